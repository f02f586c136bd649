//! The HTTP endpoints. Every client error is a 4xx with a JSON body `{"error": "…"}`; nothing a
//! client sends reaches a file outside the gallery or panics the server.

use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::multipart::MultipartRejection;
use axum::extract::rejection::QueryRejection;
use axum::extract::{DefaultBodyLimit, Multipart, Path as UrlPath, Query as UrlQuery, State};
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use super::{App, Limits};
use crate::index::{Query, QueryImage};

const PAGE: &str = include_str!("page.html");

/// A JSON error response.
pub struct ApiError(StatusCode, String);

impl ApiError {
    fn bad(msg: impl Into<String>) -> Self {
        Self(StatusCode::BAD_REQUEST, msg.into())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

pub fn router(app: Arc<App>) -> Router {
    // The multipart body carries the image plus small text fields (each checked on its own).
    let body_limit = app.limits.max_upload_bytes + 16 * 1024;
    Router::new()
        .route("/", get(page))
        .route("/healthz", get(healthz))
        .route("/gallery", get(gallery))
        .route("/images/{*name}", get(image_file))
        .route("/search", post(search))
        .fallback(|| async { ApiError(StatusCode::NOT_FOUND, "no such endpoint".into()) })
        .method_not_allowed_fallback(|| async {
            ApiError(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed here".into(),
            )
        })
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(app)
}

async fn page() -> Html<&'static str> {
    Html(PAGE)
}

async fn healthz(State(app): State<Arc<App>>) -> Json<serde_json::Value> {
    let s = app.batcher.stats();
    Json(json!({
        "status": "ok",
        "images": app.searcher.index().len(),
        "queries": s.queries.load(Ordering::Relaxed),
        "batches": s.batches.load(Ordering::Relaxed),
        "largest_batch": s.largest_batch.load(Ordering::Relaxed),
        "limits": app.limits,
    }))
}

#[derive(Deserialize)]
struct Page {
    offset: Option<usize>,
    limit: Option<usize>,
}

/// Gallery names, a page at a time (for the web page's picker).
async fn gallery(
    State(app): State<Arc<App>>,
    q: Result<UrlQuery<Page>, QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let UrlQuery(p) = q.map_err(|e| ApiError::bad(format!("bad query string: {e}")))?;
    let images = app.searcher.index().images();
    let limit = p.limit.unwrap_or(24);
    if limit > app.limits.max_gallery_page {
        return Err(ApiError::bad(format!(
            "limit must be at most {}",
            app.limits.max_gallery_page
        )));
    }
    let start = p.offset.unwrap_or(0).min(images.len());
    let end = start.saturating_add(limit).min(images.len());
    let names: Vec<&str> = images[start..end].iter().map(|g| g.name.as_str()).collect();
    Ok(Json(json!({ "total": images.len(), "names": names })))
}

/// A gallery image's file, by gallery name only: the path comes from the index, never from
/// the request, and must resolve inside the image root.
async fn image_file(
    State(app): State<Arc<App>>,
    UrlPath(name): UrlPath<String>,
) -> Result<Response, ApiError> {
    let not_found = || {
        ApiError(
            StatusCode::NOT_FOUND,
            format!("no gallery image named '{name}'"),
        )
    };
    let i = app.searcher.index().position(&name).ok_or_else(not_found)?;
    let root = app.image_root.as_ref().ok_or_else(|| {
        ApiError(
            StatusCode::NOT_FOUND,
            "this server has no image directory".into(),
        )
    })?;
    let rel = PathBuf::from(&app.searcher.index().images()[i].path);
    let path = tokio::fs::canonicalize(root.join(&rel))
        .await
        .map_err(|_| not_found())?;
    if !path.starts_with(root) {
        return Err(not_found());
    }
    let bytes = tokio::fs::read(&path).await.map_err(|_| not_found())?;
    let mime = match path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
    {
        Some(e) if e == "png" => "image/png",
        Some(e) if e == "jpg" || e == "jpeg" => "image/jpeg",
        _ => "application/octet-stream",
    };
    Ok((
        [
            (header::CONTENT_TYPE, mime),
            (header::CACHE_CONTROL, "public, max-age=3600"),
        ],
        Body::from(bytes),
    )
        .into_response())
}

/// The fields of a `POST /search` form, as received.
#[derive(Default)]
struct SearchForm {
    image: Option<Vec<u8>>,
    reference: Option<String>,
    text: Option<String>,
    k: Option<String>,
}

async fn read_form(
    mp: Result<Multipart, MultipartRejection>,
    max_upload: usize,
) -> Result<SearchForm, ApiError> {
    let mut mp = mp.map_err(|e| ApiError(e.status(), e.body_text()))?;
    let mut form = SearchForm::default();
    let field_err = |e: axum::extract::multipart::MultipartError| {
        let status = e.status();
        let msg = if status == StatusCode::PAYLOAD_TOO_LARGE {
            "upload too large".to_string()
        } else {
            e.body_text()
        };
        ApiError(status, msg)
    };
    while let Some(field) = mp.next_field().await.map_err(field_err)? {
        let name = field.name().unwrap_or("").to_string();
        let dup = || ApiError::bad(format!("field '{name}' given twice"));
        match name.as_str() {
            "image" => {
                let mut field = field;
                let mut buf = Vec::new();
                while let Some(chunk) = field.chunk().await.map_err(field_err)? {
                    if buf.len() + chunk.len() > max_upload {
                        return Err(ApiError(
                            StatusCode::PAYLOAD_TOO_LARGE,
                            format!("upload too large (at most {max_upload} bytes)"),
                        ));
                    }
                    buf.extend_from_slice(&chunk);
                }
                if form.image.replace(buf).is_some() {
                    return Err(dup());
                }
            }
            "reference" | "text" | "k" => {
                let t = field.text().await.map_err(field_err)?;
                let slot = match name.as_str() {
                    "reference" => &mut form.reference,
                    "text" => &mut form.text,
                    _ => &mut form.k,
                };
                if slot.replace(t).is_some() {
                    return Err(dup());
                }
            }
            other => return Err(ApiError::bad(format!("unknown field '{other}'"))),
        }
    }
    Ok(form)
}

async fn search(
    State(app): State<Arc<App>>,
    mp: Result<Multipart, MultipartRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let form = read_form(mp, app.limits.max_upload_bytes).await?;
    let limits = &app.limits;
    let text = form
        .text
        .ok_or_else(|| ApiError::bad("missing field 'text'"))?;
    if text.chars().count() > limits.max_text_chars {
        return Err(ApiError::bad(format!(
            "text longer than {} characters",
            limits.max_text_chars
        )));
    }
    let k = match form.k.as_deref().map(str::trim) {
        None | Some("") => limits.default_k.min(limits.max_k),
        Some(s) => s
            .parse::<usize>()
            .map_err(|_| ApiError::bad(format!("k must be a whole number, got '{s}'")))?,
    };
    if k == 0 || k > limits.max_k {
        return Err(ApiError::bad(format!(
            "k must be between 1 and {}",
            limits.max_k
        )));
    }
    let image = match (form.image, form.reference) {
        (Some(_), Some(_)) => {
            return Err(ApiError::bad(
                "give either 'image' or 'reference', not both",
            ))
        }
        (None, None) => return Err(ApiError::bad("missing field 'image' or 'reference'")),
        (None, Some(r)) => {
            let i = app.searcher.index().position(&r).ok_or_else(|| {
                ApiError(
                    StatusCode::NOT_FOUND,
                    format!("no gallery image named '{r}'"),
                )
            })?;
            QueryImage::Reference(i)
        }
        (Some(bytes), None) => {
            let app2 = app.clone();
            let pixels = tokio::task::spawn_blocking(move || decode_upload(&app2, &bytes))
                .await
                .map_err(|_| {
                    ApiError(StatusCode::INTERNAL_SERVER_ERROR, "decoder failed".into())
                })??;
            QueryImage::Pixels(pixels)
        }
    };
    let rx = app.batcher.submit(Query { image, text, k }).map_err(|_| {
        ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many queries waiting; try again".into(),
        )
    })?;
    let results = rx
        .await
        .map_err(|_| {
            ApiError(
                StatusCode::INTERNAL_SERVER_ERROR,
                "search worker stopped".into(),
            )
        })?
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e))?;
    Ok(Json(json!({ "results": results })))
}

/// Checks an upload's format and dimensions (from its header, before decoding), then
/// preprocesses it for the model.
fn decode_upload(app: &App, bytes: &[u8]) -> Result<candle_core::Tensor, ApiError> {
    let l: &Limits = &app.limits;
    if bytes.is_empty() {
        return Err(ApiError::bad("the uploaded image is empty"));
    }
    let reader = || {
        image::ImageReader::new(Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|_| ApiError::bad("unreadable image"))
    };
    if reader()?.format().is_none() {
        return Err(ApiError(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported image format (PNG or JPEG expected)".into(),
        ));
    }
    let (w, h) = reader()?
        .into_dimensions()
        .map_err(|e| ApiError::bad(format!("could not read the image header: {e}")))?;
    if w == 0 || h == 0 || w > l.max_image_side || h > l.max_image_side {
        return Err(ApiError::bad(format!(
            "image is {w}×{h}; each side must be between 1 and {} pixels",
            l.max_image_side
        )));
    }
    // The dimensions are bounded now, so decoding cannot allocate without bound.
    app.searcher
        .encoder()
        .preprocess(bytes)
        .map_err(|e| ApiError::bad(format!("could not decode the image: {e:#}")))
}

/// The image directory, resolved once so that served paths can be checked against it.
pub fn resolve_root(root: &Path) -> anyhow::Result<PathBuf> {
    use anyhow::Context;
    std::fs::canonicalize(root).with_context(|| format!("image directory {}", root.display()))
}

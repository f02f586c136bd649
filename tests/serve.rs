//! The search service over a real loopback socket: every endpoint and every error case.

mod gallery;
mod http_client;

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::Duration;

use http_client::{multipart, Part};
use slot4acir::index::build::list_image_dir;
use slot4acir::index::format::Dtype;
use slot4acir::index::{build_index, BuildOptions, Index, Query, QueryImage, Searcher, ToyEncoder};
use slot4acir::serve::{App, BatchOptions, Limits, Server};

struct Fixture {
    _tmp: tempfile::TempDir,
    server: Server,
    dir: std::path::PathBuf,
    searcher: Searcher,
    names: Vec<String>,
}

fn start() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let dir = gallery::write_gallery(tmp.path(), 12);
    let images = list_image_dir(&dir).unwrap();
    let enc = Arc::new(ToyEncoder::new(9, 12, gallery::LAYOUT).unwrap());
    let out = tmp.path().join("g.s4idx");
    let opts = BuildOptions {
        dtype: Dtype::F16,
        batch_size: 5,
        progress: false,
    };
    build_index(enc.as_ref(), &images, &dir, &out, &opts).unwrap();
    let limits = Limits {
        max_upload_bytes: 20_000,
        max_image_side: 64,
        max_text_chars: 40,
        max_k: 8,
        default_k: 5,
        max_gallery_page: 10,
    };
    let batch = BatchOptions {
        max_batch: 16,
        max_wait: Duration::from_millis(20),
        queue: 64,
    };
    let searcher = Searcher::new(Index::open(&out).unwrap(), enc.clone()).unwrap();
    let app = App::new(searcher, None, limits, &batch).unwrap();
    let server = Server::start(app, "127.0.0.1:0").unwrap();
    let searcher = Searcher::new(Index::open(&out).unwrap(), enc).unwrap();
    Fixture {
        _tmp: tmp,
        server,
        dir,
        searcher,
        names: images.into_iter().map(|g| g.name).collect(),
    }
}

fn png(w: u32, h: u32, seed: u8) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([
            (x as u8).wrapping_mul(seed),
            (y as u8).wrapping_add(seed),
            seed,
        ])
    });
    let mut out = Vec::new();
    image::DynamicImage::ImageRgb8(img)
        .write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
        .unwrap();
    out
}

/// Asserts a JSON error with this status and a message containing `needle`.
fn assert_error(resp: (u16, String, String), status: u16, needle: &str) {
    let (got, ctype, body) = resp;
    assert_eq!(got, status, "body: {body}");
    assert!(
        ctype.starts_with("application/json"),
        "content-type {ctype} for {body}"
    );
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let msg = v["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error field in {body}"));
    assert!(msg.contains(needle), "'{msg}' does not mention '{needle}'");
}

fn results(body: &str) -> Vec<(String, f32)> {
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    v["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["name"].as_str().unwrap().to_string(),
                r["score"].as_f64().unwrap() as f32,
            )
        })
        .collect()
}

#[test]
fn every_endpoint_answers_a_real_http_client() {
    let f = start();
    let c = http_client::Client::new(f.server.addr);

    let (s, _, body) = c.get("/healthz");
    assert_eq!(s, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (v["status"].as_str(), v["images"].as_u64()),
        (Some("ok"), Some(12))
    );

    let (s, ctype, body) = c.get("/");
    assert_eq!(s, 200);
    assert!(ctype.starts_with("text/html") && body.contains("id=\"results\""));

    let (s, _, body) = c.get("/gallery?offset=2&limit=3");
    assert_eq!(s, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["total"], 12);
    assert_eq!(v["names"], serde_json::json!(f.names[2..5]));

    // Gallery files by name, including one in a subfolder.
    for name in [
        &f.names[0],
        f.names.iter().find(|n| n.starts_with("sub/")).unwrap(),
    ] {
        let (s, ctype, bytes) = c.get_bytes(&format!("/images/{name}"));
        assert_eq!(s, 200, "{name}");
        let file = list_image_dir(&f.dir)
            .unwrap()
            .into_iter()
            .find(|g| &g.name == name)
            .unwrap();
        assert_eq!(bytes, std::fs::read(f.dir.join(file.path)).unwrap());
        assert!(ctype.starts_with("image/"));
    }

    // Search by reference equals the in-process searcher (which leaves the reference out).
    let reference = f.names[4].clone();
    let (ct, body) = multipart(&[
        ("reference", Part::Text(&reference)),
        ("text", Part::Text("make it brighter")),
        ("k", Part::Text("4")),
    ]);
    let (s, _, out) = c.post("/search", &ct, &body);
    assert_eq!(s, 200, "{out}");
    let got = results(&out);
    let want = f
        .searcher
        .search(&[Query {
            image: QueryImage::Reference(4),
            text: "make it brighter".into(),
            k: 4,
        }])
        .unwrap()
        .remove(0);
    assert_eq!(got.len(), 4);
    for ((gn, gs), w) in got.iter().zip(&want) {
        assert_eq!(gn, &w.name);
        assert!((gs - w.score).abs() < 1e-5);
        assert_ne!(gn, &reference);
    }
    assert!(got.windows(2).all(|p| p[0].1 >= p[1].1), "best first");

    // Search by upload, default k.
    let upload = png(30, 20, 3);
    let (ct, body) = multipart(&[
        ("image", Part::File("q.png", &upload)),
        ("text", Part::Text("red")),
    ]);
    let (s, _, out) = c.post("/search", &ct, &body);
    assert_eq!(s, 200, "{out}");
    let got = results(&out);
    let pixels = f.searcher.encoder().preprocess(&upload).unwrap();
    let want = f
        .searcher
        .search(&[Query {
            image: QueryImage::Pixels(pixels),
            text: "red".into(),
            k: 5,
        }])
        .unwrap()
        .remove(0);
    assert_eq!(
        got.iter().map(|g| g.0.clone()).collect::<Vec<_>>(),
        want.iter().map(|w| w.name.clone()).collect::<Vec<_>>()
    );
}

#[test]
fn every_client_error_is_a_json_4xx_and_the_server_survives() {
    let f = start();
    let c = http_client::Client::new(f.server.addr);
    let r = f.names[0].as_str();
    let post = |fields: &[(&str, Part)]| {
        let (ct, body) = multipart(fields);
        c.post("/search", &ct, &body)
    };
    use Part::{File, Text};
    assert_error(post(&[("reference", Text(r))]), 400, "missing field 'text'");
    assert_error(
        post(&[("text", Text("x"))]),
        400,
        "missing field 'image' or 'reference'",
    );
    assert_error(
        post(&[
            ("reference", Text(r)),
            ("image", File("a.png", &png(8, 8, 1))),
            ("text", Text("x")),
        ]),
        400,
        "not both",
    );
    assert_error(
        post(&[("reference", Text("nope")), ("text", Text("x"))]),
        404,
        "no gallery image",
    );
    assert_error(
        post(&[
            ("reference", Text(r)),
            ("text", Text("x")),
            ("k", Text("0")),
        ]),
        400,
        "between 1 and 8",
    );
    assert_error(
        post(&[
            ("reference", Text(r)),
            ("text", Text("x")),
            ("k", Text("9")),
        ]),
        400,
        "between 1 and 8",
    );
    assert_error(
        post(&[
            ("reference", Text(r)),
            ("text", Text("x")),
            ("k", Text("-1")),
        ]),
        400,
        "whole number",
    );
    assert_error(
        post(&[
            ("reference", Text(r)),
            ("text", Text("x")),
            ("k", Text("1e99")),
        ]),
        400,
        "whole number",
    );
    let long = "word ".repeat(9);
    assert_error(
        post(&[("reference", Text(r)), ("text", Text(&long))]),
        400,
        "longer than 40",
    );
    assert_error(
        post(&[
            ("reference", Text(r)),
            ("text", Text("x")),
            ("colour", Text("red")),
        ]),
        400,
        "unknown field",
    );
    assert_error(
        post(&[
            ("reference", Text(r)),
            ("text", Text("x")),
            ("text", Text("y")),
        ]),
        400,
        "given twice",
    );
    let big = vec![7u8; 30_000];
    assert_error(
        post(&[("image", File("big.png", &big)), ("text", Text("x"))]),
        413,
        "too large",
    );
    let huge = "x".repeat(40_000);
    assert_error(
        post(&[("reference", Text(r)), ("text", Text(&huge))]),
        413,
        "too large",
    );
    assert_error(
        post(&[
            ("image", File("wide.png", &png(65, 10, 2))),
            ("text", Text("x")),
        ]),
        400,
        "65×10",
    );
    assert_error(
        post(&[("image", File("e.png", b"")), ("text", Text("x"))]),
        400,
        "empty",
    );
    assert_error(
        post(&[
            ("image", File("t.txt", b"hello, not an image")),
            ("text", Text("x")),
        ]),
        415,
        "unsupported",
    );
    let mut cut = png(20, 20, 5);
    cut.truncate(60);
    assert_error(
        post(&[("image", File("cut.png", &cut)), ("text", Text("x"))]),
        400,
        "image",
    );
    // Not multipart at all, or broken multipart.
    assert_error(
        c.post("/search", "application/json", b"{\"text\": \"x\"}"),
        400,
        "",
    );
    assert_error(
        c.post(
            "/search",
            "multipart/form-data; boundary=zz",
            b"--zz\r\ngarbage",
        ),
        400,
        "",
    );
    assert_error(c.get("/search"), 405, "method");
    assert_error(c.get("/nowhere"), 404, "no such endpoint");
    assert_error(c.get("/gallery?limit=11"), 400, "at most 10");
    assert_error(c.get("/gallery?offset=minus"), 400, "query string");
    assert_error(c.get("/images/not-there"), 404, "no gallery image");
    // Path traversal, raw and encoded, never leaves the gallery.
    for path in [
        "/images/../../../../etc/passwd",
        "/images/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
        "/images/..%2f..%2f..%2fetc%2fpasswd",
        "/images/%2Fetc%2Fpasswd",
        "/images//etc/passwd",
    ] {
        let raw = raw_get(f.server.addr, path);
        assert!(
            raw.starts_with("HTTP/1.1 404") || raw.starts_with("HTTP/1.1 400"),
            "{path}: {raw}"
        );
        assert!(!raw.contains("root:"), "{path} leaked a file");
    }
    let (s, _, _) = c.get("/healthz");
    assert_eq!(s, 200, "the server is still up");
}

#[test]
fn concurrent_queries_are_batched_and_all_answered() {
    let f = start();
    let addr = f.server.addr;
    let names = Arc::new(f.names.clone());
    let threads: Vec<_> = (0..12)
        .map(|t| {
            let names = names.clone();
            std::thread::spawn(move || {
                let c = http_client::Client::new(addr);
                for i in 0..4 {
                    let (ct, body) = multipart(&[
                        ("reference", Part::Text(&names[(t + i) % names.len()])),
                        ("text", Part::Text("more sky")),
                        ("k", Part::Text("3")),
                    ]);
                    let (s, _, out) = c.post("/search", &ct, &body);
                    assert_eq!(s, 200, "{out}");
                    assert_eq!(results(&out).len(), 3);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let c = http_client::Client::new(addr);
    let v: serde_json::Value = serde_json::from_str(&c.get("/healthz").2).unwrap();
    assert_eq!(v["queries"], 48);
    assert!(
        v["largest_batch"].as_u64().unwrap() > 1,
        "no batching happened: {v}"
    );
    assert!(v["batches"].as_u64().unwrap() < 48);
}

fn raw_get(addr: std::net::SocketAddr, path: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

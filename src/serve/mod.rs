//! The search service: `POST /search`, `GET /images/{name}`, `GET /gallery`, `GET /healthz`
//! and a web page at `/`, over an index and the light model (axum on tokio).

pub mod batcher;
pub mod http;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use serde::Serialize;
use tokio::sync::oneshot;

use crate::index::Searcher;
pub use batcher::{BatchStats, Batcher};

/// What a client may send.
#[derive(Debug, Clone, Serialize)]
pub struct Limits {
    pub max_upload_bytes: usize,
    pub max_image_side: u32,
    pub max_text_chars: usize,
    pub max_k: usize,
    pub default_k: usize,
    pub max_gallery_page: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_upload_bytes: 10 * 1024 * 1024,
            max_image_side: 8192,
            max_text_chars: 1000,
            max_k: 100,
            default_k: 10,
            max_gallery_page: 1000,
        }
    }
}

/// How queries are batched.
#[derive(Debug, Clone)]
pub struct BatchOptions {
    pub max_batch: usize,
    pub max_wait: Duration,
    pub queue: usize,
}

impl Default for BatchOptions {
    fn default() -> Self {
        Self {
            max_batch: 32,
            max_wait: Duration::from_millis(2),
            queue: 1024,
        }
    }
}

/// The service's shared state.
pub struct App {
    pub searcher: Arc<Searcher>,
    pub batcher: Batcher,
    pub limits: Limits,
    /// Canonical image directory (`None`: `GET /images` answers 404).
    pub image_root: Option<PathBuf>,
}

impl App {
    /// `image_root` overrides the directory recorded in the index.
    pub fn new(
        searcher: Searcher,
        image_root: Option<&Path>,
        limits: Limits,
        batch: &BatchOptions,
    ) -> Result<Self> {
        let root = match image_root {
            Some(p) => Some(http::resolve_root(p)?),
            None => match &searcher.index().header().image_root {
                Some(p) => http::resolve_root(Path::new(p)).ok(),
                None => None,
            },
        };
        let searcher = Arc::new(searcher);
        let batcher = Batcher::start(
            searcher.clone(),
            batch.max_batch,
            batch.max_wait,
            batch.queue,
        );
        Ok(Self {
            searcher,
            batcher,
            limits,
            image_root: root,
        })
    }
}

/// A server running on its own thread (with its own tokio runtime); stops when dropped.
pub struct Server {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    /// Binds `addr` (port 0 picks a free port) and starts serving.
    pub fn start(app: App, addr: &str) -> Result<Self> {
        let listener =
            std::net::TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
        listener.set_nonblocking(true)?;
        let local = listener.local_addr()?;
        let (stop, stopped) = oneshot::channel::<()>();
        let router = http::router(Arc::new(app));
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .worker_threads(2)
            .thread_name("serve")
            .build()
            .context("starting the tokio runtime")?;
        let thread = std::thread::Builder::new()
            .name("serve-main".into())
            .spawn(move || {
                rt.block_on(async move {
                    let listener = match tokio::net::TcpListener::from_std(listener) {
                        Ok(l) => l,
                        Err(e) => {
                            tracing::error!("listener: {e}");
                            return;
                        }
                    };
                    // Not graceful: open keep-alive connections must not hold up a stop.
                    tokio::select! {
                        served = axum::serve(listener, router) => {
                            if let Err(e) = served {
                                tracing::error!("server stopped: {e}");
                            }
                        }
                        _ = stopped => {}
                    }
                });
                rt.shutdown_timeout(Duration::from_secs(1));
            })?;
        Ok(Self {
            addr: local,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Blocks until the server stops (it only stops when dropped from another thread or on
    /// a fatal error).
    pub fn wait(mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

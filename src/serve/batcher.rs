//! Query batching under load: requests arriving within a short window go through the model
//! and the gallery scan together (one light-model call, one pass over the vectors).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::index::{Found, Query, Searcher};

/// Counters shown by `GET /healthz`.
#[derive(Debug, Default)]
pub struct BatchStats {
    pub queries: AtomicUsize,
    pub batches: AtomicUsize,
    pub largest_batch: AtomicUsize,
}

type Reply = Result<Vec<Found>, String>;

struct Job {
    query: Query,
    reply: oneshot::Sender<Reply>,
}

/// The queue is full: the caller should answer 503.
#[derive(Debug)]
pub struct Busy;

/// A worker thread that collects up to `max_batch` queries, waiting at most `max_wait` after
/// the first one, and answers them with one [`Searcher::search`] call. Stops when dropped.
pub struct Batcher {
    tx: SyncSender<Job>,
    stats: Arc<BatchStats>,
}

impl Batcher {
    pub fn start(
        searcher: Arc<Searcher>,
        max_batch: usize,
        max_wait: Duration,
        queue: usize,
    ) -> Self {
        let (tx, rx) = sync_channel::<Job>(queue.max(1));
        let stats = Arc::new(BatchStats::default());
        let st = stats.clone();
        let max_batch = max_batch.max(1);
        std::thread::Builder::new()
            .name("query-batcher".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let deadline = Instant::now() + max_wait;
                    let mut jobs = vec![first];
                    while jobs.len() < max_batch {
                        let left = deadline.saturating_duration_since(Instant::now());
                        match rx.recv_timeout(left) {
                            Ok(j) => jobs.push(j),
                            Err(RecvTimeoutError::Timeout) => break,
                            Err(RecvTimeoutError::Disconnected) => break,
                        }
                    }
                    st.batches.fetch_add(1, Ordering::Relaxed);
                    st.queries.fetch_add(jobs.len(), Ordering::Relaxed);
                    st.largest_batch.fetch_max(jobs.len(), Ordering::Relaxed);
                    let queries: Vec<Query> = jobs.iter().map(|j| j.query.clone()).collect();
                    let results = catch_unwind(AssertUnwindSafe(|| searcher.search(&queries)));
                    match results {
                        Ok(Ok(results)) => {
                            for (job, r) in jobs.into_iter().zip(results) {
                                let _ = job.reply.send(Ok(r));
                            }
                        }
                        Ok(Err(e)) => {
                            let msg = format!("{e:#}");
                            for job in jobs {
                                let _ = job.reply.send(Err(msg.clone()));
                            }
                        }
                        Err(_) => {
                            for job in jobs {
                                let _ = job.reply.send(Err("internal error in the search".into()));
                            }
                        }
                    }
                }
            })
            .expect("spawning the query batcher thread");
        Self { tx, stats }
    }

    /// Queues a query; the receiver gets its results.
    pub fn submit(&self, query: Query) -> Result<oneshot::Receiver<Reply>, Busy> {
        let (reply, rx) = oneshot::channel();
        match self.tx.try_send(Job { query, reply }) {
            Ok(()) => Ok(rx),
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => Err(Busy),
        }
    }

    pub fn stats(&self) -> &BatchStats {
        &self.stats
    }
}

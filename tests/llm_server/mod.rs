//! A scripted chat-completions server on loopback for the `llm-augment` tests. It answers like
//! `/v1/chat/completions`; the first attempts for a caption hit a fault chosen by a hash of the
//! caption (429, 500/503, malformed JSON, wrong count, preamble, a slow answer, a copy), later
//! attempts get the good answer, which depends only on the caption so runs are comparable.
#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// The test prompt template: the server reads the caption and count back from it.
pub const TEMPLATE: &str =
    "# test template\nYou paraphrase.\n---\nCAPTION<<{caption}>> COUNT<<{n}>>\n";

/// What the server did with one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reply {
    Good,
    TooMany429,
    Error500,
    Error503,
    Malformed,
    WrongCount,
    Preamble,
    Slow,
    Copy,
    Empty,
    Unauthorized,
    Poisoned,
}

/// The fault script: which reply attempt `attempt` (1-based) of a caption gets.
pub fn scripted(caption: &str, attempt: u32) -> Reply {
    let faults: &[Reply] = match fnv(caption) % 10 {
        3 => &[Reply::TooMany429],
        4 => &[Reply::Error500, Reply::Error503],
        5 => &[Reply::Malformed],
        6 => &[Reply::WrongCount],
        7 => &[Reply::Preamble],
        8 => &[Reply::Slow],
        9 => &[Reply::Copy, Reply::Empty],
        _ => &[],
    };
    faults
        .get(attempt as usize - 1)
        .copied()
        .unwrap_or(Reply::Good)
}

/// The accepted answer for `caption`: `n` paraphrases that depend on the caption alone.
pub fn good(caption: &str, n: usize) -> Vec<String> {
    const FORMS: [&str; 4] = [
        "the target image should {}",
        "make it so that {}",
        "change it: {}",
        "edited so it {}",
    ];
    (0..n)
        .map(|k| FORMS[k % 4].replace("{}", caption) + &" again".repeat(k / 4))
        .collect()
}

fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf29ce484222325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100000001b3)
    })
}

#[derive(Default)]
struct State {
    attempts: HashMap<String, u32>,
    log: Vec<(String, Reply)>,
    poisoned: HashSet<String>,
}

pub struct Server {
    pub url: String,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Server {
    /// Starts on 127.0.0.1 with an ephemeral port. `delay`: time before every answer;
    /// `slow`: how long a slow answer takes; `key`: the Bearer token required, if any.
    pub fn start(delay: Duration, slow: Duration, key: Option<&str>) -> Self {
        let http = Arc::new(tiny_http::Server::http("127.0.0.1:0").expect("bind loopback"));
        let port = http.server_addr().to_ip().expect("an IP address").port();
        let state = Arc::new(Mutex::new(State::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let key = key.map(|k| format!("Bearer {k}"));
        let threads = (0..8)
            .map(|_| {
                let (http, state, stop, key) =
                    (http.clone(), state.clone(), stop.clone(), key.clone());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        if let Ok(Some(req)) = http.recv_timeout(Duration::from_millis(50)) {
                            handle(req, &state, delay, slow, key.as_deref());
                        }
                    }
                })
            })
            .collect();
        Self {
            url: format!("http://127.0.0.1:{port}/v1"),
            state,
            stop,
            threads,
        }
    }

    /// Every request so far: the caption asked and the reply given, in arrival order.
    pub fn log(&self) -> Vec<(String, Reply)> {
        self.state.lock().unwrap().log.clone()
    }

    /// Captions that get HTTP 500 on every attempt while poisoned.
    pub fn set_poisoned(&self, captions: &[String]) {
        self.state.lock().unwrap().poisoned = captions.iter().cloned().collect();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn between<'a>(text: &'a str, open: &str) -> Option<&'a str> {
    let start = text.find(open)? + open.len();
    let len = text[start..].find(">>")?;
    Some(&text[start..start + len])
}

/// The caption and count of a well-formed request for the test template.
fn parse_request(url: &str, body: &str) -> Option<(String, usize)> {
    let v: serde_json::Value = serde_json::from_str(body).ok()?;
    let user = v["messages"]
        .as_array()?
        .iter()
        .find(|m| m["role"] == "user")?["content"]
        .as_str()?;
    let n = between(user, "COUNT<<")?.parse().ok()?;
    (url == "/v1/chat/completions" && v["model"] == "test-model").then(|| {
        (
            between(user, "CAPTION<<").unwrap_or_default().to_string(),
            n,
        )
    })
}

fn handle(
    mut req: tiny_http::Request,
    state: &Mutex<State>,
    delay: Duration,
    slow: Duration,
    key: Option<&str>,
) {
    let mut body = String::new();
    let _ = req.as_reader().read_to_string(&mut body);
    let authorized = key.is_none_or(|k| {
        req.headers()
            .iter()
            .any(|h| h.field.equiv("Authorization") && h.value.as_str() == k)
    });
    let Some((caption, n)) = parse_request(req.url(), &body) else {
        let bad = tiny_http::Response::from_string("unexpected request").with_status_code(400);
        let _ = req.respond(bad);
        return;
    };
    let reply = {
        let mut s = state.lock().unwrap();
        let reply = if !authorized {
            Reply::Unauthorized
        } else if s.poisoned.contains(&caption) {
            Reply::Poisoned
        } else {
            let attempt = s.attempts.entry(caption.clone()).or_insert(0);
            *attempt += 1;
            scripted(&caption, *attempt)
        };
        s.log.push((caption.clone(), reply));
        reply
    };
    std::thread::sleep(if reply == Reply::Slow { slow } else { delay });
    let mut items = good(&caption, n);
    let (status, content) = match reply {
        Reply::Good => (200, Some(serde_json::to_string(&items).unwrap())),
        Reply::TooMany429 => (429, None),
        Reply::Error500 | Reply::Poisoned => (500, None),
        Reply::Error503 => (503, None),
        Reply::Unauthorized => (401, None),
        Reply::Malformed => {
            let r = tiny_http::Response::from_string("{\"choices\": [{\"message\": ");
            let _ = req.respond(r.with_status_code(200));
            return;
        }
        Reply::WrongCount => {
            items.push("one more".into());
            (200, Some(serde_json::to_string(&items).unwrap()))
        }
        Reply::Preamble => {
            let array = serde_json::to_string(&items).unwrap();
            (
                200,
                Some(format!("Sure! Here are {n} paraphrases:\n{array}")),
            )
        }
        Reply::Slow => (200, Some(serde_json::to_string(&items).unwrap())),
        Reply::Copy => {
            items[0] = caption.to_uppercase();
            (200, Some(serde_json::to_string(&items).unwrap()))
        }
        Reply::Empty => {
            items[n - 1] = " ".into();
            (200, Some(serde_json::to_string(&items).unwrap()))
        }
    };
    let text = match content {
        Some(c) => serde_json::json!({
            "id": "chatcmpl-test", "object": "chat.completion",
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": c}}]
        })
        .to_string(),
        None => format!("{{\"error\": {{\"message\": \"scripted {reply:?}\"}}}}"),
    };
    let mut resp = tiny_http::Response::from_string(text).with_status_code(status);
    if reply == Reply::TooMany429 {
        resp = resp.with_header(tiny_http::Header::from_bytes("Retry-After", "0").unwrap());
    }
    let _ = req.respond(resp);
}

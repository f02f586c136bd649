//! One chat-completions request to an OpenAI-compatible endpoint (llama.cpp, vLLM, Ollama or a
//! hosted API), and the classification of what went wrong so the caller knows whether to retry,
//! give up on this caption, or stop the run.

use std::time::Duration;

use rand::Rng;
use serde::Serialize;

use super::prompt::Message;

/// Where and how to ask.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Base URL of the API (`http://127.0.0.1:8080/v1`) or the full `/chat/completions` URL.
    pub endpoint: String,
    pub model: String,
    /// Sent as `Authorization: Bearer …` when set.
    pub api_key: Option<String>,
    /// Limit for one whole request, answer included.
    pub timeout: Duration,
    pub temperature: f64,
    pub max_tokens: Option<u32>,
}

/// How often to try again: transport faults and 429/5xx are retried with exponential backoff,
/// unusable answers are re-asked in the same conversation.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    pub retries: u32,
    pub reasks: u32,
    pub backoff: Duration,
    pub max_backoff: Duration,
}

impl RetryPolicy {
    /// The wait before retry number `attempt` (1-based): the server's `Retry-After` when it sent
    /// one, else `backoff · 2^(attempt−1)` with jitter in [½, 1]; never over `max_backoff`.
    pub fn delay(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        let wait = retry_after.unwrap_or_else(|| {
            let exp = self
                .backoff
                .saturating_mul(1u32 << attempt.saturating_sub(1).min(20));
            exp.mul_f64(rand::thread_rng().gen_range(0.5..=1.0))
        });
        wait.min(self.max_backoff)
    }
}

/// Why a request brought no answer.
#[derive(Debug, Clone, PartialEq)]
pub enum CallError {
    /// A passing fault (timeout, connection, 429, 5xx, malformed body): try again later.
    Retryable {
        reason: String,
        retry_after: Option<Duration>,
    },
    /// The server refuses this request (a 4xx about its content): this caption fails.
    Rejected(String),
    /// The setup is wrong (bad key, unknown URL or model): no request can succeed.
    Fatal(String),
}

#[derive(Serialize)]
struct ChatRequest<'a> {
    model: &'a str,
    messages: &'a [Message],
    temperature: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_tokens: Option<u32>,
    stream: bool,
}

/// A chat-completions client; cheap to share between worker threads (one connection pool).
pub struct ChatClient {
    agent: ureq::Agent,
    url: String,
    opts: ClientOptions,
}

impl ChatClient {
    pub fn new(opts: ClientOptions) -> Self {
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(opts.timeout))
            .user_agent(concat!("slot4acir/", env!("CARGO_PKG_VERSION")))
            .build();
        Self {
            agent: config.into(),
            url: chat_url(&opts.endpoint),
            opts,
        }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// Sends one request; the assistant's text on success.
    pub fn complete(&self, messages: &[Message]) -> Result<String, CallError> {
        let body = serde_json::to_vec(&ChatRequest {
            model: &self.opts.model,
            messages,
            temperature: self.opts.temperature,
            max_tokens: self.opts.max_tokens,
            stream: false,
        })
        .map_err(|e| CallError::Fatal(format!("encoding the request: {e}")))?;
        let mut req = self
            .agent
            .post(&self.url)
            .header("Content-Type", "application/json");
        if let Some(key) = &self.opts.api_key {
            req = req.header("Authorization", format!("Bearer {key}"));
        }
        let mut resp = req.send(&body[..]).map_err(transport_error)?;
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<f64>().ok())
            .filter(|s| s.is_finite() && *s >= 0.0)
            .map(Duration::from_secs_f64);
        let text = resp.body_mut().read_to_string().map_err(transport_error)?;
        if !(200..300).contains(&status) {
            return Err(status_error(
                status,
                &text,
                retry_after,
                &self.url,
                &self.opts.model,
            ));
        }
        assistant_content(&text).map_err(|reason| CallError::Retryable {
            reason: format!("malformed response ({reason}): {}", snippet(&text)),
            retry_after: None,
        })
    }
}

/// `…/chat/completions` from a base URL such as `http://host:8080/v1`.
pub fn chat_url(endpoint: &str) -> String {
    let base = endpoint.trim_end_matches('/');
    if base.ends_with("/chat/completions") {
        base.to_string()
    } else {
        format!("{base}/chat/completions")
    }
}

fn transport_error(e: ureq::Error) -> CallError {
    match e {
        ureq::Error::BadUri(_) | ureq::Error::HostNotFound | ureq::Error::Http(_) => {
            CallError::Fatal(format!("cannot reach the endpoint: {e}"))
        }
        e => CallError::Retryable {
            reason: e.to_string(),
            retry_after: None,
        },
    }
}

fn status_error(
    status: u16,
    body: &str,
    retry_after: Option<Duration>,
    url: &str,
    model: &str,
) -> CallError {
    let said = snippet(body);
    match status {
        401 | 403 => CallError::Fatal(format!(
            "{url} refused the credentials (HTTP {status}; set --api-key-env?): {said}"
        )),
        404 => CallError::Fatal(format!(
            "{url} answered HTTP 404 (wrong endpoint, or unknown model `{model}`?): {said}"
        )),
        408 | 409 | 425 | 429 | 500..=599 => CallError::Retryable {
            reason: format!("HTTP {status}: {said}"),
            retry_after,
        },
        400..=499 => CallError::Rejected(format!("HTTP {status}: {said}")),
        _ => CallError::Retryable {
            reason: format!("HTTP {status}: {said}"),
            retry_after,
        },
    }
}

/// `choices[0].message.content` of a chat-completions answer.
fn assistant_content(body: &str) -> Result<String, String> {
    let v: serde_json::Value = serde_json::from_str(body).map_err(|e| e.to_string())?;
    v.pointer("/choices/0/message/content")
        .and_then(|c| c.as_str())
        .map(str::to_string)
        .ok_or_else(|| "no choices[0].message.content".to_string())
}

/// The start of a server's text, on one line, for error messages.
fn snippet(text: &str) -> String {
    let one_line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    match one_line.char_indices().nth(200) {
        Some((at, _)) => format!("{}…", &one_line[..at]),
        None => one_line,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_url_accepts_base_or_full_url() {
        assert_eq!(chat_url("http://h:1/v1"), "http://h:1/v1/chat/completions");
        assert_eq!(chat_url("http://h:1/v1/"), "http://h:1/v1/chat/completions");
        assert_eq!(
            chat_url("http://h/v1/chat/completions"),
            "http://h/v1/chat/completions"
        );
    }

    #[test]
    fn statuses_are_classified() {
        let f = |s| status_error(s, "x", None, "u", "m");
        assert!(matches!(f(429), CallError::Retryable { .. }));
        assert!(matches!(f(503), CallError::Retryable { .. }));
        assert!(matches!(f(401), CallError::Fatal(_)));
        assert!(matches!(f(404), CallError::Fatal(_)));
        assert!(matches!(f(400), CallError::Rejected(_)));
    }

    #[test]
    fn backoff_grows_jitters_and_is_capped() {
        let p = RetryPolicy {
            retries: 5,
            reasks: 2,
            backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(500),
        };
        for attempt in 1..=3 {
            let full = 100u64 << (attempt - 1);
            let d = p.delay(attempt, None).as_millis() as u64;
            assert!((full / 2..=full).contains(&d), "attempt {attempt}: {d} ms");
        }
        assert_eq!(p.delay(10, None), Duration::from_millis(500));
        assert_eq!(
            p.delay(1, Some(Duration::from_secs(2))),
            Duration::from_millis(500)
        );
        assert_eq!(p.delay(3, Some(Duration::ZERO)), Duration::ZERO);
    }

    #[test]
    fn content_is_read_from_the_first_choice() {
        let body = r#"{"choices":[{"message":{"role":"assistant","content":"[\"a\"]"}}]}"#;
        assert_eq!(assistant_content(body).unwrap(), "[\"a\"]");
        assert!(assistant_content("{\"choices\":[]}").is_err());
        assert!(assistant_content("{not json").is_err());
    }
}

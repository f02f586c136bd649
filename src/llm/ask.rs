//! The conversation for one caption: ask, validate, retry passing faults with backoff, re-ask
//! after unusable answers, give up after the policy's limits.

use std::sync::atomic::{AtomicBool, Ordering};

use super::answer::parse_paraphrases;
use super::client::{CallError, ChatClient, RetryPolicy};
use super::prompt::{reask, Message, PromptTemplate};

/// How one caption ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Done(Vec<String>),
    /// Limits exhausted or the request refused; the last reason.
    Failed(String),
    /// The setup is wrong; the whole run must stop.
    Fatal(String),
    /// The run was stopped before this caption finished.
    Stopped,
}

/// One caption's outcome and what it cost.
#[derive(Debug, Clone)]
pub struct Asked {
    pub outcome: Outcome,
    pub requests: u32,
    /// Requests repeated after a transport fault, 429 or 5xx.
    pub retries: u32,
    /// Requests repeated after an unusable answer.
    pub reasks: u32,
}

/// Asks for `n` paraphrases of `caption` until one answer passes validation.
pub fn ask_paraphrases(
    client: &ChatClient,
    template: &PromptTemplate,
    policy: &RetryPolicy,
    caption: &str,
    n: usize,
    stop: &AtomicBool,
) -> Asked {
    let mut messages: Vec<Message> = template.messages(caption, n);
    let mut asked = Asked {
        outcome: Outcome::Stopped,
        requests: 0,
        retries: 0,
        reasks: 0,
    };
    loop {
        if stop.load(Ordering::Relaxed) {
            asked.outcome = Outcome::Stopped;
            return asked;
        }
        asked.requests += 1;
        match client.complete(&messages) {
            Ok(content) => match parse_paraphrases(&content, caption, n) {
                Ok(paraphrases) => {
                    asked.outcome = Outcome::Done(paraphrases);
                    return asked;
                }
                Err(reason) if asked.reasks < policy.reasks => {
                    tracing::debug!("re-asking for {caption:?}: {reason}");
                    asked.reasks += 1;
                    messages.push(Message::assistant(content));
                    messages.push(reask(&reason, caption, n));
                }
                Err(reason) => {
                    asked.outcome = Outcome::Failed(format!("unusable answer: {reason}"));
                    return asked;
                }
            },
            Err(CallError::Retryable {
                reason,
                retry_after,
            }) if asked.retries < policy.retries => {
                asked.retries += 1;
                let wait = policy.delay(asked.retries, retry_after);
                tracing::debug!(
                    "retry {} for {caption:?} in {wait:?}: {reason}",
                    asked.retries
                );
                std::thread::sleep(wait);
            }
            Err(CallError::Retryable { reason, .. }) => {
                asked.outcome = Outcome::Failed(format!("gave up after retries: {reason}"));
                return asked;
            }
            Err(CallError::Rejected(reason)) => {
                asked.outcome = Outcome::Failed(format!("request refused: {reason}"));
                return asked;
            }
            Err(CallError::Fatal(reason)) => {
                asked.outcome = Outcome::Fatal(reason);
                return asked;
            }
        }
    }
}

//! The LLM sampler's caption files (SPEC section 3): paraphrases of every training caption made
//! by any OpenAI-compatible chat endpoint, written in the layout the training reader expects.
//!
//! - [`prompt`]: the editable prompt template (`assets/llm_prompt.txt`);
//! - [`client`]: one chat-completions request and its fault classes, the retry policy;
//! - [`answer`]: validation of an answer (count, non-empty, no copies, no preamble);
//! - [`ask`]: one caption's conversation: retries with backoff, re-asks;
//! - [`progress`]: the resumable progress file;
//! - [`captions`]: the caption files and the augmented layout;
//! - [`augment`]: the run over a file, with bounded concurrency and a report.

pub mod answer;
pub mod ask;
pub mod augment;
pub mod captions;
pub mod client;
pub mod progress;
pub mod prompt;

pub use augment::{AugmentOptions, Augmenter, FileReport};
pub use captions::{Dataset, FASHIONIQ_TYPES};
pub use client::{ClientOptions, RetryPolicy};
pub use prompt::PromptTemplate;

//! The text side: the caption processor every caption goes through, and the BERT WordPiece
//! tokenizer of the Q-Former.

pub mod caption;
pub mod tokenizer;

pub use caption::{process_caption, MAX_WORDS};
pub use tokenizer::Tokenizer;

//! The Q-Former's tokenizer: HF `BertTokenizer` for bert-base-uncased with BLIP-2's added
//! bos token `[DEC]`, built with the `tokenizers` crate from the committed vocabulary.

use candle_core::{Device, Result, Tensor};
use tokenizers::models::wordpiece::WordPiece;
use tokenizers::normalizers::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::AddedToken;

/// bert-base-uncased's vocabulary (30522 entries, one per line, id = line number).
const BERT_UNCASED_VOCAB: &str = include_str!("../../assets/bert-base-uncased-vocab.txt");

pub const PAD_ID: u32 = 0;
pub const CLS_ID: u32 = 101;
pub const SEP_ID: u32 = 102;
/// `[DEC]`, which BLIP-2 appends to the vocabulary as the bos token.
pub const DEC_ID: u32 = 30522;

fn err(e: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(format!("tokenizer: {e}"))
}

/// See the module documentation. Cheap to share (`&self` everywhere).
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
}

impl Tokenizer {
    /// WordPiece over the bert-base-uncased vocabulary, `BertNormalizer` (clean text, CJK
    /// spacing, lowercase and accent stripping), `BertPreTokenizer`, `[CLS] $A [SEP]`.
    pub fn bert_uncased() -> Result<Self> {
        let vocab = WordPiece::read_bytes(BERT_UNCASED_VOCAB.as_bytes()).map_err(err)?;
        let wordpiece = WordPiece::builder()
            .vocab(vocab)
            .unk_token("[UNK]".into())
            .continuing_subword_prefix("##".into())
            .max_input_chars_per_word(100)
            .build()
            .map_err(err)?;
        let template = TemplateProcessing::builder()
            .try_single("[CLS] $A [SEP]")
            .map_err(err)?
            .try_pair("[CLS] $A [SEP] $B:1 [SEP]:1")
            .map_err(err)?
            .special_tokens(vec![("[CLS]", CLS_ID), ("[SEP]", SEP_ID)])
            .build()
            .map_err(err)?;
        let mut inner = tokenizers::Tokenizer::new(wordpiece);
        inner
            .with_normalizer(Some(BertNormalizer::new(true, true, None, true)))
            .map_err(err)?
            .with_pre_tokenizer(Some(BertPreTokenizer))
            .with_post_processor(Some(template));
        // The vocabulary's own special tokens, then BLIP-2's `[DEC]` (taking the next id).
        let specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
            .map(|t| AddedToken::from(t, true));
        inner.add_special_tokens(specials).map_err(err)?;
        let tok = Self { inner };
        for (token, id) in [
            ("[PAD]", PAD_ID),
            ("[CLS]", CLS_ID),
            ("[SEP]", SEP_ID),
            ("[DEC]", DEC_ID),
        ] {
            if tok.token_id(token) != Some(id) {
                return Err(err(format!(
                    "{token} has id {:?}, not {id}",
                    tok.token_id(token)
                )));
            }
        }
        Ok(tok)
    }

    /// Vocabulary size including `[DEC]` (30523: the Q-Former's word-embedding rows).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// `[CLS] tokens… [SEP]`, untruncated.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self
            .inner
            .encode(text, true)
            .map_err(err)?
            .get_ids()
            .to_vec())
    }

    /// What BLIP-2 gets from `tokenizer(texts, padding="max_length", truncation=True,
    /// max_length=max_len)`: `input_ids` and `attention_mask`, i64 of shape (B, max_len), on
    /// the CPU. A text too long keeps its first `max_len − 2` tokens between `[CLS]` and
    /// `[SEP]`; shorter ones are padded with `[PAD]` (mask 0).
    pub fn encode_batch(&self, texts: &[String], max_len: usize) -> Result<(Tensor, Tensor)> {
        self.encode_padded(texts, max_len, false)
    }

    /// As [`Self::encode_batch`], but padded only to the longest text of the batch (at most
    /// `max_len`): the same outputs at a fraction of the cost, since the model masks padded
    /// positions out (an additive −10000 that underflows to an exact zero weight).
    pub fn encode_batch_longest(
        &self,
        texts: &[String],
        max_len: usize,
    ) -> Result<(Tensor, Tensor)> {
        self.encode_padded(texts, max_len, true)
    }

    fn encode_padded(
        &self,
        texts: &[String],
        max_len: usize,
        to_longest: bool,
    ) -> Result<(Tensor, Tensor)> {
        if max_len < 2 {
            return Err(err(format!(
                "max_len {max_len} leaves no room for [CLS] and [SEP]"
            )));
        }
        let encodings = self
            .inner
            .encode_batch(texts.iter().map(String::as_str).collect(), true)
            .map_err(err)?;
        let max_len = if to_longest {
            let longest = encodings.iter().map(|e| e.get_ids().len()).max();
            longest.unwrap_or(2).clamp(2, max_len)
        } else {
            max_len
        };
        let mut ids = vec![PAD_ID as i64; texts.len() * max_len];
        let mut mask = vec![0i64; texts.len() * max_len];
        for (row, enc) in encodings.iter().enumerate() {
            let enc = enc.get_ids();
            let n = enc.len().min(max_len);
            let out = &mut ids[row * max_len..row * max_len + n];
            for (o, &id) in out.iter_mut().zip(enc) {
                *o = id as i64;
            }
            if enc.len() > max_len {
                out[n - 1] = SEP_ID as i64;
            }
            mask[row * max_len..row * max_len + n].fill(1);
        }
        let shape = (texts.len(), max_len);
        Ok((
            Tensor::from_vec(ids, shape, &Device::Cpu)?,
            Tensor::from_vec(mask, shape, &Device::Cpu)?,
        ))
    }
}

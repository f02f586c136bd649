//! A fingerprint of a model's weights, so that an index refuses a model other than its own.

use std::collections::BTreeMap;

use candle_core::{DType, Tensor};

/// Prefixes left out of the fingerprint: the ViT is frozen (SPEC section 3), so it is the same
/// in every checkpoint of one pretraining, and hashing its ~1B parameters would slow down every
/// server start for nothing.
pub const UNFINGERPRINTED_PREFIXES: &[&str] = &["visual_encoder."];

/// BLAKE3 over every (name, dtype, shape, values) of the state dict in name order, values as
/// little-endian bytes; the first 16 bytes, in hex.
pub fn fingerprint(state_dict: &BTreeMap<String, Tensor>) -> candle_core::Result<String> {
    hash_tensors(
        state_dict
            .iter()
            .filter(|(name, _)| !UNFINGERPRINTED_PREFIXES.iter().any(|p| name.starts_with(p))),
    )
}

/// The same hash over exactly the given tensors, in the given order.
pub fn hash_tensors<'a>(
    tensors: impl IntoIterator<Item = (&'a String, &'a Tensor)>,
) -> candle_core::Result<String> {
    let mut h = blake3::Hasher::new();
    for (name, t) in tensors {
        h.update(name.as_bytes());
        h.update(&[0]);
        h.update(format!("{:?}{:?}", t.dtype(), t.dims()).as_bytes());
        let flat = t.flatten_all()?;
        match t.dtype() {
            DType::I64 => {
                for v in flat.to_vec1::<i64>()? {
                    h.update(&v.to_le_bytes());
                }
            }
            DType::U32 | DType::U8 => {
                for v in flat.to_dtype(DType::U32)?.to_vec1::<u32>()? {
                    h.update(&v.to_le_bytes());
                }
            }
            _ => {
                let v = flat.to_dtype(DType::F32)?.to_vec1::<f32>()?;
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                h.update(&bytes);
            }
        }
    }
    let hash = h.finalize();
    Ok(hash.as_bytes()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn dict(v: f32) -> BTreeMap<String, Tensor> {
        let mut d = BTreeMap::new();
        d.insert(
            "text_proj.weight".to_string(),
            Tensor::new(&[[1f32, 2.0], [3.0, v]], &Device::Cpu).unwrap(),
        );
        d.insert(
            "visual_encoder.x".to_string(),
            Tensor::new(&[v], &Device::Cpu).unwrap(),
        );
        d
    }

    #[test]
    fn changes_with_values_but_not_with_the_frozen_vit() {
        let a = fingerprint(&dict(4.0)).unwrap();
        assert_eq!(a.len(), 32);
        assert_ne!(a, fingerprint(&dict(4.5)).unwrap());
        let mut d = dict(4.0);
        d.insert(
            "visual_encoder.x".to_string(),
            Tensor::new(&[9f32], &Device::Cpu).unwrap(),
        );
        assert_eq!(a, fingerprint(&d).unwrap());
    }
}

//! Gradient accumulation over micro-batches equals the full-batch gradient of a
//! batch-contrastive loss.

use candle_core::{DType, Device, Result, Tensor, Var, D};
use candle_nn::ops::log_softmax;
use slot4acir::train::gradcache::{batch_grads, BatchContrastive, LossOutput};
use slot4acir::weights::{Mode, ParamStore};

/// Two linear towers and an InfoNCE loss with a learned temperature.
struct Towers {
    wq: Var,
    wg: Var,
    temp: Var,
}

impl BatchContrastive for Towers {
    type Chunk = (Tensor, Tensor);
    fn encode(&self, (x, y): &Self::Chunk, _seed: u64) -> Result<Vec<Tensor>> {
        let q = x.matmul(self.wq.as_tensor())?.tanh()?;
        let g = y.matmul(self.wg.as_tensor())?.tanh()?;
        Ok(vec![q, g])
    }
    fn loss(&self, reps: &[Tensor]) -> Result<LossOutput> {
        let logits = reps[0]
            .matmul(&reps[1].t()?)?
            .broadcast_div(self.temp.as_tensor())?;
        let n = logits.dim(0)?;
        let lsm = log_softmax(&logits, D::Minus1)?;
        let diag = lsm.mul(&Tensor::eye(n, DType::F32, logits.device())?)?;
        let itc = (diag.sum_all()? * (-1.0 / n as f64))?;
        Ok(LossOutput {
            total: itc.clone(),
            parts: vec![("itc", itc)],
        })
    }
}

#[test]
fn accumulated_step_equals_full_batch_step() {
    let dev = Device::Cpu;
    let x = Tensor::randn(0f32, 1.0, (12, 5), &dev).unwrap();
    let y = Tensor::randn(0f32, 1.0, (12, 7), &dev).unwrap();
    let m = Towers {
        wq: Var::randn(0f32, 0.5, (5, 4), &dev).unwrap(),
        wg: Var::randn(0f32, 0.5, (7, 4), &dev).unwrap(),
        temp: Var::from_slice(&[0.3f32], 1, &dev).unwrap(),
    };
    let vars = vec![
        ("wq".to_string(), m.wq.clone()),
        ("wg".to_string(), m.wg.clone()),
        ("temp".to_string(), m.temp.clone()),
    ];
    let store = ParamStore::random(Mode::Training);
    let (full_loss, full) =
        batch_grads(&m, &[(x.clone(), y.clone())], &[0], &vars, &store).unwrap();
    let chunks: Vec<(Tensor, Tensor)> = [(0, 5), (5, 4), (9, 3)]
        .iter()
        .map(|&(s, n)| (x.narrow(0, s, n).unwrap(), y.narrow(0, s, n).unwrap()))
        .collect();
    let (acc_loss, acc) = batch_grads(&m, &chunks, &[1, 2, 3], &vars, &store).unwrap();
    assert!(
        (full_loss[0].1 - acc_loss[0].1).abs() < 1e-6,
        "{full_loss:?} vs {acc_loss:?}"
    );
    assert_eq!(acc.len(), 3);
    for (name, v) in &vars {
        let (a, b) = (full.get(v).unwrap(), acc.get(v).unwrap());
        let num = (a - b)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .sqrt();
        let den = a
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .sqrt();
        assert!(den > 1e-4, "{name}: zero gradient");
        assert!(
            num / den < 1e-5,
            "{name}: relative difference {}",
            num / den
        );
    }
}

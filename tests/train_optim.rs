//! AdamW and OneCycle against PyTorch: the schedule fixture, and the update rule against a
//! plain f64 transcription of `torch.optim.AdamW` with a per-step beta1.

mod common;

use candle_core::{Device, Tensor, Var};
use slot4acir::train::gradcache::ParamGrads;
use slot4acir::train::optim::{AdamW, AdamWConfig, OneCycle, ScheduleKind};

fn read_onecycle() -> serde_json::Value {
    let path = common::fixture_dir("onecycle.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

fn check_setting(kind: ScheduleKind, key: &str) {
    let all = read_onecycle();
    let f = &all[key];
    let max_lr = f["max_lr"].as_f64().unwrap();
    let epochs = f["epochs"].as_u64().unwrap() as usize;
    let spe = f["steps_per_epoch"].as_u64().unwrap() as usize;
    let sched = OneCycle::for_dataset(kind, max_lr, epochs, spe);
    if let Some(p) = f["args"]["pct_start"].as_f64() {
        assert!(
            (sched.pct_start - p).abs() < 1e-15,
            "{key}: pct_start {}",
            sched.pct_start
        );
    }
    let lrs = f["lr"].as_array().unwrap();
    let betas = f["beta1"].as_array().unwrap();
    assert_eq!(lrs.len(), epochs * spe);
    assert_eq!(betas.len(), lrs.len());
    let mut worst = 0.0f64;
    for (i, (lr, b1)) in lrs.iter().zip(betas).enumerate() {
        let (lr_ref, b1_ref) = (lr.as_f64().unwrap(), b1.as_f64().unwrap());
        let (lr_got, b1_got) = sched.at(i);
        let e = ((lr_got - lr_ref).abs() / lr_ref.abs()).max((b1_got - b1_ref).abs() / b1_ref);
        assert!(
            e < 1e-12,
            "{key} step {i}: lr {lr_got} vs {lr_ref}, beta1 {b1_got} vs {b1_ref}"
        );
        worst = worst.max(e);
    }
    println!("{key}: {} steps, max relative error {worst:.3e}", lrs.len());
}

#[test]
fn onecycle_matches_pytorch_cirr() {
    check_setting(ScheduleKind::Cirr, "cirr");
}

#[test]
fn onecycle_matches_pytorch_fashioniq() {
    check_setting(ScheduleKind::FashionIq, "fashioniq");
}

/// torch.optim.AdamW, single-tensor path, in f64.
fn adamw_reference(
    p: &mut [f64],
    m: &mut [f64],
    v: &mut [f64],
    g: &[f64],
    lr: f64,
    beta1: f64,
    step: i32,
) {
    let c = AdamWConfig::default();
    for i in 0..p.len() {
        p[i] *= 1.0 - lr * c.weight_decay;
        m[i] += (1.0 - beta1) * (g[i] - m[i]);
        v[i] = v[i] * c.beta2 + (1.0 - c.beta2) * g[i] * g[i];
        let denom = v[i].sqrt() / (1.0 - c.beta2.powi(step)).sqrt() + c.eps;
        p[i] -= lr / (1.0 - beta1.powi(step)) * m[i] / denom;
    }
}

#[test]
fn adamw_follows_torch_with_cycling_beta1() {
    let dev = Device::Cpu;
    let init: Vec<f32> = (0..37).map(|i| ((i as f32) * 0.37).sin()).collect();
    let var = Var::from_slice(&init, 37, &dev).unwrap();
    let frozen = Tensor::from_slice(&init, 37, &dev).unwrap();
    let mut opt = AdamW::new(vec![("w".into(), var.clone())], AdamWConfig::default()).unwrap();
    let sched = OneCycle::for_dataset(ScheduleKind::Cirr, 1e-2, 10, 2);
    let mut p: Vec<f64> = init.iter().map(|&x| x as f64).collect();
    let (mut m, mut v) = (vec![0.0; 37], vec![0.0; 37]);
    for step in 0..20 {
        // loss = sum(w^3 * frozen): a gradient that depends on the parameter.
        let loss = (var.as_tensor().powf(3.0).unwrap() * &frozen)
            .unwrap()
            .sum_all()
            .unwrap();
        let store = loss.backward().unwrap();
        let grads = ParamGrads::from_store(&store, &[("w".to_string(), var.clone())]);
        let g64: Vec<f64> = grads
            .get(&var)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|&x| x as f64)
            .collect();
        let (lr, b1) = sched.at(step);
        opt.step(&grads, lr, b1).unwrap();
        adamw_reference(&mut p, &mut m, &mut v, &g64, lr, b1, step as i32 + 1);
        let got = var.as_tensor().to_vec1::<f32>().unwrap();
        for (a, b) in got.iter().zip(&p) {
            assert!(
                (*a as f64 - b).abs() < 1e-5 * (1.0 + b.abs()),
                "step {step}: {a} vs {b}"
            );
        }
    }
    assert_eq!(opt.steps_taken(), 20);
    // The state round-trips and carries on identically.
    let state = opt.state().unwrap();
    let (_, m_t, _) = &state[0];
    let m32 = m_t.to_vec1::<f32>().unwrap();
    for (a, b) in m32.iter().zip(&m) {
        assert!((*a as f64 - b).abs() < 1e-5 * (1.0 + b.abs()));
    }
}

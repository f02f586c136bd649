//! Checkpoint files: atomic writes, weights and training state read back exactly.

use std::collections::BTreeMap;

use candle_core::{Device, Tensor, Var};
use slot4acir::train::checkpoint::{
    check_finite, load_training_state, save_training_state, save_weights, write_atomic,
    TrainingState,
};
use slot4acir::train::gradcache::ParamGrads;
use slot4acir::train::optim::{AdamW, AdamWConfig};

fn grads_of(loss: &Tensor, vars: &[&Var]) -> ParamGrads {
    let named: Vec<(String, Var)> = vars.iter().map(|v| (String::new(), (*v).clone())).collect();
    ParamGrads::from_store(&loss.backward().unwrap(), &named)
}

#[test]
fn atomic_write_replaces_whole_file_and_leaves_no_temporary() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("ckpt.bin");
    write_atomic(&p, b"first version, long").unwrap();
    write_atomic(&p, b"second").unwrap();
    assert_eq!(std::fs::read(&p).unwrap(), b"second");
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
    // A folder that does not exist is an error naming the file, not a panic.
    let err = write_atomic(&dir.path().join("no/such/x.bin"), b"x").unwrap_err();
    assert!(format!("{err:#}").contains("x.bin"), "{err:#}");
}

#[test]
fn weights_and_training_state_round_trip() {
    let dev = Device::Cpu;
    let dir = tempfile::tempdir().unwrap();
    let a = Var::from_slice(&[1.0f32, -2.0, 3.5, 0.25], (2, 2), &dev).unwrap();
    let b = Var::from_slice(&[0.5f32, 0.125, -1.0], 3, &dev).unwrap();
    let mut opt = AdamW::new(
        vec![("a".into(), a.clone()), ("b".into(), b.clone())],
        AdamWConfig::default(),
    )
    .unwrap();
    for _ in 0..3 {
        let loss = (a.as_tensor().sqr().unwrap().sum_all().unwrap()
            + b.as_tensor().exp().unwrap().sum_all().unwrap())
        .unwrap();
        opt.step(&grads_of(&loss, &[&a, &b]), 1e-2, 0.9).unwrap();
    }
    let sd: BTreeMap<String, Tensor> = [
        ("a".to_string(), a.as_tensor().clone()),
        ("b".to_string(), b.as_tensor().clone()),
    ]
    .into();
    let wpath = dir.path().join("w.safetensors");
    save_weights(&wpath, &sd, 7).unwrap();
    let back = candle_core::safetensors::load(&wpath, &dev).unwrap();
    for (k, t) in &sd {
        assert_eq!(
            back[k].flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
    }

    let mut st = TrainingState::new(42, 100);
    st.epochs_done = 2;
    st.step = 3;
    st.best_metric = Some(55.5);
    st.best_epoch = Some(1);
    let spath = dir.path().join("state.safetensors");
    save_training_state(&spath, &st, &opt).unwrap();
    let (st2, moments) = load_training_state(&spath).unwrap();
    assert_eq!(st2, st);
    let a2 = Var::from_tensor(&a.as_tensor().copy().unwrap()).unwrap();
    let b2 = Var::from_tensor(&b.as_tensor().copy().unwrap()).unwrap();
    let mut opt2 = AdamW::new(
        vec![("a".into(), a2.clone()), ("b".into(), b2.clone())],
        AdamWConfig::default(),
    )
    .unwrap();
    opt2.load_state(st2.step, |n| moments.get(n).cloned())
        .unwrap();
    // Both optimizers take the same next step.
    for (o, (x, y)) in [(&mut opt, (&a, &b)), (&mut opt2, (&a2, &b2))] {
        let loss = (x.as_tensor().sqr().unwrap().sum_all().unwrap()
            + y.as_tensor().exp().unwrap().sum_all().unwrap())
        .unwrap();
        o.step(&grads_of(&loss, &[x, y]), 1e-2, 0.88).unwrap();
    }
    assert_eq!(
        a.as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap(),
        a2.as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    );
    assert_eq!(
        b.as_tensor().to_vec1::<f32>().unwrap(),
        b2.as_tensor().to_vec1::<f32>().unwrap()
    );

    // A weights file is not a training state.
    let err = load_training_state(&wpath).unwrap_err();
    assert!(format!("{err:#}").contains("w.safetensors"), "{err:#}");
    // Missing moments are reported by name.
    let mut opt3 = AdamW::new(vec![("c".into(), b2.clone())], AdamWConfig::default()).unwrap();
    let err = opt3.load_state(1, |n| moments.get(n).cloned()).unwrap_err();
    assert!(err.to_string().contains("for c"), "{err}");
}

#[test]
fn non_finite_loss_is_a_clear_error() {
    let p = std::path::Path::new("runs/x/checkpoint_last.safetensors");
    assert!(check_finite(0.3, "loss", 1, 10, p).is_ok());
    let err = check_finite(f64::NAN, "total loss", 2, 17, p)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("NaN") && err.contains("epoch 2") && err.contains("checkpoint_last"),
        "{err}"
    );
    assert!(check_finite(f64::INFINITY, "loss", 0, 0, p).is_err());
}

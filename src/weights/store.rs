//! The parameter store: the one place model code gets its weights from.
//!
//! Model modules are built from a `candle_nn::VarBuilder` backed by a [`ParamStore`]. The store
//! hands out the loaded state-dict tensors under the reference key names and records every
//! request, so that after construction it can report *all* missing keys and shape mismatches
//! at once (naming the weights file), and later give back the full state dict for saving.
//!
//! In [`Mode::Training`] trainable parameters are `candle_core::Var`s (tracked by autograd and
//! listed by [`ParamStore::trainable_vars`]); BatchNorm buffers are `Var`s too so that a
//! training-mode forward can update them in place (`Var::from_tensor(&t)?.set(..)`), but they
//! are not trainable. Frozen parameters (the ViT) are plain tensors in every mode.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::{Init, VarBuilder};

/// How the store hands out parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Plain tensors everywhere: no autograd graph is recorded.
    Inference,
    /// Trainable parameters and BatchNorm buffers are `Var`s.
    Training,
}

/// What a parameter is, by its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Trainable,
    /// BatchNorm running statistics: updated by training-mode forwards, never by the optimizer.
    Buffer,
    Frozen,
}

#[derive(Clone)]
struct Entry {
    tensor: Tensor,
    role: Role,
}

struct Inner {
    source: HashMap<String, Tensor>,
    source_name: String,
    mode: Mode,
    init_missing: bool,
    /// Seed of the random initialization (`None`: candle's own generator).
    init_seed: Option<u64>,
    frozen_prefixes: Vec<String>,
    registry: Mutex<BTreeMap<String, Entry>>,
    missing: Mutex<Vec<String>>,
    mismatched: Mutex<Vec<String>>,
}

/// See the module documentation. Cheap to clone (shared state).
#[derive(Clone)]
pub struct ParamStore(Arc<Inner>);

/// Parameter-name prefixes that are never trained (SPEC section 3: the ViT alone).
pub const DEFAULT_FROZEN_PREFIXES: &[&str] = &["visual_encoder."];

/// Non-trained state: BatchNorm statistics and EfficientViT's attention-bias index table.
fn is_buffer(name: &str) -> bool {
    name.ends_with("running_mean")
        || name.ends_with("running_var")
        || name.ends_with("num_batches_tracked")
        || name.ends_with("attention_bias_idxs")
}

impl ParamStore {
    /// A store over a loaded state dict. `source_name` (usually the file path) is used in
    /// error messages. With `init_missing`, absent keys are initialized from the module's
    /// init hint (random initialization) instead of being reported as missing.
    pub fn new(
        source: HashMap<String, Tensor>,
        source_name: impl Into<String>,
        mode: Mode,
        init_missing: bool,
    ) -> Self {
        Self(Arc::new(Inner {
            source,
            source_name: source_name.into(),
            mode,
            init_missing,
            init_seed: None,
            frozen_prefixes: DEFAULT_FROZEN_PREFIXES
                .iter()
                .map(|s| s.to_string())
                .collect(),
            registry: Mutex::new(BTreeMap::new()),
            missing: Mutex::new(Vec::new()),
            mismatched: Mutex::new(Vec::new()),
        }))
    }

    /// A store with no source: every parameter is initialized from its init hint.
    pub fn random(mode: Mode) -> Self {
        Self::new(HashMap::new(), "<random initialization>", mode, true)
    }

    pub fn mode(&self) -> Mode {
        self.0.mode
    }

    pub fn source_name(&self) -> &str {
        &self.0.source_name
    }

    /// A `VarBuilder` whose requests go through this store (float32 on `device`).
    pub fn var_builder(&self, device: &Device) -> VarBuilder<'static> {
        self.var_builder_as(DType::F32, device)
    }

    /// The same in another float type (float64 checks how well a result is conditioned).
    pub fn var_builder_as(&self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        let backend: Box<dyn candle_nn::var_builder::SimpleBackend> = Box::new(self.clone());
        VarBuilder::from_backend(backend, dtype, device.clone())
    }

    /// A frozen module's BatchNorm statistics are frozen too (it only runs in eval mode), so
    /// its convolutions can be folded with them.
    pub fn role(&self, name: &str) -> Role {
        if self
            .0
            .frozen_prefixes
            .iter()
            .any(|p| name.starts_with(p.as_str()))
        {
            Role::Frozen
        } else if is_buffer(name) {
            Role::Buffer
        } else {
            Role::Trainable
        }
    }

    /// Draws the random initialization of absent keys from `seed` and each parameter's name,
    /// so that a run is reproducible whatever order the model asks for its parameters in.
    /// Call before building the model.
    pub fn seeded(mut self, seed: u64) -> Self {
        let inner = Arc::get_mut(&mut self.0).expect("seed before the store is shared");
        inner.init_seed = Some(seed);
        self
    }

    /// Also freezes the parameters under `prefix` (e.g. `light_visual_encoder.` to train only
    /// the slots, the Q-Former and the projections). Call before building the model.
    pub fn freeze(mut self, prefix: &str) -> Self {
        let inner = Arc::get_mut(&mut self.0).expect("freeze before the store is shared");
        inner.frozen_prefixes.push(prefix.to_string());
        self
    }

    /// Call after building the model: an error listing every missing key and every shape
    /// mismatch, naming the weights file.
    pub fn finish(&self) -> anyhow::Result<()> {
        let missing = self.0.missing.lock().unwrap().clone();
        let mismatched = self.0.mismatched.lock().unwrap().clone();
        if missing.is_empty() && mismatched.is_empty() {
            return Ok(());
        }
        let mut msg = format!("weights file {}:", self.0.source_name);
        if !mismatched.is_empty() {
            msg.push_str(&format!(
                "\n  {} shape mismatch(es):\n    {}",
                mismatched.len(),
                mismatched.join("\n    ")
            ));
        }
        if !missing.is_empty() {
            msg.push_str(&format!(
                "\n  {} missing key(s):\n    {}",
                missing.len(),
                missing.join("\n    ")
            ));
        }
        anyhow::bail!(msg)
    }

    /// Every parameter and buffer the model asked for, detached, under its reference name.
    pub fn state_dict(&self) -> BTreeMap<String, Tensor> {
        let reg = self.0.registry.lock().unwrap();
        reg.iter()
            .map(|(k, e)| (k.clone(), e.tensor.detach()))
            .collect()
    }

    /// The trainable parameters (empty in inference mode), sorted by name.
    pub fn trainable_vars(&self) -> Vec<(String, Var)> {
        let reg = self.0.registry.lock().unwrap();
        reg.iter()
            .filter(|(_, e)| e.role == Role::Trainable && e.tensor.is_variable())
            .map(|(k, e)| {
                (
                    k.clone(),
                    Var::from_tensor(&e.tensor).expect("variable tensor"),
                )
            })
            .collect()
    }

    /// The tensor registered under `name`, if the model asked for it.
    pub fn get_registered(&self, name: &str) -> Option<Tensor> {
        self.0
            .registry
            .lock()
            .unwrap()
            .get(name)
            .map(|e| e.tensor.clone())
    }

    /// Overwrites a registered parameter or buffer in place (for `--resume` and tests).
    pub fn set(&self, name: &str, value: &Tensor) -> candle_core::Result<()> {
        let t = self.get_registered(name).ok_or_else(|| {
            candle_core::Error::Msg(format!("no parameter named {name} in the model"))
        })?;
        if t.is_variable() {
            Var::from_tensor(&t)?.set(value)
        } else {
            Err(candle_core::Error::Msg(format!(
                "parameter {name} is not mutable in this mode"
            )))
        }
    }

    fn make(&self, name: &str, t: Tensor) -> candle_core::Result<Tensor> {
        let role = self.role(name);
        let out = match (self.0.mode, role) {
            (Mode::Training, Role::Trainable | Role::Buffer) => {
                Var::from_tensor(&t)?.as_tensor().clone()
            }
            _ => t,
        };
        self.0.registry.lock().unwrap().insert(
            name.to_string(),
            Entry {
                tensor: out.clone(),
                role,
            },
        );
        Ok(out)
    }
}

/// `h` drawn (in f32, on the CPU) from a generator seeded by `seed` and `name`.
fn seeded_init(h: &Init, s: Shape, seed: u64, name: &str) -> candle_core::Result<Tensor> {
    use rand::{Rng, SeedableRng};
    enum Dist {
        Uniform(f64, f64),
        Normal(f64, f64),
    }
    let dist = match *h {
        Init::Const(_) => return Ok(h.var(s, DType::F32, &Device::Cpu)?.as_tensor().detach()),
        Init::Uniform { lo, up } => Dist::Uniform(lo, up),
        Init::Randn { mean, stdev } => Dist::Normal(mean, stdev),
        Init::Kaiming {
            dist,
            fan,
            non_linearity,
        } => {
            let std = non_linearity.gain() / (fan.for_shape(&s) as f64).sqrt();
            match dist {
                candle_nn::init::NormalOrUniform::Uniform => {
                    Dist::Uniform(-(3f64.sqrt()) * std, 3f64.sqrt() * std)
                }
                candle_nn::init::NormalOrUniform::Normal => Dist::Normal(0.0, std),
            }
        }
    };
    let key = blake3::hash(format!("{seed}/{name}").as_bytes());
    let mut word = [0u8; 8];
    word.copy_from_slice(&key.as_bytes()[..8]);
    let mut rng = rand::rngs::StdRng::seed_from_u64(u64::from_le_bytes(word));
    let values: Vec<f32> = (0..s.elem_count())
        .map(|_| match dist {
            Dist::Uniform(lo, up) => lo + (up - lo) * rng.gen::<f64>(),
            // Box-Muller.
            Dist::Normal(mean, std) => {
                let u1: f64 = 1.0 - rng.gen::<f64>();
                let u2: f64 = rng.gen();
                mean + std * (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
            }
        } as f32)
        .collect();
    Tensor::from_vec(values, s, &Device::Cpu)
}

impl candle_nn::var_builder::SimpleBackend for ParamStore {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        if let Some(e) = self.0.registry.lock().unwrap().get(name) {
            // Shared parameters (asked for twice) get the same tensor.
            return Ok(e.tensor.clone());
        }
        let t = match self.0.source.get(name) {
            Some(t) => {
                if t.shape() != &s {
                    self.0.mismatched.lock().unwrap().push(format!(
                        "{name}: file has {:?}, model expects {:?}",
                        t.dims(),
                        s.dims()
                    ));
                    Tensor::zeros(s, dtype, dev)?
                } else {
                    t.to_dtype(dtype)?.to_device(dev)?
                }
            }
            None if self.0.init_missing => match self.0.init_seed {
                Some(seed) => seeded_init(&h, s, seed, name)?
                    .to_dtype(dtype)?
                    .to_device(dev)?,
                None => h.var(s, dtype, dev)?.as_tensor().detach(),
            },
            None => {
                self.0.missing.lock().unwrap().push(name.to_string());
                Tensor::zeros(s, dtype, dev)?
            }
        };
        self.make(name, t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        if let Some(e) = self.0.registry.lock().unwrap().get(name) {
            return Ok(e.tensor.clone());
        }
        match self.0.source.get(name) {
            Some(t) => {
                let t = t.to_dtype(dtype)?.to_device(dev)?;
                self.make(name, t)
            }
            None => {
                self.0.missing.lock().unwrap().push(name.to_string());
                Err(candle_core::Error::CannotFindTensor {
                    path: name.to_string(),
                })
            }
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0.source.contains_key(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeded_initialization_is_reproducible_and_order_free() {
        let dev = Device::Cpu;
        let draw = |seed: u64, names: &[&str]| -> HashMap<String, Vec<f32>> {
            let store = ParamStore::random(Mode::Training).seeded(seed);
            let vb = store.var_builder(&dev);
            names
                .iter()
                .map(|n| {
                    let t = vb
                        .get_with_hints(
                            (100, 100),
                            n,
                            Init::Randn {
                                mean: 0.5,
                                stdev: 0.02,
                            },
                        )
                        .unwrap();
                    (
                        n.to_string(),
                        t.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                    )
                })
                .collect()
        };
        let a = draw(7, &["x.weight", "y.weight"]);
        let b = draw(7, &["y.weight", "x.weight"]);
        assert_eq!(a, b, "the same seed gives the same values in any order");
        assert_ne!(a["x.weight"], a["y.weight"]);
        assert_ne!(a["x.weight"], draw(8, &["x.weight"])["x.weight"]);
        // The distribution asked for: 10 000 draws of N(0.5, 0.02).
        let v = &a["x.weight"];
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
        let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / v.len() as f64;
        assert!((mean - 0.5).abs() < 0.001, "mean {mean}");
        assert!((var.sqrt() - 0.02).abs() < 0.001, "std {}", var.sqrt());
        let store = ParamStore::random(Mode::Training).seeded(1);
        let u = store
            .var_builder(&dev)
            .get_with_hints(1000, "u", Init::Uniform { lo: -2.0, up: 3.0 })
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(u.iter().all(|&x| (-2.0..3.0).contains(&x)));
        assert!(u.iter().any(|&x| x < -1.5) && u.iter().any(|&x| x > 2.5));
    }

    #[test]
    fn reports_every_missing_key_and_mismatch() {
        let dev = Device::Cpu;
        let mut src = HashMap::new();
        src.insert(
            "a.weight".to_string(),
            Tensor::zeros((2, 3), DType::F32, &dev).unwrap(),
        );
        let store = ParamStore::new(src, "w.safetensors", Mode::Inference, false);
        let vb = store.var_builder(&dev);
        vb.get((3, 3), "a.weight").unwrap();
        vb.get(4, "b.bias").unwrap();
        vb.pp("c").get(1, "d").unwrap();
        let err = store.finish().unwrap_err().to_string();
        assert!(err.contains("w.safetensors"), "{err}");
        assert!(
            err.contains("a.weight: file has [2, 3], model expects [3, 3]"),
            "{err}"
        );
        assert!(err.contains("b.bias") && err.contains("c.d"), "{err}");
    }

    #[test]
    fn training_mode_makes_trainable_vars_but_keeps_frozen_plain() {
        let dev = Device::Cpu;
        let store = ParamStore::random(Mode::Training);
        let vb = store.var_builder(&dev);
        let w = vb
            .get_with_hints(2, "proj.weight", Init::Const(1.0))
            .unwrap();
        let f = vb
            .get_with_hints(2, "visual_encoder.x", Init::Const(1.0))
            .unwrap();
        let b = vb
            .get_with_hints(2, "bn.running_mean", Init::Const(0.0))
            .unwrap();
        assert!(w.is_variable() && b.is_variable() && !f.is_variable());
        let names: Vec<String> = store.trainable_vars().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, vec!["proj.weight".to_string()]);
        store.finish().unwrap();
        assert_eq!(store.state_dict().len(), 3);
    }
}

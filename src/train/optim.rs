//! AdamW and the one-cycle schedule, with PyTorch's exact semantics (SPEC section 3).
//!
//! The schedule is f64 math identical to `torch.optim.lr_scheduler.OneCycleLR`
//! (`anneal_strategy="cos"`, `three_phase=False`, `cycle_momentum=True`): value `i` is the
//! learning rate and AdamW beta1 the optimizer uses at its step `i` (0-based).
//!
//! AdamW follows `torch.optim.AdamW`: decoupled weight decay `p -= lr·wd·p`, then the Adam
//! update whose bias corrections use the *current* beta1 (it is read from the param group at
//! every step, and the schedule cycles it): `bc1 = 1 - beta1^t`, `bc2 = 1 - beta2^t`,
//! `p -= lr/bc1 · m / (sqrt(v)/sqrt(bc2) + eps)`. Only trainable parameters are handed to the
//! optimizer, so frozen ones get neither gradient nor state.

use std::sync::Mutex;

use candle_core::{CpuStorage, DType, Device, InplaceOp2, Layout, Result, Tensor, Var};

use crate::train::gradcache::ParamGrads;

/// `torch.optim.lr_scheduler.OneCycleLR` with cosine annealing, two phases.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OneCycle {
    pub max_lr: f64,
    pub total_steps: usize,
    pub pct_start: f64,
    pub div_factor: f64,
    pub final_div_factor: f64,
    pub base_momentum: f64,
    pub max_momentum: f64,
}

/// Which of the reference's training scripts a schedule reproduces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScheduleKind {
    /// `pct_start = 1/50`, `div_factor = 25` (PyTorch's default).
    Cirr,
    /// `pct_start = 1.5/epochs`, `div_factor = 100`.
    FashionIq,
}

fn annealing_cos(start: f64, end: f64, pct: f64) -> f64 {
    let cos_out = (std::f64::consts::PI * pct).cos() + 1.0;
    end + (start - end) / 2.0 * cos_out
}

impl OneCycle {
    /// PyTorch's defaults (`final_div_factor = 1e4`, momentum 0.85..0.95).
    pub fn new(max_lr: f64, total_steps: usize, pct_start: f64, div_factor: f64) -> Self {
        Self {
            max_lr,
            total_steps,
            pct_start,
            div_factor,
            final_div_factor: 1e4,
            base_momentum: 0.85,
            max_momentum: 0.95,
        }
    }

    /// The schedule of the reference's CIRR or FashionIQ script.
    pub fn for_dataset(
        kind: ScheduleKind,
        max_lr: f64,
        epochs: usize,
        steps_per_epoch: usize,
    ) -> Self {
        let total = epochs * steps_per_epoch;
        match kind {
            ScheduleKind::Cirr => Self::new(max_lr, total, 1.0 / 50.0, 25.0),
            ScheduleKind::FashionIq => Self::new(max_lr, total, 1.5 / epochs as f64, 100.0),
        }
    }

    pub fn initial_lr(&self) -> f64 {
        self.max_lr / self.div_factor
    }

    pub fn min_lr(&self) -> f64 {
        self.initial_lr() / self.final_div_factor
    }

    /// (learning rate, beta1) at 0-based optimizer step `step`. Steps past the end keep the
    /// final phase's formula (PyTorch raises instead; we never step that far).
    pub fn at(&self, step: usize) -> (f64, f64) {
        // Phase boundaries exactly as PyTorch: `float(pct_start * total) - 1` and `total - 1`.
        let phases = [
            (
                self.pct_start * self.total_steps as f64 - 1.0,
                (self.initial_lr(), self.max_lr),
                (self.max_momentum, self.base_momentum),
            ),
            (
                self.total_steps as f64 - 1.0,
                (self.max_lr, self.min_lr()),
                (self.base_momentum, self.max_momentum),
            ),
        ];
        let s = step as f64;
        let mut start_step = 0.0;
        for (i, (end_step, (lr0, lr1), (m0, m1))) in phases.iter().enumerate() {
            if s <= *end_step || i == phases.len() - 1 {
                let pct = (s - start_step) / (end_step - start_step);
                return (annealing_cos(*lr0, *lr1, pct), annealing_cos(*m0, *m1, pct));
            }
            start_step = *end_step;
        }
        unreachable!("the last phase always matches")
    }
}

/// AdamW hyper-parameters other than the scheduled lr and beta1 (SPEC: betas (0.9, 0.98),
/// eps 1e-7, weight decay 0.05).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta2: 0.98,
            eps: 1e-7,
            weight_decay: 0.05,
        }
    }
}

/// First and second moments of one parameter. On the CPU they live in host vectors updated by
/// a fused in-place kernel; elsewhere they are device tensors.
enum Moments {
    Host(Mutex<(Vec<f32>, Vec<f32>)>),
    Device(Var, Var),
}

struct ParamState {
    name: String,
    var: Var,
    moments: Moments,
}

/// AdamW over named trainable variables.
pub struct AdamW {
    pub cfg: AdamWConfig,
    params: Vec<ParamState>,
    /// Number of steps taken (PyTorch's `state["step"]`, equal for all parameters here).
    step: u64,
}

/// The fused CPU update of one parameter (p is the destination, the gradient the source).
struct FusedStep<'a> {
    moments: &'a Mutex<(Vec<f32>, Vec<f32>)>,
    lr: f64,
    beta1: f64,
    cfg: AdamWConfig,
    step: u64,
}

impl InplaceOp2 for FusedStep<'_> {
    fn name(&self) -> &'static str {
        "adamw-step"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let (CpuStorage::F32(p), CpuStorage::F32(g)) = (s1, s2) else {
            candle_core::bail!("adamw: parameters and gradients must be f32");
        };
        let (Some((p0, p1)), Some((g0, g1))) = (l1.contiguous_offsets(), l2.contiguous_offsets())
        else {
            candle_core::bail!("adamw: non-contiguous parameter or gradient");
        };
        let (p, g) = (&mut p[p0..p1], &g[g0..g1]);
        let mut guard = self.moments.lock().expect("moments lock");
        let (m, v) = &mut *guard;
        if p.len() != g.len() || m.len() != p.len() {
            candle_core::bail!("adamw: gradient or state size differs from the parameter");
        }
        let t = self.step as i32;
        let decay = (1.0 - self.lr * self.cfg.weight_decay) as f32;
        let (b1, b2) = (self.beta1 as f32, self.cfg.beta2 as f32);
        let step_size = (self.lr / (1.0 - self.beta1.powi(t))) as f32;
        let bc2_sqrt = (1.0 - self.cfg.beta2.powi(t)).sqrt() as f32;
        let eps = self.cfg.eps as f32;
        let update = |p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]| {
            for i in 0..p.len() {
                let gi = g[i];
                // torch: exp_avg.lerp_(grad, 1 - beta1); exp_avg_sq.mul_(beta2).addcmul_(g, g, 1 - beta2)
                m[i] += (1.0 - b1) * (gi - m[i]);
                v[i] = v[i] * b2 + (1.0 - b2) * gi * gi;
                let denom = v[i].sqrt() / bc2_sqrt + eps;
                p[i] = p[i] * decay - step_size * (m[i] / denom);
            }
        };
        // Element-wise, so chunks run on all threads with the same results.
        const CHUNK: usize = 1 << 16;
        use rayon::prelude::*;
        p.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK))
            .zip(m.par_chunks_mut(CHUNK))
            .zip(v.par_chunks_mut(CHUNK))
            .for_each(|(((p, g), m), v)| update(p, g, m, v));
        Ok(())
    }
}

impl AdamW {
    pub fn new(vars: Vec<(String, Var)>, cfg: AdamWConfig) -> Result<Self> {
        let params = vars
            .into_iter()
            .map(|(name, var)| {
                let moments = Self::zero_moments(&var)?;
                Ok(ParamState { name, var, moments })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            cfg,
            params,
            step: 0,
        })
    }

    fn zero_moments(var: &Var) -> Result<Moments> {
        if var.dtype() != DType::F32 {
            candle_core::bail!("adamw: only f32 parameters are supported");
        }
        Ok(match var.device() {
            Device::Cpu => {
                let n = var.elem_count();
                Moments::Host(Mutex::new((vec![0.0; n], vec![0.0; n])))
            }
            _ => Moments::Device(
                Var::zeros(var.shape(), DType::F32, var.device())?,
                Var::zeros(var.shape(), DType::F32, var.device())?,
            ),
        })
    }

    pub fn steps_taken(&self) -> u64 {
        self.step
    }

    pub fn param_names(&self) -> impl Iterator<Item = &str> {
        self.params.iter().map(|p| p.name.as_str())
    }

    /// One update with learning rate `lr` and first-moment coefficient `beta1`. A parameter
    /// without gradient is skipped (as torch skips `p.grad is None`) but the step counter is
    /// shared: every trainable parameter of this model receives a gradient.
    pub fn step(&mut self, grads: &ParamGrads, lr: f64, beta1: f64) -> Result<()> {
        self.step += 1;
        let t = self.step as i32;
        for p in &self.params {
            let Some(g) = grads.get(&p.var) else {
                continue;
            };
            let g = g.contiguous()?;
            match &p.moments {
                Moments::Host(moments) => {
                    let op = FusedStep {
                        moments,
                        lr,
                        beta1,
                        cfg: self.cfg,
                        step: self.step,
                    };
                    p.var.as_tensor().inplace_op2(&g, &op)?;
                }
                Moments::Device(m, v) => {
                    let cfg = self.cfg;
                    let (m_t, v_t) = (m.as_tensor(), v.as_tensor());
                    let new_m = (m_t + ((&g - m_t)? * (1.0 - beta1))?)?;
                    let new_v = ((v_t * cfg.beta2)? + (g.sqr()? * (1.0 - cfg.beta2))?)?;
                    let step_size = lr / (1.0 - beta1.powi(t));
                    let bc2_sqrt = (1.0 - cfg.beta2.powi(t)).sqrt();
                    let denom = ((new_v.sqrt()? / bc2_sqrt)? + cfg.eps)?;
                    let upd = ((new_m.div(&denom))? * step_size)?;
                    let decayed = (p.var.as_tensor() * (1.0 - lr * cfg.weight_decay))?;
                    p.var.set(&(decayed - upd)?)?;
                    m.set(&new_m)?;
                    v.set(&new_v)?;
                }
            }
        }
        Ok(())
    }

    /// The optimizer state for checkpoints: `(name, first moment, second moment)` as CPU
    /// tensors shaped like the parameter.
    pub fn state(&self) -> Result<Vec<(String, Tensor, Tensor)>> {
        self.params
            .iter()
            .map(|p| {
                let shape = p.var.shape().clone();
                let (m, v) = match &p.moments {
                    Moments::Host(mv) => {
                        let g = mv.lock().expect("moments lock");
                        (
                            Tensor::from_slice(&g.0, &shape, &Device::Cpu)?,
                            Tensor::from_slice(&g.1, &shape, &Device::Cpu)?,
                        )
                    }
                    Moments::Device(m, v) => {
                        (m.to_device(&Device::Cpu)?, v.to_device(&Device::Cpu)?)
                    }
                };
                Ok((p.name.clone(), m, v))
            })
            .collect()
    }

    /// Restores the state written by [`AdamW::state`]; `get(name)` gives (m, v) for a
    /// parameter. Every parameter must be present with its own shape.
    pub fn load_state(
        &mut self,
        step: u64,
        mut get: impl FnMut(&str) -> Option<(Tensor, Tensor)>,
    ) -> Result<()> {
        for p in &mut self.params {
            let (m, v) = get(&p.name).ok_or_else(|| {
                candle_core::Error::Msg(format!("optimizer state has no moments for {}", p.name))
            })?;
            if m.shape() != p.var.shape() || v.shape() != p.var.shape() {
                candle_core::bail!(
                    "optimizer state for {}: moments {:?}, parameter {:?}",
                    p.name,
                    m.dims(),
                    p.var.dims()
                );
            }
            p.moments = match p.var.device() {
                Device::Cpu => Moments::Host(Mutex::new((
                    m.flatten_all()?.to_vec1::<f32>()?,
                    v.flatten_all()?.to_vec1::<f32>()?,
                ))),
                d => Moments::Device(
                    Var::from_tensor(&m.to_device(d)?)?,
                    Var::from_tensor(&v.to_device(d)?)?,
                ),
            };
        }
        self.step = step;
        Ok(())
    }
}

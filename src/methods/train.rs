//! The one training loop of the learned methods (FlatQuant, AffineQuant): per block, AdamW over
//! parameter groups with their own learning rates and schedules, minimising the quantized block's
//! output MSE against the full-precision outputs; a non-finite loss or a method's own end-of-epoch
//! check restores the last good epoch's parameters and stops, with a note; one log entry per
//! epoch.

use super::{EpochLog, MethodReport, StepPhases};
use crate::error::Result;
use crate::model::{Block, Mode, NoHook, Rope};
use candle_core::{Device, Tensor, Var};
use candle_nn::optim::{AdamW, Optimizer, ParamsAdamW};
use std::time::Instant;

/// A trainable variable holding `v` with `shape`.
pub fn var(v: &[f32], shape: &[usize]) -> Result<Var> {
    Ok(Var::from_tensor(&Tensor::from_slice(
        v,
        shape,
        &Device::Cpu,
    )?)?)
}

/// Learning-rate schedule of a parameter group over the run's steps.
#[derive(Debug, Clone, Copy)]
pub enum Schedule {
    Constant,
    /// Cosine decay from the group's rate to `min` (or to the group's rate where that is lower:
    /// never upwards) over all steps (FlatQuant).
    Cosine {
        min: f64,
    },
}

/// Variables optimised together with one learning rate.
pub struct Group {
    pub vars: Vec<Var>,
    pub lr: f64,
    pub weight_decay: f64,
    pub schedule: Schedule,
}

/// The objective's form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Loss {
    /// The MSE itself.
    Mse,
    /// `mse / stopgrad(mse)`: the gradient of `log(mse)`, independent of the MSE's scale.
    LogMse,
}

pub struct TrainConfig {
    pub epochs: usize,
    /// Windows per step (clamped to the number of windows).
    pub batch: usize,
    pub loss: Loss,
}

/// What a method supplies to the loop for one block.
pub trait Trainee {
    /// Every trained variable (snapshot and restore cover these).
    fn vars(&self) -> Vec<Var>;
    /// Called before each step (e.g. a projection of the parameters).
    fn before_step(&self) -> Result<()> {
        Ok(())
    }
    /// The quantized block at `epoch`, differentiable in the variables (its weight-side work
    /// is done here, once per step for the whole batch).
    fn quantized_block(&self, epoch: usize) -> Result<Block>;
    /// The rotary tables the block runs with.
    fn rope(&self) -> &Rope;
    /// The full-precision block being calibrated.
    fn block(&self) -> &Block;
    /// Called after each epoch's last step; `Some(note)` restores the last good parameters and
    /// stops training with that note.
    fn end_of_epoch(&self, _epoch: usize) -> Result<Option<String>> {
        Ok(None)
    }
}

/// Copies of the variables' values: the last good state of a block's training.
fn snapshot(vars: &[Var]) -> Result<Vec<Tensor>> {
    vars.iter().map(|v| Ok(v.as_tensor().copy()?)).collect()
}

/// Puts the values of [`snapshot`] back.
fn restore(vars: &[Var], snap: &[Tensor]) -> Result<()> {
    for (v, t) in vars.iter().zip(snap) {
        v.set(t)?;
    }
    Ok(())
}

/// `min + (lr − min)·(1 + cos(π·step/total))/2`.
fn cosine(step: usize, total: usize, lr: f64, min: f64) -> f64 {
    min + (lr - min) * (1.0 + (std::f64::consts::PI * step as f64 / total.max(1) as f64).cos())
        / 2.0
}

/// Trains `t` on windows `x` → targets `y` (`[N, L, hidden]`) of block `block`.
pub fn train(
    t: &dyn Trainee,
    groups: &[Group],
    cfg: &TrainConfig,
    block: usize,
    x: &Tensor,
    y: &Tensor,
    on_epoch: &mut dyn FnMut(&EpochLog),
) -> Result<MethodReport> {
    let n = x.dim(0)?;
    let bs = cfg.batch.clamp(1, n);
    let steps_per_epoch = n / bs;
    let total = cfg.epochs * steps_per_epoch;
    let mut opts = groups
        .iter()
        .map(|g| {
            AdamW::new(
                g.vars.clone(),
                ParamsAdamW {
                    lr: g.lr,
                    beta1: 0.9,
                    beta2: 0.999,
                    eps: 1e-8,
                    weight_decay: g.weight_decay,
                },
            )
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    let vars = t.vars();
    let mut notes = Vec::new();
    let mut epochs = Vec::new();
    let mut step = 0;
    let mut good = snapshot(&vars)?;
    // Every step allocates and frees the same buffers, the largest of them the block's
    // transformed weights (f32) and their gradients: keep those in the heap.
    let c = t.block().config();
    let _heap = crate::heap::ReuseLarge::for_buffers_of(4 * c.hidden_size * c.intermediate_size);
    'train: for e in 0..cfg.epochs {
        let t0 = Instant::now();
        let mut sum = 0.0;
        let mut phases = StepPhases::default();
        for k in 0..steps_per_epoch {
            let tick = Instant::now();
            t.before_step()?;
            let qblock = t.quantized_block(e)?;
            let t_weights = tick.elapsed().as_secs_f64();
            // Windows may be kept in bf16 by the engine: widened per batch.
            let f32 = candle_core::DType::F32;
            let out = qblock.forward(
                &x.narrow(0, k * bs, bs)?.to_dtype(f32)?,
                t.rope(),
                Mode::Train,
                &mut NoHook,
            )?;
            let target = y.narrow(0, k * bs, bs)?.to_dtype(f32)?;
            let loss = crate::model::mean_squared_error(&out, &target)?;
            let lv = loss.to_scalar::<f32>()? as f64;
            let t_forward = tick.elapsed().as_secs_f64();
            if !lv.is_finite() {
                restore(&vars, &good)?;
                notes.push(format!("block {block}: non-finite loss at epoch {e}; restored the parameters of the last finished epoch and stopped"));
                break 'train;
            }
            sum += lv;
            let grads = match cfg.loss {
                Loss::Mse => loss.backward()?,
                Loss::LogMse => (&loss / lv)?.backward()?,
            };
            let t_backward = tick.elapsed().as_secs_f64();
            for (opt, g) in opts.iter_mut().zip(groups) {
                if let Schedule::Cosine { min } = g.schedule {
                    opt.set_learning_rate(cosine(step, total, g.lr, min.min(g.lr)));
                }
            }
            for opt in opts.iter_mut() {
                opt.step(&grads)?;
            }
            drop(grads);
            phases.add(&StepPhases {
                steps: 1,
                weights: t_weights,
                forward: t_forward - t_weights,
                backward: t_backward - t_forward,
                optimizer: tick.elapsed().as_secs_f64() - t_backward,
            });
            step += 1;
        }
        if let Some(note) = t.end_of_epoch(e)? {
            restore(&vars, &good)?;
            notes.push(note);
            break 'train;
        }
        let log = EpochLog {
            epoch: e,
            loss: sum / steps_per_epoch as f64,
            seconds: t0.elapsed().as_secs_f64(),
            phases,
        };
        on_epoch(&log);
        epochs.push(log);
        good = snapshot(&vars)?;
    }
    Ok(MethodReport { epochs, notes })
}

//! The decoder's shared ops in their two numerically equivalent forms: `Mode::Eval` uses candle's
//! fused kernels (rms_norm, rope) and the fused causal attention; `Mode::Train` uses ops with an
//! explicit backward (`train_ops`; candle's fused kernels drop gradients, candle.md §2).

use super::config::ModelConfig;
use crate::error::{Error, Result};
use candle_core::{Device, Tensor};

/// Which implementation of the shared ops to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Fused kernels, causal chunking; no gradients.
    Eval,
    /// Composed, differentiable ops only.
    Train,
}

/// `x / sqrt(mean(x²) + ε) · w` over the last dimension.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64, mode: Mode) -> Result<Tensor> {
    Ok(match mode {
        Mode::Eval => candle_nn::ops::rms_norm(&x.contiguous()?, w, eps as f32)?,
        Mode::Train => x.contiguous()?.apply_op2(
            &w.contiguous()?,
            super::train_ops::RmsNormOp { eps: eps as f32 },
        )?,
    })
}

/// `silu(gate)·up`.
pub fn swiglu(gate: &Tensor, up: &Tensor, mode: Mode) -> Result<Tensor> {
    Ok(match mode {
        Mode::Eval => (candle_nn::ops::silu(gate)? * up)?,
        Mode::Train => gate
            .contiguous()?
            .apply_op2(&up.contiguous()?, super::train_ops::SwiGluOp)?,
    })
}

/// `mean((y − t)²)` over all elements as one differentiable node (`t` a constant): the value and
/// `y`'s gradient equal candle's `(y − t).sqr().mean_all()` bit for bit.
pub fn mean_squared_error(y: &Tensor, t: &Tensor) -> Result<Tensor> {
    Ok(y.contiguous()?
        .apply_op2(&t.contiguous()?, super::train_ops::MseOp)?)
}

/// RoPE tables for rotate-half (HF) convention: `cos`, `sin` are `[max_len, head_dim/2]`.
pub struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    pub fn new(cfg: &ModelConfig, max_len: usize) -> Result<Self> {
        let inv = cfg.rope_inv_freq();
        let half = inv.len();
        let mut cos = Vec::with_capacity(max_len * half);
        let mut sin = Vec::with_capacity(max_len * half);
        for p in 0..max_len {
            for &f in &inv {
                // Angles in f64 (as the oracle's float64 tables), rounded once to f32.
                let a = p as f64 * f;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
        Ok(Rope {
            cos: Tensor::from_vec(cos, (max_len, half), &Device::Cpu)?,
            sin: Tensor::from_vec(sin, (max_len, half), &Device::Cpu)?,
        })
    }

    pub fn max_len(&self) -> usize {
        self.cos.dims()[0]
    }

    /// Rotates `x` `[B, H, T, D]` at positions `0..T`.
    pub fn apply(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        self.apply_at(x, mode, 0)
    }

    /// The `cos`, `sin` rows of positions `pos0..pos0 + t`.
    fn tables(&self, pos0: usize, t: usize) -> Result<(Tensor, Tensor)> {
        if pos0 + t > self.max_len() {
            return Err(Error::Runtime(format!(
                "sequence of {} tokens exceeds the RoPE table ({})",
                pos0 + t,
                self.max_len()
            )));
        }
        Ok((self.cos.narrow(0, pos0, t)?, self.sin.narrow(0, pos0, t)?))
    }

    /// Rotates `x` `[B, H, T, D]` at positions `pos0..pos0 + T` (tokens after a KV cache).
    pub fn apply_at(&self, x: &Tensor, mode: Mode, pos0: usize) -> Result<Tensor> {
        let (cos, sin) = self.tables(pos0, x.dim(2)?)?;
        Ok(match mode {
            Mode::Eval => candle_nn::rotary_emb::rope(&x.contiguous()?, &cos, &sin)?,
            Mode::Train => x.contiguous()?.apply_op3(
                &cos.contiguous()?,
                &sin.contiguous()?,
                super::train_ops::RopeOp,
            )?,
        })
    }

    /// A projection `x` `[B, T, heads·D]` as heads `[B, heads, T, D]`, rotated at positions
    /// `pos0..pos0 + T` when `rotate`. Training splits and rotates in one node
    /// ([`super::train_ops::HeadsOp`]; the same values).
    pub fn heads_at(
        &self,
        x: &Tensor,
        heads: usize,
        rotate: bool,
        mode: Mode,
        pos0: usize,
    ) -> Result<Tensor> {
        let (b, t, hd) = x.dims3()?;
        match mode {
            Mode::Eval => {
                let x = x
                    .reshape((b, t, heads, hd / heads.max(1)))?
                    .transpose(1, 2)?
                    .contiguous()?;
                match rotate {
                    true => self.apply_at(&x, mode, pos0),
                    false => Ok(x),
                }
            }
            Mode::Train => {
                let (cos, sin) = self.tables(pos0, t)?;
                Ok(x.contiguous()?.apply_op3(
                    &cos.contiguous()?,
                    &sin.contiguous()?,
                    super::train_ops::HeadsOp { heads, rotate },
                )?)
            }
        }
    }
}

/// A 16-bit CPU tensor's elements widened to f32 into `out` (resized to fit), with the CPU's
/// conversion instructions (F16C where present, through `half`'s slice conversion) across
/// threads — the per-product cost of keeping weights 16-bit in memory. Exact: every f16/bf16
/// value is an f32. `false` (and `out` untouched) for any other tensor.
pub fn widen_into(t: &Tensor, out: &mut Vec<f32>) -> Result<bool> {
    use candle_core::{CpuStorage, Storage};
    use half::slice::HalfFloatSliceExt;
    use rayon::prelude::*;
    fn widen<T: Sync>(v: &[T], out: &mut Vec<f32>)
    where
        [T]: HalfFloatSliceExt,
    {
        const CHUNK: usize = 1 << 16;
        out.resize(v.len(), 0.0);
        out.par_chunks_mut(CHUNK)
            .zip(v.par_chunks(CHUNK))
            .for_each(|(o, s)| s.convert_to_f32_slice(o));
    }
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    match (&*storage, layout.contiguous_offsets()) {
        (Storage::Cpu(CpuStorage::F16(v)), Some((a, b))) => widen(&v[a..b], out),
        (Storage::Cpu(CpuStorage::BF16(v)), Some((a, b))) => widen(&v[a..b], out),
        _ => return Ok(false),
    }
    Ok(true)
}

//! Activation and KV-cache quantizers behind one trait: a fixed grid (dynamic per unit, clip
//! ratios constant; eval and deployment) or learnable clip ratios (LAC, FlatQuant §2.7; training).

use super::ops::fake_quant;
use super::quantizer::QuantSpec;
use crate::error::Result;
use candle_core::Tensor;

/// Quantize-dequantize of `x` in units of `unit` consecutive values along the last dimension.
pub trait ActQuantizer: Send + Sync {
    fn apply(&self, x: &Tensor, unit: usize) -> Result<Tensor>;
    /// The fixed grid this quantizer amounts to now (learned ratios evaluated).
    fn spec(&self) -> Result<QuantSpec>;
    /// A learnable clip's logits `(a_hi, a_lo)` and grid, for ops that fuse the quantizer into
    /// the product it feeds (training).
    fn learned_clip(&self) -> Option<(&Tensor, &Tensor, QuantSpec)> {
        None
    }
}

impl ActQuantizer for QuantSpec {
    fn apply(&self, x: &Tensor, unit: usize) -> Result<Tensor> {
        Ok(fake_quant(x, self, unit)?)
    }
    fn spec(&self) -> Result<QuantSpec> {
        Ok(*self)
    }
}

/// `v + stopgrad(round(v) − v)`: rounded forward, identity gradient (algorithms.md §1.5).
pub fn round_ste(v: &Tensor) -> Result<Tensor> {
    Ok((v + (v.round()? - v)?.detach())?)
}

pub fn sigmoid(x: &Tensor) -> Result<Tensor> {
    Ok((x.neg()?.exp()? + 1.0)?.recip()?)
}

/// Smallest scale used by the differentiable quantizers (an all-zero unit would divide by 0).
const MIN_SCALE: f64 = 1e-8;

/// Fake quantization with learnable clip ratios `σ(α_max)`, `σ(α_min)` (scalars), differentiable
/// with respect to `x` and both `α` through the straight-through estimator.
pub struct LearnedClip {
    /// Bits, symmetry and scale rule; its clip fields are ignored.
    pub spec: QuantSpec,
    pub alpha_max: Tensor,
    pub alpha_min: Tensor,
}

/// Differentiable quantize-dequantize of `x` `[rows, unit]` with per-row extremes `xmax ≥ 0 ≥ xmin`
/// (already clipped): symmetric `s = max(|xmin|, xmax)/(2^(b−1)−1)`, codes clamped to
/// `[−2^(b−1), 2^(b−1)−1]`; asymmetric `s = (xmax − xmin)/(2^b−1)`, `z = round(−xmin/s)` (no gradient).
pub fn fake_quant_graph(
    x: &Tensor,
    xmin: &Tensor,
    xmax: &Tensor,
    spec: &QuantSpec,
) -> Result<Tensor> {
    let half = (1u32 << (spec.bits - 1)) as f64;
    if spec.symmetric {
        let div = match spec.sym_scale {
            super::SymScale::MaxPos => half - 1.0,
            super::SymScale::HalfRange => spec.qmax() as f64 / 2.0,
            super::SymScale::SignedMax => half,
        };
        let s = (xmax.maximum(&xmin.neg()?)? / div)?.clamp(MIN_SCALE, f64::MAX)?;
        let q = round_ste(&x.broadcast_div(&s)?)?.clamp(-half, half - 1.0)?;
        Ok(q.broadcast_mul(&s)?)
    } else {
        let s = ((xmax - xmin)? / spec.qmax() as f64)?.clamp(MIN_SCALE, f64::MAX)?;
        let z = xmin.neg()?.div(&s)?.round()?.detach();
        let q = (round_ste(&x.broadcast_div(&s)?)?.broadcast_add(&z)?)
            .clamp(0.0, spec.qmax() as f64)?;
        Ok(q.broadcast_sub(&z)?.broadcast_mul(&s)?)
    }
}

impl ActQuantizer for LearnedClip {
    fn apply(&self, x: &Tensor, unit: usize) -> Result<Tensor> {
        super::clipquant::clip_quant_units(
            x,
            unit,
            &self.alpha_max,
            &self.alpha_min,
            &self.spec,
            false,
        )
    }
    fn learned_clip(&self) -> Option<(&Tensor, &Tensor, QuantSpec)> {
        Some((&self.alpha_max, &self.alpha_min, self.spec))
    }
    fn spec(&self) -> Result<QuantSpec> {
        let r = |t: &Tensor| -> Result<f32> { Ok(sigmoid(t)?.flatten_all()?.to_vec1::<f32>()?[0]) };
        Ok(QuantSpec {
            clip: r(&self.alpha_max)?,
            clip_min: r(&self.alpha_min)?,
            ..self.spec
        })
    }
}

//! Learnable clipping (OmniQuant's LWC for weights, FlatQuant's LAC for activations and the KV
//! cache), shared by the learned methods: per unit two logits `γmax, γmin` whose sigmoids scale the
//! unit's extremes (algorithms.md §2.6, §2.7).

use super::train::var;
use crate::error::Result;
use crate::quant::act::sigmoid;
use crate::quant::weight::unit_len;
use crate::quant::{Granularity, LearnedClip, QuantSpec};
use candle_core::{Tensor, Var, D};

/// Learnable clip of one quantizer: `(max, min)` logits, ratios `σ(·)`.
pub struct Clip {
    pub max: Var,
    pub min: Var,
}

impl Clip {
    pub fn new(shape: &[usize]) -> Result<Self> {
        let n: usize = shape.iter().product();
        Ok(Clip {
            max: var(&vec![4.0; n], shape)?,
            min: var(&vec![4.0; n], shape)?,
        })
    }
    pub fn vars(&self) -> Vec<Var> {
        vec![self.max.clone(), self.min.clone()]
    }
    /// The quantizer of grid `spec` clipped by these logits (differentiable in them).
    pub fn learned(&self, spec: QuantSpec) -> LearnedClip {
        LearnedClip {
            spec,
            alpha_max: self.max.as_tensor().clone(),
            alpha_min: self.min.as_tensor().clone(),
        }
    }
}

/// Elements per LWC unit of weight `[out, in]`: a row, or a group of it (checked to divide it).
pub fn lwc_unit(w: &Tensor, group: Option<usize>) -> Result<usize> {
    let (_, inp) = w.dims2()?;
    unit_len(
        "a learnable-clipping weight",
        inp,
        group.map_or(Granularity::Channel, Granularity::Group),
    )
}

/// Weight `[out, in]` viewed as its LWC units `[out·in/g, g]` (one unit per row without groups).
pub fn lwc_units(w: &Tensor, group: Option<usize>) -> Result<Tensor> {
    let g = lwc_unit(w, group)?;
    Ok(w.reshape((w.elem_count() / g, g))?)
}

/// Per-row extremes clipped by learned ratios: `(σ(γmin)·min(w, 0), σ(γmax)·max(w, 0))` per row.
pub fn lwc_bounds(w: &Tensor, clip: &Clip) -> Result<(Tensor, Tensor)> {
    let hi = w
        .max_keepdim(D::Minus1)?
        .broadcast_mul(&sigmoid(clip.max.as_tensor())?)?;
    let lo = w
        .min_keepdim(D::Minus1)?
        .broadcast_mul(&sigmoid(clip.min.as_tensor())?)?;
    Ok((lo, hi))
}

pub fn clamp_rows(w: &Tensor, lo: &Tensor, hi: &Tensor) -> Result<Tensor> {
    Ok(w.broadcast_minimum(hi)?.broadcast_maximum(lo)?)
}

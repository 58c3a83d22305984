//! The quantization plan (what to quantize, on which grids) and the round-to-nearest steps every
//! method shares: weights onto their grid, activation and KV quantizers attached.

use crate::backend::simulated::QuantLinear;
use crate::error::Result;
use crate::formats::schema::WeightScheme;
use crate::model::{Block, LinearKind, LinearLayer, Model};
use crate::quant::{ActQuantizer, Granularity, QuantSpec, QuantizedWeight};
use std::sync::Arc;

/// What to quantize and how.
#[derive(Debug, Clone)]
pub struct QuantPlan {
    pub weights: Option<WeightScheme>,
    pub activations: Option<QuantSpec>,
    pub kv_cache: Option<QuantSpec>,
    pub quantize_head: bool,
}

impl QuantPlan {
    /// The weight scheme of `kind`'s linears (`None`: they stay in full precision).
    pub fn weights_for(&self, kind: LinearKind) -> Option<&WeightScheme> {
        self.weights.as_ref().filter(|w| !w.keeps_dense(kind))
    }

    /// The plan's grids as a learned method trains against them.
    pub fn grids(&self) -> Grids {
        Grids {
            dense: LinearKind::ALL.map(|k| self.weights.as_ref().is_some_and(|w| w.keeps_dense(k))),
            weights: self.weights.as_ref().map(|w| w.spec),
            group_size: self.weights.as_ref().and_then(|w| match w.granularity {
                Granularity::Group(g) => Some(g),
                _ => None,
            }),
            activations: self.activations,
            kv_cache: self.kv_cache,
        }
    }
}

/// The grids of weights, activations and the KV cache, as one value.
#[derive(Debug, Clone, Copy, Default)]
pub struct Grids {
    pub weights: Option<QuantSpec>,
    /// Weight group size along the (transformed) input dimension: learnable clipping per
    /// (row, group); `None` per channel.
    pub group_size: Option<usize>,
    pub activations: Option<QuantSpec>,
    pub kv_cache: Option<QuantSpec>,
    /// Per [`LinearKind::ALL`] entry: the linear stays in full precision.
    pub dense: [bool; 7],
}

impl Grids {
    fn is_dense(&self, kind: LinearKind) -> bool {
        LinearKind::ALL
            .iter()
            .zip(self.dense)
            .any(|(k, d)| *k == kind && d)
    }

    /// The weight grid of `kind`'s linears (`None`: full precision).
    pub fn weights_for(&self, kind: LinearKind) -> Option<QuantSpec> {
        self.weights.filter(|_| !self.is_dense(kind))
    }

    /// The LWC unit length of `kind`'s linears (`None`: per channel, also for a dense linear,
    /// whose clip parameters are never used).
    pub fn group_for(&self, kind: LinearKind) -> Option<usize> {
        self.group_size.filter(|_| !self.is_dense(kind))
    }
}

/// Round-to-nearest quantization of one linear's weight on `scheme` (`None`: kept in full
/// precision), keeping `act` as its input quantizer.
pub fn quantize_linear(
    layer: &dyn LinearLayer,
    name: &str,
    scheme: Option<&WeightScheme>,
    act: Option<Arc<dyn ActQuantizer>>,
) -> Result<QuantLinear> {
    let w = layer.weight()?;
    let (out, inp) = w.dims2()?;
    let qw = match scheme {
        Some(s) => {
            let values: Vec<f32> = w.flatten_all()?.to_vec1()?;
            Some(QuantizedWeight::quantize(
                name,
                &values,
                out,
                inp,
                s.spec,
                s.granularity,
                s.clip_search,
            )?)
        }
        None => None,
    };
    QuantLinear::with_quantizer(qw, w, layer.bias().cloned(), act)
}

fn act_of(plan: &QuantPlan) -> Option<Arc<dyn ActQuantizer>> {
    fixed_quantizer(plan.activations)
}

/// A fixed-grid quantizer as the trait object layers hold.
pub fn fixed_quantizer(spec: Option<QuantSpec>) -> Option<Arc<dyn ActQuantizer>> {
    spec.map(|s| Arc::new(s) as Arc<dyn ActQuantizer>)
}

/// Round-to-nearest quantization of one block's linears with the activation and KV quantizers
/// attached.
pub fn quantize_block(block: &mut Block, plan: &QuantPlan) -> Result<()> {
    let i = block.index();
    for kind in LinearKind::ALL {
        let name = format!("model.layers.{i}.{}", kind.hf_name());
        let q = quantize_linear(
            block.linear(kind),
            &name,
            plan.weights_for(kind),
            act_of(plan),
        )?;
        block.set_linear(kind, Box::new(q))?;
    }
    attach_kv(block, plan.kv_cache);
    Ok(())
}

/// The plan's activation quantizers on every linear input and its KV quantizers, weights left in
/// full precision: the starting point of weight quantizers that need calibration data (GPTQ).
pub fn attach_quantizers(block: &mut Block, plan: &QuantPlan) -> Result<()> {
    attach_fixed_quantizers(block, plan.activations, plan.kv_cache)
}

/// Fixed-grid quantizers `activations` on every linear input and `kv` on keys and values (`None`:
/// none), weights left as they are in full precision.
pub fn attach_fixed_quantizers(
    block: &mut Block,
    activations: Option<QuantSpec>,
    kv: Option<QuantSpec>,
) -> Result<()> {
    for kind in LinearKind::ALL {
        let layer = block.linear(kind);
        let q = QuantLinear::with_quantizer(
            None,
            layer.weight()?,
            layer.bias().cloned(),
            fixed_quantizer(activations),
        )?;
        block.set_linear(kind, Box::new(q))?;
    }
    attach_kv(block, kv);
    Ok(())
}

/// The same fixed per-(token, head) quantizer on keys and values.
pub fn attach_kv(block: &mut Block, kv: Option<QuantSpec>) {
    let q = fixed_quantizer(kv);
    block.set_kv_quantizers(q.clone(), q);
}

/// Round-to-nearest quantization of every decoder linear (and the head if asked), with the
/// activation and KV quantizers attached.
pub fn quantize(model: &mut Model, plan: &QuantPlan) -> Result<()> {
    for block in &mut model.blocks {
        quantize_block(block, plan)?;
    }
    quantize_head(model, plan)
}

/// Round-to-nearest quantization of the head, if the plan asks for it.
pub fn quantize_head(model: &mut Model, plan: &QuantPlan) -> Result<()> {
    if plan.quantize_head {
        let q = quantize_linear(
            model.head.as_ref(),
            "lm_head",
            plan.weights.as_ref(),
            act_of(plan),
        )?;
        model.head = Box::new(q);
        model.tied_head = false;
    }
    Ok(())
}

//! Quantization methods. Every method ends in the same step, `quantize`: weights to their grid,
//! activation and KV quantizers attached. Methods differ in what they do to the model before it
//! (nothing for RTN; an exact orthogonal reparameterisation for `rotate`).

pub mod rotate;

use crate::checkpoint::WeightScheme;
use crate::error::Result;
use crate::model::{LinearKind, LinearLayer, Model};
use crate::quant::{QuantLinear, QuantSpec, QuantizedWeight};

/// What to quantize and how.
#[derive(Debug, Clone)]
pub struct QuantPlan {
    pub weights: Option<WeightScheme>,
    pub activations: Option<QuantSpec>,
    pub kv_cache: Option<QuantSpec>,
    pub quantize_head: bool,
}

fn quantize_linear(
    layer: &dyn LinearLayer,
    name: &str,
    plan: &QuantPlan,
    act: Option<QuantSpec>,
) -> Result<QuantLinear> {
    let w = layer.weight()?;
    let (out, inp) = w.dims2()?;
    let qw = match &plan.weights {
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
    QuantLinear::new(qw, w, layer.bias().cloned(), act)
}

/// Round-to-nearest quantization of one block's linears with the activation and KV quantizers
/// attached.
pub fn quantize_block(block: &mut crate::model::Block, plan: &QuantPlan) -> Result<()> {
    let i = block.index;
    for kind in LinearKind::ALL {
        let name = format!("model.layers.{i}.{}", kind.hf_name());
        let q = quantize_linear(block.linear(kind), &name, plan, plan.activations)?;
        block.set_linear(kind, Box::new(q))?;
    }
    block.k_quant = plan
        .kv_cache
        .map(|s| std::sync::Arc::new(s) as std::sync::Arc<dyn crate::quant::ActQuantizer>);
    block.v_quant = block.k_quant.clone();
    Ok(())
}

/// Round-to-nearest quantization of every decoder linear (and the head if asked), with the
/// activation and KV quantizers attached.
pub fn quantize(model: &mut Model, plan: &QuantPlan) -> Result<()> {
    for block in &mut model.blocks {
        quantize_block(block, plan)?;
    }
    if plan.quantize_head {
        let q = quantize_linear(model.head.as_ref(), "lm_head", plan, plan.activations)?;
        model.head = Box::new(q);
        model.tied_head = false;
    }
    Ok(())
}

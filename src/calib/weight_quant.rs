//! The engine's last step for every block: the weights the method left in full precision (already
//! transformed and clipped) go onto their grid, by round-to-nearest or by GPTQ.

use super::observe_block;
use crate::backend::simulated::QuantLinear;
use crate::error::Result;
use crate::methods::plan::quantize_linear;
use crate::methods::QuantPlan;
use crate::model::{Block, BlockHook, LinearKind, Rope};
use crate::quant::gptq::{gptq_factored, GptqConfig, GptqFactor, Hessian};
use crate::quant::ActQuantizer;
use candle_core::Tensor;
use std::sync::Arc;

/// How weights are rounded (`--weight-quantizer`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum WeightQuantizer {
    Rtn,
    Gptq(GptqConfig),
}

impl WeightQuantizer {
    pub fn name(&self) -> &'static str {
        match self {
            WeightQuantizer::Rtn => "rtn",
            WeightQuantizer::Gptq(_) => "gptq",
        }
    }
}

/// Linears that read the same input, in the order GPTQ quantizes them (§4.3): each group's
/// Hessian is taken with the earlier groups of the block already quantized.
const GPTQ_GROUPS: [&[LinearKind]; 4] = [
    &[LinearKind::K, LinearKind::V, LinearKind::Q],
    &[LinearKind::O],
    &[LinearKind::Up, LinearKind::Gate],
    &[LinearKind::Down],
];

/// Accumulates the Hessian of one linear's input *as the layer sees it*: after the online
/// transform and after its activation quantizer (FlatQuant's choice; QuaRot uses the unquantized
/// rotated input — affq uses what inference computes, for every method).
struct HessianHook {
    kind: LinearKind,
    act: Option<Arc<dyn ActQuantizer>>,
    h: Hessian,
}

impl BlockHook for HessianHook {
    fn linear_input(&mut self, kind: LinearKind, x: &Tensor) -> Result<()> {
        if kind == self.kind {
            match &self.act {
                Some(a) => self.h.add(&a.apply(x, self.h.n)?)?,
                None => self.h.add(x)?,
            }
        }
        Ok(())
    }

    fn last_wanted(&self) -> Option<LinearKind> {
        Some(self.kind)
    }
}

/// Puts every linear of `block` on the plan's weight grid. `x` (`[N, L, hidden]`): the block's
/// calibration inputs from the already-quantized preceding blocks (used by GPTQ only).
pub fn quantize_block_weights(
    block: &mut Block,
    plan: &QuantPlan,
    wq: &WeightQuantizer,
    rope: &Rope,
    x: &Tensor,
    notes: &mut Vec<String>,
) -> Result<()> {
    let Some(scheme) = &plan.weights else {
        return Ok(());
    };
    let index = block.index();
    let name = |kind: LinearKind| format!("model.layers.{index}.{}", kind.hf_name());
    match wq {
        WeightQuantizer::Rtn => {
            for kind in LinearKind::ALL {
                let layer = block.linear(kind);
                let q = quantize_linear(
                    layer,
                    &name(kind),
                    plan.weights_for(kind),
                    layer.act_quantizer(),
                )?;
                block.set_linear(kind, Box::new(q))?;
            }
        }
        WeightQuantizer::Gptq(cfg) => {
            for group in GPTQ_GROUPS {
                // A linear kept dense keeps its full-precision weight (and input quantizer).
                let group: Vec<LinearKind> = group
                    .iter()
                    .copied()
                    .filter(|&k| plan.weights_for(k).is_some())
                    .collect();
                if group.is_empty() {
                    continue;
                }
                let first = block.linear(group[0]);
                let mut hook = HessianHook {
                    kind: group[0],
                    act: first.act_quantizer(),
                    h: Hessian::new(first.in_features()),
                };
                observe_block(block, rope, x, 4, &mut hook)?;
                let inp = hook.h.n;
                let factor = GptqFactor::new(&name(group[0]), hook.h.into_matrix(), inp, cfg)?;
                for &kind in &group {
                    let layer = block.linear(kind);
                    let w = layer.weight()?;
                    let out = w.dims2()?.0;
                    let values: Vec<f32> = w.flatten_all()?.to_vec1()?;
                    let r = gptq_factored(
                        &name(kind),
                        &values,
                        out,
                        &factor,
                        scheme.spec,
                        scheme.granularity,
                        scheme.clip_search,
                        cfg,
                    )?;
                    if r.damp != cfg.damp {
                        notes.push(format!(
                            "{}: GPTQ needed dampening {} (asked {})",
                            name(kind),
                            r.damp,
                            cfg.damp
                        ));
                    }
                    let q = QuantLinear::with_quantizer(
                        Some(r.weight),
                        w,
                        layer.bias().cloned(),
                        layer.act_quantizer(),
                    )?;
                    block.set_linear(kind, Box::new(q))?;
                }
            }
        }
    }
    Ok(())
}

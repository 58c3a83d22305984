//! Round to nearest: no transform; the engine's weight quantizer (RTN or GPTQ) does everything.

use super::plan::attach_quantizers;
use super::{EpochLog, Method, MethodInput, MethodReport, MethodSpec, QuantPlan, SiteStats};
use crate::error::Result;
use crate::model::{Block, Rope};
use candle_core::Tensor;

pub const SPEC: MethodSpec = MethodSpec {
    name: "rtn",
    about: "Round to nearest, no transform.",
    trained: false,
    preset: None,
    own_keys: &[],
    asym_activations: false,
    build: |m: &MethodInput| {
        Ok(Box::new(Rtn {
            plan: m.plan.clone(),
        }))
    },
};

pub struct Rtn {
    plan: QuantPlan,
}

/// A block of an untrained method: the plan's activation and KV quantizers on it as it is.
pub(super) fn untrained(block: &Block, plan: &QuantPlan) -> Result<(Block, MethodReport)> {
    let mut b = block.clone();
    attach_quantizers(&mut b, plan)?;
    Ok((b, MethodReport::default()))
}

impl Method for Rtn {
    fn label(&self) -> &'static str {
        "gptq"
    }
    fn calibrate(
        &mut self,
        block: &Block,
        _: &Rope,
        _: &Tensor,
        _: &Tensor,
        _: &SiteStats,
        _: &mut dyn FnMut(&EpochLog),
    ) -> Result<(Block, MethodReport)> {
        untrained(block, &self.plan)
    }
}

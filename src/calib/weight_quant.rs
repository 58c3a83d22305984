//! The engine's last step for every block: the weights the method left in full precision (already
//! transformed and clipped) go onto their grid, by round-to-nearest or by GPTQ.

use super::{for_each_batch, observe_block};
use crate::backend::simulated::QuantLinear;
use crate::error::Result;
use crate::methods::plan::{attach_fixed_quantizers, quantize_linear};
use crate::methods::QuantPlan;
use crate::model::{Block, BlockHook, LinearKind, Rope, Site, SiteState, Stage};
use crate::quant::gptq::{gptq_factored, CrossMoment, GptqConfig, GptqFactor, Hessian};
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
/// rotated input — affq uses what inference computes, for every method). With GPTQ v2 also
/// `C = Σ (x_fp − x̃)·x̃ᵀ`, the full-precision inputs given per batch of [`BATCH`] windows in the
/// order the batches are shown.
struct HessianHook<'a> {
    kind: LinearKind,
    act: Option<Arc<dyn ActQuantizer>>,
    h: Hessian,
    cross: Option<(CrossMoment, std::slice::Iter<'a, Tensor>)>,
}

impl BlockHook for HessianHook<'_> {
    fn linear_input(&mut self, kind: LinearKind, x: &Tensor) -> Result<()> {
        if kind == self.kind {
            let xq = match &self.act {
                Some(a) => a.apply(x, self.h.n)?,
                None => x.clone(),
            };
            self.h.add(&xq)?;
            // The cross moment covers the windows with full-precision inputs, the first ones
            // (`--gptq-v2-windows`); the last such batch may hold fewer windows than `xq`'s.
            if let Some((c, fp)) = &mut self.cross {
                if let Some(xf) = fp.next() {
                    c.add(xf, &xq.narrow(0, 0, xf.dim(0)?)?)?;
                }
            }
        }
        Ok(())
    }

    fn last_wanted(&self) -> Option<LinearKind> {
        Some(self.kind)
    }
}

/// `block` computing in full precision: its weights as they are (not yet on the grid), no
/// activation or KV-cache quantizer. With the method's transforms online or merged, this is the
/// full-precision block's function in the transformed basis (GPTQ v2's `X`).
fn full_precision(block: &Block) -> Result<Block> {
    let mut b = block.clone();
    attach_fixed_quantizers(&mut b, None, None)?;
    Ok(b)
}

/// Records the inputs of several linears in one pass (the full-precision stream of GPTQ v2).
struct InputsHook {
    kinds: Vec<LinearKind>,
    seen: Vec<Option<Tensor>>,
}

impl BlockHook for InputsHook {
    fn linear_input(&mut self, kind: LinearKind, x: &Tensor) -> Result<()> {
        if let Some(i) = self.kinds.iter().position(|&k| k == kind) {
            self.seen[i] = Some(x.clone());
        }
        Ok(())
    }

    fn last_wanted(&self) -> Option<LinearKind> {
        self.kinds.last().copied()
    }
}

/// Windows per pass of GPTQ's observations.
const BATCH: usize = 4;

/// The inputs of the linears `kinds` in the full-precision block `fp` on the first `windows`
/// windows of `fx`, one forward per batch of [`BATCH`] windows: `[kind][batch]`.
fn full_precision_inputs(
    fp: &Block,
    rope: &Rope,
    fx: &Tensor,
    windows: usize,
    kinds: &[LinearKind],
) -> Result<Vec<Vec<Tensor>>> {
    if fx.dim(0)? < windows {
        return Err(crate::error::Error::Runtime(format!(
            "GPTQ v2: {} full-precision windows for {windows} quantized ones",
            fx.dim(0)?
        )));
    }
    let mut out = vec![Vec::new(); kinds.len()];
    let mut s = 0;
    while s < windows {
        let b = BATCH.min(windows - s);
        let mut hook = InputsHook {
            kinds: kinds.to_vec(),
            seen: vec![None; kinds.len()],
        };
        fp.observe(
            &fx.narrow(0, s, b)?.to_dtype(candle_core::DType::F32)?,
            rope,
            &mut hook,
        )?;
        for (o, seen) in out.iter_mut().zip(hook.seen) {
            o.push(seen.ok_or_else(|| {
                crate::error::Error::Runtime("GPTQ v2: a linear's input was never reached".into())
            })?);
        }
        s += b;
    }
    Ok(out)
}

/// `state` run forward to `site` (`None`: to the block's output) with the block's linears as
/// they are now.
fn run_to(block: &Block, state: SiteState, site: Option<Site>, rope: &Rope) -> Result<Stage> {
    let mut stage = Stage::At(state);
    while let Stage::At(s) = stage {
        if Some(s.site()) == site {
            return Ok(Stage::At(s));
        }
        stage = block.advance(s, rope)?;
    }
    Ok(stage)
}

/// The most bytes of states GPTQ carries site by site (every window's residual stream and input
/// at the widest site, in f32): beyond it each group runs its own partial forward instead, which
/// holds one batch at a time (SmolLM2 at 32 × 512 tokens: 138 MB; an 8B model at 128 × 2048:
/// 19 GB).
pub const STAGED_MAX_BYTES: usize = 2 << 30;

/// Puts every linear of `block` on the plan's weight grid. `x` (`[N, L, hidden]`): the block's
/// calibration inputs from the already-quantized preceding blocks (used by GPTQ only); `fx`: the
/// same windows' full-precision inputs (GPTQ v2 only); `max_state_bytes` bounds the states GPTQ
/// carries site by site ([`STAGED_MAX_BYTES`]; either way the same weights). GPTQ returns the
/// quantized block's output on `x` (in `x`'s dtype) when it carried the windows site by site,
/// which computes it anyway.
#[allow(clippy::too_many_arguments)]
pub fn quantize_block_weights(
    block: &mut Block,
    plan: &QuantPlan,
    wq: &WeightQuantizer,
    rope: &Rope,
    x: &Tensor,
    fx: Option<&Tensor>,
    notes: &mut Vec<String>,
    max_state_bytes: usize,
) -> Result<Option<Tensor>> {
    let Some(scheme) = &plan.weights else {
        return Ok(None);
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
            Ok(None)
        }
        WeightQuantizer::Gptq(cfg) => {
            // A linear kept dense keeps its full-precision weight (and input quantizer).
            let groups: Vec<Vec<LinearKind>> = GPTQ_GROUPS
                .iter()
                .map(|g| {
                    g.iter()
                        .copied()
                        .filter(|&k| plan.weights_for(k).is_some())
                        .collect::<Vec<_>>()
                })
                .filter(|g| !g.is_empty())
                .collect();
            // GPTQ v2: every group's full-precision input, before any weight is on the grid.
            let v2 = match (cfg.v2_alpha, fx) {
                (Some(a), Some(fx)) => {
                    let firsts: Vec<LinearKind> = groups.iter().map(|g| g[0]).collect();
                    let fp = full_precision(block)?;
                    let windows = fx.dim(0)?.min(x.dim(0)?);
                    let inputs = full_precision_inputs(&fp, rope, fx, windows, &firsts)?;
                    Some((a, inputs))
                }
                (Some(_), None) => {
                    return Err(crate::error::Error::Runtime(
                        "GPTQ v2 needs the full-precision inputs".into(),
                    ))
                }
                _ => None,
            };
            // Every batch of windows is carried site by site: each group is observed with the
            // groups before it already quantized (as a forward per group to its site would), and
            // what was computed up to a site is not computed again for the next group.
            let config = block.config();
            let widest = Site::ALL.iter().map(|s| s.dim(config)).max().unwrap_or(0);
            let (n, l, _) = x.dims3()?;
            let staged = n * l * (config.hidden_size + widest) * std::mem::size_of::<f32>()
                <= max_state_bytes;
            let mut states = Vec::new();
            if staged {
                for_each_batch(x, BATCH, |xb| {
                    states.push(block.enter(xb)?);
                    Ok(())
                })?;
            }
            for (gi, group) in groups.into_iter().enumerate() {
                let site = group[0].site();
                states = states
                    .into_iter()
                    .map(|s| match run_to(block, s, Some(site), rope)? {
                        Stage::At(s) => Ok(s),
                        Stage::Out(_) => Err(crate::error::Error::Runtime(format!(
                            "GPTQ: site {} after the block's end",
                            site.name()
                        ))),
                    })
                    .collect::<Result<_>>()?;
                let first = block.linear(group[0]);
                let (inp, act) = (first.in_features(), first.act_quantizer());
                let mut hook = HessianHook {
                    kind: group[0],
                    act,
                    h: Hessian::new(inp),
                    cross: v2
                        .as_ref()
                        .map(|(_, inputs)| (CrossMoment::new(inp), inputs[gi].iter())),
                };
                if staged {
                    states = states
                        .into_iter()
                        .map(|s| block.show(s, &mut hook))
                        .collect::<Result<_>>()?;
                } else {
                    observe_block(block, rope, x, BATCH, &mut hook)?;
                }
                let cross = hook.cross.map(|(c, _)| c.into_matrix());
                let factor = GptqFactor::new(&name(group[0]), hook.h.into_matrix(), inp, cfg)?;
                for &kind in &group {
                    let layer = block.linear(kind);
                    let w = layer.weight()?;
                    let out = w.dims2()?.0;
                    let mut values: Vec<f32> = w.flatten_all()?.to_vec1()?;
                    if let (Some(c), Some((alpha, _))) = (&cross, &v2) {
                        values = factor.asymmetric_target(&values, out, c, *alpha);
                    }
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
            if !staged {
                return Ok(None);
            }
            let outs = states
                .into_iter()
                .map(|s| match run_to(block, s, None, rope)? {
                    Stage::Out(y) => Ok(y.to_dtype(x.dtype())?),
                    Stage::At(_) => unreachable!("run to the end"),
                })
                .collect::<Result<Vec<_>>>()?;
            Ok(Some(Tensor::cat(&outs, 0)?))
        }
    }
}

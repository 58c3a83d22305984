//! The calibration engine: one loop for every learned method.
//!
//! Layer by layer: the full-precision inputs `X` of block `i` are run through the FP block to get
//! its outputs `Y` (and per-channel activation statistics); a `Method` turns the FP block into
//! its deployed quantized form by minimising the block-output MSE; `Y` becomes the next block's
//! input (no error propagation, as FlatQuant and AffineQuant do). Only one block's activations are
//! alive at a time.

pub mod data;
pub mod key_smooth;
pub mod lock;
pub mod resume;
pub mod shard;
pub mod weight_quant;

use crate::error::{Error, Result};
use crate::methods::plan::{attach_quantizers, quantize_block};
use crate::methods::{BlockData, EpochLog, Method, MethodReport, QuantPlan, SiteStats};
use crate::model::{Block, BlockHook, Mode, Model, NoHook, Rope};
use candle_core::{DType, Tensor};
use std::time::Instant;
pub use weight_quant::WeightQuantizer;

/// What a method reports for a block.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct BlockReport {
    pub block: usize,
    /// Output MSE of plain RTN (no transform) on the first calibration windows.
    pub loss_rtn: f64,
    /// Output MSE of the deployed block (transforms merged, weights on the grid), same windows.
    pub loss_final: f64,
    /// The trained block lost to its untrained start, which was deployed instead.
    #[serde(default)]
    pub kept_untrained: bool,
    pub epochs: Vec<EpochLog>,
    /// From the block's full-precision forward to its deployment; blocks whose weight quantizer
    /// ran beside the next block's training overlap in time ([`calibrate_model`]).
    pub seconds: f64,
    /// Anything the method had to do about numerical trouble.
    pub notes: Vec<String>,
}

/// Where finished blocks are kept so an interrupted calibration can continue, and where the
/// processes of a sharded calibration meet ([`resume::WorkDir`]).
pub trait BlockStore {
    /// Block `i` as an earlier run (or another shard) finished it, if it did.
    fn load(&self, i: usize) -> Result<Option<(Block, BlockReport)>>;
    /// Whether block `i` is finished (without reading it).
    fn contains(&self, i: usize) -> bool;
    fn save(&self, block: &Block, report: &BlockReport) -> Result<()>;
    /// Claims block `i` for this process before it is calibrated, so that concurrent shards do
    /// not calibrate it twice. The default grants every claim (a store of one process).
    fn claim(&self, _i: usize) -> Result<BlockClaim> {
        Ok(BlockClaim::Granted(Box::new(())))
    }
}

/// The answer to [`BlockStore::claim`].
pub enum BlockClaim {
    /// Finished meanwhile by another process.
    Done,
    /// Ours until the guard is dropped.
    Granted(Box<dyn std::any::Any>),
    /// Another live process calibrates it; the text says which.
    Busy(String),
}

/// Which blocks a run calibrates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Schedule {
    /// Every block, each put into the flow in order (finished blocks in the store are loaded).
    Whole,
    /// One shard of a sharded calibration: only these blocks, each claimed in the store first and
    /// saved there; the blocks before them are only run forward, and nothing is put into the
    /// flow.
    Shard(std::ops::Range<usize>),
}

/// What [`calibrate_model`] did.
#[derive(Debug, Default)]
pub struct CalibOutcome {
    /// The blocks calibrated (or, for a whole run, also those loaded), in order.
    pub reports: Vec<BlockReport>,
    /// Shard blocks found finished in the store.
    pub already_done: Vec<usize>,
    /// Shard blocks another live process was calibrating, and who.
    pub busy: Vec<(usize, String)>,
    /// Seconds from the embedding to the first block of the schedule (a shard's forward pass
    /// over the blocks before its range).
    pub prefix_seconds: f64,
}

/// Where the engine reads the full-precision blocks and where it puts the deployed ones, so a
/// calibration holds one block at a time (the checkpoint reader and writer).
pub trait BlockFlow {
    fn num_blocks(&self) -> usize;
    /// Block `i` in full precision, as the model has it (before the method's whole-model step).
    fn take(&mut self, i: usize) -> Result<Block>;
    /// The deployed block `block.index()`; blocks come in order.
    fn put(&mut self, block: Block) -> Result<()>;
}

/// What the engine does after the method: the quantization plan and how weights are rounded.
pub struct EngineConfig {
    pub plan: QuantPlan,
    pub weight_quantizer: WeightQuantizer,
    /// The method trains on the first `method_windows` calibration windows; GPTQ's Hessians use
    /// all of them. A Hessian of an n-wide input needs well over n tokens to generalise (GPTQ
    /// uses 128 × 2048), more than a CPU training budget such as AffineQuant's 8 × 512.
    pub method_windows: usize,
    /// The dtype the block inputs and targets are kept in between blocks (f32, or bf16 for half
    /// the memory); every product still runs in f32.
    pub activations: DType,
    /// GPTQ's Hessians from the full-precision model's inputs instead of the quantized model's
    /// own: each block then depends only on the full-precision model, so blocks can be
    /// calibrated by separate processes ([`Schedule::Shard`]).
    pub gptq_fp_inputs: bool,
    /// Deploy a trained block even when it loses to its untrained start (not when it diverged).
    pub keep_trained: bool,
    /// Trained methods learn on the quantized model's own inputs (the outputs of the blocks
    /// already deployed) against the full-precision block's outputs on the full-precision
    /// inputs, so each block also learns to undo the error of the blocks before it (the
    /// asymmetric calibration of OmniQuant and GPTAQ; algorithms.md §8).
    pub quantized_inputs: bool,
    /// Smooth and centre every block's keys before its method (a quantized KV cache;
    /// [`key_smooth`]).
    pub condition_keys: bool,
    /// A block's weight quantizer runs beside the next block's forward and training (where
    /// those do not read its output, [`calibrate_model`]): the same blocks in less time, with
    /// two blocks' working memory alive at once (and the weight quantizer then allocating under
    /// the training's heap policy, `crate::heap::ReuseLarge`, for models whose buffers need it).
    pub overlap: bool,
}

/// A block of an untrained method: the plan's activation and KV quantizers on it as it is.
fn untrained(block: &Block, plan: &QuantPlan) -> Result<(Block, MethodReport)> {
    let mut b = block.clone();
    attach_quantizers(&mut b, plan)?;
    Ok((b, MethodReport::default()))
}

/// Runs `block` over `x` in chunks of `batch` samples (eval path) with `hook` observing; the
/// output has `x`'s dtype (a bf16 store is widened per chunk, the block computes in f32).
pub fn run_block(
    block: &Block,
    rope: &Rope,
    x: &Tensor,
    batch: usize,
    hook: &mut dyn BlockHook,
) -> Result<Tensor> {
    let mut outs = Vec::new();
    for_each_batch(x, batch, |xb| {
        outs.push(
            block
                .forward(xb, rope, Mode::Eval, hook)?
                .to_dtype(x.dtype())?,
        );
        Ok(())
    })?;
    Ok(Tensor::cat(&outs, 0)?)
}

/// `f` on `x` (`[N, ...]`) `batch` windows at a time, each batch in f32.
pub(super) fn for_each_batch(
    x: &Tensor,
    batch: usize,
    mut f: impl FnMut(&Tensor) -> Result<()>,
) -> Result<()> {
    let n = x.dim(0)?;
    let mut s = 0;
    while s < n {
        let b = batch.min(n - s);
        f(&x.narrow(0, s, b)?.to_dtype(DType::F32)?)?;
        s += b;
    }
    Ok(())
}

/// Windows on which a block's deployed form is compared with its untrained (RTN) start.
pub const PROBE_WINDOWS: usize = 4;

/// Shows `hook` the linear inputs of `block` on `x` (`[N, L, hidden]`), `batch` windows at a
/// time, running each batch only as far as the hook wants ([`Block::observe`]).
pub fn observe_block(
    block: &Block,
    rope: &Rope,
    x: &Tensor,
    batch: usize,
    hook: &mut dyn BlockHook,
) -> Result<()> {
    for_each_batch(x, batch, |xb| block.observe(xb, rope, hook))
}

/// Mean squared error between two tensors (either dtype), in f64.
pub fn mse(a: &Tensor, b: &Tensor) -> Result<f64> {
    let (a, b) = (a.to_dtype(DType::F32)?, b.to_dtype(DType::F32)?);
    Ok((a - b)?
        .sqr()?
        .mean_all()?
        .to_dtype(candle_core::DType::F64)?
        .to_scalar::<f64>()?)
}

/// Calibrates the blocks of `blocks` that `schedule` names, on `tokens` `[N, L]`, with `method`
/// (on the first `engine.method_windows` windows; GPTQ on all): each block is taken from
/// `blocks`, goes through the method's whole-model step ([`Method::prepare_block`]; `ends`
/// already went through [`Method::prepare`]) and its calibration, and is put back in its deployed
/// form (a whole run) or saved in `store` (a shard). `ends` gives the embedding and RoPE.
/// `progress(done, total, report)` after each block.
///
/// Methods train on the full-precision inputs and targets (no error propagation, as FlatQuant
/// does), or with `engine.quantized_inputs` on the quantized model's own inputs against the
/// full-precision targets; GPTQ's Hessians come from the inputs produced by the already-quantized
/// preceding blocks (as GPTQ and QuaRot do), so those are carried along only when GPTQ runs,
/// unless `engine.gptq_fp_inputs`. A block's result is thus a function of the settings and the
/// full-precision blocks before it, which is what lets a shard start at any block.
///
/// The same dependence lets two blocks be worked on at once: block `i`'s weight quantizer (GPTQ's
/// staged pass with its Hessians and cross moments, and its solves: a quarter to a third of a
/// block's time at the W4A4 preset) runs on a second thread
/// while block `i + 1` is run forward and trained, which reads only the full-precision stream.
/// Training on the quantized model's inputs reads block `i`'s deployed outputs, so there the two
/// run in turn. Either way each block is computed exactly as alone; a block's `seconds` run from
/// its forward to its deployment, so with the overlap they add up to more than the run's time.
#[allow(clippy::too_many_arguments)]
pub fn calibrate_model(
    ends: &mut Model,
    blocks: &mut dyn BlockFlow,
    tokens: &Tensor,
    method: &mut dyn Method,
    engine: &EngineConfig,
    store: Option<&dyn BlockStore>,
    schedule: &Schedule,
    mut on_epoch: impl FnMut(usize, &EpochLog),
    mut progress: impl FnMut(usize, usize, &BlockReport),
) -> Result<CalibOutcome> {
    let (_, l) = tokens.dims2()?;
    if l > ends.rope.max_len() {
        ends.rope = Rope::new(&ends.config, l)?;
    }
    let rope = &ends.rope;
    let gptq = matches!(engine.weight_quantizer, WeightQuantizer::Gptq(_));
    let total = blocks.num_blocks();
    let range = match schedule {
        Schedule::Whole => 0..total,
        Schedule::Shard(r) => {
            if gptq && !engine.gptq_fp_inputs {
                return Err(Error::Usage(
                    "a shard cannot calibrate GPTQ on the quantized model's own inputs (they need every earlier block): use --gptq-fp-inputs".into(),
                ));
            }
            if engine.quantized_inputs {
                return Err(Error::Usage(
                    "a shard cannot train on the quantized model's own inputs (they need every earlier block)".into(),
                ));
            }
            if store.is_none() || r.end > total {
                return Err(Error::Runtime(format!(
                    "shard blocks {r:?} of {total}: needs a work directory"
                )));
            }
            r.clone()
        }
    };
    let shard = matches!(schedule, Schedule::Shard(_));
    let all = ends.embed(tokens)?.to_dtype(engine.activations)?;
    // An untrained method reads its full-precision path only for the deploy check's targets.
    let method_windows = match method.trainer() {
        Some(_) => engine.method_windows,
        None => engine.method_windows.min(PROBE_WINDOWS),
    };
    let windows = method_windows.min(all.dim(0)?).max(1);
    let mut x = all.narrow(0, 0, windows)?;
    // GPTQ v2 compares the quantized model's inputs with the full-precision ones on its first
    // `fp_windows` windows (all of GPTQ's by default): the training windows `x` when they cover
    // them, else a stream of its own.
    let (v2, fp_windows) = match engine.weight_quantizer {
        WeightQuantizer::Gptq(g) if g.v2_alpha.is_some() => {
            (true, g.v2_windows.unwrap_or(usize::MAX).min(all.dim(0)?))
        }
        _ => (false, 0),
    };
    let mut xf = match v2 && windows < fp_windows {
        true => Some(all.narrow(0, 0, fp_windows)?),
        false => None,
    };
    let mut run = Run {
        engine,
        rope,
        store,
        shard,
        total: range.len(),
        xq: (gptq || engine.quantized_inputs).then_some(all),
        out: CalibOutcome::default(),
    };
    let on_epoch: &mut dyn FnMut(usize, &EpochLog) = &mut on_epoch;
    let progress: &mut dyn FnMut(usize, usize, &BlockReport) = &mut progress;
    // One worker thread asked for (`--threads 1`) means one block at a time.
    let overlap = engine.overlap && rayon::current_num_threads() > 1;
    // The weight quantizer beside a training runs on one thread of its own, so that the two
    // never queue behind each other's small parallel steps in one pool (SmolLM2's W4A4 preset in
    // a slow machine state: 0.79 × the one-block-at-a-time time, 0.82 × with both in the global
    // pool; in a fast state, where one block at a time already keeps both cores busy, 0.99 ×).
    let side = match overlap {
        true => Some(
            rayon::ThreadPoolBuilder::new()
                .num_threads(1)
                .build()
                .map_err(|e| Error::Runtime(format!("weight quantizer thread: {e}")))?,
        ),
        false => None,
    };
    // The block trained last, its weights not yet on the grid, and its shard claim.
    let mut pending: Option<(Trained, Option<Box<dyn std::any::Any>>)> = None;
    let t_start = Instant::now();
    for i in 0..range.end {
        if i == range.start {
            run.out.prefix_seconds = t_start.elapsed().as_secs_f64();
        }
        let t0 = Instant::now();
        let role = if i < range.start {
            Role::Forward
        } else if shard {
            let store = store.expect("checked above");
            let claim = if store.contains(i) {
                BlockClaim::Done
            } else {
                store.claim(i)?
            };
            match claim {
                BlockClaim::Done => Role::Done,
                BlockClaim::Busy(who) => Role::Busy(who),
                BlockClaim::Granted(guard) => Role::Calibrate(Some(guard)),
            }
        } else if let Some(loaded) = store.map(|s| s.load(i)).transpose()?.flatten() {
            Role::Loaded(Box::new(loaded))
        } else {
            Role::Calibrate(None)
        };
        let calibrate = matches!(role, Role::Calibrate(_));
        // Block i's forward and training overlap block i − 1's weight quantizer unless they read
        // the quantized stream that it advances (or block i only advances that stream), or the
        // engine is asked for one block at a time.
        if !calibrate || engine.quantized_inputs || !overlap {
            if let Some((p, claim)) = pending.take() {
                run.settle(p, claim, None, method, blocks, on_epoch, progress)?;
            }
        }
        let (front, weighed) = std::thread::scope(|s| {
            let weighing = pending.as_mut().zip(side.as_ref()).map(|((p, _), side)| {
                let xq = run.xq.as_ref();
                s.spawn(move || side.install(|| p.weigh(engine, rope, xq)))
            });
            let front = (|| -> Result<(Block, Tensor, Option<Trained>)> {
                let mut fp = blocks.take(i)?;
                method.prepare_block(&mut fp)?;
                if engine.condition_keys {
                    key_smooth::condition_keys(&mut fp, rope, &x)?;
                }
                let mut stats = SiteStats::default();
                let y = run_block(&fp, rope, &x, 4, &mut stats)?;
                let ymax = y.flatten_all()?.max(0)?.to_dtype(DType::F32)?;
                if !ymax.to_scalar::<f32>()?.is_finite() {
                    return Err(Error::Runtime(format!(
                        "block {i}: full-precision outputs are not finite"
                    )));
                }
                let fx = match (v2, &xf) {
                    (false, _) => None,
                    (true, Some(f)) => Some(f.clone()),
                    (true, None) => Some(x.narrow(0, 0, fp_windows.min(windows))?),
                };
                // The next block's full-precision GPTQ v2 inputs: on the training windows they
                // are `y` (the same block on the same windows), so only the windows beyond them
                // run here.
                if let Some(f) = xf.as_mut() {
                    let w = y.dim(0)?;
                    let rest =
                        run_block(&fp, rope, &f.narrow(0, w, f.dim(0)? - w)?, 4, &mut NoHook)?;
                    *f = Tensor::cat(&[&y, &rest], 0)?;
                }
                let trained = match calibrate {
                    false => None,
                    true => {
                        let xt = match (&run.xq, engine.quantized_inputs) {
                            (Some(xq), true) => xq.narrow(0, 0, windows)?,
                            _ => x.clone(),
                        };
                        let data = BlockData {
                            block: &fp,
                            rope,
                            x: &xt,
                            y: &y,
                            stats: &stats,
                        };
                        let (block, rep, probe, loss_rtn) =
                            train_block(&data, method, &engine.plan, &mut |e| on_epoch(i, e))?;
                        Some(Trained {
                            i,
                            t0,
                            fp: fp.clone(),
                            x: xt,
                            y: y.clone(),
                            stats,
                            fx,
                            probe,
                            loss_rtn,
                            block,
                            rep,
                            trained: method.trainer().is_some(),
                        })
                    }
                };
                Ok((fp, y, trained))
            })();
            let weighed =
                weighing.map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)));
            (front, weighed)
        });
        if let Some((p, claim)) = pending.take() {
            run.settle(p, claim, weighed, method, blocks, on_epoch, progress)?;
        }
        let (fp, y, trained) = front?;
        match role {
            Role::Calibrate(claim) => pending = trained.map(|t| (t, claim)),
            Role::Forward => run.advance(&fp, None)?,
            Role::Done => {
                run.advance(&fp, None)?;
                run.out.already_done.push(i);
            }
            Role::Busy(who) => {
                run.advance(&fp, None)?;
                run.out.busy.push((i, who));
            }
            Role::Loaded(loaded) => {
                let (block, report) = *loaded;
                run.advance(&fp, Some(&block))?;
                blocks.put(block)?;
                progress(run.out.reports.len() + 1, run.total, &report);
                run.out.reports.push(report);
            }
        }
        x = y;
    }
    if let Some((p, claim)) = pending.take() {
        run.settle(p, claim, None, method, blocks, on_epoch, progress)?;
    }
    Ok(run.out)
}

/// What the engine does with block `i` of the loop.
enum Role {
    /// Only runs forward (before a shard's range).
    Forward,
    /// A shard block another process finished.
    Done,
    /// A shard block another live process calibrates (named).
    Busy(String),
    /// Finished by an earlier run of a whole calibration.
    Loaded(Box<(Block, BlockReport)>),
    /// Calibrated here (a shard: under its claim).
    Calibrate(Option<Box<dyn std::any::Any>>),
}

/// The loop's state past the blocks' full-precision stream.
struct Run<'a> {
    engine: &'a EngineConfig,
    rope: &'a Rope,
    store: Option<&'a dyn BlockStore>,
    shard: bool,
    /// Blocks of the schedule.
    total: usize,
    /// The quantized model's stream: the inputs of the next block to deploy.
    xq: Option<Tensor>,
    out: CalibOutcome,
}

/// A block after its method, before its weight quantizer and deploy decision.
struct Trained {
    i: usize,
    /// When the block's forward started.
    t0: Instant,
    fp: Block,
    /// The training inputs and the full-precision outputs, and the input statistics.
    x: Tensor,
    y: Tensor,
    stats: SiteStats,
    /// GPTQ v2's full-precision inputs.
    fx: Option<Tensor>,
    /// The first windows of `x` and `y` in f32 (the deploy check's), and plain RTN's loss there.
    probe: (Tensor, Tensor),
    loss_rtn: f64,
    block: Block,
    rep: MethodReport,
    /// The method trains (a block that loses to its start may be replaced).
    trained: bool,
}

/// A block's loss on the probe windows after the weight quantizer; with GPTQ also its output on
/// the quantized stream.
type Scored = (f64, Option<Tensor>);

/// The engine's weight quantizer on a calibrated block (GPTQ on `wx`, GPTQ v2 also on `fx`), then
/// its loss on the probe windows `(xp, yp)`.
fn weigh(
    block: &mut Block,
    notes: &mut Vec<String>,
    engine: &EngineConfig,
    rope: &Rope,
    (wx, fx): (&Tensor, Option<&Tensor>),
    (xp, yp): (&Tensor, &Tensor),
) -> Result<Scored> {
    let out = weight_quant::quantize_block_weights(
        block,
        &engine.plan,
        &engine.weight_quantizer,
        rope,
        wx,
        fx,
        notes,
        weight_quant::STAGED_MAX_BYTES,
    )?;
    Ok((mse(&run_block(block, rope, xp, 4, &mut NoHook)?, yp)?, out))
}

/// The method's calibration of `d` (an untrained method: the plan's quantizers attached), cut
/// from the autograd graph; with the untrained start on the first windows: the probe windows in
/// f32 (even when the store is bf16, so the deploy decision compares unrounded outputs) and plain
/// RTN's loss on them.
fn train_block(
    d: &BlockData,
    method: &mut dyn Method,
    plan: &QuantPlan,
    on_epoch: &mut dyn FnMut(&EpochLog),
) -> Result<(Block, MethodReport, (Tensor, Tensor), f64)> {
    let probe = d.x.dim(0)?.min(PROBE_WINDOWS);
    let (xp, yp) = (
        d.x.narrow(0, 0, probe)?.to_dtype(DType::F32)?,
        d.y.narrow(0, 0, probe)?.to_dtype(DType::F32)?,
    );
    let mut rtn = d.block.clone();
    quantize_block(&mut rtn, plan)?;
    let loss_rtn = mse(&run_block(&rtn, d.rope, &xp, 4, &mut NoHook)?, &yp)?;
    let (mut block, rep) = match method.trainer() {
        Some(t) => t.calibrate(d, on_epoch)?,
        None => untrained(d.block, plan)?,
    };
    block.detach();
    Ok((block, rep, (xp, yp), loss_rtn))
}

impl Trained {
    /// [`weigh`] of the trained block on the quantized stream `xq` (the full-precision inputs
    /// where the engine carries none: RTN weights).
    fn weigh(&mut self, engine: &EngineConfig, rope: &Rope, xq: Option<&Tensor>) -> Result<Scored> {
        weigh(
            &mut self.block,
            &mut self.rep.notes,
            engine,
            rope,
            (xq.unwrap_or(&self.x), self.fx.as_ref()),
            (&self.probe.0, &self.probe.1),
        )
    }
}

impl Run<'_> {
    /// The quantized stream past block `fp`: through the full-precision block with
    /// `gptq_fp_inputs`, else through the block deployed here (none: a shard never carries
    /// quantized inputs past a block it did not deploy).
    fn advance(&mut self, fp: &Block, deployed: Option<&Block>) -> Result<()> {
        let through = match self.engine.gptq_fp_inputs {
            true => Some(fp),
            false => deployed,
        };
        if let (Some(xq), Some(b)) = (self.xq.as_mut(), through) {
            *xq = run_block(b, self.rope, xq, 4, &mut NoHook)?;
        }
        Ok(())
    }

    /// The weight quantizer on a trained block (unless `weighed` beside the next block's
    /// training), the deploy decision against its untrained start, then the block deployed: the
    /// quantized stream advanced through it, saved in the store, put into the flow (a whole run),
    /// reported.
    #[allow(clippy::too_many_arguments)]
    fn settle(
        &mut self,
        mut p: Trained,
        claim: Option<Box<dyn std::any::Any>>,
        weighed: Option<Result<Scored>>,
        method: &mut dyn Method,
        blocks: &mut dyn BlockFlow,
        on_epoch: &mut dyn FnMut(usize, &EpochLog),
        progress: &mut dyn FnMut(usize, usize, &BlockReport),
    ) -> Result<()> {
        let scored = match weighed {
            Some(scored) => scored,
            None => p.weigh(self.engine, self.rope, self.xq.as_ref()),
        };
        let (mut loss_final, mut out) = scored?;
        let Trained {
            i,
            t0,
            fp,
            x,
            y,
            stats,
            fx,
            probe: (xp, yp),
            loss_rtn,
            mut block,
            mut rep,
            trained,
        } = p;
        let (engine, rope) = (self.engine, self.rope);
        let wx = self.xq.as_ref().unwrap_or(&x);
        let score = |block: &mut Block, notes: &mut Vec<String>| {
            weigh(block, notes, engine, rope, (wx, fx.as_ref()), (&xp, &yp))
        };
        let data = BlockData {
            block: &fp,
            rope,
            x: &x,
            y: &y,
            stats: &stats,
        };
        let loses = |loss: f64| loss.is_nan() || (!engine.keep_trained && loss > loss_rtn);
        // A method with a second start trains a block that lost to its untrained start once more
        // from there, and keeps the lower of the two (AffineQuant, docs/algorithms.md §3.10).
        if trained && loses(loss_final) {
            let retry = match method.trainer() {
                Some(t) => t.recalibrate(&data, &mut |e| on_epoch(i, e))?,
                None => None,
            };
            if let Some(mut r) = retry {
                r.block.detach();
                let (loss, r_out) = score(&mut r.block, &mut r.report.notes)?;
                let note = format!(
                    "block {i}: the trained block's loss {loss_final:.3e} is above the untrained start's {loss_rtn:.3e} (RTN); trained again from {}: loss {loss:.3e}",
                    r.start
                );
                if loss < loss_final || (loss_final.is_nan() && !loss.is_nan()) {
                    block = r.block;
                    rep = r.report;
                    loss_final = loss;
                    out = r_out;
                }
                rep.notes.insert(0, note);
            }
        }
        // A trained block is deployed only if it beats its untrained start on the calibration
        // windows (a diverged training must not cost more than not training at all); the start
        // gets the engine's weight quantizer (GPTQ where asked, RTN if GPTQ does no better).
        let mut kept_untrained = false;
        if trained && loses(loss_final) {
            let mut rtn = fp.clone();
            quantize_block(&mut rtn, &engine.plan)?;
            // With RTN weights the untrained start is `rtn` itself.
            let (start, loss_start, start_out) = match engine.weight_quantizer {
                WeightQuantizer::Rtn => (rtn, loss_rtn, None),
                WeightQuantizer::Gptq(_) => {
                    let (mut start, _) = untrained(&fp, &engine.plan)?;
                    let mut notes = Vec::new();
                    let (loss, start_out) = score(&mut start, &mut notes)?;
                    if loss <= loss_rtn {
                        rep.notes.extend(notes);
                        (start, loss, start_out)
                    } else {
                        (rtn, loss_rtn, None)
                    }
                }
            };
            rep.notes.push(format!(
                "block {i}: the trained block's loss {loss_final:.3e} is above the untrained start's {loss_rtn:.3e} (RTN); deployed the untrained block ({} weights, loss {loss_start:.3e})",
                engine.weight_quantizer.name()
            ));
            block = start;
            loss_final = loss_start;
            out = start_out;
            kept_untrained = true;
        }
        // The next block's inputs through this one are part of its cost (GPTQ on the quantized
        // model's inputs computed them).
        match out {
            Some(y) if self.xq.is_some() && !engine.gptq_fp_inputs => self.xq = Some(y),
            _ => self.advance(&fp, Some(&block))?,
        }
        let report = BlockReport {
            block: i,
            loss_rtn,
            loss_final,
            kept_untrained,
            epochs: rep.epochs,
            seconds: t0.elapsed().as_secs_f64(),
            notes: rep.notes,
        };
        if let Some(s) = self.store {
            s.save(&block, &report)?;
        }
        drop(claim);
        if !self.shard {
            blocks.put(block)?;
        }
        let done = self.out.reports.len() + self.out.already_done.len() + 1;
        progress(done, self.total, &report);
        self.out.reports.push(report);
        Ok(())
    }
}

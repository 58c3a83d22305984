//! Quantization methods: each is one file behind one trait, [`Method`], and one entry of
//! [`REGISTRY`] (its name, what it trains, its default recipe, the recipe keys it reads and how it
//! is built). Adding a method is a new file plus its line in the registry; the CLI, the plan and
//! the calibration engine (`crate::calib`) know methods only through these.
//!
//! Every method ends in the same step: the engine puts the weights the method leaves in full
//! precision onto their grid (RTN or GPTQ). Methods differ in what they do before it — nothing
//! (`rtn`), an exact orthogonal reparameterisation of the whole model (`rotate`), or learned
//! transforms and clipping trained block by block (`flatquant`, `affinequant`, on the shared loop
//! of [`train`] with the learnable clipping of [`lwc`]).

pub mod affinequant;
pub mod flatquant;
pub mod lwc;
pub mod plan;
pub mod rotate;
pub mod rtn;
pub mod train;

pub use plan::QuantPlan;

use crate::error::Result;
use crate::model::{Block, BlockHook, LinearKind, Model, Rope};
use crate::recipe::Recipe;
use candle_core::{Tensor, D};

/// The registered methods, in the order `--help` lists them.
pub const REGISTRY: &[MethodSpec] = &[rtn::SPEC, rotate::SPEC, flatquant::SPEC, affinequant::SPEC];

/// The registry entry of `name`.
pub fn find(name: &str) -> Option<&'static MethodSpec> {
    REGISTRY.iter().find(|m| m.name == name)
}

/// What the registry knows of a method before it is built.
pub struct MethodSpec {
    /// `--method NAME`, and `method` in the checkpoint.
    pub name: &'static str,
    /// One line for `--help`.
    pub about: &'static str,
    /// Trains each block: the calibration engine runs even with RTN weights, and the training
    /// keys (epochs, batch, lr, alpha) apply.
    pub trained: bool,
    /// The recipe the method starts from (flags and `--recipe` override it); `None`: only the
    /// `cpu` recipe's data budget (used by GPTQ).
    pub preset: Option<&'static str>,
    /// The recipe for the scheme the flags request (bits, activation and KV bits, weight
    /// quantizer; unset keys at their defaults; `true`: a `--format` target fixes the weight
    /// grid) when no `--recipe` is given, between the preset and the flags.
    pub scheme_recipe: fn(&Recipe, bool) -> Option<&'static str>,
    /// Recipe keys that only this method reads.
    pub own_keys: &'static [&'static str],
    /// Per-token activations on an asymmetric grid (AffineQuant §3.6) instead of a symmetric one.
    pub asym_activations: bool,
    /// Has a mode whose transforms all merge into the weights (recipe key `merged_only`).
    pub merged_mode: bool,
    /// Builds the method from the resolved recipe and the validated plan.
    pub build: fn(&MethodInput) -> Result<Box<dyn Method>>,
}

impl std::fmt::Debug for MethodSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MethodSpec({})", self.name)
    }
}

/// What a method is built from.
pub struct MethodInput<'a> {
    pub recipe: &'a Recipe,
    pub plan: &'a QuantPlan,
    pub seed: u64,
}

/// A quantization method.
pub trait Method {
    /// Names the calibration in logs and in the checkpoint's notes (`gptq` for methods that do
    /// not train: then the engine runs for GPTQ's sake).
    fn label(&self) -> &'static str;
    /// One line on the training budget, for the log and the checkpoint's notes.
    fn training_summary(&self) -> Option<String> {
        None
    }
    /// A whole-model step before any block is calibrated (e.g. rotations), on the model's ends
    /// (embedding, final norm, head; `model.blocks` may be empty: the blocks are read one at a
    /// time and each goes through [`Self::prepare_block`]); returns what it did, one line each,
    /// for the checkpoint's list of transforms.
    fn prepare(&mut self, _model: &mut Model) -> Result<Vec<String>> {
        Ok(Vec::new())
    }
    /// The whole-model step's part on one full-precision block, as it is read.
    fn prepare_block(&mut self, _block: &mut Block) -> Result<()> {
        Ok(())
    }
    /// The block-by-block training of a learned method; `None`: blocks are used as they are
    /// (after [`Self::prepare`]) with the plan's quantizers attached.
    fn trainer(&mut self) -> Option<&mut dyn BlockTrainer> {
        None
    }
}

/// The per-block calibration of a learned method.
pub trait BlockTrainer {
    /// Returns the block in its deployed form except for the weight grid: transforms merged or
    /// attached, learned clipping applied to the weights, activation and KV quantizers attached,
    /// weights still in full precision (the engine's weight quantizer rounds them).
    fn calibrate(
        &mut self,
        d: &BlockData,
        on_epoch: &mut dyn FnMut(&EpochLog),
    ) -> Result<(Block, MethodReport)>;

    /// The calibration from the method's second start, for a block whose first training ended
    /// above its untrained start (the engine keeps whichever of the two is lower). `None`: the
    /// method has one start.
    fn recalibrate(
        &mut self,
        _d: &BlockData,
        _on_epoch: &mut dyn FnMut(&EpochLog),
    ) -> Result<Option<Retrained>> {
        Ok(None)
    }
}

/// What a block's calibration reads: the full-precision block, the RoPE tables, the block's
/// full-precision inputs `x` and outputs `y` (`[N, L, hidden]`), and its input statistics.
#[derive(Clone, Copy)]
pub struct BlockData<'a> {
    pub block: &'a Block,
    pub rope: &'a Rope,
    pub x: &'a Tensor,
    pub y: &'a Tensor,
    pub stats: &'a SiteStats,
}

/// A block calibrated again from a second start ([`BlockTrainer::recalibrate`]).
pub struct Retrained {
    /// The start, as the notes name it.
    pub start: &'static str,
    pub block: Block,
    pub report: MethodReport,
}

/// Per-channel running max of |x| at the inputs of q/o/gate/down (FlatQuant §2.5, AffineQuant
/// §3.5), observed by the engine on the full-precision block.
#[derive(Default)]
pub struct SiteStats {
    pub attn_in: Option<Tensor>,
    pub o_in: Option<Tensor>,
    pub mlp_in: Option<Tensor>,
    pub down_in: Option<Tensor>,
}

impl BlockHook for SiteStats {
    fn linear_input(&mut self, kind: LinearKind, x: &Tensor) -> Result<()> {
        let slot = match kind {
            LinearKind::Q => &mut self.attn_in,
            LinearKind::O => &mut self.o_in,
            LinearKind::Gate => &mut self.mlp_in,
            LinearKind::Down => &mut self.down_in,
            _ => return Ok(()),
        };
        let n = x.dim(D::Minus1)?;
        let m = x.abs()?.reshape(((), n))?.max(0)?;
        *slot = Some(match slot.take() {
            Some(prev) => prev.maximum(&m)?,
            None => m,
        });
        Ok(())
    }
}

/// One epoch's record for the log.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct EpochLog {
    pub epoch: usize,
    pub loss: f64,
    pub seconds: f64,
    /// Where the epoch's steps spent their time.
    #[serde(default)]
    pub phases: StepPhases,
}

/// Seconds of a training step's phases, summed over steps: building the differentiable
/// quantized block (the method's parameter projection, then the transformed, clipped and
/// fake-quantized weights), its forward pass over the batch with the loss, the backward pass,
/// and the optimizer step.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StepPhases {
    pub steps: usize,
    pub weights: f64,
    pub forward: f64,
    pub backward: f64,
    pub optimizer: f64,
}

impl StepPhases {
    pub fn add(&mut self, o: &StepPhases) {
        self.steps += o.steps;
        self.weights += o.weights;
        self.forward += o.forward;
        self.backward += o.backward;
        self.optimizer += o.optimizer;
    }
}

/// What a method says about its training of one block.
#[derive(Debug, Clone, Default)]
pub struct MethodReport {
    pub epochs: Vec<EpochLog>,
    pub notes: Vec<String>,
}

//! `affq quantize`'s arguments and recipe turned into one validated plan: every rule about which
//! flags go together, which values are allowed and what the model must allow is checked here, once
//! (the binary only parses; `crate::quantize` only runs the plan).

use crate::calib::shard::Shard;
use crate::calib::WeightQuantizer;
use crate::error::{Error, Result};
use crate::export::Format;
use crate::formats::schema::WeightScheme;
use crate::methods::{self, MethodSpec, QuantPlan};
use crate::model::{LinearKind, ModelConfig};
use crate::quant::gptq::GptqConfig;
use crate::quant::weight::unit_len;
use crate::quant::{AsymZero, Granularity, QuantSpec, ScaleDtype, SymScale};
use crate::recipe::Recipe;
use std::path::PathBuf;

/// What the user asked for: the low-level arguments of `affq quantize`, before validation. The
/// recipe keys given as flags are in `flags` (its `method` unset).
#[derive(Debug, Clone)]
pub struct QuantizeRequest {
    pub model: PathBuf,
    /// `None`: [`default_output`].
    pub output: Option<PathBuf>,
    /// A name of [`methods::REGISTRY`].
    pub method: String,
    /// `--recipe`: a built-in name or a TOML path.
    pub recipe: Option<String>,
    pub flags: Recipe,
    /// `None`: signed-max for a `--format` target (GGUF's own rule), else max-pos.
    pub sym_scale: Option<SymScale>,
    pub zero_point: AsymZero,
    pub clip: f32,
    pub a_clip: f32,
    pub kv_sym: bool,
    pub weight_clip_search: bool,
    pub quantize_head: bool,
    pub seed: u64,
    pub data_dir: Option<PathBuf>,
    /// `--format`: quantize on that format's grid, so that its export is exact.
    pub target: Option<Format>,
    pub resume: bool,
    pub force: bool,
    /// Which shard of a sharded calibration this process runs, if any.
    pub shard: ShardRequest,
    /// Assemble the checkpoint from the blocks that the shards finished.
    pub merge: bool,
    /// A block lock without a heartbeat for this long is stale (seconds).
    pub lock_timeout: u64,
    /// No block's weight quantizer beside the next block's training ([`EngineConfig::overlap`]).
    ///
    /// [`EngineConfig::overlap`]: crate::calib::EngineConfig::overlap
    pub sequential_blocks: bool,
}

/// `--shard I/N` or `--shard-from-env [--shards N]`, as given.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum ShardRequest {
    #[default]
    None,
    Explicit(String),
    FromEnv {
        shards: Option<usize>,
    },
}

/// A validated plan.
#[derive(Debug, Clone)]
pub struct QuantizePlan {
    pub request: QuantizeRequest,
    /// The checkpoint directory to write (the request's, or the default).
    pub output: PathBuf,
    pub method: &'static MethodSpec,
    /// Method preset, then `--recipe` (or the method's recipe for the scheme), then flags.
    pub recipe: Recipe,
    /// The recipe picked for the requested scheme when no `--recipe` was given.
    pub chosen_recipe: Option<&'static str>,
    pub quant: QuantPlan,
    pub weight_quantizer: WeightQuantizer,
    /// The block-by-block calibration engine runs (a trained method, GPTQ, or key smoothing).
    pub calibrated: bool,
    /// This process calibrates one shard of the blocks (and writes no checkpoint).
    pub shard: Option<Shard>,
}

impl QuantizePlan {
    /// Keys are smoothed and centred before KV quantization (algorithms.md §10).
    pub fn conditions_keys(&self) -> bool {
        conditions_keys(&self.recipe)
    }
    /// Calibration windows the method trains on.
    pub fn nsamples(&self) -> usize {
        self.recipe.nsamples.unwrap_or(32)
    }

    /// Tokens per calibration window.
    pub fn calib_seqlen(&self) -> usize {
        self.recipe.calib_seqlen.unwrap_or(512)
    }

    /// The dtype the engine keeps calibration activations in (validated when the plan is made).
    pub fn calib_activations(&self) -> candle_core::DType {
        match self.recipe.calib_activations.as_deref() {
            Some("bf16") => candle_core::DType::BF16,
            _ => candle_core::DType::F32,
        }
    }

    /// The plan for a model whose tensors are stored in `dtype`: compressed-tensors keeps scales
    /// in the model's dtype, so a bf16 model's checkpoint that targets it quantizes on bf16
    /// scales (f16 otherwise, which an f32 model's scales hold exactly too).
    /// A target format keeps the linears whose shape its layout cannot tile in full precision
    /// (stored dense, as llama-quantize falls back to a float type and llm-compressor's `ignore`
    /// skips a module); the returned notes name them.
    pub fn for_model(
        &self,
        dtype: safetensors::Dtype,
        c: &ModelConfig,
    ) -> (QuantizePlan, Vec<String>) {
        let mut p = self.clone();
        let mut notes = Vec::new();
        let target = p.request.target;
        let act_bits = p.quant.activations.map(|a| a.bits);
        if let (Some(Format::CompressedTensors), safetensors::Dtype::BF16, Some(w)) =
            (target, dtype, p.quant.weights.as_mut())
        {
            w.spec.scale_dtype = ScaleDtype::Bf16;
        }
        if let (Some(f), Some(w)) = (target, p.quant.weights.as_mut()) {
            for kind in LinearKind::ALL {
                let (out, inp) = kind.shape(c);
                if let Some(why) = untileable(f, w, act_bits, out, inp) {
                    notes.push(format!(
                        "--format {}: {} is {out}×{inp}: {why}; kept in full precision",
                        f.name(),
                        kind.hf_name()
                    ));
                    w.dense.push(kind.hf_name().into());
                }
            }
        }
        (p, notes)
    }

    /// Checks what the plan needs of the model: weight groups must tile the input of every
    /// linear it quantizes.
    pub fn check_model(&self, c: &ModelConfig) -> Result<()> {
        if let Some(g @ Granularity::Group(_)) = self.quant.weights.as_ref().map(|w| w.granularity)
        {
            for i in 0..c.num_layers {
                for kind in LinearKind::ALL {
                    if self.quant.weights_for(kind).is_none() {
                        continue;
                    }
                    let (_, inp) = kind.shape(c);
                    unit_len(&format!("model.layers.{i}.{}", kind.hf_name()), inp, g)?;
                }
            }
        }
        Ok(())
    }
}

fn usage(msg: impl Into<String>) -> Error {
    Error::Usage(msg.into())
}

/// `--bits`-style values: 2..8, or 16 for full precision (`None`).
fn bits_arg(flag: &str, b: u8) -> Result<Option<u8>> {
    match b {
        2..=8 => Ok(Some(b)),
        16 => Ok(None),
        _ => Err(usage(format!(
            "{flag} {b}: allowed are 2..8, or 16 for full precision"
        ))),
    }
}

/// GPTQ v2's share of the asymmetric correction (`--gptq-v2`, `--gptq-v2-alpha`), or `None`.
fn gptq_v2_alpha(r: &Recipe) -> Result<Option<f64>> {
    // A recipe's GPTQ v2 gives way to --gptq-fp-inputs (both from flags are refused).
    if r.gptq_v2 != Some(true) || r.gptq_fp_inputs == Some(true) {
        return Ok(None);
    }
    let a = r.gptq_v2_alpha.unwrap_or(0.25);
    if !(a > 0.0 && a <= 1.0) {
        return Err(usage(format!("--gptq-v2-alpha {a}: must be in (0, 1]")));
    }
    Ok(Some(a))
}

/// The windows of GPTQ v2's cross moment (`--gptq-v2-windows`), when GPTQ v2 runs.
fn gptq_v2_windows(r: &Recipe) -> Result<Option<usize>> {
    match r.gptq_v2_windows {
        Some(0) => Err(usage("--gptq-v2-windows 0: needs at least one window")),
        Some(n) if gptq_v2_alpha(r)?.is_some() => Ok(Some(n)),
        _ => Ok(None),
    }
}

/// The weight quantizer a resolved recipe asks for.
fn weight_quantizer(r: &Recipe) -> Result<WeightQuantizer> {
    Ok(match r.weight_quantizer.as_deref().unwrap_or("rtn") {
        "rtn" => WeightQuantizer::Rtn,
        "gptq" => {
            let damp = r.gptq_damp.unwrap_or(0.01);
            if !(damp >= 0.0 && damp.is_finite()) {
                return Err(usage(format!(
                    "--gptq-damp {damp}: must be a non-negative number"
                )));
            }
            WeightQuantizer::Gptq(GptqConfig {
                damp,
                act_order: r.act_order.unwrap_or(false),
                block: 128,
                grid_search: r.gptq_grid_search.unwrap_or(false),
                v2_alpha: gptq_v2_alpha(r)?,
                v2_windows: gptq_v2_windows(r)?,
            })
        }
        other => {
            return Err(usage(format!(
                "weight quantizer `{other}`: expected rtn or gptq"
            )))
        }
    })
}

/// Whether keys are smoothed and centred on calibration data (a quantized KV cache, unless
/// `--no-key-smoothing`): it makes even an untrained method with RTN weights calibrated.
fn conditions_keys(r: &Recipe) -> bool {
    r.kv_bits.is_some_and(|b| b < 16) && r.key_smoothing != Some(false)
}

/// The registered methods that train, as `a or b`.
fn trained_methods() -> String {
    method_names(|m| m.trained, " or ")
}

/// The methods with a merged-only mode, for messages.
fn merged_methods() -> String {
    method_names(|m| m.merged_mode, ", ")
}

/// The names of the registered methods `which` keeps, joined by `sep`.
fn method_names(which: fn(&MethodSpec) -> bool, sep: &str) -> String {
    let names: Vec<&str> = methods::REGISTRY
        .iter()
        .filter(|m| which(m))
        .map(|m| m.name)
        .collect();
    names.join(sep)
}

/// The flag spelling of a recipe key.
fn flag(key: &str) -> String {
    format!("--{}", key.replace('_', "-"))
}

/// Method preset, then `--recipe`, then flags; with the rules on which keys go together.
fn resolve_recipe(
    req: &QuantizeRequest,
    m: &MethodSpec,
) -> Result<(Recipe, Option<&'static str>, WeightQuantizer)> {
    // Untrained methods take only the CPU preset's data budget (used by GPTQ).
    let cpu = Recipe::load("cpu")?;
    let base = match m.preset {
        Some(p) => Recipe::load(p)?,
        None => Recipe {
            nsamples: cpu.nsamples,
            calib_seqlen: cpu.calib_seqlen,
            calib: cpu.calib,
            ..Recipe::default()
        },
    };
    let chosen = match &req.recipe {
        Some(_) => None,
        None => (m.scheme_recipe)(&req.flags, req.target.is_some()),
    };
    let base = match req.recipe.as_deref().or(chosen) {
        Some(r) => {
            let r = Recipe::load(r)?;
            if let Some(want) = &r.method {
                if want != m.name {
                    return Err(usage(format!(
                        "recipe is for --method {want}, not {}",
                        m.name
                    )));
                }
            }
            base.overridden_by(&r)
        }
        None => base,
    };
    let f = &req.flags;
    let mut r = base.overridden_by(f);
    if req.target.is_some() {
        if r.merged_only == Some(false) {
            return Err(usage(
                "--format needs a checkpoint of plain weights: merged_only = false contradicts it",
            ));
        }
        r.merged_only = Some(true);
    }
    if r.merged_only == Some(true) && !m.merged_mode {
        return Err(usage(format!(
            "--merged-only: --method {} has no merged-only mode (these have: {})",
            m.name,
            merged_methods()
        )));
    }
    if r.merged_only == Some(true) && f.ln_matrix == Some(true) {
        return Err(usage(
            "--ln-matrix keeps an online inverse on the norm output: it contradicts --merged-only / --format",
        ));
    }
    if r.epochs == Some(0) {
        return Err(usage("--epochs must be at least 1"));
    }
    if let Some(p) = r.step_products.as_deref() {
        if !["f32", "int"].contains(&p) {
            return Err(usage(format!(
                "step_products must be f32 or int, not `{p}`"
            )));
        }
    }
    if let Some(a) = r.calib_activations.as_deref() {
        if a != "f32" && a != "bf16" {
            return Err(usage(format!(
                "calib_activations must be f32 or bf16, not `{a}`"
            )));
        }
    }
    let wq = weight_quantizer(&r)?;
    let gptq = wq != WeightQuantizer::Rtn;
    if !m.trained {
        let training = [
            f.keep_trained.is_some(),
            f.quantized_inputs.is_some(),
            f.step_products.is_some(),
            f.epochs.is_some(),
            f.batch.is_some(),
            f.lr.is_some(),
            f.alpha.is_some(),
        ];
        if training.iter().any(|&x| x) {
            return Err(usage(format!("training flags (--epochs, --batch, --lr, --alpha, --keep-trained, --quantized-inputs, --step-products) need a trained method (--method {})", trained_methods())));
        }
        let data = [
            f.nsamples.is_some(),
            f.calib_seqlen.is_some(),
            f.calib.is_some(),
            f.calib_activations.is_some(),
        ];
        if !gptq && !conditions_keys(&r) && data.iter().any(|&x| x) {
            return Err(usage(format!("calibration data flags (--calib, --nsamples, --calib-seqlen, --calib-activations) need a calibrated method (--method {}), --weight-quantizer gptq or --kv-bits", trained_methods())));
        }
    }
    let set = f.keys_set();
    for other in methods::REGISTRY.iter().filter(|o| o.name != m.name) {
        let foreign: Vec<&str> = other
            .own_keys
            .iter()
            .copied()
            .filter(|k| !m.own_keys.contains(k))
            .collect();
        if foreign.iter().any(|k| set.iter().any(|s| s == k)) {
            let flags: Vec<String> = foreign.iter().map(|k| flag(k)).collect();
            return Err(usage(format!(
                "{} need --method {}",
                flags.join(" and "),
                other.name
            )));
        }
    }
    if let Some(v) = r.scale_lr.filter(|v| !(*v > 0.0 && v.is_finite())) {
        return Err(usage(format!(
            "scale_lr (--scale-lr) {v}: must be a positive number"
        )));
    }
    if !gptq
        && (f.gptq_damp.is_some()
            || f.act_order.is_some()
            || f.gptq_nsamples.is_some()
            || f.gptq_grid_search.is_some()
            || f.gptq_fp_inputs.is_some()
            || f.gptq_v2.is_some()
            || f.gptq_v2_alpha.is_some()
            || f.gptq_v2_windows.is_some())
    {
        return Err(usage(
            "--gptq-damp, --act-order, --gptq-nsamples, --gptq-grid-search, --gptq-fp-inputs and --gptq-v2 need --weight-quantizer gptq",
        ));
    }
    if f.gptq_v2_alpha.is_some() && r.gptq_v2 != Some(true) {
        return Err(usage("--gptq-v2-alpha needs --gptq-v2"));
    }
    if f.gptq_v2_windows.is_some() && r.gptq_v2 != Some(true) {
        return Err(usage("--gptq-v2-windows needs --gptq-v2"));
    }
    if f.gptq_v2 == Some(true) && r.gptq_fp_inputs == Some(true) {
        return Err(usage(
            "--gptq-v2 fits the quantized model's inputs to the full-precision ones, --gptq-fp-inputs takes the Hessians from the full-precision inputs: pick one",
        ));
    }
    if r.quantized_inputs == Some(true) && r.gptq_fp_inputs == Some(true) {
        return Err(usage(
            "--quantized-inputs carries the quantized model's inputs, --gptq-fp-inputs the full-precision ones: pick one",
        ));
    }
    if gptq {
        // A Hessian of a 1536-wide input from AffineQuant's 8 × 512 training tokens overfits
        // them (measured: GPTQ then loses to RTN); trained methods take at least the CPU
        // preset's 32 windows for GPTQ, untrained ones use --nsamples as given.
        let n = r.nsamples.unwrap_or(32);
        let min = if m.trained { n.max(32) } else { n };
        // A recipe's GPTQ windows are a floor under the training windows; a flag's are checked.
        let g = match (f.gptq_nsamples, r.gptq_nsamples) {
            (None, Some(g)) => g.max(min),
            (_, g) => g.unwrap_or(min),
        };
        if g < n {
            return Err(usage(format!(
                "--gptq-nsamples {g} is fewer than --nsamples {n}: GPTQ uses the training windows and more"
            )));
        }
        r.gptq_nsamples = Some(g);
    }
    Ok((r, chosen, wq))
}

/// Grids of weights, activations and the KV cache.
fn quant_plan(
    req: &QuantizeRequest,
    m: &MethodSpec,
    r: &Recipe,
    wq: &WeightQuantizer,
) -> Result<QuantPlan> {
    // Signed-max moves each unit's zero, which the trained methods' clipping does not model.
    let sym_scale = req.sym_scale.unwrap_or(match req.target {
        Some(Format::Gguf) if !m.trained => SymScale::SignedMax,
        _ => SymScale::MaxPos,
    });
    // Signed-max is a weight rule (its zero moves per unit); activations and the KV cache keep
    // the max-pos grid.
    let act_scale = match sym_scale {
        SymScale::SignedMax => SymScale::MaxPos,
        s => s,
    };
    if sym_scale == SymScale::SignedMax && m.trained {
        return Err(usage(format!(
            "--sym-scale signed-max: --method {} trains its clipping on a fixed-zero grid; use max-pos or half-range",
            m.name
        )));
    }
    for (flag, v) in [("--clip", req.clip), ("--a-clip", req.a_clip)] {
        if !(v > 0.0 && v <= 1.0) {
            return Err(usage(format!("{flag} {v}: must be in (0, 1]")));
        }
    }
    let group_size = r.group_size;
    let quantizer = wq.name();
    let weights = bits_arg("--bits", r.bits.unwrap_or(4))?.map(|bits| {
        let base = if r.asym == Some(true) {
            QuantSpec::asym(bits)
        } else {
            QuantSpec::sym(bits)
        };
        WeightScheme {
            spec: QuantSpec {
                sym_scale,
                asym_zero: req.zero_point,
                clip: req.clip,
                clip_min: req.clip,
                ..base
            },
            granularity: match group_size {
                Some(g) => Granularity::Group(g),
                None => Granularity::Channel,
            },
            clip_search: req.weight_clip_search,
            quantizer: quantizer.into(),
            dense: Vec::new(),
        }
    });
    if weights.is_none() && (group_size.is_some() || req.weight_clip_search) {
        return Err(usage(
            "--group-size and --weight-clip-search need weight quantization (--bits 2..8)",
        ));
    }
    if group_size == Some(0) {
        return Err(usage("--group-size must be positive"));
    }
    let activations = bits_arg("--a-bits", r.a_bits.unwrap_or(16))?.map(|b| QuantSpec {
        sym_scale: act_scale,
        clip: req.a_clip,
        clip_min: req.a_clip,
        ..if m.asym_activations {
            QuantSpec::asym(b)
        } else {
            QuantSpec::sym(b)
        }
    });
    let kv_cache = bits_arg("--kv-bits", r.kv_bits.unwrap_or(16))?.map(|b| {
        if req.kv_sym {
            QuantSpec {
                sym_scale: act_scale,
                ..QuantSpec::sym(b)
            }
        } else {
            QuantSpec::asym(b)
        }
    });
    Ok(QuantPlan {
        weights,
        activations,
        kv_cache,
        quantize_head: req.quantize_head,
    })
}

/// Puts the plan on `format`'s grid (formats.md §3.2), or says why it cannot be: GGUF holds
/// 4-bit symmetric (Q4_0), 4-bit float-offset (Q4_1) and 8-bit symmetric (Q8_0) weights with f16
/// scales, one per 32 weights; no format carries KV quantization or an online transform, and only
/// compressed-tensors carries activation quantization (dynamic per token, unclipped).
fn target_grid(format: Format, m: &MethodSpec, q: &mut QuantPlan) -> Result<()> {
    let name = format.name();
    let w = q.weights.as_mut().ok_or_else(|| {
        usage(format!(
            "--format {name} needs quantized weights (--bits 2, 4 or 8)"
        ))
    })?;
    if q.kv_cache.is_some() {
        return Err(usage(format!(
            "--format {name} carries no KV-cache quantization: drop --kv-bits"
        )));
    }
    if let Some(a) = q.activations.as_mut() {
        if format != Format::CompressedTensors {
            return Err(usage(format!(
                "--format {name} carries weights only: drop --a-bits (compressed-tensors carries dynamic per-token activations)"
            )));
        }
        if a.clip != 1.0 {
            return Err(usage(format!(
                "--format compressed-tensors: --a-clip {}: its dynamic per-token quantizer does not clip",
                a.clip
            )));
        }
        // compressed-tensors' observer grid (formats.md §1.5): s = amax/((2^b − 1)/2), or an
        // integer zero point.
        a.sym_scale = SymScale::HalfRange;
        a.asym_zero = AsymZero::Integer;
    }
    if !m.merged_mode {
        return Err(usage(format!(
            "--format {name}: --method {} keeps online transforms, which the format cannot carry, and has no merged-only mode; use --method {} (with --weight-quantizer gptq for calibrated weights)",
            m.name,
            merged_methods()
        )));
    }
    if format != Format::Gguf {
        // compressed-tensors and GPTQ: 2/4/8-bit integer codes with f16 scales (GPTQ's dtype,
        // and the f16 models' dtype of compressed-tensors; a bf16 model's checkpoint gets bf16
        // scales once the model is read, [`QuantizePlan::for_model`]), integer zero points;
        // GPTQ v1 cannot store a zero of 0, so its grids are symmetric.
        if ![2, 4, 8].contains(&w.spec.bits) {
            return Err(usage(format!(
                "--format {name}: {}-bit codes; affq writes 2-, 4- and 8-bit layouts",
                w.spec.bits
            )));
        }
        if format == Format::Gptq && !w.spec.symmetric {
            return Err(usage(
                "--format gptq: GPTQ v1 stores z − 1 and cannot hold an asymmetric group's z = 0; use symmetric weights",
            ));
        }
        w.spec.asym_zero = AsymZero::Integer;
        w.spec.scale_dtype = ScaleDtype::F16;
        return Ok(());
    }
    match (w.spec.bits, w.spec.symmetric) {
        (4, _) | (8, true) => {}
        (b, s) => {
            return Err(usage(format!(
                "--format gguf: {b}-bit {} weights have no GGUF type (Q4_0: 4-bit symmetric, Q4_1: 4-bit asymmetric, Q8_0: 8-bit symmetric)",
                if s { "symmetric" } else { "asymmetric" }
            )))
        }
    }
    if !w.spec.symmetric {
        w.spec.asym_zero = AsymZero::FloatOffset;
    }
    w.spec.scale_dtype = ScaleDtype::F16;
    // GGUF's blocks are 32 weights: the default group (a per-channel scale would be repeated
    // in every block anyway).
    if w.granularity == Granularity::Channel {
        w.granularity = Granularity::Group(32);
    }
    if let Granularity::Group(g) = w.granularity {
        if !g.is_multiple_of(32) {
            return Err(usage(format!(
                "--format gguf: --group-size {g} is not a multiple of 32 (a GGUF block of 32 weights has one scale)"
            )));
        }
    }
    Ok(())
}

/// Why format `f`'s layout cannot hold an `out × inp` linear on grid `w` (with input
/// activations of `act_bits`), if it cannot: the formats' own rules (GGUF blocks of 32 weights
/// along a row; GPTQ's and compressed-tensors' packed words).
fn untileable(
    f: Format,
    w: &WeightScheme,
    act_bits: Option<u8>,
    out: usize,
    inp: usize,
) -> Option<String> {
    use crate::formats::{compressed_tensors, gguf::blocks::QK, gptq};
    let bits = w.spec.bits;
    match f {
        Format::Gguf => (!inp.is_multiple_of(QK))
            .then(|| format!("its input is not a multiple of a GGUF block ({QK} weights)")),
        Format::Gptq => gptq::untileable(out, inp, bits),
        Format::CompressedTensors
            if compressed_tensors::is_int_quantized(bits, act_bits.is_some()) =>
        {
            None
        }
        Format::CompressedTensors => {
            compressed_tensors::untileable(out, inp, bits, !w.spec.symmetric)
        }
    }
}

/// The scheme's short name: `w4a16`, `w4a4kv4`, `w3a16g64`.
pub fn scheme_name(q: &QuantPlan) -> String {
    let mut s = format!(
        "w{}a{}",
        q.weights.as_ref().map_or(16, |w| w.spec.bits),
        q.activations.map_or(16, |a| a.bits)
    );
    if let Some(kv) = q.kv_cache {
        s.push_str(&format!("kv{}", kv.bits));
    }
    if let Some(Granularity::Group(g)) = q.weights.as_ref().map(|w| w.granularity) {
        s.push_str(&format!("g{g}"));
    }
    s
}

/// Where a checkpoint goes without `-o` (as llama-quantize writes beside its input): a sibling of
/// the model directory named `DIR-affq-METHOD-SCHEME` (the model directory itself is never
/// written into).
pub fn default_output(model: &std::path::Path, method: &str, q: &QuantPlan) -> PathBuf {
    let dir = if model.is_dir() {
        model.to_path_buf()
    } else {
        model
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map_or_else(|| PathBuf::from("."), |p| p.to_path_buf())
    };
    let dir = std::fs::canonicalize(&dir).unwrap_or(dir);
    let name = dir
        .file_name()
        .map_or("model".into(), |n| n.to_string_lossy().into_owned());
    dir.with_file_name(format!("{name}-affq-{method}-{}", scheme_name(q)))
}

/// Validates `req` into a plan (nothing is read but the recipe).
pub fn plan(req: QuantizeRequest) -> Result<QuantizePlan> {
    let names: Vec<&str> = methods::REGISTRY.iter().map(|m| m.name).collect();
    let method = methods::find(&req.method).ok_or_else(|| {
        usage(format!(
            "unknown method `{}` (methods: {})",
            req.method,
            names.join(", ")
        ))
    })?;
    let (recipe, chosen_recipe, weight_quantizer) = resolve_recipe(&req, method)?;
    let mut quant = quant_plan(&req, method, &recipe, &weight_quantizer)?;
    if let Some(f) = req.target {
        target_grid(f, method, &mut quant)?;
    }
    if recipe.key_smoothing == Some(false) && recipe.kv_bits.is_none_or(|b| b >= 16) {
        return Err(usage(
            "--no-key-smoothing applies to a quantized KV cache: add --kv-bits",
        ));
    }
    let calibrated =
        method.trained || weight_quantizer != WeightQuantizer::Rtn || conditions_keys(&recipe);
    if req.resume && !calibrated {
        return Err(usage(format!(
            "--resume continues a calibration: it needs --method {}, --weight-quantizer gptq, or --kv-bits",
            trained_methods()
        )));
    }
    let shard = match &req.shard {
        ShardRequest::None => None,
        ShardRequest::Explicit(s) => Some(Shard::parse(s)?),
        ShardRequest::FromEnv { shards } => {
            Some(Shard::from_env(&|k| std::env::var(k).ok(), *shards)?)
        }
    };
    if (shard.is_some() || req.merge) && !calibrated {
        return Err(usage(format!(
            "--shard and --merge split a calibration: they need --method {}, --weight-quantizer gptq, or --kv-bits (this plan rounds to nearest in seconds)",
            trained_methods()
        )));
    }
    if shard.is_some() && req.resume {
        return Err(usage(
            "--shard always continues the work directory's finished blocks: drop --resume",
        ));
    }
    if req.merge && req.resume {
        return Err(usage("--merge reads the finished blocks: drop --resume"));
    }
    if shard.is_some()
        && weight_quantizer != WeightQuantizer::Rtn
        && recipe.gptq_fp_inputs != Some(true)
    {
        return Err(usage(
            "--shard with GPTQ weights (--weight-quantizer gptq, or the scheme's recipe): GPTQ's Hessians come from the quantized model's own inputs, which need every earlier block; pass --gptq-fp-inputs (Hessians from the full-precision inputs, the same flag in every shard and the merge), --weight-quantizer rtn, or run in one process",
        ));
    }
    if shard.is_some() && recipe.quantized_inputs == Some(true) {
        return Err(usage(
            "--shard with --quantized-inputs: a block's training inputs come from every earlier quantized block; run in one process",
        ));
    }
    // Three heartbeats (20 s each), so that a live lock never looks stale through a slow
    // filesystem's attribute cache (NFS caches them up to 60 s).
    if req.lock_timeout < 60 {
        return Err(usage(format!(
            "--lock-timeout {}: must be at least 60 seconds (a live shard refreshes its locks every 20 s)",
            req.lock_timeout
        )));
    }
    let output = match &req.output {
        Some(o) => o.clone(),
        None => {
            let o = default_output(&req.model, method.name, &quant);
            if o.exists() {
                return Err(usage(format!(
                    "{}: the default output exists; pass -o to choose another path (the default never replaces one)",
                    o.display()
                )));
            }
            o
        }
    };
    Ok(QuantizePlan {
        output,
        request: req,
        method,
        recipe,
        chosen_recipe,
        quant,
        weight_quantizer,
        calibrated,
        shard,
    })
}

//! The `affq` binary: parses arguments into a validated plan and hands it to the library.

use affq::calib::affinequant::{AffineQuant, AffineQuantConfig};
use affq::calib::data::CalibSource;
use affq::calib::flatquant::{FlatQuant, FlatQuantConfig};
use affq::calib::recipe::Recipe;
use affq::calib::{BlockMethod, EngineConfig, Untrained, WeightQuantizer};
use affq::checkpoint::{QuantConfig, WeightScheme};
use affq::data::{self, DataFile};
use affq::eval::{self, PplOptions, Protocol};
use affq::gguf::{self, ImportDtype};
use affq::methods::{self, QuantPlan};
use affq::model::Model;
use affq::quant::gptq::GptqConfig;
use affq::quant::{AsymZero, Granularity, QuantSpec, SymScale};
use affq::tokenizer::Tok;
use affq::weights::Checkpoint;
use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::time::Instant;

#[derive(Parser)]
#[command(
    name = "affq",
    version,
    about = "Post-training quantization of LLMs with learned affine transforms"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone)]
struct Common {
    /// Print one JSON object on stdout instead of text.
    #[arg(long, global = true)]
    json: bool,
    /// Worker threads (default: RAYON_NUM_THREADS or the number of cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
}

#[derive(Subcommand)]
enum Command {
    /// Import a llama.cpp GGUF file into a Hugging Face model directory.
    Import(ImportArgs),
    /// Measure perplexity of a model (original or quantized).
    Eval(EvalArgs),
    /// Quantize a model and write a quantized checkpoint.
    Quantize(Box<QuantizeArgs>),
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum MethodArg {
    /// Round to nearest, no transform.
    Rtn,
    /// QuaRot-style rotations (Hadamard / random orthogonal), then round to nearest.
    Rotate,
    /// Learned Kronecker affine transforms with learnable clipping, calibrated block by block.
    Flatquant,
    /// Learned affine matrices with the gradual mask (AffineQuant), calibrated block by block.
    Affinequant,
}

#[derive(Clone, Copy, ValueEnum)]
enum SymScaleArg {
    /// s = amax / (2^(b-1) - 1)  (amax/7 at 4 bits; FlatQuant, QuaRot)
    Maxpos,
    /// s = amax / ((2^b - 1)/2)   (amax/7.5; GPTQ repo, compressed-tensors)
    Halfrange,
}

#[derive(Clone, Copy, ValueEnum)]
enum ZeroArg {
    /// Range widened to include 0, integer zero point.
    Integer,
    /// No widening, float offset (GGUF Q4_1 style).
    FloatOffset,
}

#[derive(Args)]
struct QuantizeArgs {
    /// Model directory or .safetensors file (config.json beside it).
    model: PathBuf,
    /// Output checkpoint directory.
    #[arg(short, long)]
    output: PathBuf,
    #[arg(long, value_enum, default_value = "rtn")]
    method: MethodArg,
    /// Weight bits (2..8; 16 = keep full precision) [default: 4].
    #[arg(long)]
    bits: Option<u8>,
    /// Activation bits for every decoder linear input, per token (2..8; 16 = off) [default: 16].
    #[arg(long)]
    a_bits: Option<u8>,
    /// Key/value cache bits, per (token, head) (2..8; 16 = off) [default: 16].
    #[arg(long)]
    kv_bits: Option<u8>,
    /// Calibration recipe: a built-in name (cpu, paper, flatquant-w4a4, flatquant-w4a4kv4) or a
    /// .toml path. Flags override it.
    #[arg(long)]
    recipe: Option<String>,
    /// Calibration text: wikitext2 (train split if present, else validation), c4, or a .txt/.jsonl file.
    #[arg(long)]
    calib: Option<String>,
    /// Calibration windows.
    #[arg(long)]
    nsamples: Option<usize>,
    /// Tokens per calibration window.
    #[arg(long)]
    calib_seqlen: Option<usize>,
    /// Training epochs per block.
    #[arg(long)]
    epochs: Option<usize>,
    /// Windows per optimisation step.
    #[arg(long)]
    batch: Option<usize>,
    /// Learning rate of the transforms (clip parameters: 10×).
    #[arg(long)]
    lr: Option<f64>,
    /// Channel-scale init strength α (FlatQuant's diag_alpha).
    #[arg(long)]
    alpha: Option<f64>,
    /// Directory with the calibration texts (default: $AFFQ_DATA_DIR, else ~/.cache/affq/data).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Weight group size along the input dimension (default: one group per output channel).
    #[arg(long)]
    group_size: Option<usize>,
    /// Symmetric weights (default).
    #[arg(long, conflicts_with = "asym")]
    sym: bool,
    /// Asymmetric weights.
    #[arg(long)]
    asym: bool,
    /// Scale convention of symmetric grids.
    #[arg(long, value_enum, default_value = "maxpos")]
    sym_scale: SymScaleArg,
    /// Zero-point convention of asymmetric weight grids.
    #[arg(long, value_enum, default_value = "integer")]
    zero_point: ZeroArg,
    /// Weight clip ratio (multiplies each unit's range).
    #[arg(long, default_value_t = 1.0)]
    clip: f32,
    /// Activation clip ratio.
    #[arg(long, default_value_t = 1.0)]
    a_clip: f32,
    /// Symmetric KV-cache quantization (default asymmetric, as FlatQuant).
    #[arg(long)]
    kv_sym: bool,
    /// Per-unit MSE search of the weight clip range (80-point grid).
    #[arg(long)]
    weight_clip_search: bool,
    /// Also quantize the LM head (weights and its input).
    #[arg(long)]
    quantize_head: bool,
    /// Seed of every random choice (rotations).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// How weights are rounded onto their grid, under any method [default: rtn].
    #[arg(long, value_enum)]
    weight_quantizer: Option<WeightQuantizerArg>,
    /// GPTQ dampening: fraction of the mean Hessian diagonal added to it [default: 0.01].
    #[arg(long)]
    gptq_damp: Option<f64>,
    /// GPTQ: quantize columns by decreasing Hessian diagonal (groups then use static grids).
    #[arg(long)]
    act_order: bool,
    /// GPTQ: calibration windows for the Hessians; a trained method still trains on the first
    /// --nsamples of them [default: --nsamples for rtn/rotate, at least 32 for flatquant and
    /// affinequant].
    #[arg(long)]
    gptq_nsamples: Option<usize>,
    /// AffineQuant: off-diagonal factor of the gradual mask [default: 0.1 with --a-bits, else 0.01].
    #[arg(long)]
    stability_factor: Option<f64>,
    /// AffineQuant: dense norm→q/k/v and norm→up/gate matrices (inverse kept online) instead of
    /// per-channel scales (the weight-only recipes).
    #[arg(long)]
    ln_matrix: bool,
    /// Continue an interrupted calibration from the blocks it finished (kept in `.OUT.affq-work`
    /// beside the output); the other flags must be the same as in the interrupted run.
    #[arg(long)]
    resume: bool,
    /// Replace an existing output directory.
    #[arg(long)]
    force: bool,
    #[command(flatten)]
    common: Common,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum WeightQuantizerArg {
    /// Round to nearest.
    Rtn,
    /// GPTQ: error-compensating rounding with calibration Hessians.
    Gptq,
}

#[derive(Clone, Copy, ValueEnum)]
enum DtypeArg {
    F16,
    F32,
}

#[derive(Args)]
struct ImportArgs {
    /// The .gguf file.
    gguf: PathBuf,
    /// Output directory (config.json, model.safetensors, tokenizer.json).
    #[arg(short, long)]
    output: PathBuf,
    /// Storage dtype of the dequantized weights.
    #[arg(long, value_enum, default_value = "f16")]
    dtype: DtypeArg,
    /// Replace an existing output directory.
    #[arg(long)]
    force: bool,
    #[command(flatten)]
    common: Common,
}

#[derive(Clone, Copy, ValueEnum)]
enum PplSet {
    Wikitext2,
    C4,
}

#[derive(Clone, Copy, ValueEnum)]
enum ProtocolArg {
    Paper,
    Llamacpp,
}

#[derive(Args)]
struct EvalArgs {
    /// Model directory or .safetensors file (config.json beside it).
    model: PathBuf,
    /// Evaluation text.
    #[arg(long, value_enum, default_value = "wikitext2")]
    ppl: PplSet,
    /// Window length in tokens.
    #[arg(long, default_value_t = 2048)]
    seqlen: usize,
    /// Evaluate only the first N windows.
    #[arg(long)]
    max_windows: Option<usize>,
    /// Windowing and scoring rules: the papers' (GPTQ, FlatQuant) or llama.cpp's.
    #[arg(long, value_enum, default_value = "paper")]
    protocol: ProtocolArg,
    /// Directory with wikitext-2-raw/ and calibration/ (default: $AFFQ_DATA_DIR, else ~/.cache/affq/data).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// How quantized linears run: integer kernels where the scheme has one (per-channel weights
    /// with an integer zero, quantized activations), or the float simulation everywhere.
    #[arg(long, value_enum, default_value = "int")]
    kernels: KernelsArg,
    /// Where the integer kernels run: the CPU, or an NVIDIA GPU (builds with the cuda feature;
    /// the quantized linears run there, the rest of the model on the CPU).
    #[arg(long, value_enum, default_value = "cpu")]
    device: DeviceArg,
    #[command(flatten)]
    common: Common,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum KernelsArg {
    /// Real low-bit kernels (integer GEMM; AVX-512 VNNI, AVX2 or portable, detected at run time).
    Int,
    /// As `int`, with the online Kronecker transforms computed in bf16 (AVX-512 BF16: twice the
    /// MACs per instruction; f32 where the CPU lacks it). Transformed values move by bf16
    /// rounding (≈ 2⁻⁷ relative), so results differ slightly from `int` and `simulate`.
    IntBf16,
    /// Dequantized weights and fake-quantized activations in f32.
    Simulate,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum DeviceArg {
    Cpu,
    Cuda,
}

#[cfg(feature = "cuda")]
fn use_cuda(model: &mut Model) -> anyhow::Result<String> {
    let cuda = affq::kernels::cuda::Cuda::new()?;
    let n = model.use_cuda(&cuda)?;
    Ok(format!("int (cuda {}, {n} layers)", cuda.name))
}

#[cfg(not(feature = "cuda"))]
fn use_cuda(_: &mut Model) -> anyhow::Result<String> {
    Err(affq::Error::Usage(
        "--device cuda: this affq was built without the cuda feature (scripts/build-cuda.sh builds it)".into(),
    )
    .into())
}

fn init_threads(common: &Common) -> anyhow::Result<()> {
    if let Some(n) = common.threads {
        if n == 0 {
            return Err(affq::Error::Usage("--threads must be at least 1".into()).into());
        }
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .context("cannot start the thread pool")?;
    }
    Ok(())
}

fn run_import(a: ImportArgs) -> anyhow::Result<()> {
    init_threads(&a.common)?;
    let dtype = match a.dtype {
        DtypeArg::F16 => ImportDtype::F16,
        DtypeArg::F32 => ImportDtype::F32,
    };
    let t0 = Instant::now();
    let report = gguf::import(&a.gguf, &a.output, dtype, a.force)?;
    if a.common.json {
        let mut v = serde_json::to_value(&report)?;
        v["seconds"] = serde_json::json!(t0.elapsed().as_secs_f64());
        println!("{v}");
    } else {
        println!(
            "imported {} ({} tensors, {} parameters; {:?}) with a {} tokenizer into {} in {:.1}s",
            report.architecture,
            report.tensors,
            report.parameters,
            report.tensor_types,
            report.tokenizer,
            report.output.display(),
            t0.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

fn run_eval(a: EvalArgs) -> anyhow::Result<()> {
    init_threads(&a.common)?;
    let dir = data::data_dir(a.data_dir.as_deref());
    let protocol = match a.protocol {
        ProtocolArg::Paper => Protocol::Paper,
        ProtocolArg::Llamacpp => Protocol::Llamacpp,
    };
    // Resolve every input before the expensive load.
    let (data_path, text_form) = match a.ppl {
        PplSet::Wikitext2 => (data::locate(&dir, DataFile::WikiTest)?, "wikitext2"),
        PplSet::C4 => (data::locate(&dir, DataFile::C4Validation)?, "c4"),
    };
    let t_load = Instant::now();
    let ckpt = Checkpoint::open(&a.model)?;
    let tok_path = ckpt.files.tokenizer.clone().ok_or_else(|| {
        affq::Error::format(
            ckpt.files.dir.join("tokenizer.json"),
            "missing: evaluation needs the model's tokenizer",
        )
    })?;
    let tok = Tok::load(&tok_path)?;
    let text = match (a.ppl, protocol) {
        (PplSet::Wikitext2, Protocol::Paper) => data::paper_text(&data::read_text(&data_path)?),
        (PplSet::Wikitext2, Protocol::Llamacpp) => {
            data::llamacpp_text(&data::read_text(&data_path)?)
        }
        (PplSet::C4, _) => data::c4_eval_text(&data_path)?,
    };
    let bos = eval::bos_policy(&tok)?;
    // Paper protocol: no special tokens; llama.cpp: the vocabulary's own policy (BOS at start).
    let add_special = protocol == Protocol::Llamacpp;
    let mut ids = tok.encode(&text, add_special)?;
    if let PplSet::C4 = a.ppl {
        ids.truncate(256 * a.seqlen);
    }
    let mut model = Model::load(&ckpt, a.seqlen)?;
    let isa = affq::kernels::int_gemm::Isa::detect();
    let bf16 = a.kernels == KernelsArg::IntBf16;
    let (int_layers, bf16_sites) = match a.kernels {
        KernelsArg::Int | KernelsArg::IntBf16 => model.use_int_kernels(isa, bf16)?,
        KernelsArg::Simulate => (0, 0),
    };
    let mut kernels = if int_layers > 0 {
        let xf = match (bf16, bf16_sites) {
            (false, _) => String::new(),
            (true, 0) => ", f32 transforms: no AVX-512 BF16 or no transforms".into(),
            (true, n) => format!(", {n} transforms in bf16"),
        };
        format!("int ({}, {int_layers} layers{xf})", isa.name())
    } else {
        "simulate".to_string()
    };
    if a.device == DeviceArg::Cuda {
        if a.kernels != KernelsArg::Int {
            return Err(affq::Error::Usage(
                "--device cuda runs the integer kernels with f32 transforms: use --kernels int"
                    .into(),
            )
            .into());
        }
        kernels = use_cuda(&mut model)?;
    }
    let load_s = t_load.elapsed().as_secs_f64();
    let opts = PplOptions {
        seqlen: a.seqlen,
        max_windows: a.max_windows,
        protocol,
    };
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30} {pos}/{len} windows  ppl {msg}  [{elapsed}<{eta}]",
        )
        .expect("valid template"),
    );
    let res = eval::perplexity(&model, &ids, &opts, bos, |done, total, ppl| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
        bar.set_message(format!("{ppl:.4}"));
    })?;
    bar.finish_and_clear();
    let bos_policy = match (protocol, bos) {
        (Protocol::Paper, _) => "none".to_string(),
        (Protocol::Llamacpp, Some(b)) => format!("bos {b} replaces each chunk's first token"),
        (Protocol::Llamacpp, None) => "none (vocabulary adds no BOS)".to_string(),
    };
    if a.common.json {
        let mut v = serde_json::to_value(&res)?;
        v["model"] = serde_json::json!(a.model.display().to_string());
        v["dataset"] = serde_json::json!(text_form);
        v["text_tokens"] = serde_json::json!(ids.len());
        v["bos"] = serde_json::json!(bos_policy);
        v["load_seconds"] = serde_json::json!(load_s);
        v["kernels"] = serde_json::json!(kernels);
        println!("{v}");
    } else {
        println!(
            "{text_form} PPL {:.4}  ({} windows × {} tokens, {} predictions, protocol {:?}, BOS {})",
            res.ppl, res.windows, res.seqlen, res.predictions, protocol, bos_policy
        );
        println!(
            "model {}  text tokens {}  eval {:.1}s  {:.0} tok/s  (load {:.1}s)  kernels {kernels}",
            a.model.display(),
            ids.len(),
            res.seconds,
            res.tok_per_s,
            load_s
        );
    }
    Ok(())
}

fn bits_arg(flag: &str, b: u8) -> anyhow::Result<Option<u8>> {
    match b {
        2..=8 => Ok(Some(b)),
        16 => Ok(None),
        _ => Err(affq::Error::Usage(format!(
            "{flag} {b}: allowed are 2..8, or 16 for full precision"
        ))
        .into()),
    }
}

/// Turns the flags into a validated plan.
fn quant_plan(a: &QuantizeArgs, r: &Recipe) -> anyhow::Result<QuantPlan> {
    let sym_scale = match a.sym_scale {
        SymScaleArg::Maxpos => SymScale::MaxPos,
        SymScaleArg::Halfrange => SymScale::HalfRange,
    };
    for (flag, r) in [("--clip", a.clip), ("--a-clip", a.a_clip)] {
        if !(r > 0.0 && r <= 1.0) {
            return Err(affq::Error::Usage(format!("{flag} {r}: must be in (0, 1]")).into());
        }
    }
    let group_size = r.group_size;
    let weights = bits_arg("--bits", r.bits.unwrap_or(4))?.map(|bits| {
        let base = if r.asym == Some(true) {
            QuantSpec::asym(bits)
        } else {
            QuantSpec::sym(bits)
        };
        let asym_zero = match a.zero_point {
            ZeroArg::Integer => AsymZero::Integer,
            ZeroArg::FloatOffset => AsymZero::FloatOffset,
        };
        WeightScheme {
            spec: QuantSpec {
                sym_scale,
                asym_zero,
                clip: a.clip,
                clip_min: a.clip,
                ..base
            },
            granularity: match group_size {
                Some(g) => Granularity::Group(g),
                None => Granularity::Channel,
            },
            clip_search: a.weight_clip_search,
            quantizer: weight_quantizer(r)
                .map(|w| w.name())
                .unwrap_or("rtn")
                .into(),
        }
    });
    if weights.is_none() && (group_size.is_some() || a.weight_clip_search) {
        return Err(affq::Error::Usage(
            "--group-size and --weight-clip-search need weight quantization (--bits 2..8)".into(),
        )
        .into());
    }
    if group_size == Some(0) {
        return Err(affq::Error::Usage("--group-size must be positive".into()).into());
    }
    // Per-token activations: symmetric (FlatQuant, QuaRot), asymmetric for AffineQuant (§3.6).
    let activations = bits_arg("--a-bits", r.a_bits.unwrap_or(16))?.map(|b| QuantSpec {
        sym_scale,
        clip: a.a_clip,
        clip_min: a.a_clip,
        ..if a.method == MethodArg::Affinequant {
            QuantSpec::asym(b)
        } else {
            QuantSpec::sym(b)
        }
    });
    let kv_cache = bits_arg("--kv-bits", r.kv_bits.unwrap_or(16))?.map(|b| {
        if a.kv_sym {
            QuantSpec {
                sym_scale,
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
        quantize_head: a.quantize_head,
    })
}

/// Method preset, then `--recipe`, then flags.
fn resolve_recipe(a: &QuantizeArgs) -> anyhow::Result<Recipe> {
    // Untrained methods take only the CPU preset's data budget (used by GPTQ).
    let cpu = Recipe::load("cpu")?;
    let base = match a.method {
        MethodArg::Flatquant => cpu,
        MethodArg::Affinequant => Recipe::load("affinequant-cpu")?,
        _ => Recipe {
            nsamples: cpu.nsamples,
            calib_seqlen: cpu.calib_seqlen,
            calib: cpu.calib,
            ..Recipe::default()
        },
    };
    let base = match &a.recipe {
        Some(r) => {
            let r = Recipe::load(r)?;
            if let Some(m) = &r.method {
                let want = method_name(a.method);
                if m != want {
                    return Err(affq::Error::Usage(format!(
                        "recipe is for --method {m}, not {want}"
                    ))
                    .into());
                }
            }
            base.overridden_by(&r)
        }
        None => base,
    };
    let flags = Recipe {
        method: None,
        bits: a.bits,
        a_bits: a.a_bits,
        kv_bits: a.kv_bits,
        nsamples: a.nsamples,
        calib_seqlen: a.calib_seqlen,
        epochs: a.epochs,
        batch: a.batch,
        lr: a.lr,
        alpha: a.alpha,
        calib: a.calib.clone(),
        weight_quantizer: a.weight_quantizer.map(|w| {
            match w {
                WeightQuantizerArg::Rtn => "rtn",
                WeightQuantizerArg::Gptq => "gptq",
            }
            .to_string()
        }),
        gptq_damp: a.gptq_damp,
        act_order: a.act_order.then_some(true),
        gptq_nsamples: a.gptq_nsamples,
        asym: if a.sym {
            Some(false)
        } else {
            a.asym.then_some(true)
        },
        group_size: a.group_size,
        stability_factor: a.stability_factor,
        ln_matrix: a.ln_matrix.then_some(true),
    };
    let mut r = base.overridden_by(&flags);
    if r.epochs == Some(0) {
        return Err(affq::Error::Usage("--epochs must be at least 1".into()).into());
    }
    let gptq = weight_quantizer(&r)? != WeightQuantizer::Rtn;
    if !trained(a.method) {
        let training_flags = [
            a.epochs.is_some(),
            a.batch.is_some(),
            a.lr.is_some(),
            a.alpha.is_some(),
        ];
        if training_flags.iter().any(|&f| f) {
            return Err(affq::Error::Usage("training flags (--epochs, --batch, --lr, --alpha) need a trained method (--method flatquant or affinequant)".into()).into());
        }
        let data_flags = [
            a.nsamples.is_some(),
            a.calib_seqlen.is_some(),
            a.calib.is_some(),
        ];
        if !gptq && data_flags.iter().any(|&f| f) {
            return Err(affq::Error::Usage("calibration data flags (--calib, --nsamples, --calib-seqlen) need a calibrated method (--method flatquant or affinequant) or --weight-quantizer gptq".into()).into());
        }
    }
    if a.method != MethodArg::Affinequant && (a.stability_factor.is_some() || a.ln_matrix) {
        return Err(affq::Error::Usage(
            "--stability-factor and --ln-matrix need --method affinequant".into(),
        )
        .into());
    }
    if !gptq && (a.gptq_damp.is_some() || a.act_order || a.gptq_nsamples.is_some()) {
        return Err(affq::Error::Usage(
            "--gptq-damp, --act-order and --gptq-nsamples need --weight-quantizer gptq".into(),
        )
        .into());
    }
    if gptq {
        // A Hessian of a 1536-wide input from AffineQuant's 8 × 512 training tokens overfits
        // them (measured: GPTQ then loses to RTN); trained methods take at least the CPU
        // preset's 32 windows for GPTQ, untrained ones use --nsamples as given.
        let n = r.nsamples.unwrap_or(32);
        let min = if trained(a.method) { n.max(32) } else { n };
        let g = r.gptq_nsamples.unwrap_or(min);
        if g < n {
            return Err(affq::Error::Usage(format!(
                "--gptq-nsamples {g} is fewer than --nsamples {n}: GPTQ uses the training windows and more"
            ))
            .into());
        }
        r.gptq_nsamples = Some(g);
    }
    Ok(r)
}

fn trained(m: MethodArg) -> bool {
    matches!(m, MethodArg::Flatquant | MethodArg::Affinequant)
}

fn method_name(m: MethodArg) -> &'static str {
    match m {
        MethodArg::Rtn => "rtn",
        MethodArg::Rotate => "rotate",
        MethodArg::Flatquant => "flatquant",
        MethodArg::Affinequant => "affinequant",
    }
}

/// The weight quantizer a resolved recipe asks for.
fn weight_quantizer(r: &Recipe) -> anyhow::Result<WeightQuantizer> {
    Ok(match r.weight_quantizer.as_deref().unwrap_or("rtn") {
        "rtn" => WeightQuantizer::Rtn,
        "gptq" => {
            let damp = r.gptq_damp.unwrap_or(0.01);
            if !(damp >= 0.0 && damp.is_finite()) {
                return Err(affq::Error::Usage(format!(
                    "--gptq-damp {damp}: must be a non-negative number"
                ))
                .into());
            }
            WeightQuantizer::Gptq(GptqConfig {
                damp,
                act_order: r.act_order.unwrap_or(false),
                block: 128,
            })
        }
        other => {
            return Err(affq::Error::Usage(format!(
                "weight quantizer `{other}`: expected rtn or gptq"
            ))
            .into())
        }
    })
}

struct CalibOutcome {
    csv: String,
    transforms: Vec<String>,
}

/// Calibration data of the resolved recipe, tokenized into windows; and its description.
fn calibration_tokens(
    a: &QuantizeArgs,
    r: &Recipe,
    ckpt: &Checkpoint,
) -> anyhow::Result<(candle_core::Tensor, String)> {
    let dir = data::data_dir(a.data_dir.as_deref());
    let source = match r.calib.as_deref().unwrap_or("wikitext2") {
        "wikitext2" => CalibSource::Wikitext2,
        "c4" => CalibSource::C4,
        path => CalibSource::File(PathBuf::from(path)),
    };
    let (path, desc) = affq::calib::data::resolve(&source, &dir)?;
    let tok_path = ckpt.files.tokenizer.clone().ok_or_else(|| {
        affq::Error::format(
            ckpt.files.dir.join("tokenizer.json"),
            "missing: calibration needs the model's tokenizer",
        )
    })?;
    let tok = Tok::load(&tok_path)?;
    let (n, l) = (r.nsamples.unwrap_or(32), r.calib_seqlen.unwrap_or(512));
    // Windows are drawn in sequence from the seed: the first n are the training windows
    // whether or not GPTQ asks for more.
    let total = r.gptq_nsamples.unwrap_or(n).max(n);
    let text = affq::calib::data::read(&path)?;
    let tokens = affq::calib::data::windows(&tok, &text, &path, total, l, a.seed)?;
    let mut desc = format!("{desc}, {n} × {l} tokens");
    if total > n {
        desc.push_str(&format!(" ({total} windows for GPTQ's Hessians)"));
    }
    Ok((tokens, desc))
}

fn flatquant_config(
    a: &QuantizeArgs,
    r: &Recipe,
    plan: &QuantPlan,
) -> anyhow::Result<FlatQuantConfig> {
    let epochs = r.epochs.unwrap_or(3);
    Ok(FlatQuantConfig {
        weights: plan.weights.as_ref().map(|w| w.spec),
        activations: plan.activations,
        kv_cache: plan.kv_cache,
        epochs,
        batch: r.batch.unwrap_or(1),
        lr: r.lr.unwrap_or(5e-3),
        clip_lr_mult: 10.0,
        weight_decay: 0.01,
        alpha: r.alpha.unwrap_or(0.3),
        seed: a.seed,
        group_size: plan.weights.as_ref().and_then(|w| match w.granularity {
            Granularity::Group(g) => Some(g),
            _ => None,
        }),
    })
}

fn affinequant_config(r: &Recipe, plan: &QuantPlan) -> anyhow::Result<AffineQuantConfig> {
    let epochs = r.epochs.unwrap_or(4);
    Ok(AffineQuantConfig {
        weights: plan.weights.as_ref().map(|w| w.spec),
        group_size: plan.weights.as_ref().and_then(|w| match w.granularity {
            Granularity::Group(g) => Some(g),
            _ => None,
        }),
        activations: plan.activations,
        kv_cache: plan.kv_cache,
        epochs,
        lr: r.lr.unwrap_or(5e-3),
        lwc_lr: 1e-2,
        alpha: r.alpha.unwrap_or(0.5),
        // §3.3: 0.1 for W4A4, 1e-2 for LLaMA-family weight-only.
        stability_factor: r.stability_factor.unwrap_or(if plan.activations.is_some() {
            0.1
        } else {
            1e-2
        }),
        ln_matrix: r.ln_matrix.unwrap_or(false),
    })
}

/// Runs the block-by-block engine with `method` and the recipe's weight quantizer.
#[allow(clippy::too_many_arguments)]
fn run_calibration(
    a: &QuantizeArgs,
    r: &Recipe,
    plan: &QuantPlan,
    ckpt: &Checkpoint,
    model: &mut Model,
    method: &mut dyn BlockMethod,
    label: &str,
    training: Option<String>,
    store: Option<&dyn affq::calib::BlockStore>,
) -> anyhow::Result<CalibOutcome> {
    let (tokens, data_desc) = calibration_tokens(a, r, ckpt)?;
    let wq = weight_quantizer(r)?;
    let mut summary = format!("{label}: calibrated on {data_desc}");
    if let Some(t) = training {
        summary.push_str(&format!(", {t}"));
    }
    if let WeightQuantizer::Gptq(g) = wq {
        summary.push_str(&format!(
            ", weights by GPTQ (damp {}, act order {})",
            g.damp, g.act_order
        ));
    }
    if !a.common.json {
        eprintln!("{summary}");
    }
    let engine = EngineConfig {
        plan: plan.clone(),
        weight_quantizer: wq,
        method_windows: r.nsamples.unwrap_or(32),
    };
    let nblocks = model.blocks.len() as u64;
    let bar = indicatif::ProgressBar::new(nblocks);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "blocks {pos}/{len} {bar:30} [{elapsed}<{eta}] {msg}",
        )
        .expect("valid template"),
    );
    let mut csv = String::from("block,epoch,loss,seconds\n");
    let reports = affq::calib::calibrate_model(
        model,
        &tokens,
        method,
        &engine,
        store,
        |b, e| bar.set_message(format!("block {b} epoch {} loss {:.3e}", e.epoch, e.loss)),
        |done, _, rep| {
            bar.set_position(done as u64);
            bar.suspend(|| {
                eprintln!(
                    "block {:>2}: loss rtn {:.3e} -> {label} {:.3e} ({:.1}s)",
                    rep.block, rep.loss_rtn, rep.loss_final, rep.seconds
                )
            });
        },
    )?;
    bar.finish_and_clear();
    for rep in &reports {
        for e in &rep.epochs {
            csv.push_str(&format!(
                "{},{},{:.6e},{:.2}\n",
                rep.block, e.epoch, e.loss, e.seconds
            ));
        }
    }
    csv.push_str("\nblock,loss_rtn,loss_final,seconds\n");
    let mut transforms = vec![summary];
    for rep in &reports {
        csv.push_str(&format!(
            "{},{:.6e},{:.6e},{:.2}\n",
            rep.block, rep.loss_rtn, rep.loss_final, rep.seconds
        ));
        for note in &rep.notes {
            eprintln!("warning: {note}");
            transforms.push(note.clone());
        }
    }
    Ok(CalibOutcome { csv, transforms })
}

fn run_quantize(a: QuantizeArgs) -> anyhow::Result<()> {
    init_threads(&a.common)?;
    let recipe = resolve_recipe(&a)?;
    let plan = quant_plan(&a, &recipe)?;
    let t0 = Instant::now();
    let ckpt = Checkpoint::open(&a.model)?;
    if ckpt.quant.is_some() {
        return Err(affq::Error::Usage(format!(
            "{} is already a quantized checkpoint",
            a.model.display()
        ))
        .into());
    }
    // Refuse an output inside the model directory (it would be read while being replaced).
    let model_dir = std::fs::canonicalize(&ckpt.files.dir).unwrap_or(ckpt.files.dir.clone());
    let out_parent = a
        .output
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    let out_abs =
        std::fs::canonicalize(out_parent).map(|p| p.join(a.output.file_name().unwrap_or_default()));
    if let Ok(out_abs) = &out_abs {
        if out_abs.starts_with(&model_dir) {
            return Err(affq::Error::Usage(format!(
                "output {} is inside the model directory {}",
                a.output.display(),
                model_dir.display()
            ))
            .into());
        }
    }
    affq::fsutil::check_output(&a.output, a.force)?;
    let mut model = Model::load(&ckpt, 1)?;
    // Groups must tile every linear's input; checked before any calibration starts.
    if let Some(Granularity::Group(g)) = plan.weights.as_ref().map(|w| w.granularity) {
        for b in &model.blocks {
            for kind in affq::model::LinearKind::ALL {
                let inp = b.linear(kind).in_features();
                if g == 0 || inp % g != 0 {
                    return Err(affq::Error::Usage(format!(
                        "group size {g} does not divide the input size {inp} of model.layers.{}.{}",
                        b.index,
                        kind.hf_name()
                    ))
                    .into());
                }
            }
        }
    }
    let mut extra = Vec::new();
    let mut transforms = match a.method {
        MethodArg::Rotate => methods::rotate::rotate(&mut model, a.seed)?,
        _ => Vec::new(),
    };
    let method_label = method_name(a.method);
    let mut qcfg = QuantConfig {
        quant_method: "affq".into(),
        format: affq::checkpoint::FORMAT.into(),
        format_version: affq::checkpoint::FORMAT_VERSION,
        affq_version: affq::VERSION.into(),
        method: method_label.into(),
        weights: plan.weights.clone(),
        activations: plan.activations,
        kv_cache: plan.kv_cache,
        quantize_head: plan.quantize_head,
        transforms: Vec::new(),
        seed: a.seed,
    };
    let engine = trained(a.method) || weight_quantizer(&recipe)? != WeightQuantizer::Rtn;
    if a.resume && !engine {
        return Err(affq::Error::Usage(
            "--resume continues a calibration: it needs --method flatquant or affinequant, or --weight-quantizer gptq".into(),
        )
        .into());
    }
    let mut work = None;
    if engine {
        // Everything that decides the result: a resumed run must have the same.
        let model_id = std::fs::canonicalize(&a.model).unwrap_or(a.model.clone());
        let fingerprint = format!(
            "affq {}\nmodel {}\nmethod {method_label}\nrecipe {recipe:?}\nplan {plan:?}\nseed {}\n",
            affq::VERSION,
            model_id.display(),
            a.seed
        );
        let w = affq::calib::resume::WorkDir::open(
            &a.output,
            &fingerprint,
            a.resume,
            a.force,
            model.config.clone(),
            qcfg.clone(),
        )?;
        if w.resumed > 0 && !a.common.json {
            eprintln!(
                "resuming: blocks 0..{} were finished by the interrupted run",
                w.resumed
            );
        }
        work = Some(w);
    }
    if engine {
        let (mut method, label, training): (Box<dyn BlockMethod>, &str, Option<String>) =
            match a.method {
                MethodArg::Flatquant => {
                    let cfg = flatquant_config(&a, &recipe, &plan)?;
                    let t = format!("{} epochs, batch {}, lr {}", cfg.epochs, cfg.batch, cfg.lr);
                    (Box::new(FlatQuant::new(cfg)?), "flatquant", Some(t))
                }
                MethodArg::Affinequant => {
                    let cfg = affinequant_config(&recipe, &plan)?;
                    let t = format!(
                        "{} epochs, lr {}, stability factor {}, {} at the norms",
                        cfg.epochs,
                        cfg.lr,
                        cfg.stability_factor,
                        if cfg.ln_matrix {
                            "dense matrices"
                        } else {
                            "per-channel scales"
                        }
                    );
                    (Box::new(AffineQuant { cfg }), "affinequant", Some(t))
                }
                MethodArg::Rtn | MethodArg::Rotate => {
                    (Box::new(Untrained { plan: plan.clone() }), "gptq", None)
                }
            };
        let outcome = run_calibration(
            &a,
            &recipe,
            &plan,
            &ckpt,
            &mut model,
            method.as_mut(),
            label,
            training,
            work.as_ref().map(|w| w as &dyn affq::calib::BlockStore),
        )
        .inspect_err(|_| {
            if let Some(w) = &work {
                w.discard_if_empty();
            }
        })?;
        extra.push(("calibration.csv".to_string(), outcome.csv));
        transforms.extend(outcome.transforms);
        methods::quantize_head(&mut model, &plan)?;
    } else {
        methods::quantize(&mut model, &plan)?;
    }
    let method = method_label;
    qcfg.transforms = transforms.clone();
    affq::checkpoint::write(
        &model,
        &ckpt.files.dir,
        &ckpt.files.config,
        &qcfg,
        &a.output,
        a.force,
        &extra,
    )?;
    if let Some(w) = work {
        w.finish()?;
    }
    let secs = t0.elapsed().as_secs_f64();
    if a.common.json {
        let mut v = serde_json::to_value(&qcfg)?;
        v["output"] = serde_json::json!(a.output.display().to_string());
        v["seconds"] = serde_json::json!(secs);
        println!("{v}");
    } else {
        let wdesc = plan
            .weights
            .as_ref()
            .map_or("16".to_string(), |w| format!("{}", w.spec.bits));
        let bits = |s: Option<QuantSpec>| s.map_or("16".to_string(), |s| s.bits.to_string());
        println!(
            "quantized {} with {method}: W{wdesc}A{}KV{} -> {} in {secs:.1}s",
            a.model.display(),
            bits(plan.activations),
            bits(plan.kv_cache),
            a.output.display()
        );
        for t in transforms {
            println!("  {t}");
        }
    }
    Ok(())
}

/// Keeps large tensor buffers in the malloc heap instead of fresh mmap/munmap pairs: every munmap
/// costs page faults and a cross-core TLB shootdown, which dominated the calibration profile.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only adjusts glibc allocator thresholds; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20); // glibc maximum
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

fn main() {
    // Die quietly on a closed stdout (`affq eval … | head -1`), as Unix tools do, instead of
    // panicking on the failed write.
    #[cfg(unix)]
    // SAFETY: restoring the default disposition of SIGPIPE before any other thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    tune_allocator();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Import(a) => run_import(a),
        Command::Eval(a) => run_eval(a),
        Command::Quantize(a) => run_quantize(*a),
    };
    if let Err(e) = result {
        let code = e
            .downcast_ref::<affq::Error>()
            .map_or(1, affq::Error::exit_code);
        eprintln!("error: {e:#}");
        std::process::exit(code);
    }
}

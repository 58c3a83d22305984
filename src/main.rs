//! The `affq` binary: parses arguments into a validated plan and hands it to the library.

use affq::checkpoint::{QuantConfig, WeightScheme};
use affq::data::{self, DataFile};
use affq::eval::{self, PplOptions, Protocol};
use affq::gguf::{self, ImportDtype};
use affq::methods::{self, QuantPlan};
use affq::model::Model;
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
    Quantize(QuantizeArgs),
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum MethodArg {
    /// Round to nearest, no transform.
    Rtn,
    /// QuaRot-style rotations (Hadamard / random orthogonal), then round to nearest.
    Rotate,
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
    /// Weight bits (2..8; 16 = keep full precision).
    #[arg(long, default_value_t = 4)]
    bits: u8,
    /// Activation bits for every decoder linear input, per token (2..8; 16 = off).
    #[arg(long, default_value_t = 16)]
    a_bits: u8,
    /// Key/value cache bits, per (token, head) (2..8; 16 = off).
    #[arg(long, default_value_t = 16)]
    kv_bits: u8,
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
    /// Replace an existing output directory.
    #[arg(long)]
    force: bool,
    #[command(flatten)]
    common: Common,
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
    #[command(flatten)]
    common: Common,
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
    let model = Model::load(&ckpt, a.seqlen)?;
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
        println!("{v}");
    } else {
        println!(
            "{text_form} PPL {:.4}  ({} windows × {} tokens, {} predictions, protocol {:?}, BOS {})",
            res.ppl, res.windows, res.seqlen, res.predictions, protocol, bos_policy
        );
        println!(
            "model {}  text tokens {}  eval {:.1}s  {:.0} tok/s  (load {:.1}s)",
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
fn quant_plan(a: &QuantizeArgs) -> anyhow::Result<QuantPlan> {
    let sym_scale = match a.sym_scale {
        SymScaleArg::Maxpos => SymScale::MaxPos,
        SymScaleArg::Halfrange => SymScale::HalfRange,
    };
    for (flag, r) in [("--clip", a.clip), ("--a-clip", a.a_clip)] {
        if !(r > 0.0 && r <= 1.0) {
            return Err(affq::Error::Usage(format!("{flag} {r}: must be in (0, 1]")).into());
        }
    }
    let weights = bits_arg("--bits", a.bits)?.map(|bits| {
        let base = if a.asym {
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
            granularity: match a.group_size {
                Some(g) => Granularity::Group(g),
                None => Granularity::Channel,
            },
            clip_search: a.weight_clip_search,
            quantizer: "rtn".into(),
        }
    });
    if weights.is_none() && (a.group_size.is_some() || a.weight_clip_search) {
        return Err(affq::Error::Usage(
            "--group-size and --weight-clip-search need weight quantization (--bits 2..8)".into(),
        )
        .into());
    }
    if a.group_size == Some(0) {
        return Err(affq::Error::Usage("--group-size must be positive".into()).into());
    }
    let activations = bits_arg("--a-bits", a.a_bits)?.map(|b| QuantSpec {
        sym_scale,
        clip: a.a_clip,
        clip_min: a.a_clip,
        ..QuantSpec::sym(b)
    });
    let kv_cache = bits_arg("--kv-bits", a.kv_bits)?.map(|b| {
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

fn run_quantize(a: QuantizeArgs) -> anyhow::Result<()> {
    init_threads(&a.common)?;
    let plan = quant_plan(&a)?;
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
    if a.output.exists() && !a.force {
        return Err(affq::Error::Usage(format!(
            "{} already exists (use --force to replace it)",
            a.output.display()
        ))
        .into());
    }
    let mut model = Model::load(&ckpt, 1)?;
    let transforms = match a.method {
        MethodArg::Rtn => Vec::new(),
        MethodArg::Rotate => methods::rotate::rotate(&mut model, a.seed)?,
    };
    methods::quantize(&mut model, &plan)?;
    let method = match a.method {
        MethodArg::Rtn => "rtn",
        MethodArg::Rotate => "rotate",
    };
    let qcfg = QuantConfig {
        quant_method: "affq".into(),
        format: affq::checkpoint::FORMAT.into(),
        format_version: affq::checkpoint::FORMAT_VERSION,
        affq_version: affq::VERSION.into(),
        method: method.into(),
        weights: plan.weights.clone(),
        activations: plan.activations,
        kv_cache: plan.kv_cache,
        quantize_head: plan.quantize_head,
        transforms: transforms.clone(),
        seed: a.seed,
    };
    affq::checkpoint::write(
        &model,
        &ckpt.files.dir,
        &ckpt.files.config,
        &qcfg,
        &a.output,
        a.force,
    )?;
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

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Import(a) => run_import(a),
        Command::Eval(a) => run_eval(a),
        Command::Quantize(a) => run_quantize(a),
    };
    if let Err(e) = result {
        let code = e
            .downcast_ref::<affq::Error>()
            .map_or(1, affq::Error::exit_code);
        eprintln!("error: {e:#}");
        std::process::exit(code);
    }
}

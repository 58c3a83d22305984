//! The `affq` binary: parses arguments (clap), hands them to the library as a request, and
//! prints what comes back. Validation lives in `affq::plan`, the work in the library.

use affq::calib::BlockReport;
use affq::data;
use affq::eval::{self, Dataset, PplOptions, Protocol};
use affq::formats::gguf::{self, ImportDtype};
use affq::formats::Checkpoint;
use affq::methods::EpochLog;
use affq::plan::QuantizeRequest;
use affq::quant::{AsymZero, SymScale};
use affq::quantize::Progress;
use affq::recipe::Recipe;
use affq::tokenizer::Tok;
use anyhow::Context;
use clap::builder::{PossibleValue, PossibleValuesParser};
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

/// `--method` values: the registered methods.
fn method_names() -> PossibleValuesParser {
    PossibleValuesParser::new(
        affq::methods::REGISTRY
            .iter()
            .map(|m| PossibleValue::new(m.name).help(m.about)),
    )
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
    /// Quantization method.
    #[arg(long, default_value = "rtn", value_parser = method_names())]
    method: String,
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

impl QuantizeArgs {
    /// The low-level arguments as the library's request.
    fn request(&self) -> QuantizeRequest {
        QuantizeRequest {
            model: self.model.clone(),
            output: self.output.clone(),
            method: self.method.clone(),
            recipe: self.recipe.clone(),
            flags: Recipe {
                method: None,
                bits: self.bits,
                a_bits: self.a_bits,
                kv_bits: self.kv_bits,
                nsamples: self.nsamples,
                calib_seqlen: self.calib_seqlen,
                epochs: self.epochs,
                batch: self.batch,
                lr: self.lr,
                alpha: self.alpha,
                calib: self.calib.clone(),
                weight_quantizer: self.weight_quantizer.map(|w| {
                    match w {
                        WeightQuantizerArg::Rtn => "rtn",
                        WeightQuantizerArg::Gptq => "gptq",
                    }
                    .to_string()
                }),
                gptq_damp: self.gptq_damp,
                act_order: self.act_order.then_some(true),
                gptq_nsamples: self.gptq_nsamples,
                asym: if self.sym {
                    Some(false)
                } else {
                    self.asym.then_some(true)
                },
                group_size: self.group_size,
                stability_factor: self.stability_factor,
                ln_matrix: self.ln_matrix.then_some(true),
            },
            sym_scale: match self.sym_scale {
                SymScaleArg::Maxpos => SymScale::MaxPos,
                SymScaleArg::Halfrange => SymScale::HalfRange,
            },
            zero_point: match self.zero_point {
                ZeroArg::Integer => AsymZero::Integer,
                ZeroArg::FloatOffset => AsymZero::FloatOffset,
            },
            clip: self.clip,
            a_clip: self.a_clip,
            kv_sym: self.kv_sym,
            weight_clip_search: self.weight_clip_search,
            quantize_head: self.quantize_head,
            seed: self.seed,
            data_dir: self.data_dir.clone(),
            resume: self.resume,
            force: self.force,
        }
    }
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
    let dataset = match a.ppl {
        PplSet::Wikitext2 => Dataset::Wikitext2,
        PplSet::C4 => Dataset::C4,
    };
    // Resolve every input before the expensive load.
    let data_path = dataset.locate(&dir)?;
    let t_load = Instant::now();
    let ckpt = Checkpoint::open(&a.model)?;
    let tok_path = ckpt.files.tokenizer.clone().ok_or_else(|| {
        affq::Error::format(
            ckpt.files.dir.join("tokenizer.json"),
            "missing: evaluation needs the model's tokenizer",
        )
    })?;
    let tok = Tok::load(&tok_path)?;
    let bos = eval::bos_policy(&tok)?;
    let ids = dataset.tokens(&data_path, protocol, &tok, a.seqlen)?;
    let mut model = ckpt.load_model(a.seqlen)?;
    let isa = affq::kernels::int_gemm::Isa::detect();
    let bf16 = a.kernels == KernelsArg::IntBf16;
    let (int_layers, bf16_sites) = match a.kernels {
        KernelsArg::Int | KernelsArg::IntBf16 => {
            affq::backend::int_cpu::use_int_kernels(&mut model, isa, bf16)?
        }
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
        use affq::backend::cuda;
        let gpu = cuda::Cuda::new()?;
        let n = cuda::use_cuda(&mut model, &gpu)?;
        kernels = format!("int (cuda {}, {n} layers)", gpu.name);
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
        v["dataset"] = serde_json::json!(dataset.name());
        v["text_tokens"] = serde_json::json!(ids.len());
        v["bos"] = serde_json::json!(bos_policy);
        v["load_seconds"] = serde_json::json!(load_s);
        v["kernels"] = serde_json::json!(kernels);
        println!("{v}");
    } else {
        println!(
            "{} PPL {:.4}  ({} windows × {} tokens, {} predictions, protocol {:?}, BOS {})",
            dataset.name(),
            res.ppl,
            res.windows,
            res.seqlen,
            res.predictions,
            protocol,
            bos_policy
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

/// Shows a quantization run on stderr: a progress bar over blocks, a line per finished block.
struct Bars {
    quiet: bool,
    bar: Option<indicatif::ProgressBar>,
}

impl Progress for Bars {
    fn resumed(&mut self, n: usize) {
        if !self.quiet {
            eprintln!("resuming: blocks 0..{n} were finished by the interrupted run");
        }
    }
    fn calibration_started(&mut self, summary: &str, blocks: usize) {
        if !self.quiet {
            eprintln!("{summary}");
        }
        let bar = indicatif::ProgressBar::new(blocks as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "blocks {pos}/{len} {bar:30} [{elapsed}<{eta}] {msg}",
            )
            .expect("valid template"),
        );
        self.bar = Some(bar);
    }
    fn epoch(&mut self, block: usize, e: &EpochLog) {
        if let Some(bar) = &self.bar {
            bar.set_message(format!(
                "block {block} epoch {} loss {:.3e}",
                e.epoch, e.loss
            ));
        }
    }
    fn block_done(&mut self, done: usize, _total: usize, rep: &BlockReport, label: &str) {
        if let Some(bar) = &self.bar {
            bar.set_position(done as u64);
            bar.suspend(|| {
                eprintln!(
                    "block {:>2}: loss rtn {:.3e} -> {label} {:.3e} ({:.1}s)",
                    rep.block, rep.loss_rtn, rep.loss_final, rep.seconds
                )
            });
        }
    }
    fn calibration_finished(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
    fn warning(&mut self, msg: &str) {
        eprintln!("warning: {msg}");
    }
}

fn run_quantize(a: QuantizeArgs) -> anyhow::Result<()> {
    init_threads(&a.common)?;
    let plan = affq::plan::plan(a.request())?;
    let t0 = Instant::now();
    let mut bars = Bars {
        quiet: a.common.json,
        bar: None,
    };
    let out = affq::quantize::run(&plan, &mut bars)?;
    let secs = t0.elapsed().as_secs_f64();
    if a.common.json {
        let mut v = serde_json::to_value(&out.config)?;
        v["output"] = serde_json::json!(a.output.display().to_string());
        v["seconds"] = serde_json::json!(secs);
        println!("{v}");
    } else {
        let q = &plan.quant;
        let wdesc = q
            .weights
            .as_ref()
            .map_or("16".to_string(), |w| format!("{}", w.spec.bits));
        let bits =
            |s: Option<affq::quant::QuantSpec>| s.map_or("16".to_string(), |s| s.bits.to_string());
        println!(
            "quantized {} with {}: W{wdesc}A{}KV{} -> {} in {secs:.1}s",
            a.model.display(),
            plan.method.name,
            bits(q.activations),
            bits(q.kv_cache),
            a.output.display()
        );
        for t in out.transforms {
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

//! The command line: clap derive structs (the low-level arguments) and their conversion into the
//! library's requests (`affq::plan::QuantizeRequest`, `affq::eval::EvalRequest`, `affq::runtime`'s requests).

use affq::eval::{Dataset, Device, EvalRequest, Kernels, Protocol};
use affq::plan::{QuantizeRequest, ShardRequest};
use affq::quant::{AsymZero, SymScale};
use affq::recipe::Recipe;
use affq::runtime::bench::BenchRequest;
use affq::runtime::generate::{GenerateRequest, PromptSource};
use affq::runtime::sampler::SamplerConfig;
use clap::builder::{PossibleValue, PossibleValuesParser};
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "affq",
    version,
    about = "Post-training quantization of LLMs with learned affine transforms"
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Args, Clone)]
pub(crate) struct Common {
    /// Print one JSON object on stdout instead of text.
    #[arg(long, global = true)]
    pub(crate) json: bool,
    /// Worker threads (default: RAYON_NUM_THREADS or the number of cores). `quantize` runs
    /// candle's element-wise ops on the calling thread unless CANDLE_NUM_THREADS is set.
    #[arg(long, global = true)]
    pub(crate) threads: Option<usize>,
}

#[derive(Subcommand)]
pub(crate) enum Command {
    /// Import a llama.cpp GGUF file into a Hugging Face model directory.
    Import(ImportArgs),
    /// Measure perplexity of a model (original or quantized).
    Eval(EvalArgs),
    /// Quantize a model and write a quantized checkpoint.
    Quantize(Box<QuantizeArgs>),
    /// Write a checkpoint in a format another runtime loads (GGUF for llama.cpp).
    Export(ExportArgs),
    /// Generate text from a prompt (plain or through the chat template), streamed to stdout.
    Generate(GenerateArgs),
    /// Measure prefill (pp) and decode (tg) speed, as llama-bench does.
    Bench(BenchArgs),
}

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum FormatArg {
    /// llama.cpp's GGUF (Q4_0, Q4_1, Q8_0, F16, F32).
    Gguf,
    /// compressed-tensors pack-quantized (transformers, vLLM): 2/4/8-bit integer weights.
    CompressedTensors,
    /// GPTQ v1 (GPTQModel, transformers, vLLM): 2/4/8-bit integer weights, f16 scales.
    Gptq,
}

impl FormatArg {
    pub(crate) fn format(self) -> affq::export::Format {
        match self {
            FormatArg::Gguf => affq::export::Format::Gguf,
            FormatArg::CompressedTensors => affq::export::Format::CompressedTensors,
            FormatArg::Gptq => affq::export::Format::Gptq,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum GgufTypeArg {
    /// 4-bit symmetric, groups of 32, f16 scales.
    #[value(name = "q4_0")]
    Q4_0,
    /// 4-bit with a float offset, groups of 32.
    #[value(name = "q4_1")]
    Q4_1,
    /// 8-bit symmetric, groups of 32.
    #[value(name = "q8_0")]
    Q8_0,
    F16,
    F32,
}

#[derive(Args)]
pub(crate) struct ExportArgs {
    /// Checkpoint directory (affq's, or a full-precision Hugging Face model).
    pub(crate) checkpoint: PathBuf,
    /// Output file (GGUF) or directory [default: beside the checkpoint, CHECKPOINT_DIR.TYPE.gguf,
    /// CHECKPOINT_DIR-compressed-tensors or CHECKPOINT_DIR-gptq].
    #[arg(short, long)]
    pub(crate) output: Option<PathBuf>,
    /// Output format.
    #[arg(long, value_enum, default_value = "gguf")]
    pub(crate) format: FormatArg,
    /// GGUF type of the linears [default: the checkpoint's grid (4-bit symmetric: q4_0, 8-bit:
    /// q8_0, 4-bit asymmetric: q4_1), or its stored dtype for a full-precision model].
    #[arg(long = "type", value_enum)]
    pub(crate) gguf_type: Option<GgufTypeArg>,
    /// Re-round what the format cannot hold exactly (reports the relative weight error per
    /// tensor kind; drops activation and KV-cache quantization) instead of refusing.
    #[arg(long)]
    pub(crate) allow_lossy: bool,
    /// Replace an existing output file.
    #[arg(long)]
    pub(crate) force: bool,
    #[command(flatten)]
    pub(crate) common: Common,
}

impl ExportArgs {
    pub(crate) fn request(&self) -> affq::export::ExportRequest {
        affq::export::ExportRequest {
            checkpoint: self.checkpoint.clone(),
            output: self.output.clone(),
            format: self.format.format(),
            gguf_type: self.gguf_type.map(|t| {
                match t {
                    GgufTypeArg::Q4_0 => "q4_0",
                    GgufTypeArg::Q4_1 => "q4_1",
                    GgufTypeArg::Q8_0 => "q8_0",
                    GgufTypeArg::F16 => "f16",
                    GgufTypeArg::F32 => "f32",
                }
                .to_string()
            }),
            allow_lossy: self.allow_lossy,
            force: self.force,
        }
    }
}

/// `--method` values: the registered methods.
pub(crate) fn method_names() -> PossibleValuesParser {
    PossibleValuesParser::new(
        affq::methods::REGISTRY
            .iter()
            .map(|m| PossibleValue::new(m.name).help(m.about)),
    )
}

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum SymScaleArg {
    /// s = amax / (2^(b-1) - 1)  (amax/7 at 4 bits; FlatQuant, QuaRot)
    Maxpos,
    /// s = amax / ((2^b - 1)/2)   (amax/7.5; GPTQ repo, compressed-tensors)
    Halfrange,
    /// s = amax / 2^(b-1), zero moved so the extreme is exact: all 2^b levels (llama.cpp's
    /// Q4_0/Q8_0 rule; weights only)
    #[value(name = "signed-max")]
    SignedMax,
}

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum ZeroArg {
    /// Range widened to include 0, integer zero point.
    Integer,
    /// No widening, float offset (GGUF Q4_1 style).
    FloatOffset,
}

#[derive(Args)]
pub(crate) struct QuantizeArgs {
    /// Model directory or .safetensors file (config.json beside it).
    pub(crate) model: PathBuf,
    /// Output checkpoint directory [default: MODEL_DIR-affq-METHOD-SCHEME beside the model
    /// directory, e.g. smollm2-affq-rtn-w4a16; never an existing path].
    #[arg(short, long)]
    pub(crate) output: Option<PathBuf>,
    /// Quantization method.
    #[arg(long, default_value = "rtn", value_parser = method_names())]
    pub(crate) method: String,
    /// Weight bits (2..8; 16 = keep full precision) [default: 4].
    #[arg(long)]
    pub(crate) bits: Option<u8>,
    /// Activation bits for every decoder linear input, per token (2..8; 16 = off) [default: 16].
    #[arg(long)]
    pub(crate) a_bits: Option<u8>,
    /// Key/value cache bits, per (token, head) (2..8; 16 = off) [default: 16].
    #[arg(long)]
    pub(crate) kv_bits: Option<u8>,
    /// Calibration recipe: a built-in name (calib/README.md: cpu, paper, flatquant-w4a4-gptq, …)
    /// or a .toml path. Flags override it. Without it, FlatQuant and AffineQuant take the recipe
    /// of the requested scheme (named in the output).
    #[arg(long)]
    pub(crate) recipe: Option<String>,
    /// Calibration text: wikitext2 (train split if present, else validation), c4, or a .txt/.jsonl file.
    #[arg(long)]
    pub(crate) calib: Option<String>,
    /// Calibration windows.
    #[arg(long)]
    pub(crate) nsamples: Option<usize>,
    /// Tokens per calibration window.
    #[arg(long)]
    pub(crate) calib_seqlen: Option<usize>,
    /// How calibration keeps the blocks' inputs and targets: f32, or bf16 for half the memory
    /// (widened per batch) [default: f32].
    #[arg(long, value_parser = ["f32", "bf16"])]
    pub(crate) calib_activations: Option<String>,
    /// Training epochs per block.
    #[arg(long)]
    pub(crate) epochs: Option<usize>,
    /// Windows per optimisation step.
    #[arg(long)]
    pub(crate) batch: Option<usize>,
    /// Learning rate of the transforms (clip parameters: 10×).
    #[arg(long)]
    pub(crate) lr: Option<f64>,
    /// FlatQuant: learning rate of the channel scales, trained as ln c [default: the recipe's;
    /// 4e-2 in the CPU budget, whatever --lr says].
    #[arg(long)]
    pub(crate) scale_lr: Option<f64>,
    /// Channel-scale init strength α (FlatQuant's diag_alpha).
    #[arg(long)]
    pub(crate) alpha: Option<f64>,
    /// Directory with the calibration texts (default: $AFFQ_DATA_DIR, else ~/.cache/affq/data).
    #[arg(long)]
    pub(crate) data_dir: Option<PathBuf>,
    /// Weight group size along the input dimension (default: one group per output channel).
    #[arg(long)]
    pub(crate) group_size: Option<usize>,
    /// Symmetric weights (default, except in recipes that set `asym`, such as FlatQuant's W4A16
    /// preset and AffineQuant's).
    #[arg(long, conflicts_with = "asym")]
    pub(crate) sym: bool,
    /// Asymmetric weights (integer zero point unless --zero-point says otherwise).
    #[arg(long)]
    pub(crate) asym: bool,
    /// Scale convention of symmetric grids [default: signed-max with --format, else maxpos].
    #[arg(long, value_enum)]
    pub(crate) sym_scale: Option<SymScaleArg>,
    /// Zero-point convention of asymmetric weight grids.
    #[arg(long, value_enum, default_value = "integer")]
    pub(crate) zero_point: ZeroArg,
    /// Weight clip ratio (multiplies each unit's range).
    #[arg(long, default_value_t = 1.0)]
    pub(crate) clip: f32,
    /// Activation clip ratio.
    #[arg(long, default_value_t = 1.0)]
    pub(crate) a_clip: f32,
    /// Symmetric KV-cache quantization (default asymmetric, as FlatQuant).
    #[arg(long)]
    pub(crate) kv_sym: bool,
    /// Per-unit MSE search of the weight clip range (80-point grid).
    #[arg(long)]
    pub(crate) weight_clip_search: bool,
    /// Also quantize the LM head (weights and its input).
    #[arg(long)]
    pub(crate) quantize_head: bool,
    /// Seed of every random choice (rotations).
    #[arg(long, default_value_t = 0)]
    pub(crate) seed: u64,
    /// How weights are rounded onto their grid, under any method [default: rtn; gptq (v2) in
    /// FlatQuant's W4A16, W4A4 and W4A4KV4 recipes].
    #[arg(long, value_enum)]
    pub(crate) weight_quantizer: Option<WeightQuantizerArg>,
    /// GPTQ dampening: fraction of the mean Hessian diagonal added to it [default: 0.01].
    #[arg(long)]
    pub(crate) gptq_damp: Option<f64>,
    /// GPTQ: quantize columns by decreasing Hessian diagonal (groups then use static grids).
    #[arg(long, conflicts_with = "no_act_order")]
    pub(crate) act_order: bool,
    /// GPTQ in column order where the scheme's recipe (FlatQuant's W4A16 and W4A4 presets) sets
    /// act order.
    #[arg(long)]
    pub(crate) no_act_order: bool,
    /// GPTQ: choose each group's grid on the error-updated weights by a search of the scale
    /// weighted by the Hessian diagonal (llama.cpp's importance-matrix rule inside GPTQ).
    #[arg(long)]
    pub(crate) gptq_grid_search: bool,
    /// GPTQ: calibration windows for the Hessians; a trained method still trains on the first
    /// --nsamples of them [default: --nsamples for rtn/rotate, at least 32 for flatquant and
    /// affinequant].
    #[arg(long)]
    pub(crate) gptq_nsamples: Option<usize>,
    /// AffineQuant: off-diagonal factor of the gradual mask [default: 0.1 with --a-bits, else 0.01].
    #[arg(long)]
    pub(crate) stability_factor: Option<f64>,
    /// AffineQuant: dense norm→q/k/v and norm→up/gate matrices (inverse kept online) instead of
    /// per-channel scales (the weight-only recipes).
    #[arg(long)]
    pub(crate) ln_matrix: bool,
    /// Only transforms that merge into the weights (rotate: the residual and per-head value
    /// rotations; no online Hadamard, head mixer or query/key rotation): the checkpoint holds
    /// plain weights and exports to GGUF. Implied by --format.
    #[arg(long)]
    pub(crate) merged_only: bool,
    /// Quantize on the grid of a format so that its export is exact: `gguf` = f16 scales, groups
    /// of 32 (or --group-size, a multiple of 32), 4-bit symmetric with signed-max scales (Q4_0),
    /// 4-bit asymmetric with float offsets (Q4_1) or 8-bit symmetric (Q8_0); `compressed-tensors`
    /// and `gptq` = 2/4/8-bit integer codes with f16 scales (GPTQ: symmetric); weights only.
    #[arg(long, value_enum)]
    pub(crate) format: Option<FormatArg>,
    /// Continue an interrupted calibration from the blocks it finished (kept in `.OUT.affq-work`
    /// beside the output); the other flags must be the same as in the interrupted run.
    #[arg(long)]
    pub(crate) resume: bool,
    /// Replace an existing output directory.
    #[arg(long)]
    pub(crate) force: bool,
    /// GPTQ: Hessians from the full-precision model's inputs instead of the quantized model's own
    /// (every block then depends only on the full-precision model, so --shard can run GPTQ).
    #[arg(long)]
    pub(crate) gptq_fp_inputs: bool,
    /// GPTQ v2 (GPTAQ's asymmetric calibration): fit each quantized linear on the quantized
    /// model's input to the full-precision linear on the full-precision input, not to itself.
    #[arg(long, conflicts_with = "no_gptq_v2")]
    pub(crate) gptq_v2: bool,
    /// Plain GPTQ where the scheme's recipe (the FlatQuant presets) sets GPTQ v2.
    #[arg(long)]
    pub(crate) no_gptq_v2: bool,
    /// GPTQ v2: the share of the asymmetric correction applied, in (0, 1] [default: 0.25].
    #[arg(long)]
    pub(crate) gptq_v2_alpha: Option<f64>,
    /// GPTQ v2: the cross moment from the first N calibration windows [default: all of GPTQ's];
    /// windows beyond the training ones each cost a full-precision block forward.
    #[arg(long, value_name = "N")]
    pub(crate) gptq_v2_windows: Option<usize>,
    /// Trained methods: deploy every trained block, even one that lost to its untrained start on
    /// the calibration windows (by default the start is deployed instead).
    #[arg(long)]
    pub(crate) keep_trained: bool,
    /// Trained methods: learn each block on the quantized model's own inputs (the outputs of the
    /// blocks already deployed) against the full-precision outputs, instead of on the
    /// full-precision inputs.
    #[arg(long)]
    pub(crate) quantized_inputs: bool,
    /// Trained methods: how a linear whose activations and weights are both quantized computes
    /// during calibration: f32 (default) or int (forwards as exact integer GEMMs, gradients with
    /// the upstream gradient rounded to 8 bits).
    #[arg(long, value_name = "f32|int")]
    pub(crate) step_products: Option<String>,
    /// With --kv-bits: keep the keys as they are (by default every block's keys are smoothed and
    /// centred on calibration data before KV quantization, an exact change of the attention).
    #[arg(long)]
    pub(crate) no_key_smoothing: bool,
    /// Calibrate only shard I of N (0-based; contiguous, balanced block ranges) into the work
    /// directory `.OUT.affq-work` on a shared filesystem; run `--merge` with the same flags once
    /// every shard has finished. Each shard runs the earlier blocks forward to get its inputs.
    #[arg(long, value_name = "I/N", conflicts_with_all = ["shard_from_env", "merge", "resume"])]
    pub(crate) shard: Option<String>,
    /// Like --shard, from the scheduler: SLURM_ARRAY_TASK_ID (minus SLURM_ARRAY_TASK_MIN) of
    /// SLURM_ARRAY_TASK_COUNT, or a Kubernetes Indexed Job's JOB_COMPLETION_INDEX of --shards.
    #[arg(long, conflicts_with_all = ["merge", "resume"])]
    pub(crate) shard_from_env: bool,
    /// The number of shards, with --shard-from-env (required for Kubernetes; overrides Slurm's).
    #[arg(long, requires = "shard_from_env")]
    pub(crate) shards: Option<usize>,
    /// Assemble the checkpoint from the blocks the shards finished (same flags as the shards);
    /// names the blocks still missing otherwise.
    #[arg(long, conflicts_with = "resume")]
    pub(crate) merge: bool,
    /// A shard's block lock without a heartbeat (every 20 s) for this many seconds is stale and
    /// is taken over; a lock of a process of this host that has exited is taken over at once.
    #[arg(long, value_name = "SECONDS", default_value_t = 600)]
    pub(crate) lock_timeout: u64,
    /// Calibrate one block at a time: no block's weight quantizer beside the next block's
    /// training (the same checkpoint, more time, a lower peak memory).
    #[arg(long)]
    pub(crate) sequential_blocks: bool,
    #[command(flatten)]
    pub(crate) common: Common,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
pub(crate) enum WeightQuantizerArg {
    /// Round to nearest.
    Rtn,
    /// GPTQ: error-compensating rounding with calibration Hessians.
    Gptq,
}

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum DtypeArg {
    F16,
    F32,
}

#[derive(Args)]
pub(crate) struct ImportArgs {
    /// The .gguf file.
    pub(crate) gguf: PathBuf,
    /// Output directory (config.json, model.safetensors, tokenizer.json).
    #[arg(short, long)]
    pub(crate) output: PathBuf,
    /// Storage dtype of the dequantized weights.
    #[arg(long, value_enum, default_value = "f16")]
    pub(crate) dtype: DtypeArg,
    /// Replace an existing output directory.
    #[arg(long)]
    pub(crate) force: bool,
    #[command(flatten)]
    pub(crate) common: Common,
}

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum PplSet {
    Wikitext2,
    C4,
}

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum ProtocolArg {
    Paper,
    Llamacpp,
}

#[derive(Args)]
pub(crate) struct EvalArgs {
    /// Model directory or .safetensors file (config.json beside it).
    pub(crate) model: PathBuf,
    /// Evaluation text.
    #[arg(long, value_enum, default_value = "wikitext2")]
    pub(crate) ppl: PplSet,
    /// Window length in tokens.
    #[arg(long, default_value_t = 2048)]
    pub(crate) seqlen: usize,
    /// Evaluate only the first N windows.
    #[arg(long)]
    pub(crate) max_windows: Option<usize>,
    /// Windowing and scoring rules: the papers' (GPTQ, FlatQuant) or llama.cpp's.
    #[arg(long, value_enum, default_value = "paper")]
    pub(crate) protocol: ProtocolArg,
    /// Directory with wikitext-2-raw/ and calibration/ (default: $AFFQ_DATA_DIR, else ~/.cache/affq/data).
    #[arg(long)]
    pub(crate) data_dir: Option<PathBuf>,
    #[command(flatten)]
    pub(crate) backend: BackendArgs,
    /// Also score the same windows on BASE (e.g. the full-precision model) and report the KL
    /// divergence of the model's next-token distributions from BASE's: mean, median, 99th
    /// percentile, top-1 agreement and PPL/PPL(BASE), as llama-perplexity's --kl-divergence.
    #[arg(long, value_name = "BASE")]
    pub(crate) kld_base: Option<PathBuf>,
    #[command(flatten)]
    pub(crate) common: Common,
}

/// How and where a checkpoint computes (eval, generate, bench).
#[derive(Args, Clone)]
pub(crate) struct BackendArgs {
    /// How quantized linears run: integer kernels where the scheme has one (per-channel weights
    /// with an integer zero, quantized activations), or the float simulation everywhere.
    #[arg(long, value_enum, default_value = "int")]
    pub(crate) kernels: KernelsArg,
    /// Where the integer kernels run: the CPU, or an NVIDIA GPU (builds with the cuda feature;
    /// the quantized linears run there, the rest of the model on the CPU).
    #[arg(long, value_enum, default_value = "cpu")]
    pub(crate) device: DeviceArg,
}

impl BackendArgs {
    pub(crate) fn kernels(&self) -> Kernels {
        match self.kernels {
            KernelsArg::Int => Kernels::Int,
            KernelsArg::IntBf16 => Kernels::IntBf16,
            KernelsArg::Simulate => Kernels::Simulate,
        }
    }
    pub(crate) fn device(&self) -> Device {
        match self.device {
            DeviceArg::Cpu => Device::Cpu,
            DeviceArg::Cuda => Device::Cuda,
        }
    }
}

#[derive(Args)]
pub(crate) struct GenerateArgs {
    /// Model directory or .safetensors file (config.json and tokenizer.json beside it).
    pub(crate) model: PathBuf,
    /// The prompt (default: empty, i.e. the BOS token alone).
    #[arg(long, conflicts_with = "prompt_file")]
    pub(crate) prompt: Option<String>,
    /// Read the prompt from a file.
    #[arg(long)]
    pub(crate) prompt_file: Option<PathBuf>,
    /// Wrap the prompt as a user message in the model's chat template (tokenizer_config.json).
    #[arg(long)]
    pub(crate) chat: bool,
    /// A system message for --chat (default: the template's own).
    #[arg(long, requires = "chat")]
    pub(crate) system: Option<String>,
    /// Tokens to generate at most (generation also stops at an end-of-sequence token).
    #[arg(long, short = 'n', default_value_t = 256)]
    pub(crate) max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.8)]
    pub(crate) temperature: f32,
    /// Keep the K most likely tokens (0: all).
    #[arg(long, default_value_t = 40)]
    pub(crate) top_k: usize,
    /// Keep the most likely tokens up to this cumulative probability (1: all).
    #[arg(long, default_value_t = 0.95)]
    pub(crate) top_p: f32,
    /// Seed of the sampler (default: from the clock; printed with --json).
    #[arg(long)]
    pub(crate) seed: Option<u64>,
    #[command(flatten)]
    pub(crate) backend: BackendArgs,
    #[command(flatten)]
    pub(crate) common: Common,
}

#[derive(Args)]
pub(crate) struct BenchArgs {
    /// Model directory or .safetensors file.
    pub(crate) model: PathBuf,
    /// Prompt tokens of the prefill test (pp), 0 to skip it.
    #[arg(long = "n-prompt", short = 'p', default_value_t = 512)]
    pub(crate) n_prompt: usize,
    /// Tokens of the decode test (tg), 0 to skip it.
    #[arg(long = "n-gen", short = 'n', default_value_t = 128)]
    pub(crate) n_gen: usize,
    /// Measured runs of each test (after one warm-up run).
    #[arg(long, short = 'r', default_value_t = 5)]
    pub(crate) repetitions: usize,
    #[command(flatten)]
    pub(crate) backend: BackendArgs,
    #[command(flatten)]
    pub(crate) common: Common,
}

impl GenerateArgs {
    pub(crate) fn request(&self) -> affq::Result<GenerateRequest> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(affq::Error::Usage(
                "--temperature must be a number ≥ 0".into(),
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(affq::Error::Usage("--top-p must be in (0, 1]".into()));
        }
        let seed = self.seed.unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64)
        });
        Ok(GenerateRequest {
            model: self.model.clone(),
            prompt: match (&self.prompt, &self.prompt_file) {
                (_, Some(f)) => PromptSource::File(f.clone()),
                (Some(t), None) => PromptSource::Text(t.clone()),
                (None, None) => PromptSource::Text(String::new()),
            },
            chat: self.chat,
            system: self.system.clone(),
            max_tokens: self.max_tokens,
            sampler: SamplerConfig {
                temperature: self.temperature,
                top_k: self.top_k,
                top_p: self.top_p,
                seed,
            },
            kernels: self.backend.kernels(),
            device: self.backend.device(),
        })
    }
}

impl BenchArgs {
    pub(crate) fn request(&self) -> BenchRequest {
        BenchRequest {
            model: self.model.clone(),
            prompt_tokens: self.n_prompt,
            gen_tokens: self.n_gen,
            repetitions: self.repetitions,
            kernels: self.backend.kernels(),
            device: self.backend.device(),
        }
    }
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
pub(crate) enum KernelsArg {
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
pub(crate) enum DeviceArg {
    Cpu,
    Cuda,
}

impl QuantizeArgs {
    /// The low-level arguments as the library's request.
    pub(crate) fn request(&self) -> QuantizeRequest {
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
                scale_lr: self.scale_lr,
                calib: self.calib.clone(),
                weight_quantizer: self.weight_quantizer.map(|w| {
                    match w {
                        WeightQuantizerArg::Rtn => "rtn",
                        WeightQuantizerArg::Gptq => "gptq",
                    }
                    .to_string()
                }),
                gptq_damp: self.gptq_damp,
                act_order: switch(self.act_order, self.no_act_order),
                gptq_nsamples: self.gptq_nsamples,
                asym: switch(self.asym, self.sym),
                group_size: self.group_size,
                stability_factor: self.stability_factor,
                ln_matrix: self.ln_matrix.then_some(true),
                calib_activations: self.calib_activations.clone(),
                merged_only: self.merged_only.then_some(true),
                gptq_grid_search: self.gptq_grid_search.then_some(true),
                gptq_fp_inputs: self.gptq_fp_inputs.then_some(true),
                gptq_v2: switch(self.gptq_v2, self.no_gptq_v2),
                gptq_v2_alpha: self.gptq_v2_alpha,
                gptq_v2_windows: self.gptq_v2_windows,
                keep_trained: self.keep_trained.then_some(true),
                quantized_inputs: self.quantized_inputs.then_some(true),
                key_smoothing: self.no_key_smoothing.then_some(false),
                step_products: self.step_products.clone(),
            },
            sym_scale: self.sym_scale.map(|s| match s {
                SymScaleArg::Maxpos => SymScale::MaxPos,
                SymScaleArg::Halfrange => SymScale::HalfRange,
                SymScaleArg::SignedMax => SymScale::SignedMax,
            }),
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
            target: self.format.map(FormatArg::format),
            resume: self.resume,
            force: self.force,
            shard: match (&self.shard, self.shard_from_env) {
                (Some(s), _) => ShardRequest::Explicit(s.clone()),
                (None, true) => ShardRequest::FromEnv {
                    shards: self.shards,
                },
                (None, false) => ShardRequest::None,
            },
            merge: self.merge,
            lock_timeout: self.lock_timeout,
            sequential_blocks: self.sequential_blocks,
        }
    }
}

impl EvalArgs {
    /// The low-level arguments as the library's request.
    pub(crate) fn request(&self) -> EvalRequest {
        EvalRequest {
            model: self.model.clone(),
            dataset: match self.ppl {
                PplSet::Wikitext2 => Dataset::Wikitext2,
                PplSet::C4 => Dataset::C4,
            },
            protocol: match self.protocol {
                ProtocolArg::Paper => Protocol::Paper,
                ProtocolArg::Llamacpp => Protocol::Llamacpp,
            },
            seqlen: self.seqlen,
            max_windows: self.max_windows,
            data_dir: self.data_dir.clone(),
            kernels: self.backend.kernels(),
            device: self.backend.device(),
            kld_base: self.kld_base.clone(),
        }
    }
}

/// A recipe key set by a flag and its negation (clap refuses both at once): `Some(true)`,
/// `Some(false)`, or `None` to leave the recipe's value.
fn switch(on: bool, off: bool) -> Option<bool> {
    match (on, off) {
        (_, true) => Some(false),
        (true, false) => Some(true),
        (false, false) => None,
    }
}

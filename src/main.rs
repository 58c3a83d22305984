//! The `affq` binary: parses arguments into a validated plan and hands it to the library.

use affq::data::{self, DataFile};
use affq::eval::{self, PplOptions, Protocol};
use affq::gguf::{self, ImportDtype};
use affq::model::Model;
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

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Import(a) => run_import(a),
        Command::Eval(a) => run_eval(a),
    };
    if let Err(e) = result {
        let code = e
            .downcast_ref::<affq::Error>()
            .map_or(1, affq::Error::exit_code);
        eprintln!("error: {e:#}");
        std::process::exit(code);
    }
}

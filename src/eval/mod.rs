//! Perplexity evaluation under the paper protocol and llama.cpp's (algorithms.md §5).

use crate::data::{self, DataFile};
use crate::error::{Error, Result};
use crate::formats::checkpoint::Precision;
use crate::model::Model;
use crate::tokenizer::Tok;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The evaluation texts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dataset {
    /// WikiText-2 raw, test split.
    Wikitext2,
    /// GPTQ's C4 evaluation text (validation documents).
    C4,
}

impl Dataset {
    pub fn name(self) -> &'static str {
        match self {
            Dataset::Wikitext2 => "wikitext2",
            Dataset::C4 => "c4",
        }
    }

    /// The file of this dataset under the data directory `dir` (checked to exist).
    pub fn locate(self, dir: &Path) -> Result<PathBuf> {
        data::locate(
            dir,
            match self {
                Dataset::Wikitext2 => DataFile::WikiTest,
                Dataset::C4 => DataFile::C4Validation,
            },
        )
    }

    /// The token stream a protocol scores (algorithms.md §5): the paper protocol's text without
    /// special tokens, or llama.cpp's with the vocabulary's own policy (BOS at the start); C4 cut
    /// to 256 windows of `seqlen`, as GPTQ's evaluation does.
    pub fn tokens(
        self,
        path: &Path,
        protocol: Protocol,
        tok: &Tok,
        seqlen: usize,
    ) -> Result<Vec<u32>> {
        let text = match (self, protocol) {
            (Dataset::Wikitext2, Protocol::Paper) => data::paper_text(&data::read_text(path)?),
            (Dataset::Wikitext2, Protocol::Llamacpp) => {
                data::llamacpp_text(&data::read_text(path)?)
            }
            (Dataset::C4, _) => data::c4_eval_text(path)?,
        };
        let mut ids = tok.encode(&text, protocol == Protocol::Llamacpp)?;
        if self == Dataset::C4 {
            ids.truncate(256 * seqlen);
        }
        Ok(ids)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// GPTQ/FlatQuant: non-overlapping windows, every next-token prediction scored, no BOS.
    Paper,
    /// `llama-perplexity`: per-chunk BOS replacement, only the second half of each chunk scored.
    Llamacpp,
}

#[derive(Debug, Clone)]
pub struct PplOptions {
    pub seqlen: usize,
    pub max_windows: Option<usize>,
    pub protocol: Protocol,
}

/// Whether the tokenizer's post-processor adds a BOS token, and which.
pub fn bos_policy(tok: &Tok) -> Result<Option<u32>> {
    let with = tok.encode("a", true)?;
    let without = tok.encode("a", false)?;
    Ok(if with.len() > without.len() {
        with.first().copied()
    } else {
        None
    })
}

#[derive(Debug, Clone, Serialize)]
pub struct PplResult {
    pub ppl: f64,
    pub windows: usize,
    pub seqlen: usize,
    /// Tokens run through the model.
    pub tokens: usize,
    /// Predictions scored.
    pub predictions: usize,
    pub nll_sum: f64,
    pub seconds: f64,
    pub tok_per_s: f64,
    pub protocol: Protocol,
    /// Per-window PPL.
    pub window_ppl: Vec<f64>,
}

/// Runs the windows of `ids` through `model`; `progress(done, total, running_ppl)` after each.
pub fn perplexity(
    model: &Model,
    ids: &[u32],
    opts: &PplOptions,
    bos: Option<u32>,
    mut progress: impl FnMut(usize, usize, f64),
) -> Result<PplResult> {
    let l = opts.seqlen;
    if l < 2 {
        return Err(Error::Usage("--seqlen must be at least 2".into()));
    }
    let available = ids.len() / l;
    if opts.protocol == Protocol::Llamacpp && ids.len() < 2 * l {
        return Err(Error::Usage(format!(
            "llama.cpp protocol needs at least 2·seqlen = {} tokens, the text has {}",
            2 * l,
            ids.len()
        )));
    }
    let n_win = opts.max_windows.map_or(available, |m| m.min(available));
    if n_win == 0 {
        return Err(Error::Usage(format!(
            "the text has {} tokens, fewer than one window of {l}",
            ids.len()
        )));
    }
    let start = Instant::now();
    let mut nll_sum = 0.0;
    let mut count = 0usize;
    let mut window_ppl = Vec::with_capacity(n_win);
    for w in 0..n_win {
        let mut window = ids[w * l..(w + 1) * l].to_vec();
        let first = match opts.protocol {
            Protocol::Paper => 0,
            Protocol::Llamacpp => {
                if let Some(b) = bos {
                    window[0] = b;
                }
                l / 2
            }
        };
        let nll = model.nll(&window, first)?;
        let s: f64 = nll.iter().sum();
        window_ppl.push((s / nll.len() as f64).exp());
        nll_sum += s;
        count += nll.len();
        progress(w + 1, n_win, (nll_sum / count as f64).exp());
    }
    let seconds = start.elapsed().as_secs_f64();
    Ok(PplResult {
        ppl: (nll_sum / count as f64).exp(),
        windows: n_win,
        seqlen: l,
        tokens: n_win * l,
        predictions: count,
        nll_sum,
        seconds,
        tok_per_s: (n_win * l) as f64 / seconds,
        protocol: opts.protocol,
        window_ppl,
    })
}

/// How quantized linears compute during evaluation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernels {
    /// Integer kernels where the scheme has one (f32 online transforms).
    Int,
    /// As `Int`, with the online transforms in bf16 where the CPU can.
    IntBf16,
    /// The float simulation everywhere.
    Simulate,
}

/// Where the integer kernels run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda,
}

/// An `affq eval` run.
#[derive(Debug, Clone)]
pub struct EvalRequest {
    pub model: PathBuf,
    pub dataset: Dataset,
    pub protocol: Protocol,
    pub seqlen: usize,
    pub max_windows: Option<usize>,
    pub data_dir: Option<PathBuf>,
    pub kernels: Kernels,
    pub device: Device,
}

/// What an evaluation measured and how.
pub struct EvalOutcome {
    pub result: PplResult,
    /// Tokens of the whole evaluation text.
    pub text_tokens: usize,
    /// The BOS rule that was applied, in words.
    pub bos: String,
    pub load_seconds: f64,
    /// The kernels that ran, in words (`int (avx512-vnni, 84 layers)`, `simulate`, …).
    pub kernels: String,
}

/// Evaluates the request's model: data located, model loaded and converted to the requested
/// backend, windows scored; `progress(done, total, running_ppl)` after each window.
pub fn run(req: &EvalRequest, progress: impl FnMut(usize, usize, f64)) -> Result<EvalOutcome> {
    use crate::backend::{cuda, int_cpu};
    let dir = data::data_dir(req.data_dir.as_deref());
    if req.device == Device::Cuda && req.kernels != Kernels::Int {
        return Err(Error::Usage(
            "--device cuda runs the integer kernels with f32 transforms: use --kernels int".into(),
        ));
    }
    // Resolve every input before the expensive load.
    let data_path = req.dataset.locate(&dir)?;
    let t_load = Instant::now();
    let ckpt = crate::formats::Checkpoint::open(&req.model)?;
    let tok = ckpt.tokenizer("evaluation")?;
    let bos = bos_policy(&tok)?;
    let ids = req
        .dataset
        .tokens(&data_path, req.protocol, &tok, req.seqlen)?;
    // Block by block, each converted to its kernels as it is read: full-precision weights stay in
    // their stored 16-bit dtype; on the integer kernels quantized layers keep only codes and
    // packed weights (simulated ones hold their dense f32 weights), so the model is never held
    // twice.
    // The head multiplies every position in 256-row chunks: held in f32 (widening a 16-bit head
    // per chunk would cost a vocabulary-sized conversion each time).
    let mut model = ckpt.load_ends(req.seqlen, Precision::F32)?;
    let isa = crate::kernels::int_gemm::Isa::detect();
    let bf16 = req.kernels == Kernels::IntBf16;
    let int = matches!(req.kernels, Kernels::Int | Kernels::IntBf16);
    let (mut int_layers, mut bf16_sites) = (0, 0);
    for i in 0..model.config.num_layers {
        let mut block = ckpt.load_block(model.config.clone(), i, Precision::Stored)?;
        if int {
            let (n, b) = int_cpu::use_int_kernels_block(&mut block, isa, bf16)?;
            int_layers += n;
            bf16_sites += b;
        }
        model.blocks.push(block);
    }
    if int {
        int_layers += int_cpu::use_int_kernels_head(&mut model, isa)? as usize;
    }
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
    if req.device == Device::Cuda {
        let gpu = cuda::Cuda::new()?;
        let n = cuda::use_cuda(&mut model, &gpu)?;
        kernels = format!("int (cuda {}, {n} layers)", gpu.name);
    }
    let load_seconds = t_load.elapsed().as_secs_f64();
    let opts = PplOptions {
        seqlen: req.seqlen,
        max_windows: req.max_windows,
        protocol: req.protocol,
    };
    let result = perplexity(&model, &ids, &opts, bos, progress)?;
    let bos = match (req.protocol, bos) {
        (Protocol::Paper, _) => "none".to_string(),
        (Protocol::Llamacpp, Some(b)) => format!("bos {b} replaces each chunk's first token"),
        (Protocol::Llamacpp, None) => "none (vocabulary adds no BOS)".to_string(),
    };
    Ok(EvalOutcome {
        result,
        text_tokens: ids.len(),
        bos,
        load_seconds,
        kernels,
    })
}

//! Perplexity evaluation under the paper protocol and llama.cpp's (algorithms.md §5).

use crate::data::{self, DataFile};
use crate::error::{Error, Result};
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

/// How many windows of `opts` the text of `n` tokens gives (checked non-zero).
fn window_count(n: usize, opts: &PplOptions) -> Result<usize> {
    let l = opts.seqlen;
    if l < 2 {
        return Err(Error::Usage("--seqlen must be at least 2".into()));
    }
    let available = n / l;
    if opts.protocol == Protocol::Llamacpp && n < 2 * l {
        return Err(Error::Usage(format!(
            "llama.cpp protocol needs at least 2·seqlen = {} tokens, the text has {n}",
            2 * l
        )));
    }
    let n_win = opts.max_windows.map_or(available, |m| m.min(available));
    if n_win == 0 {
        return Err(Error::Usage(format!(
            "the text has {n} tokens, fewer than one window of {l}"
        )));
    }
    Ok(n_win)
}

/// Window `w`'s tokens and the first position whose next-token prediction is scored.
fn window(ids: &[u32], w: usize, opts: &PplOptions, bos: Option<u32>) -> (Vec<u32>, usize) {
    let l = opts.seqlen;
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
    (window, first)
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
    let n_win = window_count(ids.len(), opts)?;
    let start = Instant::now();
    let mut nll_sum = 0.0;
    let mut count = 0usize;
    let mut window_ppl = Vec::with_capacity(n_win);
    for w in 0..n_win {
        let (window, first) = window(ids, w, opts, bos);
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

/// The divergence of a model's next-token distributions from a base model's over the scored
/// positions of the same windows (llama-perplexity's `--kl-divergence`): per position
/// `KL(P_base ‖ P) = Σ_v p_base(v)·(log p_base(v) − log p(v))`, with both log-softmaxes taken in
/// f64; their mean, median and 99th percentile; how often both put the most probability on the
/// same token; and `PPL/PPL_base = exp(mean NLL − mean NLL_base)`.
#[derive(Debug, Clone, Serialize)]
pub struct KldResult {
    pub base: PathBuf,
    pub kld_mean: f64,
    pub kld_median: f64,
    pub kld_p99: f64,
    pub kld_max: f64,
    /// Fraction of positions where both models' arg max agree.
    pub top1_agreement: f64,
    pub ppl_base: f64,
    pub ppl_ratio: f64,
}

/// Per-position statistics of one chunk of rows: (KL, same arg max, NLL, NLL_base).
fn kld_rows(
    q: &[f32],
    b: &[f32],
    vocab: usize,
    targets: &[u32],
) -> Result<Vec<(f64, bool, f64, f64)>> {
    use rayon::prelude::*;
    q.par_chunks_exact(vocab)
        .zip(b.par_chunks_exact(vocab))
        .zip(targets.par_iter())
        .map(|((rq, rb), &t)| {
            let t = t as usize;
            if t >= vocab {
                return Err(Error::Runtime(format!(
                    "token id {t} outside the vocabulary ({vocab})"
                )));
            }
            let (lq, lb) = (
                crate::fastmath::logsumexp(rq),
                crate::fastmath::logsumexp(rb),
            );
            let mut kl = 0f64;
            for (&x, &y) in rq.iter().zip(rb) {
                let lpb = y as f64 - lb;
                kl += lpb.exp() * (lpb - (x as f64 - lq));
            }
            let argmax = |r: &[f32]| {
                r.iter()
                    .enumerate()
                    .fold(
                        (0, f32::NEG_INFINITY),
                        |m, (i, &v)| if v > m.1 { (i, v) } else { m },
                    )
                    .0
            };
            Ok((
                kl.max(0.0),
                argmax(rq) == argmax(rb),
                lq - rq[t] as f64,
                lb - rb[t] as f64,
            ))
        })
        .collect()
}

/// Scores the windows of `ids` on `model` and on `base` at once: the model's PPL and its
/// divergence from the base; `progress(done, total, running_ppl)` after each window.
pub fn kl_divergence(
    model: &Model,
    base: &Model,
    base_path: &Path,
    ids: &[u32],
    opts: &PplOptions,
    bos: Option<u32>,
    mut progress: impl FnMut(usize, usize, f64),
) -> Result<(PplResult, KldResult)> {
    use crate::model::Mode;
    use candle_core::{DType, Device, Tensor};
    const ROWS: usize = 256;
    let n_win = window_count(ids.len(), opts)?;
    let vocab = model.head.out_features();
    if base.head.out_features() != vocab {
        return Err(Error::format(
            base_path,
            format!(
                "vocabulary of {} tokens, the evaluated model has {vocab}",
                base.head.out_features()
            ),
        ));
    }
    let start = Instant::now();
    let (mut nll, mut nll_b, mut kls, mut same) = (0f64, 0f64, Vec::new(), 0usize);
    let mut window_ppl = Vec::with_capacity(n_win);
    for w in 0..n_win {
        let (win, first) = window(ids, w, opts, bos);
        let t = win.len();
        let ids_t = Tensor::from_slice(&win, (1, t), &Device::Cpu)?;
        let hq = model.hidden_states(&ids_t, Mode::Eval)?.squeeze(0)?;
        let hb = base.hidden_states(&ids_t, Mode::Eval)?.squeeze(0)?;
        let n = t - 1 - first;
        let mut wsum = 0f64;
        let mut s0 = 0;
        while s0 < n {
            let r = ROWS.min(n - s0);
            let logits = |m: &Model, h: &Tensor| -> Result<Vec<f32>> {
                let l = m
                    .head
                    .forward(&h.narrow(0, first + s0, r)?)?
                    .to_dtype(DType::F32)?;
                Ok(l.flatten_all()?.to_vec1()?)
            };
            let rows = kld_rows(
                &logits(model, &hq)?,
                &logits(base, &hb)?,
                vocab,
                &win[first + 1 + s0..first + 1 + s0 + r],
            )?;
            for (kl, agree, a, b) in rows {
                kls.push(kl);
                same += agree as usize;
                wsum += a;
                nll_b += b;
            }
            s0 += r;
        }
        nll += wsum;
        window_ppl.push((wsum / n as f64).exp());
        progress(w + 1, n_win, (nll / kls.len() as f64).exp());
    }
    let seconds = start.elapsed().as_secs_f64();
    let count = kls.len();
    let mut sorted = kls.clone();
    sorted.sort_by(f64::total_cmp);
    let pct = |p: f64| sorted[((count - 1) as f64 * p).round() as usize];
    let ppl = PplResult {
        ppl: (nll / count as f64).exp(),
        windows: n_win,
        seqlen: opts.seqlen,
        tokens: n_win * opts.seqlen,
        predictions: count,
        nll_sum: nll,
        seconds,
        tok_per_s: (n_win * opts.seqlen) as f64 / seconds,
        protocol: opts.protocol,
        window_ppl,
    };
    let kld = KldResult {
        base: base_path.to_path_buf(),
        kld_mean: kls.iter().sum::<f64>() / count as f64,
        kld_median: pct(0.5),
        kld_p99: pct(0.99),
        kld_max: sorted[count - 1],
        top1_agreement: same as f64 / count as f64,
        ppl_base: (nll_b / count as f64).exp(),
        ppl_ratio: ((nll - nll_b) / count as f64).exp(),
    };
    Ok((ppl, kld))
}

pub use crate::runtime::{Device, Kernels};

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
    /// `--kld-base`: also score the same windows on this model and report the divergence.
    pub kld_base: Option<PathBuf>,
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
    pub kld: Option<KldResult>,
}

/// A checkpoint loaded for evaluation: full-precision weights stay in their stored 16-bit dtype
/// (they are only multiplied by, in large batches of rows).
fn load_for_eval(ckpt: &crate::formats::Checkpoint, req: &EvalRequest) -> Result<(Model, String)> {
    crate::runtime::load(
        ckpt,
        req.seqlen,
        req.kernels,
        req.device,
        crate::runtime::Purpose::Eval,
    )
}

/// Evaluates the request's model: data located, model loaded and converted to the requested
/// backend, windows scored; `progress(done, total, running_ppl)` after each window.
pub fn run(req: &EvalRequest, progress: impl FnMut(usize, usize, f64)) -> Result<EvalOutcome> {
    let dir = data::data_dir(req.data_dir.as_deref());
    crate::runtime::check_backend(req.kernels, req.device)?;
    // Resolve every input before the expensive load.
    let data_path = req.dataset.locate(&dir)?;
    let t_load = Instant::now();
    let ckpt = crate::formats::Checkpoint::open(&req.model)?;
    let tok = ckpt.tokenizer("evaluation")?;
    let bos = bos_policy(&tok)?;
    let ids = req
        .dataset
        .tokens(&data_path, req.protocol, &tok, req.seqlen)?;
    let (model, kernels) = load_for_eval(&ckpt, req)?;
    // The base of a divergence: loaded alike; its tokenizer must read the text as the model's.
    let base = match &req.kld_base {
        Some(b) => {
            let bc = crate::formats::Checkpoint::open(b)?;
            let bids = req.dataset.tokens(
                &data_path,
                req.protocol,
                &bc.tokenizer("--kld-base")?,
                req.seqlen,
            )?;
            if bids != ids {
                return Err(Error::format(
                    b,
                    "its tokenizer reads the evaluation text differently from the model's: a divergence needs the same tokens",
                ));
            }
            Some(load_for_eval(&bc, req)?.0)
        }
        None => None,
    };
    let load_seconds = t_load.elapsed().as_secs_f64();
    let opts = PplOptions {
        seqlen: req.seqlen,
        max_windows: req.max_windows,
        protocol: req.protocol,
    };
    let (result, kld) = match (&base, &req.kld_base) {
        (Some(b), Some(path)) => {
            let (r, k) = kl_divergence(&model, b, path, &ids, &opts, bos, progress)?;
            (r, Some(k))
        }
        _ => (perplexity(&model, &ids, &opts, bos, progress)?, None),
    };
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
        kld,
    })
}

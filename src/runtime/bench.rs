//! `affq bench`: llama-bench's two tests on one checkpoint (docs/decode.md §5). `pp`: a prompt of
//! `p` random tokens prefilled into an empty cache in one pass; `tg`: `n` tokens decoded one at a
//! time from an empty cache, each step one forward pass of a single token. Each test runs once to
//! warm up and then `repetitions` times; rates are tokens per second, mean ± sample stddev.

use super::{Device, Kernels};
use crate::error::{Error, Result};
use crate::formats::Checkpoint;
use crate::model::Model;
use crate::rng::Rng;
use serde::Serialize;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Debug, Clone)]
pub struct BenchRequest {
    pub model: PathBuf,
    /// Prompt tokens of the prefill test (0 skips it).
    pub prompt_tokens: usize,
    /// Tokens of the decode test (0 skips it).
    pub gen_tokens: usize,
    pub repetitions: usize,
    pub kernels: Kernels,
    pub device: Device,
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchResult {
    pub model: String,
    pub prompt_tokens: usize,
    pub gen_tokens: usize,
    pub repetitions: usize,
    pub prefill_tok_per_s: f64,
    pub prefill_tok_per_s_stddev: f64,
    pub decode_tok_per_s: f64,
    pub decode_tok_per_s_stddev: f64,
    pub peak_rss_mb: f64,
    pub kernels: String,
    pub threads: usize,
    /// KV-cache bytes per token (all layers) and bits of keys and values.
    pub kv_bytes_per_token: usize,
    pub kv_bits: (u8, u8),
    pub load_seconds: f64,
}

fn mean_std(xs: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    let m = xs.iter().sum::<f64>() / n;
    let v = if xs.len() > 1 {
        xs.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    (m, v.sqrt())
}

/// Seconds of one prefill of `ids` into an empty cache.
fn prefill(model: &Model, ids: &[u32]) -> Result<f64> {
    let mut cache = model.new_cache()?;
    let t = Instant::now();
    model.forward_cached(ids, &mut cache)?;
    Ok(t.elapsed().as_secs_f64())
}

/// Seconds of `n` single-token steps from an empty cache, starting at `first`, each feeding the
/// argmax of the previous.
fn decode(model: &Model, first: u32, n: usize) -> Result<f64> {
    let mut cache = model.new_cache()?;
    let mut tok = first;
    let t = Instant::now();
    for _ in 0..n {
        let logits = model.forward_cached(&[tok], &mut cache)?;
        tok = super::sampler::argmax(&logits);
    }
    Ok(t.elapsed().as_secs_f64())
}

pub fn run(req: &BenchRequest) -> Result<BenchResult> {
    if req.repetitions == 0 {
        return Err(Error::Usage("--repetitions must be at least 1".into()));
    }
    if req.prompt_tokens == 0 && req.gen_tokens == 0 {
        return Err(Error::Usage(
            "nothing to measure: -p and -n are both 0".into(),
        ));
    }
    super::check_backend(req.kernels, req.device)?;
    let t_load = Instant::now();
    let ckpt = Checkpoint::open(&req.model)?;
    let max_len = req.prompt_tokens.max(req.gen_tokens).max(1);
    if max_len > ckpt.config.max_position_embeddings {
        return Err(Error::Usage(format!(
            "{} tokens exceed the model's context of {}",
            max_len, ckpt.config.max_position_embeddings
        )));
    }
    let (model, kernels) = super::load(
        &ckpt,
        max_len,
        req.kernels,
        req.device,
        super::Purpose::Decode,
    )?;
    let load_seconds = t_load.elapsed().as_secs_f64();
    let vocab = model.config.vocab_size as u64;
    let mut rng = Rng::new(1234);
    let ids: Vec<u32> = (0..req.prompt_tokens)
        .map(|_| (rng.next_u64() % vocab) as u32)
        .collect();
    let first = model.config.bos_token_id.unwrap_or(0);
    let mut pp = Vec::new();
    let mut tg = Vec::new();
    for rep in 0..=req.repetitions {
        if req.prompt_tokens > 0 {
            let s = prefill(&model, &ids)?;
            if rep > 0 {
                pp.push(req.prompt_tokens as f64 / s);
            }
        }
        if req.gen_tokens > 0 {
            let s = decode(&model, first, req.gen_tokens)?;
            if rep > 0 {
                tg.push(req.gen_tokens as f64 / s);
            }
        }
    }
    let (pm, ps) = if pp.is_empty() {
        (0.0, 0.0)
    } else {
        mean_std(&pp)
    };
    let (dm, ds) = if tg.is_empty() {
        (0.0, 0.0)
    } else {
        mean_std(&tg)
    };
    let cache = model.new_cache()?;
    Ok(BenchResult {
        model: req.model.display().to_string(),
        prompt_tokens: req.prompt_tokens,
        gen_tokens: req.gen_tokens,
        repetitions: req.repetitions,
        prefill_tok_per_s: pm,
        prefill_tok_per_s_stddev: ps,
        decode_tok_per_s: dm,
        decode_tok_per_s_stddev: ds,
        peak_rss_mb: super::peak_rss_mib(),
        kernels,
        threads: rayon::current_num_threads(),
        kv_bytes_per_token: cache.bytes_per_token(),
        kv_bits: cache.bits(),
        load_seconds,
    })
}

//! `affq generate`: a prompt (plain, or through the chat template) prefilled in one pass, then
//! one token per step over the KV cache until an end-of-sequence token or the token budget.

use super::chat::{ChatTemplate, Message};
use super::sampler::{Sampler, SamplerConfig};
use super::{Device, Kernels};
use crate::error::{Error, Result};
use crate::formats::Checkpoint;
use crate::model::Model;
use crate::tokenizer::Tok;
use serde::Serialize;
use std::path::PathBuf;
use std::time::Instant;

/// Where the prompt comes from.
#[derive(Debug, Clone)]
pub enum PromptSource {
    Text(String),
    File(PathBuf),
}

/// An `affq generate` run.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub model: PathBuf,
    pub prompt: PromptSource,
    /// Wrap the prompt as a user message in the model's chat template.
    pub chat: bool,
    /// A system message for `chat` (the template's default when `None`).
    pub system: Option<String>,
    pub max_tokens: usize,
    pub sampler: SamplerConfig,
    pub kernels: Kernels,
    pub device: Device,
}

/// Why generation stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Stop {
    Eos,
    MaxTokens,
    /// The model's `max_position_embeddings` was reached.
    Context,
}

/// Token ids and timings of one generation.
#[derive(Debug, Clone, Serialize)]
pub struct Generation {
    pub prompt_ids: Vec<u32>,
    /// Generated ids, without the end-of-sequence token that stopped them.
    pub ids: Vec<u32>,
    pub stop: Stop,
    /// The prompt's forward pass (it yields the first generated token).
    pub prompt_seconds: f64,
    /// The decode steps after it, one token each.
    pub decode_steps: usize,
    pub decode_seconds: f64,
    pub kv_bytes_per_token: usize,
    pub kv_bits: (u8, u8),
}

impl Generation {
    pub fn prompt_tok_per_s(&self) -> f64 {
        self.prompt_ids.len() as f64 / self.prompt_seconds.max(1e-12)
    }
    pub fn decode_tok_per_s(&self) -> f64 {
        self.decode_steps as f64 / self.decode_seconds.max(1e-12)
    }
}

/// Generates up to `max_tokens` tokens after `prompt` on `model`; `on_token(id)` is called for
/// each generated one as it is chosen. Stops before an `eos` token.
pub fn generate_ids(
    model: &Model,
    prompt: &[u32],
    max_tokens: usize,
    sampler: &mut Sampler,
    eos: &[u32],
    mut on_token: impl FnMut(u32) -> Result<()>,
) -> Result<Generation> {
    if prompt.is_empty() {
        return Err(Error::Usage("the prompt has no tokens".into()));
    }
    let limit = model.rope.max_len();
    if prompt.len() >= limit {
        return Err(Error::Usage(format!(
            "the prompt has {} tokens; the model's context holds {limit}",
            prompt.len()
        )));
    }
    let mut cache = model.new_cache()?;
    let t0 = Instant::now();
    let mut logits = model.forward_cached(prompt, &mut cache)?;
    let prompt_seconds = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let (mut ids, mut steps) = (Vec::new(), 0);
    let stop = loop {
        if ids.len() == max_tokens {
            break Stop::MaxTokens;
        }
        let next = sampler.sample(&logits);
        if eos.contains(&next) {
            break Stop::Eos;
        }
        ids.push(next);
        on_token(next)?;
        if ids.len() == max_tokens {
            break Stop::MaxTokens;
        }
        if cache.len() >= limit {
            break Stop::Context;
        }
        logits = model.forward_cached(&[next], &mut cache)?;
        steps += 1;
    };
    Ok(Generation {
        prompt_ids: prompt.to_vec(),
        ids,
        stop,
        prompt_seconds,
        decode_steps: steps,
        decode_seconds: t1.elapsed().as_secs_f64(),
        kv_bytes_per_token: cache.bytes_per_token(),
        kv_bits: cache.bits(),
    })
}

/// The end-of-sequence ids of a model: `eos_token_id` of config.json and generation_config.json
/// (a number or a list) and the `eos_token` of tokenizer_config.json.
pub fn eos_ids(ckpt: &Checkpoint, tok: &Tok) -> Vec<u32> {
    let dir = &ckpt.files.dir;
    let mut out = Vec::new();
    let read = |name: &str| -> Option<serde_json::Value> {
        serde_json::from_str(&std::fs::read_to_string(dir.join(name)).ok()?).ok()
    };
    for name in ["config.json", "generation_config.json"] {
        match read(name).and_then(|j| j.get("eos_token_id").cloned()) {
            Some(serde_json::Value::Number(n)) => out.extend(n.as_u64().map(|v| v as u32)),
            Some(serde_json::Value::Array(a)) => {
                out.extend(a.iter().filter_map(|v| v.as_u64()).map(|v| v as u32))
            }
            _ => {}
        }
    }
    if let Some(j) = read("tokenizer_config.json") {
        out.extend(tok.token_to_id(&super::chat::token_str(j.get("eos_token"))));
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// The prompt's token ids: the chat template's rendering tokenized as is (the template writes
/// the special tokens), or the plain text with the tokenizer's own special tokens (BOS); an
/// empty plain prompt is the BOS token alone.
pub fn prompt_ids(
    req: &GenerateRequest,
    ckpt: &Checkpoint,
    tok: &Tok,
) -> Result<(String, Vec<u32>)> {
    let text = match &req.prompt {
        PromptSource::Text(t) => t.clone(),
        PromptSource::File(p) => std::fs::read_to_string(p).map_err(|e| Error::io(p, e))?,
    };
    if req.chat {
        let path = ckpt.files.dir.join("tokenizer_config.json");
        let tmpl = ChatTemplate::load(&path)?;
        let mut msgs = Vec::new();
        if let Some(s) = &req.system {
            msgs.push(Message {
                role: "system".into(),
                content: s.clone(),
            });
        }
        msgs.push(Message {
            role: "user".into(),
            content: text,
        });
        let rendered = tmpl.render(&msgs, true)?;
        let ids = tok.encode(&rendered, false)?;
        return Ok((rendered, ids));
    }
    let mut ids = tok.encode(&text, true)?;
    if ids.is_empty() {
        let bos = ckpt.config.bos_token_id.ok_or_else(|| {
            Error::Usage("the prompt is empty and the model names no BOS token".into())
        })?;
        ids.push(bos);
    }
    Ok((text, ids))
}

/// The outcome of [`run`].
#[derive(Debug, Clone, Serialize)]
pub struct GenerateOutcome {
    /// The prompt as the model read it (the chat template's rendering with `--chat`).
    pub prompt: String,
    pub text: String,
    #[serde(flatten)]
    pub generation: Generation,
    pub prompt_tok_per_s: f64,
    pub decode_tok_per_s: f64,
    pub load_seconds: f64,
    pub kernels: String,
    pub seed: u64,
}

/// Text pieces of a growing generation: each call decodes all ids so far and returns what is new
/// (held back while the text ends inside a multi-byte character).
struct Detokenizer<'a> {
    tok: &'a Tok,
    ids: Vec<u32>,
    shown: usize,
}

impl Detokenizer<'_> {
    fn push(&mut self, id: u32) -> Result<String> {
        self.ids.push(id);
        let text = self.tok.decode(&self.ids)?;
        if text.ends_with('\u{FFFD}') || text.len() < self.shown {
            return Ok(String::new());
        }
        let new = text[self.shown..].to_string();
        self.shown = text.len();
        Ok(new)
    }
}

/// Runs the request: prompt resolved, model loaded, tokens generated; `on_text` receives the
/// text as it grows.
pub fn run(req: &GenerateRequest, mut on_text: impl FnMut(&str)) -> Result<GenerateOutcome> {
    super::check_backend(req.kernels, req.device)?;
    let t_load = Instant::now();
    let ckpt = Checkpoint::open(&req.model)?;
    let tok = ckpt.tokenizer("generation")?;
    let (prompt, ids) = prompt_ids(req, &ckpt, &tok)?;
    let eos = eos_ids(&ckpt, &tok);
    let context = ckpt.config.max_position_embeddings.max(1);
    let max_len = (ids.len() + req.max_tokens).min(context);
    let (model, kernels) = super::load(
        &ckpt,
        max_len,
        req.kernels,
        req.device,
        super::Purpose::Decode,
    )?;
    let load_seconds = t_load.elapsed().as_secs_f64();
    let mut sampler = Sampler::new(req.sampler);
    let mut detok = Detokenizer {
        tok: &tok,
        ids: Vec::new(),
        shown: 0,
    };
    let mut text = String::new();
    let generation = generate_ids(&model, &ids, req.max_tokens, &mut sampler, &eos, |id| {
        let piece = detok.push(id)?;
        if !piece.is_empty() {
            on_text(&piece);
            text.push_str(&piece);
        }
        Ok(())
    })?;
    // Whatever the detokenizer held back (a generation cut inside a character).
    let full = tok.decode(&generation.ids)?;
    if full.len() > text.len() && full.starts_with(&text) {
        on_text(&full[text.len()..]);
    }
    Ok(GenerateOutcome {
        prompt,
        text: full,
        prompt_tok_per_s: generation.prompt_tok_per_s(),
        decode_tok_per_s: generation.decode_tok_per_s(),
        generation,
        load_seconds,
        kernels,
        seed: req.sampler.seed,
    })
}

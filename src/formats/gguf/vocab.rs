//! Building `tokenizer.json` and `tokenizer_config.json` from a GGUF vocabulary (byte-level BPE
//! `gpt2`, SentencePiece-style `llama`), test-data.md §2.4.

use super::file::{GgufFile, Value};
use crate::error::{Error, Result};
use serde_json::{json, Map};
use std::collections::HashMap;

/// A tokenizer built from GGUF metadata, ready to be written out.
pub struct BuiltTokenizer {
    /// "gpt2 (byte-level BPE, pre=…)" or "llama (SentencePiece BPE)".
    pub kind: String,
    pub json: serde_json::Value,
    pub config: serde_json::Value,
}

fn str_array<'a>(g: &'a GgufFile, key: &str) -> Result<Vec<&'a str>> {
    let arr = g
        .get(key)
        .and_then(Value::as_array)
        .ok_or_else(|| Error::format(&g.path, format!("missing tokenizer array `{key}`")))?;
    arr.iter()
        .map(|v| {
            v.as_str()
                .ok_or_else(|| Error::format(&g.path, format!("`{key}` must hold strings")))
        })
        .collect()
}

fn added_token(id: usize, content: &str) -> serde_json::Value {
    json!({"id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false,
           "normalized": false, "special": true})
}

/// Builds `tokenizer.json` and `tokenizer_config.json` from the GGUF tokenizer metadata.
pub fn from_gguf(g: &GgufFile) -> Result<BuiltTokenizer> {
    let model = g
        .get("tokenizer.ggml.model")
        .and_then(Value::as_str)
        .ok_or_else(|| Error::format(&g.path, "missing `tokenizer.ggml.model`"))?;
    let tokens = str_array(g, "tokenizer.ggml.tokens")?;
    let types: Vec<i64> = match g.get("tokenizer.ggml.token_type").and_then(Value::as_array) {
        Some(a) => a.iter().map(|v| v.as_f64().unwrap_or(1.0) as i64).collect(),
        None => vec![1; tokens.len()],
    };
    let id = |k: &str| g.get(k).and_then(Value::as_u64).map(|v| v as usize);
    let bos = id("tokenizer.ggml.bos_token_id");
    let eos = id("tokenizer.ggml.eos_token_id");
    let unk = id("tokenizer.ggml.unknown_token_id");
    let tok_name = |i: Option<usize>| i.and_then(|i| tokens.get(i)).map(|s| s.to_string());

    let mut vocab = Map::new();
    for (i, t) in tokens.iter().enumerate() {
        vocab.entry(t.to_string()).or_insert(json!(i));
    }
    // Control (3), user-defined (4) and unknown (2) tokens are matched whole, never split.
    let added: Vec<serde_json::Value> = types
        .iter()
        .enumerate()
        .filter(|(_, &t)| t == 2 || t == 3 || t == 4)
        .map(|(i, _)| added_token(i, tokens[i]))
        .collect();

    match model {
        "gpt2" => {
            let merges: Vec<serde_json::Value> = str_array(g, "tokenizer.ggml.merges")?
                .into_iter()
                .map(|m| {
                    let (a, b) = m.split_once(' ').unwrap_or((m, ""));
                    json!([a, b])
                })
                .collect();
            let pre = g
                .get("tokenizer.ggml.pre")
                .and_then(Value::as_str)
                .unwrap_or("default");
            let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
            let pre_tokenizer = match pre {
                "smollm" => json!({"type": "Sequence", "pretokenizers": [
                    {"type": "Digits", "individual_digits": true}, byte_level]}),
                "default" | "gpt-2" | "gpt2" => byte_level,
                "llama-bpe" | "llama3" | "qwen2" => {
                    let digits = if pre == "qwen2" { "\\p{N}" } else { "\\p{N}{1,3}" };
                    let re = format!("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{{L}}\\p{{N}}]?\\p{{L}}+|{digits}| ?[^\\s\\p{{L}}\\p{{N}}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+");
                    json!({"type": "Sequence", "pretokenizers": [
                        {"type": "Split", "pattern": {"Regex": re}, "behavior": "Isolated", "invert": false},
                        {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}]})
                }
                other => {
                    return Err(Error::Unsupported(format!(
                        "{}: GGUF pre-tokenizer `{other}` is not supported (smollm, gpt2, llama-bpe, qwen2)",
                        g.path.display()
                    )))
                }
            };
            let json = json!({
                "version": "1.0", "truncation": null, "padding": null,
                "added_tokens": added,
                "normalizer": null,
                "pre_tokenizer": pre_tokenizer,
                "post_processor": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
                "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
                "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                          "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                          "ignore_merges": false, "vocab": vocab, "merges": merges}
            });
            let mut config = json!({
                "add_bos_token": g.get("tokenizer.ggml.add_bos_token").and_then(Value::as_bool).unwrap_or(false),
                "bos_token": tok_name(bos), "eos_token": tok_name(eos), "unk_token": tok_name(unk),
                "tokenizer_class": "GPT2Tokenizer", "clean_up_tokenization_spaces": false,
            });
            carry_chat_fields(g, &mut config, &tokens);
            Ok(BuiltTokenizer {
                kind: format!("gpt2 byte-level BPE (pre-tokenizer {pre})"),
                json,
                config,
            })
        }
        "llama" => {
            let scores: Vec<f64> = match g.get("tokenizer.ggml.scores").and_then(Value::as_array) {
                Some(a) => a.iter().map(|v| v.as_f64().unwrap_or(0.0)).collect(),
                None => (0..tokens.len()).map(|i| -(i as f64)).collect(),
            };
            let merges = spm_merges(&tokens, &scores, &types);
            let add_bos = g
                .get("tokenizer.ggml.add_bos_token")
                .and_then(Value::as_bool)
                .unwrap_or(true);
            let add_space = g
                .get("tokenizer.ggml.add_space_prefix")
                .and_then(Value::as_bool)
                .unwrap_or(true);
            let replace =
                json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"});
            let normalizer = if add_space {
                json!({"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "\u{2581}"}, replace]})
            } else {
                json!({"type": "Sequence", "normalizers": [replace]})
            };
            let post = match (add_bos, tok_name(bos)) {
                (true, Some(b)) => json!({"type": "TemplateProcessing",
                    "single": [{"SpecialToken": {"id": b, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                    "pair": [{"SpecialToken": {"id": b, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                             {"SpecialToken": {"id": b, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                    "special_tokens": {b.clone(): {"id": b, "ids": [bos.unwrap()], "tokens": [b]}}}),
                _ => serde_json::Value::Null,
            };
            let mut decoders = vec![
                json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
                json!({"type": "ByteFallback"}),
                json!({"type": "Fuse"}),
            ];
            if add_space {
                decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
            }
            let json = json!({
                "version": "1.0", "truncation": null, "padding": null,
                "added_tokens": added,
                "normalizer": normalizer,
                "pre_tokenizer": null,
                "post_processor": post,
                "decoder": {"type": "Sequence", "decoders": decoders},
                "model": {"type": "BPE", "dropout": null, "unk_token": tok_name(unk),
                          "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": true,
                          "byte_fallback": true, "ignore_merges": false, "vocab": vocab, "merges": merges}
            });
            let mut config = json!({
                "add_bos_token": add_bos, "add_eos_token": false,
                "bos_token": tok_name(bos), "eos_token": tok_name(eos), "unk_token": tok_name(unk),
                "tokenizer_class": "LlamaTokenizerFast", "legacy": true, "clean_up_tokenization_spaces": false,
            });
            carry_chat_fields(g, &mut config, &tokens);
            Ok(BuiltTokenizer {
                kind: "llama SentencePiece BPE (byte fallback)".into(),
                json,
                config,
            })
        }
        other => Err(Error::Unsupported(format!(
            "{}: GGUF tokenizer model `{other}` is not supported (gpt2, llama)",
            g.path.display()
        ))),
    }
}

/// The GGUF's chat template and padding token, when it has them, into tokenizer_config.json
/// (where transformers and [`to_gguf`] look for them).
fn carry_chat_fields(g: &GgufFile, config: &mut serde_json::Value, tokens: &[&str]) {
    if let Some(t) = g.get("tokenizer.chat_template").and_then(Value::as_str) {
        config["chat_template"] = json!(t);
    }
    let pad = g
        .get("tokenizer.ggml.padding_token_id")
        .and_then(Value::as_u64);
    if let Some(p) = pad.and_then(|p| tokens.get(p as usize)) {
        config["pad_token"] = json!(p);
    }
}

/// BPE merges implied by a SentencePiece vocabulary, as transformers' `SentencePieceExtractor`
/// derives them: every split of a piece into two in-vocabulary pieces is a merge, ranked by the
/// merged piece's score (descending, stable), ties within a piece by the halves' ids.
fn spm_merges(tokens: &[&str], scores: &[f64], types: &[i64]) -> Vec<serde_json::Value> {
    let ids: HashMap<&str, usize> = tokens.iter().enumerate().map(|(i, t)| (*t, i)).collect();
    let mut merges: Vec<(usize, usize, usize, f64)> = Vec::new(); // (order, left, right, score)
    for (i, piece) in tokens.iter().enumerate() {
        if types.get(i).is_some_and(|&t| t != 1) {
            continue; // control, unknown and byte tokens are never merge results
        }
        let bounds: Vec<usize> = piece.char_indices().map(|(b, _)| b).skip(1).collect();
        let mut local: Vec<(usize, usize)> = bounds
            .into_iter()
            .filter_map(|b| Some((*ids.get(&piece[..b])?, *ids.get(&piece[b..])?)))
            .collect();
        local.sort();
        for (l, r) in local {
            merges.push((merges.len(), l, r, scores.get(i).copied().unwrap_or(0.0)));
        }
    }
    merges.sort_by(|a, b| {
        b.3.partial_cmp(&a.3)
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(a.0.cmp(&b.0))
    });
    merges
        .into_iter()
        .map(|(_, l, r, _)| json!([tokens[l], tokens[r]]))
        .collect()
}

/// A tokenizer_config.json token entry: a string or `{"content": …}`.
fn token_text(v: Option<&serde_json::Value>) -> Option<&str> {
    match v? {
        serde_json::Value::String(s) => Some(s),
        o => o.get("content")?.as_str(),
    }
}

/// The llama.cpp pre-tokenizer name of a byte-level BPE `pre_tokenizer` (the inverse of the
/// table in [`from_gguf`]), `None` when it is none of those.
fn pre_name(pre: &serde_json::Value) -> Option<&'static str> {
    fn ty(v: &serde_json::Value) -> &str {
        v.get("type").and_then(|t| t.as_str()).unwrap_or("")
    }
    if ty(pre) == "ByteLevel" {
        return Some("gpt-2");
    }
    let parts = pre.get("pretokenizers")?.as_array()?;
    match parts.as_slice() {
        [d, b] if ty(d) == "Digits" && ty(b) == "ByteLevel" => {
            (d.get("individual_digits")? == true).then_some("smollm")
        }
        [s, b] if ty(s) == "Split" && ty(b) == "ByteLevel" => {
            let re = s.get("pattern")?.get("Regex")?.as_str()?;
            let tail = "| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
            let head = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|";
            let digits = re.strip_prefix(head)?.strip_suffix(tail)?;
            match digits {
                "\\p{N}" => Some("qwen2"),
                "\\p{N}{1,3}" => Some("llama-bpe"),
                _ => None,
            }
        }
        _ => None,
    }
}

/// The GGUF tokenizer metadata (`tokenizer.ggml.*`, `tokenizer.chat_template`) of a Hugging Face
/// tokenizer: byte-level BPE becomes `gpt2` (tokens, types, merges, pre-tokenizer name),
/// SentencePiece-style BPE with byte fallback becomes `llama` (tokens, scores, types). Token ids
/// missing from the vocabulary up to `n_vocab` (the embedding's rows) are `[PADi]` of type
/// unused (5), as llama.cpp's converter pads. Special ids come from tokenizer_config.json, else
/// `bos`/`eos` of config.json.
pub fn to_gguf(
    tokenizer_json: &std::path::Path,
    tokenizer_config: Option<&std::path::Path>,
    n_vocab: usize,
    config_bos_eos: (Option<u32>, Option<u32>),
) -> Result<Vec<(String, Value)>> {
    let read = |p: &std::path::Path| -> Result<serde_json::Value> {
        let text = std::fs::read_to_string(p).map_err(|e| Error::io(p, e))?;
        serde_json::from_str(&text).map_err(|e| Error::format(p, e.to_string()))
    };
    let tj = read(tokenizer_json)?;
    let tc = match tokenizer_config {
        Some(p) if p.is_file() => read(p)?,
        _ => json!({}),
    };
    let bad = |msg: String| Error::format(tokenizer_json, msg);
    let model = &tj["model"];
    if model["type"].as_str() != Some("BPE") {
        return Err(bad(format!(
            "tokenizer model `{}` cannot be written to GGUF (BPE only)",
            model["type"].as_str().unwrap_or("?")
        )));
    }
    let spm = model["byte_fallback"].as_bool() == Some(true);
    let vocab = model["vocab"]
        .as_object()
        .ok_or_else(|| bad("model.vocab is not an object".into()))?;
    let mut tokens: Vec<Option<String>> = Vec::new();
    let mut types: Vec<i32> = Vec::new();
    let mut put = |id: usize, text: &str, ty: i32, tokens: &mut Vec<Option<String>>| {
        if tokens.len() <= id {
            tokens.resize(id + 1, None);
            types.resize(id + 1, 5);
        }
        tokens[id] = Some(text.to_string());
        types[id] = ty;
    };
    let unk = model["unk_token"].as_str();
    for (t, id) in vocab {
        let id = id
            .as_u64()
            .ok_or_else(|| bad(format!("vocab id of `{t}` is not an integer")))?
            as usize;
        let byte = spm && t.len() == 6 && t.starts_with("<0x") && t.ends_with('>');
        let ty = if Some(t.as_str()) == unk {
            2
        } else if byte {
            6
        } else {
            1
        };
        put(id, t, ty, &mut tokens);
    }
    for a in tj["added_tokens"].as_array().into_iter().flatten() {
        let (Some(id), Some(text)) = (a["id"].as_u64(), a["content"].as_str()) else {
            continue;
        };
        let ty = if Some(text) == unk {
            2
        } else if a["special"].as_bool() == Some(true) {
            3
        } else {
            4
        };
        put(id as usize, text, ty, &mut tokens);
    }
    if tokens.len() > n_vocab {
        return Err(bad(format!(
            "{} tokens but the embedding has {n_vocab} rows",
            tokens.len()
        )));
    }
    tokens.resize(n_vocab, None);
    types.resize(n_vocab, 5);
    let tokens: Vec<String> = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| t.unwrap_or_else(|| format!("[PAD{i}]")))
        .collect();
    let ids: HashMap<&str, usize> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.as_str(), i))
        .collect();
    let merges: Vec<String> = model["merges"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| match m {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Array(p) => {
                Some(format!("{} {}", p.first()?.as_str()?, p.get(1)?.as_str()?))
            }
            _ => None,
        })
        .collect();
    let strings = |v: Vec<String>| Value::Array(v.into_iter().map(Value::String).collect());
    let mut meta: Vec<(String, Value)> = Vec::new();
    let add_space = tj["normalizer"].to_string().contains("\"Prepend\"");
    let add_bos = tc["add_bos_token"].as_bool().unwrap_or(spm);
    if spm {
        // llama.cpp's SentencePiece tokenizer merges the adjacent pair whose concatenation
        // has the highest score: a piece made by the merge of rank r scores −r, so the merge
        // order of tokenizer.json is kept; pieces no merge makes score 0.
        let mut scores = vec![0f32; n_vocab];
        let mut seen = vec![false; n_vocab];
        for (r, m) in merges.iter().enumerate() {
            if let Some(&id) = ids.get(m.replacen(' ', "", 1).as_str()) {
                if !seen[id] {
                    seen[id] = true;
                    scores[id] = -(r as f32);
                }
            }
        }
        meta.push(("tokenizer.ggml.model".into(), Value::String("llama".into())));
        meta.push(("tokenizer.ggml.tokens".into(), strings(tokens.clone())));
        meta.push((
            "tokenizer.ggml.scores".into(),
            Value::Array(scores.into_iter().map(Value::F32).collect()),
        ));
    } else {
        let pre = pre_name(&tj["pre_tokenizer"]).ok_or_else(|| {
            bad(
                "pre-tokenizer is none of those llama.cpp names (smollm, gpt-2, llama-bpe, qwen2)"
                    .into(),
            )
        })?;
        meta.push(("tokenizer.ggml.model".into(), Value::String("gpt2".into())));
        meta.push(("tokenizer.ggml.pre".into(), Value::String(pre.into())));
        meta.push(("tokenizer.ggml.tokens".into(), strings(tokens.clone())));
    }
    meta.push((
        "tokenizer.ggml.token_type".into(),
        Value::Array(types.into_iter().map(Value::I32).collect()),
    ));
    if !spm {
        meta.push(("tokenizer.ggml.merges".into(), strings(merges)));
    }
    let id_of = |key: &str| {
        token_text(tc.get(key))
            .and_then(|t| ids.get(t))
            .map(|&i| i as u32)
    };
    for (key, id) in [
        ("bos", id_of("bos_token").or(config_bos_eos.0)),
        ("eos", id_of("eos_token").or(config_bos_eos.1)),
        (
            "unknown",
            id_of("unk_token").or(unk.and_then(|u| ids.get(u)).map(|&i| i as u32)),
        ),
        ("padding", id_of("pad_token")),
    ] {
        if let Some(id) = id {
            meta.push((format!("tokenizer.ggml.{key}_token_id"), Value::U32(id)));
        }
    }
    meta.push(("tokenizer.ggml.add_bos_token".into(), Value::Bool(add_bos)));
    meta.push((
        "tokenizer.ggml.add_space_prefix".into(),
        Value::Bool(add_space),
    ));
    let template = match &tc["chat_template"] {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Array(a) => a
            .iter()
            .find(|t| t["name"] == "default")
            .and_then(|t| t["template"].as_str())
            .map(str::to_string),
        _ => None,
    };
    if let Some(t) = template {
        meta.push(("tokenizer.chat_template".into(), Value::String(t)));
    }
    Ok(meta)
}

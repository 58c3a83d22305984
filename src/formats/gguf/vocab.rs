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
            let config = json!({
                "add_bos_token": g.get("tokenizer.ggml.add_bos_token").and_then(Value::as_bool).unwrap_or(false),
                "bos_token": tok_name(bos), "eos_token": tok_name(eos), "unk_token": tok_name(unk),
                "tokenizer_class": "GPT2Tokenizer", "clean_up_tokenization_spaces": false,
            });
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
            let config = json!({
                "add_bos_token": add_bos, "add_eos_token": false,
                "bos_token": tok_name(bos), "eos_token": tok_name(eos), "unk_token": tok_name(unk),
                "tokenizer_class": "LlamaTokenizerFast", "legacy": true, "clean_up_tokenization_spaces": false,
            });
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

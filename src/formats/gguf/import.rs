//! Import of a GGUF file into a Hugging Face directory: tensors dequantized (llama's Q/K row
//! permutation undone), `config.json` from the metadata, the tokenizer from its vocabulary.

use super::file::{type_name, GgufFile, Value};
use super::vocab;
use crate::error::{Error, Result};
use crate::formats::safetensors::{SpooledSafetensors, StoredTensor};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Whether two tensors of one shape dequantize to the same values, compared a slice of rows at a
/// time.
fn same_values(
    g: &GgufFile,
    a: &super::file::TensorInfo,
    b: &super::file::TensorInfo,
) -> Result<bool> {
    for (sa, sb) in a.row_slices().iter().zip(&b.row_slices()) {
        if g.dequantize(sa)? != g.dequantize(sb)? {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Storage dtype of imported weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImportDtype {
    F16,
    F32,
}

/// Undoes llama.cpp's Q/K row permutation (formats.md §3.4):
/// `W_hf[h·D + j·D/2 + i] = W_gguf[h·D + 2i + j]`, whole rows of length `cols`.
pub fn unpermute_rows(w: &[f32], n_head: usize, cols: usize) -> Vec<f32> {
    let rows = w.len() / cols;
    let d = rows / n_head;
    let mut out = vec![0f32; w.len()];
    for h in 0..n_head {
        for i in 0..d / 2 {
            for j in 0..2 {
                let src = h * d + 2 * i + j;
                let dst = h * d + j * (d / 2) + i;
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&w[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

/// GGUF tensor name → HF name for the decoder families affq imports.
fn hf_name(name: &str) -> Option<String> {
    let simple = match name {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(s) = simple {
        return Some(s.to_string());
    }
    let rest = name.strip_prefix("blk.")?;
    let (idx, tail) = rest.split_once('.')?;
    idx.parse::<usize>().ok()?;
    let (module, suffix) = tail.rsplit_once('.')?;
    let m = match module {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "attn_q_norm" => "self_attn.q_norm",
        "attn_k_norm" => "self_attn.k_norm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{idx}.{m}.{suffix}"))
}

/// Result of an import, for the CLI's report.
#[derive(Debug, serde::Serialize)]
pub struct ImportReport {
    pub architecture: String,
    pub tensors: usize,
    pub parameters: usize,
    pub tensor_types: BTreeMap<String, usize>,
    pub tokenizer: String,
    pub output: PathBuf,
}

/// Imports a GGUF file into `out` (a Hugging Face directory). Writes into a temporary sibling
/// directory and renames it into place at the end.
pub fn import(
    gguf_path: &Path,
    out: &Path,
    dtype: ImportDtype,
    force: bool,
) -> Result<ImportReport> {
    let g = GgufFile::open(gguf_path)?;
    let arch = g
        .get("general.architecture")
        .and_then(Value::as_str)
        .ok_or_else(|| Error::format(gguf_path, "missing `general.architecture`"))?
        .to_string();
    let (hf_arch, permute_qk) = match arch.as_str() {
        "llama" => ("LlamaForCausalLM", true),
        "qwen2" => ("Qwen2ForCausalLM", false),
        "qwen3" => ("Qwen3ForCausalLM", false),
        other => {
            return Err(Error::Unsupported(format!(
            "{}: GGUF architecture `{other}` cannot be imported (supported: llama, qwen2, qwen3)",
            gguf_path.display()
        )))
        }
    };
    if g.tensor("rope_freqs.weight").is_some() {
        return Err(Error::Unsupported(format!(
            "{}: GGUF carries `rope_freqs.weight` (Llama 3.1 RoPE scaling); importing it is not supported",
            gguf_path.display()
        )));
    }
    let key = |k: &str| format!("{arch}.{k}");
    let n_layers = g.meta_u64(&key("block_count"))? as usize;
    let hidden = g.meta_u64(&key("embedding_length"))? as usize;
    let ffn = g.meta_u64(&key("feed_forward_length"))? as usize;
    let n_head = g.meta_u64(&key("attention.head_count"))? as usize;
    let n_kv = g
        .get(&key("attention.head_count_kv"))
        .and_then(Value::as_u64)
        .map(|v| v as usize)
        .unwrap_or(n_head);
    if n_head == 0 || n_kv == 0 || n_layers == 0 {
        return Err(Error::format(
            gguf_path,
            "head counts and block count must be positive",
        ));
    }
    let head_dim = g
        .get(&key("attention.key_length"))
        .and_then(Value::as_u64)
        .map(|v| v as usize)
        .unwrap_or(hidden / n_head);
    let eps = g
        .get(&key("attention.layer_norm_rms_epsilon"))
        .and_then(Value::as_f64)
        .unwrap_or(1e-5);
    let theta = g
        .get(&key("rope.freq_base"))
        .and_then(Value::as_f64)
        .unwrap_or(10000.0);
    let ctx = g
        .get(&key("context_length"))
        .and_then(Value::as_u64)
        .unwrap_or(2048);
    let embd = g
        .tensor("token_embd.weight")
        .ok_or_else(|| Error::format(gguf_path, "missing tensor `token_embd.weight`"))?;
    let vocab = embd.shape[0];
    // A stored head identical to the embedding (llama2.c conversions write both) is written as a
    // tied model, as transformers would save it.
    let tied = match g.tensor("output.weight") {
        None => true,
        Some(out) => out.shape == embd.shape && same_values(&g, out, embd)?,
    };

    crate::fsutil::check_output(out, force)?;
    let tmp = crate::fsutil::TempDir::beside(out)?;

    // Tensors: dequantize, un-permute, rename; spooled one at a time (one tensor in memory).
    let mut tensor_types = BTreeMap::new();
    let mut spool = SpooledSafetensors::create(&tmp.path().join("model.safetensors"))?;
    let mut n_tensors = 0;
    let mut params = 0usize;
    for t in &g.tensors {
        if tied && t.name == "output.weight" {
            continue;
        }
        let name = hf_name(&t.name).ok_or_else(|| {
            Error::Unsupported(format!(
                "{}: unexpected tensor `{}` for architecture {arch}",
                gguf_path.display(),
                t.name
            ))
        })?;
        *tensor_types.entry(type_name(t.ggml_type)).or_insert(0) += 1;
        // Weights and biases of Q/K are stored with llama.cpp's interleaved RoPE row order.
        let heads = match name.rsplit('.').nth(1) {
            Some("q_proj") if permute_qk => Some(n_head),
            Some("k_proj") if permute_qk => Some(n_kv),
            _ => None,
        };
        let encode = |v: &[f32], bytes: &mut Vec<u8>| match dtype {
            ImportDtype::F32 => bytes.extend(v.iter().flat_map(|x| x.to_le_bytes())),
            ImportDtype::F16 => {
                bytes.extend(v.iter().flat_map(|&x| half::f16::from_f32(x).to_le_bytes()))
            }
        };
        let width = match dtype {
            ImportDtype::F32 => 4,
            ImportDtype::F16 => 2,
        };
        let numel: usize = t.shape.iter().product();
        let mut bytes = Vec::with_capacity(numel * width);
        if let Some(heads) = heads {
            let row_len = if t.shape.len() == 2 { t.shape[1] } else { 1 };
            encode(
                &unpermute_rows(&g.dequantize(t)?, heads, row_len),
                &mut bytes,
            );
        } else {
            for slice in t.row_slices() {
                encode(&g.dequantize(&slice)?, &mut bytes);
            }
        }
        params += numel;
        let dtype = match dtype {
            ImportDtype::F32 => safetensors::Dtype::F32,
            ImportDtype::F16 => safetensors::Dtype::F16,
        };
        spool.add(vec![(
            name,
            StoredTensor {
                dtype,
                shape: t.shape.clone(),
                bytes,
            },
        )])?;
        n_tensors += 1;
    }
    let mut meta = BTreeMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    meta.insert(
        "source".to_string(),
        gguf_path
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default(),
    );
    meta.insert(
        "note".to_string(),
        "dequantized from GGUF by affq import; not original weights".to_string(),
    );
    spool.finish(&meta)?;

    let bos = g.get("tokenizer.ggml.bos_token_id").and_then(Value::as_u64);
    let eos = g.get("tokenizer.ggml.eos_token_id").and_then(Value::as_u64);
    let config = serde_json::json!({
        "architectures": [hf_arch],
        "model_type": match arch.as_str() { "llama" => "llama", "qwen2" => "qwen2", _ => "qwen3" },
        "hidden_size": hidden,
        "intermediate_size": ffn,
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "rms_norm_eps": eps,
        "rope_theta": theta,
        "max_position_embeddings": ctx,
        "vocab_size": vocab,
        "tie_word_embeddings": tied,
        "hidden_act": "silu",
        "bos_token_id": bos,
        "eos_token_id": eos,
        "torch_dtype": match dtype { ImportDtype::F16 => "float16", ImportDtype::F32 => "float32" },
    });
    crate::fsutil::write_json(&tmp.path().join("config.json"), &config)?;

    let tok = vocab::from_gguf(&g)?;
    let tok_kind = tok.kind.clone();
    crate::fsutil::write_json(&tmp.path().join("tokenizer.json"), &tok.json)?;
    crate::fsutil::write_json(&tmp.path().join("tokenizer_config.json"), &tok.config)?;
    // Refuse to publish a tokenizer that the tokenizers crate cannot load.
    crate::tokenizer::Tok::load(&tmp.path().join("tokenizer.json"))?;

    tmp.persist(out, force)?;
    Ok(ImportReport {
        architecture: hf_arch.to_string(),
        tensors: n_tensors,
        parameters: params,
        tensor_types,
        tokenizer: tok_kind,
        output: out.to_path_buf(),
    })
}

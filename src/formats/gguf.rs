//! GGUF reading (v2/v3) and import into a Hugging Face directory (formats.md §3).
//!
//! The header parser is affq's own, bounds-checked against the file size so that a corrupt file
//! gives an error naming it rather than a huge allocation or a panic. Block decoding of quantized
//! types is delegated to candle's GGML kernels.

use super::gguf_vocab;
use super::safetensors::StoredTensor;
use crate::error::{Error, Result};
use candle_core::quantized::{ggml_file::qtensor_from_ggml, GgmlDType};
use candle_core::Device;
use memmap2::Mmap;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
}

impl Value {
    pub fn as_u64(&self) -> Option<u64> {
        Some(match *self {
            Value::U8(v) => v as u64,
            Value::U16(v) => v as u64,
            Value::U32(v) => v as u64,
            Value::U64(v) => v,
            Value::I8(v) if v >= 0 => v as u64,
            Value::I16(v) if v >= 0 => v as u64,
            Value::I32(v) if v >= 0 => v as u64,
            Value::I64(v) if v >= 0 => v as u64,
            _ => return None,
        })
    }
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v as f64),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Value::Bool(b) => Some(*b),
            _ => None,
        }
    }
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// The element types affq can decode, with GGML's ids.
const TYPES: &[(u32, &str, GgmlDType)] = &[
    (0, "F32", GgmlDType::F32),
    (1, "F16", GgmlDType::F16),
    (2, "Q4_0", GgmlDType::Q4_0),
    (3, "Q4_1", GgmlDType::Q4_1),
    (6, "Q5_0", GgmlDType::Q5_0),
    (7, "Q5_1", GgmlDType::Q5_1),
    (8, "Q8_0", GgmlDType::Q8_0),
    (10, "Q2_K", GgmlDType::Q2K),
    (11, "Q3_K", GgmlDType::Q3K),
    (12, "Q4_K", GgmlDType::Q4K),
    (13, "Q5_K", GgmlDType::Q5K),
    (14, "Q6_K", GgmlDType::Q6K),
    (30, "BF16", GgmlDType::BF16),
];

fn type_name(id: u32) -> String {
    TYPES
        .iter()
        .find(|t| t.0 == id)
        .map(|t| t.1.to_string())
        .unwrap_or_else(|| format!("type {id}"))
}

#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    /// PyTorch order (outermost first): GGUF's `ne` reversed.
    pub shape: Vec<usize>,
    pub ggml_type: u32,
    /// Absolute byte offset in the file.
    pub start: usize,
    pub len: usize,
}

/// A parsed, memory-mapped GGUF file.
pub struct GgufFile {
    pub path: PathBuf,
    mmap: Mmap,
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| {
                Error::format(
                    self.path,
                    format!(
                        "truncated GGUF header: {what} at byte {} needs {n} bytes, file has {}",
                        self.pos,
                        self.buf.len()
                    ),
                )
            })?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4, what)?.try_into().unwrap()))
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8, what)?.try_into().unwrap()))
    }
    /// A count of items, each at least `min_size` bytes, that must fit in the rest of the file.
    fn count(&mut self, min_size: usize, what: &str) -> Result<usize> {
        let n = self.u64(what)?;
        let remaining = (self.buf.len() - self.pos) as u64;
        if n.saturating_mul(min_size as u64) > remaining {
            return Err(Error::format(
                self.path,
                format!("truncated or corrupt GGUF header: {what} = {n} cannot fit in the remaining {remaining} bytes"),
            ));
        }
        Ok(n as usize)
    }
    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.count(1, what)?;
        let b = self.take(n, what)?;
        String::from_utf8(b.to_vec())
            .map_err(|_| Error::format(self.path, format!("GGUF {what} is not valid UTF-8")))
    }
    fn value(&mut self, ty: u32, depth: usize) -> Result<Value> {
        let w = "metadata value";
        Ok(match ty {
            0 => Value::U8(self.take(1, w)?[0]),
            1 => Value::I8(self.take(1, w)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.take(2, w)?.try_into().unwrap())),
            3 => Value::I16(i16::from_le_bytes(self.take(2, w)?.try_into().unwrap())),
            4 => Value::U32(self.u32(w)?),
            5 => Value::I32(self.u32(w)? as i32),
            6 => Value::F32(f32::from_bits(self.u32(w)?)),
            7 => Value::Bool(self.take(1, w)?[0] != 0),
            8 => Value::String(self.string("metadata string")?),
            9 => {
                if depth > 2 {
                    return Err(Error::format(self.path, "GGUF arrays nested too deeply"));
                }
                let et = self.u32("array type")?;
                let min = match et {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    _ => 8,
                };
                let n = self.count(min, "array length")?;
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.value(et, depth + 1)?);
                }
                Value::Array(v)
            }
            10 => Value::U64(self.u64(w)?),
            11 => Value::I64(self.u64(w)? as i64),
            12 => Value::F64(f64::from_bits(self.u64(w)?)),
            other => {
                return Err(Error::format(
                    self.path,
                    format!("unknown GGUF metadata value type {other}"),
                ))
            }
        })
    }
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: read-only mapping of an input file.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let (version, metadata, tensors) = Self::parse(path, &mmap)?;
        Ok(GgufFile {
            path: path.to_path_buf(),
            mmap,
            version,
            metadata,
            tensors,
        })
    }

    #[allow(clippy::type_complexity)]
    fn parse(path: &Path, buf: &[u8]) -> Result<(u32, BTreeMap<String, Value>, Vec<TensorInfo>)> {
        let mut c = Cursor { buf, pos: 0, path };
        let magic = c.take(4, "magic")?;
        if magic != b"GGUF" {
            return Err(Error::format(
                path,
                format!(
                    "not a GGUF file (magic {:?}, expected \"GGUF\")",
                    String::from_utf8_lossy(magic)
                ),
            ));
        }
        let version = c.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(Error::format(
                path,
                format!("unsupported GGUF version {version} (2 and 3 are supported)"),
            ));
        }
        let n_tensors = c.count(24, "tensor count")?;
        let n_kv = c.count(12, "metadata count")?;
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = c.string("metadata key")?;
            let ty = c.u32("metadata type")?;
            let v = c.value(ty, 0)?;
            metadata.insert(key, v);
        }
        let mut raw = Vec::with_capacity(n_tensors);
        for _ in 0..n_tensors {
            let name = c.string("tensor name")?;
            let n_dims = c.u32("tensor n_dims")? as usize;
            if n_dims == 0 || n_dims > 4 {
                return Err(Error::format(
                    path,
                    format!("tensor `{name}` has {n_dims} dimensions (1..4 allowed)"),
                ));
            }
            let mut ne = Vec::with_capacity(n_dims);
            for _ in 0..n_dims {
                ne.push(c.u64("tensor dim")?);
            }
            let ty = c.u32("tensor type")?;
            let offset = c.u64("tensor offset")?;
            raw.push((name, ne, ty, offset));
        }
        let alignment = match metadata.get("general.alignment") {
            None => 32,
            Some(v) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() && a <= 1 << 20 => a as usize,
                _ => {
                    return Err(Error::format(
                        path,
                        "general.alignment must be a power of two",
                    ))
                }
            },
        };
        let data_start = c.pos.div_ceil(alignment) * alignment;
        let mut tensors = Vec::with_capacity(n_tensors);
        for (name, ne, ty, offset) in raw {
            let Some(&(_, _, dt)) = TYPES.iter().find(|t| t.0 == ty) else {
                let names: Vec<&str> = TYPES.iter().map(|t| t.1).collect();
                return Err(Error::format(
                    path,
                    format!(
                        "tensor `{name}` has unsupported GGML type {} (supported: {})",
                        type_name(ty),
                        names.join(", ")
                    ),
                ));
            };
            let elems = ne
                .iter()
                .try_fold(1u64, |a, &d| a.checked_mul(d))
                .filter(|&e| e < 1 << 40);
            let Some(elems) = elems else {
                return Err(Error::format(
                    path,
                    format!("tensor `{name}` has absurd dimensions {ne:?}"),
                ));
            };
            let bs = dt.block_size() as u64;
            if ne[0] % bs != 0 {
                return Err(Error::format(
                    path,
                    format!("tensor `{name}`: row length {} is not a multiple of the {} block size {bs}", ne[0], type_name(ty)),
                ));
            }
            let len = (elems / bs) as usize * dt.type_size();
            let start = (data_start as u64).checked_add(offset).map(|s| s as usize);
            let end = start.and_then(|s| s.checked_add(len));
            match (start, end) {
                (Some(s), Some(e)) if e <= buf.len() => {
                    let shape = ne.iter().rev().map(|&d| d as usize).collect();
                    tensors.push(TensorInfo {
                        name,
                        shape,
                        ggml_type: ty,
                        start: s,
                        len,
                    });
                    let _ = e;
                }
                _ => {
                    return Err(Error::format(
                        path,
                        format!(
                        "truncated tensor data: `{name}` needs bytes {}..{} but the file has {}",
                        data_start as u64 + offset,
                        data_start as u64 + offset + len as u64,
                        buf.len()
                    ),
                    ))
                }
            }
        }
        Ok((version, metadata, tensors))
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// Decodes a tensor to f32 values in PyTorch row-major order.
    pub fn dequantize(&self, t: &TensorInfo) -> Result<Vec<f32>> {
        let bytes = &self.mmap[t.start..t.start + t.len];
        let &(_, _, dt) = TYPES
            .iter()
            .find(|x| x.0 == t.ggml_type)
            .expect("checked at parse");
        let out = match dt {
            GgmlDType::F32 => bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect(),
            GgmlDType::F16 => bytes
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            GgmlDType::BF16 => bytes
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            _ => {
                // candle reinterprets the bytes as block structs: give it an owned, aligned copy.
                let owned = bytes.to_vec();
                let q = qtensor_from_ggml(dt, &owned, t.shape.clone(), &Device::Cpu)
                    .map_err(|e| Error::format(&self.path, format!("tensor `{}`: {e}", t.name)))?;
                q.dequantize(&Device::Cpu)?
                    .flatten_all()?
                    .to_vec1::<f32>()?
            }
        };
        Ok(out)
    }

    fn meta_u64(&self, key: &str) -> Result<u64> {
        self.get(key).and_then(Value::as_u64).ok_or_else(|| {
            Error::format(
                &self.path,
                format!("missing or non-integer metadata `{key}`"),
            )
        })
    }
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
        Some(out) => out.shape == embd.shape && g.dequantize(out)? == g.dequantize(embd)?,
    };

    crate::fsutil::check_output(out, force)?;
    let tmp = crate::fsutil::TempDir::beside(out)?;

    // Tensors: dequantize, un-permute, rename; keep them as stored bytes for serialization.
    let mut tensor_types = BTreeMap::new();
    let mut tensors: Vec<(String, StoredTensor)> = Vec::new();
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
        let mut v = g.dequantize(t)?;
        // Weights and biases of Q/K are stored with llama.cpp's interleaved RoPE row order.
        let heads = match name.rsplit('.').nth(1) {
            Some("q_proj") if permute_qk => Some(n_head),
            Some("k_proj") if permute_qk => Some(n_kv),
            _ => None,
        };
        if let Some(heads) = heads {
            let row_len = if t.shape.len() == 2 { t.shape[1] } else { 1 };
            v = unpermute_rows(&v, heads, row_len);
        }
        params += v.len();
        let bytes: Vec<u8> = match dtype {
            ImportDtype::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            ImportDtype::F16 => v
                .iter()
                .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
                .collect(),
        };
        let dtype = match dtype {
            ImportDtype::F32 => safetensors::Dtype::F32,
            ImportDtype::F16 => safetensors::Dtype::F16,
        };
        tensors.push((
            name,
            StoredTensor {
                dtype,
                shape: t.shape.clone(),
                bytes,
            },
        ));
    }
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
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
    super::safetensors::write_safetensors(&tmp.path().join("model.safetensors"), &tensors, &meta)?;

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

    let tok = gguf_vocab::from_gguf(&g)?;
    let tok_kind = tok.kind.clone();
    crate::fsutil::write_json(&tmp.path().join("tokenizer.json"), &tok.json)?;
    crate::fsutil::write_json(&tmp.path().join("tokenizer_config.json"), &tok.config)?;
    // Refuse to publish a tokenizer that the tokenizers crate cannot load.
    crate::tokenizer::Tok::load(&tmp.path().join("tokenizer.json"))?;

    tmp.persist(out, force)?;
    Ok(ImportReport {
        architecture: hf_arch.to_string(),
        tensors: tensors.len(),
        parameters: params,
        tensor_types,
        tokenizer: tok_kind,
        output: out.to_path_buf(),
    })
}

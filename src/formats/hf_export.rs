//! Exports to Hugging Face directories whose linears are stored quantized (compressed-tensors
//! `pack-quantized`, GPTQ v1): the walk over a checkpoint shared by both formats, one block at a
//! time, behind the small trait [`LinearFormat`] each format implements (formats.md §1, §2).
//!
//! Dense tensors (embedding, norms, an unquantized head, biases) are written in the model's dtype
//! when every value is one of its values, else F32; online transforms and KV quantization are
//! refused like the GGUF export refuses them, activation quantization unless the format carries
//! its grid (compressed-tensors' dynamic per-token `input_activations`).

use super::checkpoint::Precision;
use super::safetensors::{SpooledSafetensors, StoredTensor};
use super::Checkpoint;
use crate::error::{Error, Result};
use crate::model::{LinearKind, LinearLayer, Site};
use crate::quant::{QuantSpec, QuantizedWeight};
use candle_core::{DType, Tensor};
use safetensors::Dtype;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

/// How one format stores a quantized linear.
pub trait LinearFormat {
    /// `quant_method` / the format's name in messages.
    fn name(&self) -> &'static str;
    /// The tensors of quantized linear `prefix` (bias excluded), or why the format cannot hold
    /// it exactly.
    /// `dtype`: the model's dtype (scales of compressed-tensors are stored in it); `act`: the
    /// grid of its input activations (already accepted by [`Self::activations`]).
    fn linear(
        &self,
        q: &QuantizedWeight,
        act: Option<&QuantSpec>,
        prefix: &str,
        dtype: Dtype,
    ) -> std::result::Result<Vec<(String, StoredTensor)>, String>;
    /// `config.json:quantization_config` for the checkpoint's weight grid `q` and input
    /// activation grid `act` (one linear stands for all: affq uses one grid for the whole model);
    /// `dense`: the decoder linears (module names within a layer) left in full precision.
    fn quantization_config(
        &self,
        q: &QuantizedWeight,
        act: Option<&QuantSpec>,
        quantize_head: bool,
        dense: &[String],
    ) -> serde_json::Value;
    /// Whether the format quantizes a linear's input on the fly exactly as grid `a` does
    /// (dynamic, one unit per token), or why not.
    fn activations(&self, _a: &QuantSpec) -> std::result::Result<(), String> {
        Err(format!(
            "this {} export carries weight quantization only; quantize without --a-bits",
            self.name()
        ))
    }
    /// Bias dtype (GPTQ stores f16 biases; compressed-tensors keeps the model dtype).
    fn bias_dtype(&self, model: Dtype) -> Dtype {
        model
    }
    /// Extra files (name, contents) written beside config.json.
    fn extra_files(&self, _config: &serde_json::Value) -> Vec<(String, String)> {
        Vec::new()
    }
}

/// What an HF-directory export wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct HfReport {
    pub quantized_linears: usize,
    pub tensors: usize,
    pub bytes: u64,
}

/// The dtype of the model a checkpoint was made from (its stored embedding's, or its config's).
pub(crate) fn model_dtype(ckpt: &Checkpoint) -> Dtype {
    match ckpt
        .store
        .raw("model.embed_tokens.weight")
        .map(|r| r.dtype)
        .unwrap_or(Dtype::F32)
    {
        Dtype::BF16 => Dtype::BF16,
        Dtype::F16 => Dtype::F16,
        _ => {
            // affq checkpoints hold f32 ends; the source model's dtype is in its config.
            let text = std::fs::read_to_string(&ckpt.files.config).unwrap_or_default();
            match serde_json::from_str::<serde_json::Value>(&text)
                .ok()
                .and_then(|v| v["torch_dtype"].as_str().map(str::to_string))
                .as_deref()
            {
                Some("float16") => Dtype::F16,
                Some("bfloat16") => Dtype::BF16,
                _ => Dtype::F32,
            }
        }
    }
}

/// `t` in `dtype` when every value survives the conversion, else F32.
pub fn dense_tensor(t: &Tensor, dtype: Dtype) -> Result<StoredTensor> {
    let v: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let shape = t.dims().to_vec();
    Ok(match exact_floats(&v, dtype) {
        Some(bytes) if matches!(dtype, Dtype::F16 | Dtype::BF16) => StoredTensor {
            dtype,
            shape,
            bytes,
        },
        _ => StoredTensor::f32(&v, &shape),
    })
}

/// Refuses a checkpoint with an online transform (a Kronecker site or the query/key transform),
/// which no plain-weights format carries, naming the first one.
pub fn check_no_online(ckpt: &Checkpoint, format: &str) -> Result<()> {
    for i in 0..ckpt.config.num_layers {
        let p = format!("model.layers.{i}");
        let online = Site::ALL
            .iter()
            .map(|s| format!("{p}.online.{}.dims", s.name()))
            .chain([format!("{p}.self_attn.qk_transform.q")])
            .find(|n| ckpt.store.contains(n));
        if let Some(n) = online {
            return Err(Error::Unsupported(format!(
                "{}: `{}` is an online transform, which {format} cannot carry; only checkpoints whose transforms are merged into the weights export (--method rtn, or rotate / affinequant with --merged-only; FlatQuant has no merged-only mode yet)",
                ckpt.files.dir.display(),
                n.trim_end_matches(".dims").trim_end_matches(".q")
            )));
        }
    }
    Ok(())
}

/// Refuses a quantized KV cache, which no exported format carries exactly (compressed-tensors'
/// `kv_cache_scheme` is a static per-tensor scale; affq's cache is dynamic per token and head).
fn check_no_kv(ckpt: &Checkpoint, format: &str) -> Result<()> {
    match ckpt.quant.as_ref().and_then(|q| q.kv_cache) {
        Some(s) => Err(Error::Unsupported(format!(
            "{}: KV cache quantized to {} bits (quantization_config): this {format} export carries no dynamic per-(token, head) KV quantization; quantize without --kv-bits",
            ckpt.files.dir.display(),
            s.bits
        ))),
        None => Ok(()),
    }
}

/// Exports `ckpt` into the directory `out` (written in place: the caller gives a temporary one).
pub fn export(ckpt: &Checkpoint, out: &Path, f: &dyn LinearFormat) -> Result<HfReport> {
    check_no_online(ckpt, f.name())?;
    check_no_kv(ckpt, f.name())?;
    let c = &ckpt.config;
    let dir = ckpt.files.dir.display().to_string();
    if !ckpt
        .store
        .contains("model.layers.0.self_attn.q_proj.weight_packed")
    {
        return Err(Error::Unsupported(format!(
            "{dir}: the model is not quantized; a {} export stores quantized weights (affq quantize first)",
            f.name()
        )));
    }
    let dtype = model_dtype(ckpt);
    let mut st = SpooledSafetensors::create(&out.join("model.safetensors"))?;
    let mut first: Option<(QuantizedWeight, Option<QuantSpec>)> = None;
    let mut n_quant = 0;
    let mut linear = |l: &dyn LinearLayer,
                      prefix: &str,
                      st: &mut SpooledSafetensors|
     -> Result<()> {
        match l.quantized_weight() {
            Some(q) => {
                let refuse = |why: String| Error::Unsupported(format!("{dir}: `{prefix}` {why}"));
                let act = l.act_quantizer().map(|a| a.spec()).transpose()?;
                if let Some(a) = &act {
                    f.activations(a).map_err(|why| {
                        refuse(format!("quantizes its input to {} bits: {why}", a.bits))
                    })?;
                }
                if let Some((_, a0)) = &first {
                    if *a0 != act {
                        return Err(refuse(format!(
                                "quantizes its input activations ({}) unlike the first quantized linear ({}); the {} config holds one scheme for every linear",
                                describe_act(act.as_ref()),
                                describe_act(a0.as_ref()),
                                f.name()
                            )));
                    }
                }
                let t = f.linear(q, act.as_ref(), prefix, dtype).map_err(refuse)?;
                st.add(t)?;
                if first.is_none() {
                    first = Some((q.clone(), act));
                }
                n_quant += 1;
            }
            None => st.add(vec![(
                format!("{prefix}.weight"),
                dense_tensor(l.weight_ref(), dtype)?,
            )])?,
        }
        if let Some(b) = l.bias() {
            st.add(vec![(
                format!("{prefix}.bias"),
                dense_tensor(b, f.bias_dtype(dtype))?,
            )])?;
        }
        Ok(())
    };
    let ends = ckpt.load_ends(1, Precision::Stored)?;
    let config = ends.config.clone();
    for i in 0..c.num_layers {
        let b = ckpt.load_block(Arc::clone(&config), i, Precision::Stored)?;
        let p = format!("model.layers.{i}");
        for kind in LinearKind::ALL {
            linear(b.linear(kind), &format!("{p}.{}", kind.hf_name()), &mut st)?;
        }
        st.add(vec![
            (
                format!("{p}.input_layernorm.weight"),
                dense_tensor(b.input_norm(), dtype)?,
            ),
            (
                format!("{p}.post_attention_layernorm.weight"),
                dense_tensor(b.post_norm(), dtype)?,
            ),
        ])?;
        if let Some((qn, kn)) = b.qk_norms() {
            st.add(vec![
                (
                    format!("{p}.self_attn.q_norm.weight"),
                    dense_tensor(qn, dtype)?,
                ),
                (
                    format!("{p}.self_attn.k_norm.weight"),
                    dense_tensor(kn, dtype)?,
                ),
            ])?;
        }
    }
    st.add(vec![(
        "model.embed_tokens.weight".into(),
        dense_tensor(&ends.embed, dtype)?,
    )])?;
    st.add(vec![(
        "model.norm.weight".into(),
        dense_tensor(&ends.norm, dtype)?,
    )])?;
    let quantize_head = ckpt.store.contains("lm_head.weight_packed");
    if !ends.tied_head {
        linear(ends.head.as_ref(), "lm_head", &mut st)?;
    }
    let mut meta = BTreeMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    meta.insert("affq.version".to_string(), crate::VERSION.to_string());
    st.finish(&meta)?;
    let tensors = super::safetensors::TensorStore::open(&[out.join("model.safetensors")])?
        .names()
        .len();
    let (q, act) = first.expect("a quantized checkpoint has a quantized linear");
    let text = std::fs::read_to_string(&ckpt.files.config)
        .map_err(|e| Error::io(&ckpt.files.config, e))?;
    let mut cfg: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::format(&ckpt.files.config, e.to_string()))?;
    let dense = ckpt
        .quant
        .as_ref()
        .and_then(|q| q.weights.as_ref())
        .map_or(&[][..], |w| &w.dense[..]);
    cfg["quantization_config"] = f.quantization_config(&q, act.as_ref(), quantize_head, dense);
    cfg["tie_word_embeddings"] = serde_json::json!(ends.tied_head);
    cfg["torch_dtype"] = serde_json::json!(match dtype {
        Dtype::F16 => "float16",
        Dtype::BF16 => "bfloat16",
        _ => "float32",
    });
    crate::fsutil::write_json(&out.join("config.json"), &cfg)?;
    for (name, contents) in f.extra_files(&cfg["quantization_config"]) {
        let p = out.join(name);
        std::fs::write(&p, contents).map_err(|e| Error::io(&p, e))?;
    }
    for name in [
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "generation_config.json",
        "tokenizer.model",
    ] {
        let p = ckpt.files.dir.join(name);
        if p.is_file() {
            std::fs::copy(&p, out.join(name)).map_err(|e| Error::io(&p, e))?;
        }
    }
    let bytes = std::fs::metadata(out.join("model.safetensors"))
        .map_err(|e| Error::io(out, e))?
        .len();
    Ok(HfReport {
        quantized_linears: n_quant,
        tensors,
        bytes,
    })
}

fn describe_act(a: Option<&QuantSpec>) -> String {
    match a {
        None => "not at all".into(),
        Some(a) => format!(
            "{} bits, {}, clip {}",
            a.bits,
            if a.symmetric {
                "symmetric"
            } else {
                "asymmetric"
            },
            a.clip
        ),
    }
}

/// Packs `rows × n` codes with the low bits first, `32/b` codes per word (formats.md §1.2; the
/// 2-, 4- and 8-bit layouts every version of both formats agree on).
pub fn pack_rows(codes: &[u8], n: usize, bits: u8) -> Vec<i32> {
    crate::quant::pack::pack(codes, n, bits)
        .into_iter()
        .map(|w| w as i32)
        .collect()
}

/// `[rows, cols]` → `[cols, rows]`.
pub fn transpose<T: Copy + Default>(v: &[T], rows: usize, cols: usize) -> Vec<T> {
    let mut out = vec![T::default(); v.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = v[r * cols + c];
        }
    }
    out
}

/// `x` as little-endian bytes of `dtype` (F16/BF16/F32), or `None` when a value would change.
pub fn exact_floats(x: &[f32], dtype: Dtype) -> Option<Vec<u8>> {
    fn convert<H>(
        x: &[f32],
        from: fn(f32) -> H,
        to: fn(H) -> f32,
        bytes: fn(H) -> [u8; 2],
    ) -> Option<Vec<u8>>
    where
        H: Copy,
    {
        let mut out = Vec::with_capacity(2 * x.len());
        for &v in x {
            let h = from(v);
            if to(h) != v {
                return None;
            }
            out.extend_from_slice(&bytes(h));
        }
        Some(out)
    }
    match dtype {
        Dtype::F16 => convert(
            x,
            half::f16::from_f32,
            half::f16::to_f32,
            half::f16::to_le_bytes,
        ),
        Dtype::BF16 => convert(
            x,
            half::bf16::from_f32,
            half::bf16::to_f32,
            half::bf16::to_le_bytes,
        ),
        _ => Some(x.iter().flat_map(|v| v.to_le_bytes()).collect()),
    }
}

/// Whether a grid stores no zero point: symmetric with every zero at 2^(b−1) (a signed-max grid
/// moves its zeros, so it is stored as asymmetric).
pub fn zero_free(q: &QuantizedWeight) -> bool {
    let half = (1u32 << (q.spec.bits - 1)) as f32;
    q.spec.symmetric && q.params.iter().all(|p| p.zero == half)
}

/// `scale` (`[rows, groups]` of `q`'s units, in the order given) as bytes of `dtype`, or the
/// refusal naming the first scale that is not a `dtype` value (`fix`: what makes it one).
pub fn exact_scales(
    q: &QuantizedWeight,
    scale: &[f32],
    dtype: Dtype,
    fix: &str,
) -> std::result::Result<Vec<u8>, String> {
    exact_floats(scale, dtype).ok_or_else(|| {
        let ng = q.n_groups();
        let i = q
            .params
            .iter()
            .position(|p| exact_floats(&[p.scale], dtype).is_none())
            .unwrap_or(0);
        let name = match dtype {
            Dtype::F16 => "f16",
            Dtype::BF16 => "bf16",
            _ => "f32",
        };
        format!(
            "has scale {:e} (row {}, group {}), which is not an {name} value ({fix})",
            q.params[i].scale,
            i / ng,
            i % ng
        )
    })
}

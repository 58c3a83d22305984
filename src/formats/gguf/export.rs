//! Export of a checkpoint (affq's, or a full-precision Hugging Face directory) to a GGUF file
//! llama.cpp loads (formats.md §3): architecture `llama` (Llama, Mistral, SmolLM; Q/K rows
//! permuted to llama.cpp's interleaved RoPE order, §3.4) or `qwen2`/`qwen3` (unpermuted, q/k/v
//! biases), hyperparameters, the tokenizer, and every linear on the chosen type.
//!
//! Exact by default: a quantized linear keeps its codes and grid (`d = s`, Q4_1 `m = o − z·s`)
//! and every block is decoded with llama.cpp's formula and compared bit for bit with affq's
//! dequantized weight; the first difference refuses the export, naming the tensor. Dense tensors
//! are written as F16 when they are stored as F16 or all their values are f16 values, else F32;
//! norms and biases are F32. `allow_lossy` re-rounds instead (kept codes with f16 parameters
//! where the grid's structure fits the type, llama.cpp's reference quantizer where it does not)
//! and reports the relative weight error per tensor kind. Online transforms are never written:
//! llama.cpp has no place for them.

use super::blocks::{self, GgmlType, QK};
use super::file::Value;
use super::vocab;
use super::write::{GgufWriter, TensorEntry};
use crate::error::{Error, Result};
use crate::formats::checkpoint::Precision;
use crate::formats::Checkpoint;
use crate::model::config::Architecture;
use crate::model::{LinearKind, LinearLayer, ModelConfig};
use crate::quant::QuantizedWeight;
use candle_core::{DType, Tensor};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

/// The relative weight error a lossy export introduced in one kind of tensor.
#[derive(Debug, Clone, serde::Serialize)]
pub struct KindError {
    pub kind: String,
    pub tensors: usize,
    /// `‖Ŵ − W‖_F / ‖W‖_F` over all tensors of the kind (W: the checkpoint's weights).
    pub rel_error: f64,
    /// How the tensors were re-rounded.
    pub how: String,
}

/// What an export wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct GgufReport {
    pub architecture: String,
    /// The type of the linears (`general.file_type`).
    pub linear_type: String,
    pub tensors: usize,
    pub tensor_types: BTreeMap<String, usize>,
    pub bytes: u64,
    /// Every tensor equals the checkpoint's weights (no `--allow-lossy` change was needed).
    pub exact: bool,
    pub lossy: Vec<KindError>,
    /// What of the checkpoint the file does not carry (activation / KV quantization).
    pub dropped: Vec<String>,
    /// Tensors written on another type than the linears' (still exact).
    pub notes: Vec<String>,
}

/// The GGUF architecture name and whether q/k rows are permuted.
fn gguf_arch(c: &ModelConfig) -> (&'static str, bool) {
    match c.architecture {
        Architecture::LlamaForCausalLM | Architecture::MistralForCausalLM => ("llama", true),
        Architecture::Qwen2ForCausalLM => ("qwen2", false),
        Architecture::Qwen3ForCausalLM => ("qwen3", false),
    }
}

fn gguf_linear_name(kind: LinearKind) -> &'static str {
    match kind {
        LinearKind::Q => "attn_q",
        LinearKind::K => "attn_k",
        LinearKind::V => "attn_v",
        LinearKind::O => "attn_output",
        LinearKind::Gate => "ffn_gate",
        LinearKind::Up => "ffn_up",
        LinearKind::Down => "ffn_down",
    }
}

/// Row order of llama.cpp's Q/K permutation (formats.md §3.4): GGUF row `h·D + 2i + j` is HF row
/// `h·D + j·D/2 + i`. `rows[gguf] = hf`.
pub fn permuted_rows(n_rows: usize, n_head: usize) -> Vec<usize> {
    let d = n_rows / n_head;
    let mut rows = vec![0; n_rows];
    for h in 0..n_head {
        for i in 0..d / 2 {
            for j in 0..2 {
                rows[h * d + 2 * i + j] = h * d + j * (d / 2) + i;
            }
        }
    }
    rows
}

fn gather_rows(v: &[f32], cols: usize, rows: &[usize]) -> Vec<f32> {
    let mut out = Vec::with_capacity(rows.len() * cols);
    for &r in rows {
        out.extend_from_slice(&v[r * cols..(r + 1) * cols]);
    }
    out
}

/// The type of the linears when no `--type` is given: the checkpoint's own grid (4-bit symmetric
/// Q4_0, 8-bit symmetric Q8_0, 4-bit asymmetric Q4_1), or the stored dtype of a full-precision
/// model (F16, else F32).
pub fn default_linear_type(ckpt: &Checkpoint) -> Result<GgmlType> {
    match ckpt.quant.as_ref().and_then(|q| q.weights.as_ref()) {
        Some(w) => match (w.spec.bits, w.spec.symmetric) {
            (4, true) => Ok(GgmlType::Q4_0),
            (8, true) => Ok(GgmlType::Q8_0),
            (4, false) => Ok(GgmlType::Q4_1),
            (b, _) => Err(Error::Unsupported(format!(
                "{}: no GGUF type holds {b}-bit weights (Q4_0/Q4_1 hold 4, Q8_0 8); pass --type with --allow-lossy to re-quantize",
                ckpt.files.dir.display()
            ))),
        },
        None => {
            let raw = ckpt.store.raw("model.layers.0.self_attn.q_proj.weight")?;
            Ok(if raw.dtype == safetensors::Dtype::F16 {
                GgmlType::F16
            } else {
                GgmlType::F32
            })
        }
    }
}

/// How one tensor is written.
#[derive(Clone, Copy, PartialEq)]
enum Source {
    /// A quantized linear of the checkpoint.
    Quantized,
    /// A dense tensor.
    Dense,
}

struct Planned {
    entry: TensorEntry,
    source: Source,
}

struct Errors {
    kinds: BTreeMap<String, (usize, f64, f64, String)>,
}

impl Errors {
    fn add(&mut self, kind: &str, how: &str, want: &[f32], got: &[f32]) {
        let (d2, w2) = want.iter().zip(got).fold((0f64, 0f64), |(d, w), (&a, &b)| {
            (d + ((a - b) as f64).powi(2), w + (a as f64).powi(2))
        });
        let e = self
            .kinds
            .entry(kind.to_string())
            .or_insert((0, 0.0, 0.0, how.to_string()));
        e.0 += 1;
        e.1 += d2;
        e.2 += w2;
        if !e.3.contains(how) {
            e.3 = format!("{}; {how}", e.3);
        }
    }
}

/// Exports `ckpt` to `out` (a file, written in place: the caller provides a temporary path).
/// `ty`: the linears' type (`None`: the checkpoint's own grid, or F16/F32 for a full-precision
/// model).
pub fn export(
    ckpt: &Checkpoint,
    out: &Path,
    ty: Option<GgmlType>,
    allow_lossy: bool,
) -> Result<GgufReport> {
    let c = &ckpt.config;
    let dir = ckpt.files.dir.display().to_string();
    crate::formats::hf_export::check_no_online(ckpt, "GGUF (llama.cpp)")?;
    let (arch, permute) = gguf_arch(c);
    let quant = ckpt.quant.as_ref();
    let mut dropped = Vec::new();
    if let Some(q) = quant {
        for (what, spec) in [("activations", q.activations), ("KV cache", q.kv_cache)] {
            if let Some(s) = spec {
                let msg = format!("{what} quantized to {} bits", s.bits);
                if !allow_lossy {
                    return Err(Error::Unsupported(format!(
                        "{dir}: {msg} (quantization_config): a GGUF file carries weights only and llama.cpp runs {what} in its own types; quantize without --a-bits/--kv-bits, or pass --allow-lossy to export the weights alone"
                    )));
                }
                dropped.push(msg);
            }
        }
    }
    let linear_type = match ty {
        Some(t) => t,
        None => default_linear_type(ckpt)?,
    };

    // The tensor directory, decided from names, shapes and stored dtypes before any data.
    let dense_type = |name: &str| -> Result<GgmlType> {
        if linear_type == GgmlType::F32 {
            return Ok(GgmlType::F32);
        }
        let raw = ckpt.store.raw(name)?;
        Ok(match raw.dtype {
            safetensors::Dtype::F16 => GgmlType::F16,
            safetensors::Dtype::F32 => {
                let all_f16 = raw.data.chunks_exact(4).all(|b| {
                    let x = f32::from_le_bytes(b.try_into().unwrap());
                    half::f16::from_f32(x).to_f32() == x
                });
                // With --allow-lossy a quantized file keeps its dense tensors in F16 too (as
                // llama.cpp's own files do), the rounding reported.
                if all_f16
                    || linear_type == GgmlType::F16
                    || (allow_lossy && linear_type.is_quantized())
                {
                    GgmlType::F16
                } else {
                    GgmlType::F32
                }
            }
            // bf16 has f32's range: kept exactly as F32 unless f16 is asked for.
            _ if linear_type == GgmlType::F16 => GgmlType::F16,
            _ => GgmlType::F32,
        })
    };
    let mut plan: Vec<Planned> = Vec::new();
    let mut push = |name: String, shape: Vec<usize>, ty: GgmlType, source: Source| {
        plan.push(Planned {
            entry: TensorEntry { name, shape, ty },
            source,
        })
    };
    let mut notes = Vec::new();
    let mut linear_plan = |hf: &str, in_f: usize| -> Result<(GgmlType, Source)> {
        let fits = in_f.is_multiple_of(QK);
        if ckpt.store.contains(&format!("{hf}.weight_packed")) {
            if fits || !linear_type.is_quantized() {
                return Ok((linear_type, Source::Quantized));
            }
            // No block type fits the row: the dequantized weight, exactly (as llama-quantize
            // falls back for such tensors).
            notes.push(format!(
                "{hf}: {in_f} input columns are not a multiple of {QK}: written dequantized as F32"
            ));
            Ok((GgmlType::F32, Source::Quantized))
        } else if linear_type.is_quantized() && fits {
            // A full-precision linear put on a block type: a re-quantization.
            Ok((linear_type, Source::Dense))
        } else {
            Ok((dense_type(&format!("{hf}.weight"))?, Source::Dense))
        }
    };
    let (v, d) = (c.vocab_size, c.hidden_size);
    push(
        "token_embd.weight".into(),
        vec![v, d],
        dense_type("model.embed_tokens.weight")?,
        Source::Dense,
    );
    push(
        "output_norm.weight".into(),
        vec![d],
        GgmlType::F32,
        Source::Dense,
    );
    let has_head =
        ckpt.store.contains("lm_head.weight") || ckpt.store.contains("lm_head.weight_packed");
    if has_head {
        let (t, s) = if ckpt.store.contains("lm_head.weight_packed") {
            (linear_type, Source::Quantized)
        } else {
            (dense_type("lm_head.weight")?, Source::Dense)
        };
        push("output.weight".into(), vec![v, d], t, s);
    }
    for i in 0..c.num_layers {
        let hf = format!("model.layers.{i}");
        let g = format!("blk.{i}");
        push(
            format!("{g}.attn_norm.weight"),
            vec![d],
            GgmlType::F32,
            Source::Dense,
        );
        for kind in LinearKind::ALL {
            let (o, n) = kind.shape(c);
            let (t, s) = linear_plan(&format!("{hf}.{}", kind.hf_name()), n)?;
            push(
                format!("{g}.{}.weight", gguf_linear_name(kind)),
                vec![o, n],
                t,
                s,
            );
            if kind.has_bias(c)
                || ckpt
                    .store
                    .contains(&format!("{hf}.{}.bias", kind.hf_name()))
            {
                push(
                    format!("{g}.{}.bias", gguf_linear_name(kind)),
                    vec![o],
                    GgmlType::F32,
                    Source::Dense,
                );
            }
        }
        push(
            format!("{g}.ffn_norm.weight"),
            vec![d],
            GgmlType::F32,
            Source::Dense,
        );
        if c.qk_norm {
            push(
                format!("{g}.attn_q_norm.weight"),
                vec![c.head_dim],
                GgmlType::F32,
                Source::Dense,
            );
            push(
                format!("{g}.attn_k_norm.weight"),
                vec![c.head_dim],
                GgmlType::F32,
                Source::Dense,
            );
        }
    }
    if let Some(s) = &c.rope_scaling {
        let _ = s;
        push(
            "rope_freqs.weight".into(),
            vec![c.head_dim / 2],
            GgmlType::F32,
            Source::Dense,
        );
    }

    // Metadata.
    let mut meta: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        ("general.type".into(), Value::String("model".into())),
        (
            "general.name".into(),
            Value::String(
                ckpt.files
                    .dir
                    .file_name()
                    .map_or("model".into(), |n| n.to_string_lossy().into_owned()),
            ),
        ),
        (
            "general.quantized_by".into(),
            Value::String(format!("affq {}", crate::VERSION)),
        ),
    ];
    let a = |k: &str| format!("{arch}.{k}");
    let u = |x: usize| Value::U32(x as u32);
    meta.extend([
        (a("block_count"), u(c.num_layers)),
        (a("context_length"), u(c.max_position_embeddings)),
        (a("embedding_length"), u(d)),
        (a("feed_forward_length"), u(c.intermediate_size)),
        (a("attention.head_count"), u(c.num_heads)),
        (a("attention.head_count_kv"), u(c.num_kv_heads)),
        (a("rope.freq_base"), Value::F32(c.rope_theta as f32)),
        (
            a("attention.layer_norm_rms_epsilon"),
            Value::F32(c.rms_norm_eps as f32),
        ),
        (a("vocab_size"), u(v)),
        (a("rope.dimension_count"), u(c.head_dim)),
        (
            "general.file_type".into(),
            Value::U32(linear_type.file_type()),
        ),
    ]);
    if c.head_dim * c.num_heads != d {
        meta.push((a("attention.key_length"), u(c.head_dim)));
        meta.push((a("attention.value_length"), u(c.head_dim)));
    }
    if linear_type.is_quantized() {
        meta.push(("general.quantization_version".into(), Value::U32(2)));
    }
    let tok = ckpt.files.tokenizer.clone().ok_or_else(|| {
        Error::format(
            ckpt.files.dir.join("tokenizer.json"),
            "missing: a GGUF file carries the tokenizer, and this model has none",
        )
    })?;
    meta.extend(vocab::to_gguf(
        &tok,
        Some(&ckpt.files.dir.join("tokenizer_config.json")),
        v,
        (c.bos_token_id, c.eos_token_id),
    )?);

    // Data, one tensor at a time, in directory order.
    let entries: Vec<TensorEntry> = plan.iter().map(|p| p.entry.clone()).collect();
    let mut w = GgufWriter::create(out, &meta, entries)?;
    let mut errors = Errors {
        kinds: BTreeMap::new(),
    };
    let ends = ckpt.load_ends(1, Precision::Stored)?;
    let config = ends.config.clone();
    let mut ctx = Ctx {
        dir: &dir,
        allow_lossy,
        errors: &mut errors,
    };
    let mut it = plan.iter();
    let mut next = |name: &str| -> &Planned {
        let p = it.next().expect("plan covers every tensor");
        debug_assert_eq!(p.entry.name, name);
        p
    };
    let p = next("token_embd.weight");
    w.write(
        &p.entry.name,
        &ctx.dense(
            &ends.embed,
            "model.embed_tokens.weight",
            "token_embd",
            p.entry.ty,
            None,
        )?,
    )?;
    let p = next("output_norm.weight");
    w.write(
        &p.entry.name,
        &blocks::f32_bytes(&ends.norm.to_vec1::<f32>()?),
    )?;
    if has_head {
        let p = next("output.weight");
        let bytes = ctx.linear(ends.head.as_ref(), "lm_head", "output", p, None)?;
        w.write(&p.entry.name, &bytes)?;
    }
    drop(ends);
    for i in 0..c.num_layers {
        let b = ckpt.load_block(Arc::clone(&config), i, Precision::Stored)?;
        let hf = format!("model.layers.{i}");
        let g = format!("blk.{i}");
        let p = next(&format!("{g}.attn_norm.weight"));
        w.write(
            &p.entry.name,
            &blocks::f32_bytes(&b.input_norm().to_vec1::<f32>()?),
        )?;
        for kind in LinearKind::ALL {
            let l = b.linear(kind);
            let rows = match (permute, kind) {
                (true, LinearKind::Q) => Some(permuted_rows(c.q_dim(), c.num_heads)),
                (true, LinearKind::K) => Some(permuted_rows(c.kv_dim(), c.num_kv_heads)),
                _ => None,
            };
            let name = format!("{hf}.{}", kind.hf_name());
            let p = next(&format!("{g}.{}.weight", gguf_linear_name(kind)));
            let bytes = ctx.linear(l, &name, kind.short(), p, rows.as_deref())?;
            w.write(&p.entry.name, &bytes)?;
            if let Some(bias) = l.bias() {
                let p = next(&format!("{g}.{}.bias", gguf_linear_name(kind)));
                let v: Vec<f32> = bias.to_dtype(DType::F32)?.to_vec1()?;
                let v = match &rows {
                    Some(r) => gather_rows(&v, 1, r),
                    None => v,
                };
                w.write(&p.entry.name, &blocks::f32_bytes(&v))?;
            }
        }
        let p = next(&format!("{g}.ffn_norm.weight"));
        w.write(
            &p.entry.name,
            &blocks::f32_bytes(&b.post_norm().to_vec1::<f32>()?),
        )?;
        if let Some((qn, kn)) = b.qk_norms() {
            let p = next(&format!("{g}.attn_q_norm.weight"));
            w.write(&p.entry.name, &blocks::f32_bytes(&qn.to_vec1::<f32>()?))?;
            let p = next(&format!("{g}.attn_k_norm.weight"));
            w.write(&p.entry.name, &blocks::f32_bytes(&kn.to_vec1::<f32>()?))?;
        }
    }
    if c.rope_scaling.is_some() {
        // llama.cpp divides each base frequency by its factor: factor = base / scaled.
        let base = ModelConfig {
            rope_scaling: None,
            ..c.clone()
        }
        .rope_inv_freq();
        let f: Vec<f32> = base
            .iter()
            .zip(c.rope_inv_freq())
            .map(|(b, s)| (b / s) as f32)
            .collect();
        let p = next("rope_freqs.weight");
        w.write(&p.entry.name, &blocks::f32_bytes(&f))?;
    }
    w.finish()?;

    let mut tensor_types = BTreeMap::new();
    for p in &plan {
        *tensor_types
            .entry(p.entry.ty.name().to_string())
            .or_insert(0) += 1;
    }
    let lossy: Vec<KindError> = errors
        .kinds
        .into_iter()
        .map(|(kind, (n, d2, w2, how))| KindError {
            kind,
            tensors: n,
            rel_error: if w2 > 0.0 {
                (d2 / w2).sqrt()
            } else {
                d2.sqrt()
            },
            how,
        })
        .collect();
    Ok(GgufReport {
        architecture: arch.into(),
        linear_type: linear_type.name().into(),
        tensors: plan.len(),
        tensor_types,
        bytes: std::fs::metadata(out).map_err(|e| Error::io(out, e))?.len(),
        exact: lossy.is_empty() && dropped.is_empty(),
        lossy,
        dropped,
        notes,
    })
}

struct Ctx<'a> {
    dir: &'a str,
    allow_lossy: bool,
    errors: &'a mut Errors,
}

impl Ctx<'_> {
    fn refuse(&self, name: &str, why: String, fix: &str) -> Error {
        Error::Unsupported(format!(
            "{}: `{name}` {why}; {fix}, or pass --allow-lossy to re-round it",
            self.dir
        ))
    }

    /// A dense tensor (`[rows, cols]`) as `ty`, rows in the order `rows`.
    fn dense(
        &mut self,
        t: &Tensor,
        name: &str,
        kind: &str,
        ty: GgmlType,
        rows: Option<&[usize]>,
    ) -> Result<Vec<u8>> {
        let (_, cols) = t.dims2()?;
        if ty == GgmlType::F16 && t.dtype() == DType::F16 && rows.is_none() {
            let v: Vec<half::f16> = t.flatten_all()?.to_vec1()?;
            return Ok(v.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect());
        }
        let v: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let v = match rows {
            Some(r) => gather_rows(&v, cols, r),
            None => v,
        };
        Ok(match ty {
            GgmlType::F32 => blocks::f32_bytes(&v),
            GgmlType::F16 => {
                let bytes = blocks::f16_bytes(&v);
                if let Some(i) = v
                    .iter()
                    .position(|x| half::f16::from_f32(*x).to_f32() != *x)
                {
                    if !self.allow_lossy {
                        return Err(self.refuse(
                            name,
                            format!(
                                "holds {} (row {}, column {}), which is not an f16 value",
                                v[i],
                                i / cols,
                                i % cols
                            ),
                            "export with --type f32",
                        ));
                    }
                    self.errors.add(
                        kind,
                        "rounded to f16",
                        &v,
                        &blocks::decode(GgmlType::F16, &bytes),
                    );
                }
                bytes
            }
            block => {
                if !self.allow_lossy {
                    return Err(self.refuse(
                        name,
                        "is a full-precision weight".into(),
                        &format!("quantize the model first (affq quantize --format gguf) to export it as {}", block.name()),
                    ));
                }
                let mut bytes = Vec::with_capacity(v.len() / cols * block.row_bytes(cols));
                for row in v.chunks_exact(cols) {
                    blocks::quantize_row_ref(block, row, &mut bytes);
                }
                self.errors.add(
                    kind,
                    "llama.cpp reference quantizer",
                    &v,
                    &blocks::decode(block, &bytes),
                );
                bytes
            }
        })
    }

    /// A linear's weight as planned.
    fn linear(
        &mut self,
        l: &dyn LinearLayer,
        name: &str,
        kind: &str,
        p: &Planned,
        rows: Option<&[usize]>,
    ) -> Result<Vec<u8>> {
        let ty = p.entry.ty;
        let wname = format!("{name}.weight");
        let Some(q) = l
            .quantized_weight()
            .filter(|_| p.source == Source::Quantized)
        else {
            return self.dense(l.weight_ref(), &wname, kind, ty, rows);
        };
        let all: Vec<usize> = (0..q.out).collect();
        let rows = rows.unwrap_or(&all);
        if !ty.is_quantized() {
            let deq = gather_rows(&q.dequantize(), q.inp, rows);
            let t = Tensor::from_vec(deq, (q.out, q.inp), &candle_core::Device::Cpu)?;
            return self.dense(&t, &format!("{name} (dequantized)"), kind, ty, None);
        }
        self.quantized(q, &wname, kind, ty, rows)
    }

    fn quantized(
        &mut self,
        q: &QuantizedWeight,
        name: &str,
        kind: &str,
        ty: GgmlType,
        rows: &[usize],
    ) -> Result<Vec<u8>> {
        let mismatch = blocks::structure_mismatch(q, ty);
        let fix = "quantize with `--format gguf` (its grid: f16 scales, groups of 32)";
        match (&mismatch, self.allow_lossy) {
            (Some(m), false) => {
                return Err(self.refuse(
                    name,
                    format!("has {m}, which {} cannot hold", ty.name()),
                    fix,
                ))
            }
            (None, false) => {
                return blocks::encode_codes(q, ty, rows, true).map_err(|(r, col, v, d)| {
                    self.refuse(
                        name,
                        format!(
                            "is not exact as {}: row {r}, column {col} is {v:e} in the checkpoint and {d:e} in {} (its scale {:e} is not an f16 value)",
                            ty.name(),
                            ty.name(),
                            q.params[r * q.n_groups() + col / q.group_size()].scale
                        ),
                        fix,
                    )
                });
            }
            _ => {}
        }
        let want = gather_rows(&q.dequantize(), q.inp, rows);
        let (bytes, how) = match mismatch {
            None => match blocks::encode_codes(q, ty, rows, false) {
                Ok(b) => (b, "codes kept, scales rounded to f16"),
                Err(_) => (
                    Self::reference(ty, &want, q.inp),
                    "llama.cpp reference quantizer",
                ),
            },
            Some(_) if q.inp.is_multiple_of(QK) => (
                Self::reference(ty, &want, q.inp),
                "llama.cpp reference quantizer",
            ),
            Some(m) => {
                return Err(Error::Unsupported(format!(
                    "{}: `{name}` has {m}: no {} export is possible",
                    self.dir,
                    ty.name()
                )))
            }
        };
        let got = blocks::decode(ty, &bytes);
        if got
            .iter()
            .zip(&want)
            .any(|(a, b)| a.to_bits() != b.to_bits())
        {
            self.errors.add(kind, how, &want, &got);
        }
        Ok(bytes)
    }

    fn reference(ty: GgmlType, v: &[f32], cols: usize) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(v.len() / cols * ty.row_bytes(cols));
        for row in v.chunks_exact(cols) {
            blocks::quantize_row_ref(ty, row, &mut bytes);
        }
        bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::gguf::unpermute_rows;

    #[test]
    fn permutation_is_the_inverse_of_the_import_map() {
        for (rows, heads) in [(64usize, 8usize), (576, 9), (192, 3), (8, 1)] {
            let cols = 3;
            let w: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
            let g = gather_rows(&w, cols, &permuted_rows(rows, heads));
            assert_eq!(
                unpermute_rows(&g, heads, cols),
                w,
                "{rows} rows, {heads} heads"
            );
        }
    }
}

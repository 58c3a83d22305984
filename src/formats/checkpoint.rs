//! affq's quantized checkpoint (docs/checkpoint-format.md): reading a model directory into the
//! decoder, and writing a quantized decoder back — `config.json` with its `quantization_config`
//! (schema: [`super::schema`]), `model.safetensors` with packed codes, scales, zero points and the
//! online transforms, tokenizer files copied from the source model.

use super::safetensors::{ModelFiles, SpooledSafetensors, StoredTensor, TensorStore};
pub use super::schema::{QuantConfig, WeightScheme, FORMAT, FORMAT_VERSION};
use crate::backend::simulated::QuantLinear;
use crate::error::{Error, Result};
use crate::fsutil::{write_json, TempDir};
use crate::model::{
    Block, BlockParts, DenseLinear, LinearKind, LinearLayer, Model, ModelConfig, QkTransform, Rope,
    Site,
};
use crate::quant::{pack, ActQuantizer, Granularity, QuantSpec, QuantizedWeight, UnitParams};
use crate::transforms::KroneckerTransform;
use candle_core::{Device, Tensor};
use std::path::Path;
use std::sync::Arc;

/// Configuration and weights of one model, ready to be turned into a decoder.
pub struct Checkpoint {
    pub files: ModelFiles,
    pub config: ModelConfig,
    /// `quantization_config` of an affq checkpoint.
    pub quant: Option<QuantConfig>,
    pub store: TensorStore,
}

impl Checkpoint {
    pub fn open(path: &Path) -> Result<Self> {
        let files = ModelFiles::locate(path)?;
        let config = ModelConfig::from_file(&files.config)?;
        let text =
            std::fs::read_to_string(&files.config).map_err(|e| Error::io(&files.config, e))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::format(&files.config, e.to_string()))?;
        let quant = QuantConfig::from_config_json(&files.config, &json)?;
        let store = TensorStore::open(&files.weights)?;
        Ok(Checkpoint {
            files,
            config,
            quant,
            store,
        })
    }

    /// The model's tokenizer (`tokenizer.json` beside its config); `needed_by` names what asks,
    /// for the error when it is missing.
    pub fn tokenizer(&self, needed_by: &str) -> Result<crate::tokenizer::Tok> {
        let path = self.files.tokenizer.clone().ok_or_else(|| {
            Error::format(
                self.files.dir.join("tokenizer.json"),
                format!("missing: {needed_by} needs the model's tokenizer"),
            )
        })?;
        crate::tokenizer::Tok::load(&path)
    }

    /// The decoder of this checkpoint with RoPE tables for `max_len` positions (simulated
    /// quantized layers where the checkpoint is quantized), weights in f32 except an untied
    /// embedding, which keeps its stored dtype (see [`Self::load_ends`]).
    pub fn load_model(&self, max_len: usize) -> Result<Model> {
        let mut model = self.load_ends(max_len, Precision::F32)?;
        model.blocks = (0..model.config.num_layers)
            .map(|i| self.load_block(model.config.clone(), i, Precision::F32))
            .collect::<Result<Vec<_>>>()?;
        Ok(model)
    }

    /// Block `i` of this checkpoint, for a pass that holds one block at a time (blocks loaded
    /// this way share `config`, the one of [`Self::load_ends`]).
    pub fn load_block(
        &self,
        config: Arc<ModelConfig>,
        i: usize,
        precision: Precision,
    ) -> Result<Block> {
        load_block(&self.store, config, i, self.quant.as_ref(), precision)
    }

    /// The decoder without its blocks (`blocks` empty): embedding, final norm, head (an untied
    /// full-precision one held at `head`'s precision) and RoPE tables; the blocks come one at a
    /// time from [`Self::load_block`].
    pub fn load_ends(&self, max_len: usize, head: Precision) -> Result<Model> {
        let config = Arc::new(self.config.clone());
        let c = &*config;
        let store = &self.store;
        let quant = self.quant.clone();
        // The embedding is only gathered from: kept as stored (16-bit stays 16-bit) unless it is
        // also the head and `head` asks for f32.
        let has_head = store.contains("lm_head.weight") || store.contains("lm_head.weight_packed");
        let embed_name = "model.embed_tokens.weight";
        let embed = if has_head || head == Precision::Stored {
            store.weight(embed_name, &[c.vocab_size, c.hidden_size])?
        } else {
            store.f32(embed_name, &[c.vocab_size, c.hidden_size])?
        };
        let blocks = Vec::new();
        let norm = store.f32("model.norm.weight", &[c.hidden_size])?;
        let head_act = quant
            .as_ref()
            .filter(|q| q.quantize_head)
            .and_then(|q| q.activations);
        let (head, tied_head): (Box<dyn LinearLayer>, bool) = if has_head {
            (
                load_linear(
                    store,
                    "lm_head",
                    c.vocab_size,
                    c.hidden_size,
                    false,
                    quant.as_ref(),
                    head_act,
                    head,
                )?,
                false,
            )
        } else if c.tie_word_embeddings {
            (
                Box::new(DenseLinear {
                    weight: embed.clone(),
                    bias: None,
                }),
                true,
            )
        } else {
            return Err(Error::format(
                store.first_path(),
                "missing tensor `lm_head.weight` and config.json does not tie word embeddings",
            ));
        };
        let rope = Rope::new(c, max_len.max(1))?;
        Ok(Model {
            config,
            embed,
            blocks,
            norm,
            head,
            tied_head,
            rope,
        })
    }
}

/// How full-precision weights are held in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    /// f32: what calibration and the transforms compute on.
    F32,
    /// As stored (F16/BF16 stay 16-bit and are widened to f32 per product): evaluation, where
    /// weights are only multiplied by.
    Stored,
}

/// Loads layer `i` from `store`: full-precision linears, or packed quantized ones when the
/// checkpoint carries them (`quant` is its quantization_config).
pub fn load_block(
    store: &TensorStore,
    config: Arc<ModelConfig>,
    i: usize,
    quant: Option<&QuantConfig>,
    precision: Precision,
) -> Result<Block> {
    let c = &*config;
    let p = format!("model.layers.{i}");
    let act = quant.and_then(|q| q.activations);
    let mut linears: Vec<Box<dyn LinearLayer>> = Vec::with_capacity(7);
    for kind in LinearKind::ALL {
        let (o, n) = kind.shape(c);
        let name = format!("{p}.{}", kind.hf_name());
        linears.push(load_linear(
            store,
            &name,
            o,
            n,
            kind.has_bias(c),
            quant,
            act,
            precision,
        )?);
    }
    let d = c.hidden_size;
    let qk_norms = if c.qk_norm {
        Some((
            store.f32(&format!("{p}.self_attn.q_norm.weight"), &[c.head_dim])?,
            store.f32(&format!("{p}.self_attn.k_norm.weight"), &[c.head_dim])?,
        ))
    } else {
        None
    };
    let mut online: [Option<KroneckerTransform>; 4] = Default::default();
    for (slot, site) in online.iter_mut().zip(Site::ALL) {
        *slot = load_transform(store, &format!("{p}.online.{}", site.name()), site.dim(c))?;
    }
    let qk_name = format!("{p}.self_attn.qk_transform");
    let qk_transform = if store.contains(&format!("{qk_name}.q")) {
        let hd = c.head_dim;
        // One matrix for all heads `[hd, hd]`, or one per head `[heads, hd, hd]`.
        let per_head = store.shape(&format!("{qk_name}.q"))?.len() == 3;
        let (sq, sk): (Vec<usize>, Vec<usize>) = if per_head {
            (vec![c.num_heads, hd, hd], vec![c.num_kv_heads, hd, hd])
        } else {
            (vec![hd, hd], vec![hd, hd])
        };
        Some(QkTransform {
            q: store.f32(&format!("{qk_name}.q"), &sq)?,
            k: store.f32(&format!("{qk_name}.k"), &sk)?,
        })
    } else {
        None
    };
    let parts = BlockParts {
        input_norm: store.f32(&format!("{p}.input_layernorm.weight"), &[d])?,
        post_norm: store.f32(&format!("{p}.post_attention_layernorm.weight"), &[d])?,
        qk_norms,
        linears,
        online,
        qk_transform,
        k_quant: load_kv_quant(
            store,
            &format!("{p}.self_attn.k_quant.clip"),
            quant.and_then(|q| q.kv_cache),
        )?,
        v_quant: load_kv_quant(
            store,
            &format!("{p}.self_attn.v_quant.clip"),
            quant.and_then(|q| q.kv_cache),
        )?,
    };
    let mut block = Block::new(i, config, parts)?;
    let center = format!("{p}.self_attn.k_center");
    if store.contains(&center) {
        let (kv, hd) = (block.config().num_kv_heads, block.config().head_dim);
        block.set_k_center(Some(store.f32(&center, &[kv, hd])?.reshape((kv, 1, hd))?));
    }
    Ok(block)
}

/// Tensors of one block for a checkpoint (or a resumable calibration's work file).
pub fn block_tensors(b: &Block) -> Result<Vec<(String, StoredTensor)>> {
    let p = format!("model.layers.{}", b.index());
    let mut v = vec![
        (
            format!("{p}.input_layernorm.weight"),
            StoredTensor::from_f32(b.input_norm())?,
        ),
        (
            format!("{p}.post_attention_layernorm.weight"),
            StoredTensor::from_f32(b.post_norm())?,
        ),
    ];
    if let Some((q, k)) = b.qk_norms() {
        v.push((
            format!("{p}.self_attn.q_norm.weight"),
            StoredTensor::from_f32(q)?,
        ));
        v.push((
            format!("{p}.self_attn.k_norm.weight"),
            StoredTensor::from_f32(k)?,
        ));
    }
    for kind in LinearKind::ALL {
        v.extend(linear_tensors(
            b.linear(kind),
            &format!("{p}.{}", kind.hf_name()),
        )?);
    }
    for site in Site::ALL {
        if let Some(t) = b.site(site) {
            v.extend(transform_tensors(
                t,
                &format!("{p}.online.{}", site.name()),
            )?);
        }
    }
    if let Some(qk) = b.qk_transform() {
        v.push((
            format!("{p}.self_attn.qk_transform.q"),
            StoredTensor::from_f32(&qk.q)?,
        ));
        v.push((
            format!("{p}.self_attn.qk_transform.k"),
            StoredTensor::from_f32(&qk.k)?,
        ));
    }
    if let Some(c) = b.k_center() {
        let (kv, _, hd) = c.dims3()?;
        v.push((
            format!("{p}.self_attn.k_center"),
            StoredTensor::from_f32(&c.reshape((kv, hd))?)?,
        ));
    }
    for (name, qz) in [("k_quant", b.k_quant()), ("v_quant", b.v_quant())] {
        if let Some(qz) = qz {
            v.push((
                format!("{p}.self_attn.{name}.clip"),
                clip_tensor(&qz.spec()?),
            ));
        }
    }
    Ok(v)
}

/// Loads one linear layer: packed quantized (`{name}.weight_packed`), dense with input
/// quantization, or plain dense.
#[allow(clippy::too_many_arguments)]
fn load_linear(
    store: &TensorStore,
    name: &str,
    out: usize,
    inp: usize,
    has_bias: bool,
    quant: Option<&QuantConfig>,
    act: Option<QuantSpec>,
    precision: Precision,
) -> Result<Box<dyn LinearLayer>> {
    let act = act
        .map(|a| with_stored_clip(store, &format!("{name}.input_clip"), a))
        .transpose()?;
    if store.contains(&format!("{name}.weight_packed")) {
        let spec = quant
            .and_then(|q| q.weights.as_ref())
            .map(|w| w.spec)
            .ok_or_else(|| {
                Error::format(
                    store.first_path(),
                    format!(
                        "`{name}.weight_packed` present but config.json has no weight quantization"
                    ),
                )
            })?;
        return Ok(Box::new(load_quant_linear(
            store, name, out, inp, &spec, act,
        )?));
    }
    let weight = match (precision, act) {
        // The simulated activation quantizer's layer computes in f32.
        (Precision::Stored, None) => store.weight(&format!("{name}.weight"), &[out, inp])?,
        _ => store.f32(&format!("{name}.weight"), &[out, inp])?,
    };
    let bias_name = format!("{name}.bias");
    let bias = if has_bias || store.contains(&bias_name) {
        Some(store.f32(&bias_name, &[out])?)
    } else {
        None
    };
    Ok(match act {
        Some(_) => Box::new(QuantLinear::new(None, weight, bias, act)?),
        None => Box::new(DenseLinear { weight, bias }),
    })
}

/// A KV quantizer from the checkpoint's grid and this layer's stored clip ratios, if any.
fn load_kv_quant(
    store: &TensorStore,
    name: &str,
    spec: Option<QuantSpec>,
) -> Result<Option<Arc<dyn ActQuantizer>>> {
    let Some(spec) = spec else { return Ok(None) };
    Ok(Some(Arc::new(with_stored_clip(store, name, spec)?)))
}

/// Overrides a grid's clip ratios with `{name}` (F32 `[clip_max, clip_min]`) when stored.
pub fn with_stored_clip(store: &TensorStore, name: &str, spec: QuantSpec) -> Result<QuantSpec> {
    if !store.contains(name) {
        return Ok(spec);
    }
    let v: Vec<f32> = store.f32(name, &[2])?.to_vec1()?;
    if !v.iter().all(|c| c.is_finite() && *c > 0.0 && *c <= 1.0) {
        return Err(Error::format(
            store.path_of(name).unwrap_or(store.first_path()),
            format!("`{name}` must hold two ratios in (0, 1]"),
        ));
    }
    Ok(QuantSpec {
        clip: v[0],
        clip_min: v[1],
        ..spec
    })
}

fn clip_tensor(spec: &QuantSpec) -> StoredTensor {
    StoredTensor::f32(&[spec.clip, spec.clip_min], &[2])
}

/// Reads `{prefix}.weight_packed` & co. (docs/checkpoint-format.md).
fn load_quant_linear(
    store: &TensorStore,
    prefix: &str,
    out: usize,
    inp: usize,
    spec: &QuantSpec,
    act: Option<QuantSpec>,
) -> Result<QuantLinear> {
    let path = store
        .path_of(&format!("{prefix}.weight_packed"))
        .unwrap_or(store.first_path())
        .to_path_buf();
    let bits = spec.bits;
    let wpr = pack::words_per_row(inp, bits);
    let words: Vec<u32> = store
        .i32s(&format!("{prefix}.weight_packed"), &[out, wpr])?
        .into_iter()
        .map(|x| x as u32)
        .collect();
    let codes = pack::unpack(&words, out, inp, bits);
    if let Some(bad) = codes.iter().position(|&c| c as u32 > spec.qmax()) {
        return Err(Error::format(
            &path,
            format!(
                "`{prefix}.weight_packed`: code {} out of range at {bad}",
                codes[bad]
            ),
        ));
    }
    let sshape = store.shape(&format!("{prefix}.weight_scale"))?;
    let ng = match sshape.as_slice() {
        [o, g] if *o == out && *g > 0 && inp.is_multiple_of(*g) => *g,
        _ => return Err(Error::format(&path, format!("`{prefix}.weight_scale` has shape {sshape:?}, expected [{out}, groups dividing {inp}]"))),
    };
    let scale: Vec<f32> = store
        .f32(&format!("{prefix}.weight_scale"), &[out, ng])?
        .flatten_all()?
        .to_vec1()?;
    let half = (1u32 << (bits - 1)) as f32;
    // Symmetric grids store their zeros only when they are not all 2^(b−1) (signed-max scales).
    let zero: Vec<f32> = if store.contains(&format!("{prefix}.weight_zero")) {
        store
            .i32s(&format!("{prefix}.weight_zero"), &[out, ng])?
            .into_iter()
            .map(|z| z as f32)
            .collect()
    } else if spec.symmetric {
        vec![half; out * ng]
    } else {
        vec![0.0; out * ng]
    };
    let offset: Vec<f32> = if store.contains(&format!("{prefix}.weight_offset")) {
        store
            .f32(&format!("{prefix}.weight_offset"), &[out, ng])?
            .flatten_all()?
            .to_vec1()?
    } else {
        vec![0.0; out * ng]
    };
    if let Some(i) = scale.iter().position(|s| !s.is_finite() || *s <= 0.0) {
        return Err(Error::format(
            &path,
            format!(
                "`{prefix}.weight_scale` has an invalid scale {} at {i}",
                scale[i]
            ),
        ));
    }
    let params = (0..out * ng)
        .map(|i| UnitParams {
            scale: scale[i],
            zero: zero[i],
            offset: offset[i],
        })
        .collect();
    let granularity = if ng == 1 {
        Granularity::Channel
    } else {
        Granularity::Group(inp / ng)
    };
    let q = QuantizedWeight {
        out,
        inp,
        spec: *spec,
        granularity,
        codes,
        params,
    };
    let bias_name = format!("{prefix}.bias");
    let bias = if store.contains(&bias_name) {
        Some(store.f32(&bias_name, &[out])?)
    } else {
        None
    };
    QuantLinear::new(
        Some(q),
        Tensor::zeros((1, 1), candle_core::DType::F32, &Device::Cpu)?,
        bias,
        act,
    )
}

/// Tensors of one linear layer under `prefix`: packed codes, scales and zero points or offsets
/// when its weight is quantized, else the dense weight; the bias; the input quantizer's clip.
pub fn linear_tensors(l: &dyn LinearLayer, prefix: &str) -> Result<Vec<(String, StoredTensor)>> {
    let mut out = Vec::new();
    match l.quantized_weight() {
        Some(q) => {
            let ng = q.n_groups();
            let words = pack::pack(&q.codes, q.inp, q.spec.bits);
            let wpr = pack::words_per_row(q.inp, q.spec.bits);
            out.push((
                format!("{prefix}.weight_packed"),
                StoredTensor::i32(
                    &words.iter().map(|&w| w as i32).collect::<Vec<_>>(),
                    &[q.out, wpr],
                ),
            ));
            let scale: Vec<f32> = q.params.iter().map(|p| p.scale).collect();
            out.push((
                format!("{prefix}.weight_scale"),
                StoredTensor::f32(&scale, &[q.out, ng]),
            ));
            let half = (1u32 << (q.spec.bits - 1)) as f32;
            if q.spec.symmetric && q.params.iter().any(|p| p.zero != half) {
                let z: Vec<i32> = q.params.iter().map(|p| p.zero as i32).collect();
                out.push((
                    format!("{prefix}.weight_zero"),
                    StoredTensor::i32(&z, &[q.out, ng]),
                ));
            }
            if !q.spec.symmetric {
                if q.params.iter().any(|p| p.offset != 0.0) {
                    let m: Vec<f32> = q.params.iter().map(|p| p.offset).collect();
                    out.push((
                        format!("{prefix}.weight_offset"),
                        StoredTensor::f32(&m, &[q.out, ng]),
                    ));
                } else {
                    let z: Vec<i32> = q.params.iter().map(|p| p.zero as i32).collect();
                    out.push((
                        format!("{prefix}.weight_zero"),
                        StoredTensor::i32(&z, &[q.out, ng]),
                    ));
                }
            }
            out.push((
                format!("{prefix}.weight_shape"),
                StoredTensor::i64(&[q.out as i64, q.inp as i64], &[2]),
            ));
        }
        None => out.push((
            format!("{prefix}.weight"),
            StoredTensor::from_f32(l.weight_ref())?,
        )),
    }
    if let Some(b) = l.bias() {
        out.push((format!("{prefix}.bias"), StoredTensor::from_f32(b)?));
    }
    if let Some(a) = l.act_quantizer() {
        let a = a.spec()?;
        out.push((
            format!("{prefix}.input_clip"),
            StoredTensor::f32(&[a.clip, a.clip_min], &[2]),
        ));
    }
    Ok(out)
}

/// Reads a transform written by [`transform_tensors`], if `{prefix}.dims` exists.
pub fn load_transform(
    store: &TensorStore,
    prefix: &str,
    n: usize,
) -> Result<Option<KroneckerTransform>> {
    let dims_name = format!("{prefix}.dims");
    if !store.contains(&dims_name) {
        return Ok(None);
    }
    let raw = store.raw(&dims_name)?;
    let path = store
        .path_of(&dims_name)
        .unwrap_or(store.first_path())
        .to_path_buf();
    let d: Vec<i64> = raw
        .data
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    if raw.dtype != safetensors::Dtype::I64
        || d.len() != 2
        || d[0] <= 0
        || d[1] <= 0
        || (d[0] * d[1]) as usize != n
    {
        return Err(Error::format(
            &path,
            format!("`{dims_name}` must be I64 [n1, n2] with n1·n2 = {n}"),
        ));
    }
    let (n1, n2) = (d[0] as usize, d[1] as usize);
    let get = |name: &str, shape: &[usize]| -> Result<Option<Tensor>> {
        let full = format!("{prefix}.{name}");
        if store.contains(&full) {
            Ok(Some(store.f32(&full, shape)?))
        } else {
            Ok(None)
        }
    };
    Ok(Some(KroneckerTransform {
        n1,
        n2,
        p1: get("p1", &[n1, n1])?,
        p2: get("p2", &[n2, n2])?,
        scale: get("scale", &[n])?,
    }))
}

/// Tensors of an online transform under `prefix` (`dims`, and the factors that are not identity).
pub fn transform_tensors(
    t: &KroneckerTransform,
    prefix: &str,
) -> Result<Vec<(String, StoredTensor)>> {
    let mut v = vec![(
        format!("{prefix}.dims"),
        StoredTensor::i64(&[t.n1 as i64, t.n2 as i64], &[2]),
    )];
    for (name, x) in [("p1", &t.p1), ("p2", &t.p2), ("scale", &t.scale)] {
        if let Some(x) = x {
            v.push((format!("{prefix}.{name}"), StoredTensor::from_f32(x)?));
        }
    }
    Ok(v)
}

/// Writes `model` (quantized in memory) as a checkpoint in `out`; see [`CheckpointWriter`].
pub fn write(
    model: &Model,
    src_dir: &Path,
    src_config: &Path,
    qcfg: &QuantConfig,
    out: &Path,
    force: bool,
    extra: &[(String, String)],
) -> Result<()> {
    let mut w = CheckpointWriter::create(out, force)?;
    for b in &model.blocks {
        w.add_block(b)?;
    }
    w.finish(model, src_dir, src_config, qcfg, extra)
}

/// A checkpoint written block by block as blocks are finished, so a quantization holds one block
/// at a time: the blocks' tensors go to a spool ([`SpooledSafetensors`]); [`Self::finish`] adds
/// the embedding, norm and head, a copy of the source model's config (with its
/// `quantization_config`) and tokenizer files, plus `extra` files (name, contents) such as the
/// calibration log. Crash-safe: everything is written in a temporary directory beside `out`, then
/// renamed; dropped unfinished, nothing is left.
pub struct CheckpointWriter {
    tmp: TempDir,
    tensors: SpooledSafetensors,
    out: std::path::PathBuf,
    force: bool,
}

impl CheckpointWriter {
    pub fn create(out: &Path, force: bool) -> Result<Self> {
        crate::fsutil::check_output(out, force)?;
        let tmp = TempDir::beside(out)?;
        let tensors = SpooledSafetensors::create(&tmp.path().join("model.safetensors"))?;
        Ok(CheckpointWriter {
            tmp,
            tensors,
            out: out.to_path_buf(),
            force,
        })
    }

    pub fn add_block(&mut self, b: &Block) -> Result<()> {
        self.tensors.add(block_tensors(b)?)
    }

    /// `ends`: the model whose embedding, final norm and head are written (its blocks are not:
    /// those were added).
    pub fn finish(
        mut self,
        ends: &Model,
        src_dir: &Path,
        src_config: &Path,
        qcfg: &QuantConfig,
        extra: &[(String, String)],
    ) -> Result<()> {
        // The embedding, norm and head (when not tied), one tensor in memory at a time.
        self.tensors.add(vec![(
            "model.embed_tokens.weight".to_string(),
            StoredTensor::from_f32(&ends.embed)?,
        )])?;
        self.tensors.add(vec![(
            "model.norm.weight".to_string(),
            StoredTensor::from_f32(&ends.norm)?,
        )])?;
        if !ends.tied_head {
            for t in linear_tensors(ends.head.as_ref(), "lm_head")? {
                self.tensors.add(vec![t])?;
            }
        }
        let mut meta = std::collections::BTreeMap::new();
        meta.insert("format".to_string(), "pt".to_string());
        meta.insert("affq.version".to_string(), crate::VERSION.to_string());
        meta.insert(
            "affq.quantization".to_string(),
            serde_json::to_string(qcfg).unwrap_or_default(),
        );
        self.tensors.finish(&meta)?;
        let tmp = self.tmp;

        let text = std::fs::read_to_string(src_config).map_err(|e| Error::io(src_config, e))?;
        let mut cfg: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::format(src_config, e.to_string()))?;
        cfg["quantization_config"] =
            serde_json::to_value(qcfg).map_err(|e| Error::Runtime(e.to_string()))?;
        cfg["tie_word_embeddings"] = serde_json::json!(ends.tied_head);
        write_json(&tmp.path().join("config.json"), &cfg)?;
        for f in [
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
            "generation_config.json",
            "tokenizer.model",
        ] {
            let p = src_dir.join(f);
            if p.is_file() {
                std::fs::copy(&p, tmp.path().join(f)).map_err(|e| Error::io(&p, e))?;
            }
        }
        for (name, contents) in extra {
            let p = tmp.path().join(name);
            std::fs::write(&p, contents).map_err(|e| Error::io(&p, e))?;
        }
        tmp.persist(&self.out, self.force)
    }
}

//! The decoder, written block by block so that calibration can (a) run one block on a batch of
//! hidden states, (b) observe every linear layer's input, and (c) swap any linear layer for a
//! quantized one. Llama, Mistral, Qwen2 and Qwen3 share this one block; their differences are
//! configuration flags (biases, q/k norm, sliding window, RoPE scaling).
//!
//! Two numerically equivalent paths: `Mode::Eval` uses candle's fused kernels (rms_norm, rope,
//! softmax_last_dim) and causal chunking; `Mode::Train` uses only ops with gradients (candle.md §2).

use crate::checkpoint::QuantConfig;
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::quant::{ActQuantizer, QuantLinear, QuantSpec};
use crate::transforms::KroneckerTransform;
use crate::weights::{Checkpoint, StoredTensor, TensorStore};
use candle_core::{DType, Device, Tensor, D};
use rayon::prelude::*;
use std::sync::Arc;

/// The seven linear layers of a decoder block, in execution order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LinearKind {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl LinearKind {
    pub const ALL: [LinearKind; 7] = [
        LinearKind::Q,
        LinearKind::K,
        LinearKind::V,
        LinearKind::O,
        LinearKind::Gate,
        LinearKind::Up,
        LinearKind::Down,
    ];

    /// Module path inside a Hugging Face decoder layer.
    pub fn hf_name(self) -> &'static str {
        match self {
            LinearKind::Q => "self_attn.q_proj",
            LinearKind::K => "self_attn.k_proj",
            LinearKind::V => "self_attn.v_proj",
            LinearKind::O => "self_attn.o_proj",
            LinearKind::Gate => "mlp.gate_proj",
            LinearKind::Up => "mlp.up_proj",
            LinearKind::Down => "mlp.down_proj",
        }
    }

    pub fn short(self) -> &'static str {
        match self {
            LinearKind::Q => "q",
            LinearKind::K => "k",
            LinearKind::V => "v",
            LinearKind::O => "o",
            LinearKind::Gate => "gate",
            LinearKind::Up => "up",
            LinearKind::Down => "down",
        }
    }

    fn index(self) -> usize {
        self as usize
    }

    /// (out, in) for this layer in a model of configuration `c`.
    pub fn shape(self, c: &ModelConfig) -> (usize, usize) {
        let (d, f) = (c.hidden_size, c.intermediate_size);
        match self {
            LinearKind::Q => (c.q_dim(), d),
            LinearKind::K | LinearKind::V => (c.kv_dim(), d),
            LinearKind::O => (d, c.q_dim()),
            LinearKind::Gate | LinearKind::Up => (f, d),
            LinearKind::Down => (d, f),
        }
    }

    fn has_bias(self, c: &ModelConfig) -> bool {
        match self {
            LinearKind::Q | LinearKind::K | LinearKind::V => c.qkv_bias,
            LinearKind::O => c.o_bias,
            LinearKind::Gate | LinearKind::Up | LinearKind::Down => c.mlp_bias,
        }
    }
}

/// A linear map `y = x·Wᵀ + b` over the last dimension. Quantized layers implement this too.
pub trait LinearLayer: Send + Sync {
    /// `x`: `[..., in]` → `[..., out]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor>;
    /// The effective weight `[out, in]` in f32 (dequantized for quantized layers).
    fn weight_ref(&self) -> &Tensor;
    fn bias(&self) -> Option<&Tensor>;
    /// Tensors to store under `prefix` (e.g. `model.layers.0.self_attn.q_proj`).
    fn export(&self, prefix: &str) -> Result<Vec<(String, StoredTensor)>>;

    fn weight(&self) -> Result<Tensor> {
        Ok(self.weight_ref().clone())
    }
    fn in_features(&self) -> usize {
        self.weight_ref().dims()[1]
    }
    fn out_features(&self) -> usize {
        self.weight_ref().dims()[0]
    }
    /// The per-token quantizer this layer applies to its input, if any.
    fn act_quantizer(&self) -> Option<std::sync::Arc<dyn crate::quant::ActQuantizer>> {
        None
    }
    /// The same layer with its tensors cut from any autograd graph.
    fn detached(&self) -> Box<dyn LinearLayer>;
    /// This layer as a simulated quantized layer, if it is one.
    fn as_quant(&self) -> Option<&crate::quant::QuantLinear> {
        None
    }
    /// This layer as an integer-kernel layer, if it is one.
    fn int_kernel(&self) -> Option<&crate::kernels::int_linear::IntLinear> {
        None
    }
}

/// A full-precision linear layer.
pub struct DenseLinear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

/// `x·Wᵀ + b` for any leading shape; `w` is `[out, in]`.
pub fn linear_forward(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let n_in = *dims.last().expect("linear input has a feature dim");
    let rows: usize = dims[..dims.len() - 1].iter().product();
    let y = x.reshape((rows, n_in))?.matmul(&w.t()?)?;
    let y = match b {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    };
    let mut out_dims = dims;
    *out_dims.last_mut().unwrap() = w.dim(0)?;
    Ok(y.reshape(out_dims)?)
}

impl LinearLayer for DenseLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        linear_forward(x, &self.weight, self.bias.as_ref())
    }
    fn weight_ref(&self) -> &Tensor {
        &self.weight
    }
    fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
    fn detached(&self) -> Box<dyn LinearLayer> {
        Box::new(DenseLinear {
            weight: self.weight.detach(),
            bias: self.bias.as_ref().map(Tensor::detach),
        })
    }
    fn export(&self, prefix: &str) -> Result<Vec<(String, StoredTensor)>> {
        let mut v = vec![(
            format!("{prefix}.weight"),
            StoredTensor::from_f32(&self.weight)?,
        )];
        if let Some(b) = &self.bias {
            v.push((format!("{prefix}.bias"), StoredTensor::from_f32(b)?));
        }
        Ok(v)
    }
}

/// Where an online transform can sit: the input of a group of linears sharing it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Site {
    /// `input_layernorm` output → q, k, v.
    AttnIn,
    /// Attention output → o_proj.
    OIn,
    /// `post_attention_layernorm` output → gate, up.
    MlpIn,
    /// `silu(gate)·up` → down_proj.
    DownIn,
}

impl Site {
    pub const ALL: [Site; 4] = [Site::AttnIn, Site::OIn, Site::MlpIn, Site::DownIn];

    pub fn name(self) -> &'static str {
        match self {
            Site::AttnIn => "attn_in",
            Site::OIn => "o_in",
            Site::MlpIn => "mlp_in",
            Site::DownIn => "down_in",
        }
    }

    pub fn dim(self, c: &ModelConfig) -> usize {
        match self {
            Site::AttnIn | Site::MlpIn => c.hidden_size,
            Site::OIn => c.q_dim(),
            Site::DownIn => c.intermediate_size,
        }
    }

    pub fn linears(self) -> &'static [LinearKind] {
        match self {
            Site::AttnIn => &[LinearKind::Q, LinearKind::K, LinearKind::V],
            Site::OIn => &[LinearKind::O],
            Site::MlpIn => &[LinearKind::Gate, LinearKind::Up],
            Site::DownIn => &[LinearKind::Down],
        }
    }
}

/// Per-head transforms of queries and keys after RoPE, `q ← q·Q`, `k ← k·K` with `Q·Kᵀ = I` so
/// that `q·kᵀ` is unchanged; they shape the key distribution for KV-cache quantization.
#[derive(Clone)]
pub struct QkTransform {
    /// `[hd, hd]` shared by all query heads, or `[heads, hd, hd]`.
    pub q: Tensor,
    /// `[hd, hd]` shared by all KV heads, or `[kv_heads, hd, hd]`.
    pub k: Tensor,
}

/// Which implementation of the shared ops to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Fused kernels, causal chunking; no gradients.
    Eval,
    /// Composed, differentiable ops only.
    Train,
}

/// The input of the linears at one site: the transformed dense activations, or (eval mode, every
/// linear there an integer-kernel layer with the same activation grid) the activations
/// transformed and quantized once by the fused kernel and shared by those linears.
enum SiteInput {
    Dense(Tensor),
    /// The outputs of the site's linears side by side, and each one's kind and first column.
    Int(Tensor, Vec<(LinearKind, usize)>),
    #[cfg(feature = "cuda")]
    Gpu(
        crate::kernels::cuda::DeviceActs,
        Vec<usize>,
        Arc<crate::kernels::cuda::Cuda>,
        /// The site input on the device, alive while the kernels that read it may run.
        #[allow(dead_code)]
        crate::kernels::cuda::DeviceBuffer,
    ),
}

impl SiteInput {
    fn new(
        block: &Block,
        site: Site,
        x: &Tensor,
        kinds: &[LinearKind],
        mode: Mode,
    ) -> Result<Self> {
        let ints: Vec<_> = kinds
            .iter()
            .filter_map(|&k| block.linear(k).int_kernel())
            .collect();
        if mode == Mode::Eval && ints.len() == kinds.len() {
            let spec = ints[0].act_spec();
            let transform = match (block.site(site), &block.fused[site as usize]) {
                (None, _) => Some(None),
                (Some(_), Some(f)) => Some(Some(f.as_ref())),
                (Some(_), None) => None, // not prepared for the integer path
            };
            #[cfg(feature = "cuda")]
            if let Some(g) = &block.gpu {
                use crate::kernels::cuda;
                let on_gpu = ints.iter().all(|l| l.cuda_weights().is_some())
                    && cuda::act_supported(&spec)
                    && ints.iter().all(|l| l.act_spec() == spec);
                if on_gpu {
                    let dims = x.dims();
                    let k = *dims.last().expect("feature dim");
                    let m = x.elem_count() / k.max(1);
                    let xd =
                        crate::kernels::int_linear::with_f32_slice(x, |xs| g.cuda.upload(xs))??;
                    let t = g.sites[site as usize].as_ref();
                    let acts = cuda::transform_quantize(&g.cuda, &xd, m, k, t, &spec)?;
                    return Ok(SiteInput::Gpu(
                        acts,
                        dims[..dims.len() - 1].to_vec(),
                        g.cuda.clone(),
                        xd,
                    ));
                }
            }
            if let (Some(transform), true) = (transform, ints.iter().all(|l| l.act_spec() == spec))
            {
                let op = crate::kernels::int_linear::IntSiteOp {
                    transform,
                    linears: &ints,
                };
                let mut cols = Vec::with_capacity(kinds.len());
                let mut col = 0;
                for (&kind, l) in kinds.iter().zip(&ints) {
                    cols.push((kind, col));
                    col += l.out_features();
                }
                return Ok(SiteInput::Int(op.forward(x)?, cols));
            }
        }
        Ok(SiteInput::Dense(block.apply_site(site, x)?))
    }

    fn project(&self, block: &Block, kind: LinearKind, hook: &mut dyn BlockHook) -> Result<Tensor> {
        match self {
            SiteInput::Dense(x) => block.lin(kind, x, hook),
            SiteInput::Int(y, cols) => {
                if cols.len() == 1 {
                    return Ok(y.clone());
                }
                let i = cols.iter().position(|c| c.0 == kind);
                let (_, col) = cols[i.expect("a linear of this site")];
                let n = block.linear(kind).out_features();
                Ok(y.narrow(candle_core::D::Minus1, col, n)?)
            }
            #[cfg(feature = "cuda")]
            SiteInput::Gpu(acts, lead, cuda, _) => {
                let w = block
                    .linear(kind)
                    .int_kernel()
                    .and_then(|l| l.cuda_weights())
                    .expect("checked in SiteInput::new");
                let yd = crate::kernels::cuda::gemm(cuda, acts, w)?;
                let mut y = vec![0f32; acts.m * w.n];
                cuda.download(&yd, &mut y)?;
                let mut dims = lead.clone();
                dims.push(w.n);
                Ok(Tensor::from_vec(y, dims, &candle_core::Device::Cpu)?)
            }
        }
    }
}

/// Observes the input of every linear layer during a block forward (calibration capture).
pub trait BlockHook {
    fn linear_input(&mut self, _kind: LinearKind, _x: &Tensor) -> Result<()> {
        Ok(())
    }
}

/// The hook that does nothing.
pub struct NoHook;
impl BlockHook for NoHook {}

/// `x / sqrt(mean(x²) + ε) · w` over the last dimension.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64, mode: Mode) -> Result<Tensor> {
    Ok(match mode {
        Mode::Eval => candle_nn::ops::rms_norm(&x.contiguous()?, w, eps as f32)?,
        Mode::Train => candle_nn::ops::rms_norm_slow(x, w, eps as f32)?,
    })
}

/// RoPE tables for rotate-half (HF) convention: `cos`, `sin` are `[max_len, head_dim/2]`.
pub struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    pub fn new(cfg: &ModelConfig, max_len: usize) -> Result<Self> {
        let inv = cfg.rope_inv_freq();
        let half = inv.len();
        let mut cos = Vec::with_capacity(max_len * half);
        let mut sin = Vec::with_capacity(max_len * half);
        for p in 0..max_len {
            for &f in &inv {
                // Angles in f64 (as the oracle's float64 tables), rounded once to f32.
                let a = p as f64 * f;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
        Ok(Rope {
            cos: Tensor::from_vec(cos, (max_len, half), &Device::Cpu)?,
            sin: Tensor::from_vec(sin, (max_len, half), &Device::Cpu)?,
        })
    }

    pub fn max_len(&self) -> usize {
        self.cos.dims()[0]
    }

    /// Rotates `x` `[B, H, T, D]` at positions `0..T`.
    pub fn apply(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        let t = x.dim(2)?;
        if t > self.max_len() {
            return Err(Error::Runtime(format!(
                "sequence of {t} tokens exceeds the RoPE table ({})",
                self.max_len()
            )));
        }
        let cos = self.cos.narrow(0, 0, t)?;
        let sin = self.sin.narrow(0, 0, t)?;
        Ok(match mode {
            Mode::Eval => candle_nn::rotary_emb::rope(&x.contiguous()?, &cos, &sin)?,
            Mode::Train => candle_nn::rotary_emb::rope_slow(x, &cos, &sin)?,
        })
    }
}

/// Additive causal mask `[g·T, T]` for `g` query heads sharing a KV head: 0 where visible, −∞ for
/// future keys and keys outside a sliding window.
fn attention_mask(g: usize, t: usize, window: Option<usize>) -> Result<Tensor> {
    let mut m = vec![0f32; g * t * t];
    for (r, row) in m.chunks_exact_mut(t).enumerate() {
        let pos = r % t;
        for (j, v) in row.iter_mut().enumerate() {
            if j > pos || window.is_some_and(|w| pos - j >= w.max(1)) {
                *v = f32::NEG_INFINITY;
            }
        }
    }
    Ok(Tensor::from_vec(m, (g * t, t), &Device::Cpu)?)
}

/// One decoder layer. Cloning is cheap: tensors and layers are shared.
#[derive(Clone)]
pub struct Block {
    pub index: usize,
    pub config: Arc<ModelConfig>,
    pub input_norm: Tensor,
    pub post_norm: Tensor,
    /// Per-head RMSNorm weights on q and k (Qwen3).
    pub q_norm: Option<Tensor>,
    pub k_norm: Option<Tensor>,
    linears: Vec<Arc<dyn LinearLayer>>,
    /// Online transforms at the four input sites, indexed like `Site::ALL`.
    pub online: [Option<KroneckerTransform>; 4],
    /// The online transforms as dense factors for the fused integer kernel (set by
    /// `Model::use_int_kernels`; `set_site` clears its entry).
    fused: [Option<Arc<crate::kernels::int_linear::FusedTransform>>; 4],
    /// Set by `Model::use_cuda`: the integer sites run on the GPU.
    #[cfg(feature = "cuda")]
    gpu: Option<Arc<crate::kernels::cuda::GpuSites>>,
    pub qk_transform: Option<QkTransform>,
    /// Per-(token, head) quantization of keys (after RoPE and the Q/K transform) and values.
    pub k_quant: Option<Arc<dyn ActQuantizer>>,
    pub v_quant: Option<Arc<dyn ActQuantizer>>,
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

impl Block {
    /// Loads layer `i` from `store`: full-precision linears, or packed quantized ones when the
    /// checkpoint carries them (`quant` is its quantization_config).
    pub fn load(
        store: &TensorStore,
        config: Arc<ModelConfig>,
        i: usize,
        quant: Option<&QuantConfig>,
    ) -> Result<Self> {
        let c = &*config;
        let p = format!("model.layers.{i}");
        let act = quant.and_then(|q| q.activations);
        let mut linears: Vec<Arc<dyn LinearLayer>> = Vec::with_capacity(7);
        for kind in LinearKind::ALL {
            let (o, n) = kind.shape(c);
            let name = format!("{p}.{}", kind.hf_name());
            linears.push(Arc::from(load_linear(
                store,
                &name,
                o,
                n,
                kind.has_bias(c),
                quant,
                act,
            )?));
        }
        let d = c.hidden_size;
        let (q_norm, k_norm) = if c.qk_norm {
            (
                Some(store.f32(&format!("{p}.self_attn.q_norm.weight"), &[c.head_dim])?),
                Some(store.f32(&format!("{p}.self_attn.k_norm.weight"), &[c.head_dim])?),
            )
        } else {
            (None, None)
        };
        let mut online: [Option<KroneckerTransform>; 4] = Default::default();
        for (slot, site) in online.iter_mut().zip(Site::ALL) {
            *slot = KroneckerTransform::load(
                store,
                &format!("{p}.online.{}", site.name()),
                site.dim(c),
            )?;
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
        Ok(Block {
            index: i,
            input_norm: store.f32(&format!("{p}.input_layernorm.weight"), &[d])?,
            post_norm: store.f32(&format!("{p}.post_attention_layernorm.weight"), &[d])?,
            q_norm,
            k_norm,
            linears,
            online,
            fused: Default::default(),
            #[cfg(feature = "cuda")]
            gpu: None,
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
            config,
        })
    }

    /// Tensors of this block for a checkpoint.
    pub fn export(&self) -> Result<Vec<(String, StoredTensor)>> {
        let p = format!("model.layers.{}", self.index);
        let mut v = vec![
            (
                format!("{p}.input_layernorm.weight"),
                StoredTensor::from_f32(&self.input_norm)?,
            ),
            (
                format!("{p}.post_attention_layernorm.weight"),
                StoredTensor::from_f32(&self.post_norm)?,
            ),
        ];
        if let (Some(q), Some(k)) = (&self.q_norm, &self.k_norm) {
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
            v.extend(
                self.linear(kind)
                    .export(&format!("{p}.{}", kind.hf_name()))?,
            );
        }
        for (t, site) in self.online.iter().zip(Site::ALL) {
            if let Some(t) = t {
                v.extend(t.export(&format!("{p}.online.{}", site.name()))?);
            }
        }
        if let Some(qk) = &self.qk_transform {
            v.push((
                format!("{p}.self_attn.qk_transform.q"),
                StoredTensor::from_f32(&qk.q)?,
            ));
            v.push((
                format!("{p}.self_attn.qk_transform.k"),
                StoredTensor::from_f32(&qk.k)?,
            ));
        }
        for (name, qz) in [("k_quant", &self.k_quant), ("v_quant", &self.v_quant)] {
            if let Some(qz) = qz {
                v.push((
                    format!("{p}.self_attn.{name}.clip"),
                    clip_tensor(&qz.spec()?),
                ));
            }
        }
        Ok(v)
    }

    pub fn site(&self, site: Site) -> Option<&KroneckerTransform> {
        self.online[site as usize].as_ref()
    }

    pub fn set_site(&mut self, site: Site, t: Option<KroneckerTransform>) {
        self.online[site as usize] = t;
        self.fused[site as usize] = None;
    }

    fn apply_site(&self, site: Site, x: &Tensor) -> Result<Tensor> {
        match self.site(site) {
            Some(t) => t.apply(x),
            None => Ok(x.clone()),
        }
    }

    pub fn linear(&self, kind: LinearKind) -> &dyn LinearLayer {
        self.linears[kind.index()].as_ref()
    }

    /// Replaces one linear layer (e.g. by a quantized one); shapes must agree.
    pub fn set_linear(&mut self, kind: LinearKind, layer: Box<dyn LinearLayer>) -> Result<()> {
        let (o, n) = kind.shape(&self.config);
        if layer.out_features() != o || layer.in_features() != n {
            return Err(Error::Runtime(format!(
                "layer {} {}: replacement is {}x{}, expected {o}x{n}",
                self.index,
                kind.short(),
                layer.out_features(),
                layer.in_features()
            )));
        }
        self.linears[kind.index()] = Arc::from(layer);
        Ok(())
    }

    /// Cuts every tensor of the block from the autograd graph of its calibration: a deployed
    /// block built from trained variables would otherwise record (and keep alive) the graph of
    /// every forward pass run through it.
    pub fn detach(&mut self) {
        self.input_norm = self.input_norm.detach();
        self.post_norm = self.post_norm.detach();
        self.q_norm = self.q_norm.as_ref().map(Tensor::detach);
        self.k_norm = self.k_norm.as_ref().map(Tensor::detach);
        for t in self.online.iter_mut().flatten() {
            t.p1 = t.p1.as_ref().map(Tensor::detach);
            t.p2 = t.p2.as_ref().map(Tensor::detach);
            t.scale = t.scale.as_ref().map(Tensor::detach);
        }
        if let Some(qk) = &mut self.qk_transform {
            qk.q = qk.q.detach();
            qk.k = qk.k.detach();
        }
        for l in self.linears.iter_mut() {
            *l = Arc::from(l.detached());
        }
    }

    fn lin(&self, kind: LinearKind, x: &Tensor, hook: &mut dyn BlockHook) -> Result<Tensor> {
        hook.linear_input(kind, x)?;
        self.linears[kind.index()].forward(x)
    }

    /// `x`: `[B, T, hidden]` → `[B, T, hidden]`.
    pub fn forward(
        &self,
        x: &Tensor,
        rope: &Rope,
        mode: Mode,
        hook: &mut dyn BlockHook,
    ) -> Result<Tensor> {
        use LinearKind::*;
        let c = &*self.config;
        let eps = c.rms_norm_eps;
        let h = rms_norm(x, &self.input_norm, eps, mode)?;
        let qkv = SiteInput::new(self, Site::AttnIn, &h, &[Q, K, V], mode)?;
        let attn = self.attention(rope, mode, &mut |k| qkv.project(self, k, hook))?;
        let o_in = SiteInput::new(self, Site::OIn, &attn, &[O], mode)?;
        let x = (x + o_in.project(self, O, hook)?)?;
        let h = rms_norm(&x, &self.post_norm, eps, mode)?;
        let mlp = SiteInput::new(self, Site::MlpIn, &h, &[Gate, Up], mode)?;
        let gate = mlp.project(self, Gate, hook)?;
        let up = mlp.project(self, Up, hook)?;
        let act = (candle_nn::ops::silu(&gate)? * up)?;
        let down_in = SiteInput::new(self, Site::DownIn, &act, &[Down], mode)?;
        let down = down_in.project(self, Down, hook)?;
        Ok((x + down)?)
    }

    /// Self-attention given the q/k/v projections of the normed input (`proj`, each
    /// `[B, T, heads·D]`); returns the o_proj input `[B, T, H·D]`.
    fn attention(
        &self,
        rope: &Rope,
        mode: Mode,
        proj: &mut dyn FnMut(LinearKind) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let c = &*self.config;
        let (nh, nkv, hd) = (c.num_heads, c.num_kv_heads, c.head_dim);
        let g = nh / nkv;
        let q = proj(LinearKind::Q)?;
        let (b, t, _) = q.dims3()?;
        let q = q.reshape((b, t, nh, hd))?;
        let k = proj(LinearKind::K)?.reshape((b, t, nkv, hd))?;
        let v = proj(LinearKind::V)?.reshape((b, t, nkv, hd))?;
        let (q, k) = match (&self.q_norm, &self.k_norm) {
            (Some(qn), Some(kn)) => (
                rms_norm(&q, qn, c.rms_norm_eps, mode)?,
                rms_norm(&k, kn, c.rms_norm_eps, mode)?,
            ),
            _ => (q, k),
        };
        let q = rope.apply(&q.transpose(1, 2)?.contiguous()?, mode)?; // [B, H, T, D]
        let k = rope.apply(&k.transpose(1, 2)?.contiguous()?, mode)?; // [B, Hkv, T, D]
        let v = v.transpose(1, 2)?.contiguous()?;
        let (q, k) = match &self.qk_transform {
            Some(t) => (q.broadcast_matmul(&t.q)?, k.broadcast_matmul(&t.k)?),
            None => (q, k),
        };
        let k = match &self.k_quant {
            Some(qz) => qz.apply(&k, hd)?,
            None => k,
        };
        let v = match &self.v_quant {
            Some(qz) => qz.apply(&v, hd)?,
            None => v,
        };
        let scale = 1.0 / (hd as f64).sqrt();
        if mode == Mode::Eval {
            return Ok(crate::kernels::attention::causal_attention(
                &q,
                &k,
                &v,
                scale as f32,
                c.sliding_window,
            )?);
        }
        // Differentiable path. Query head h reads KV head h / g: view q as [B, Hkv, g·T, D] so one
        // batched matmul per KV head serves its g query heads without repeating K and V.
        let q = (q.reshape((b, nkv, g * t, hd))? * scale)?;
        let scores = q.matmul(&k.t()?)?;
        let scores = scores.broadcast_add(&attention_mask(g, t, c.sliding_window)?)?;
        // Softmax with the row max detached: it cancels mathematically, and its mask-based
        // backward over the whole score tensor would be wasted work.
        let m = scores.max_keepdim(D::Minus1)?.detach();
        let e = scores.broadcast_sub(&m)?.exp()?;
        let p = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
        let o = p.matmul(&v)?; // [B, Hkv, g·T, D]
        Ok(o.reshape((b, nh, t, hd))?
            .transpose(1, 2)?
            .reshape((b, t, nh * hd))?)
    }
}

/// Loads one linear layer: packed quantized (`{name}.weight_packed`), dense with input
/// quantization, or plain dense.
fn load_linear(
    store: &TensorStore,
    name: &str,
    out: usize,
    inp: usize,
    has_bias: bool,
    quant: Option<&QuantConfig>,
    act: Option<QuantSpec>,
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
        return Ok(Box::new(QuantLinear::load(
            store, name, out, inp, &spec, act,
        )?));
    }
    let weight = store.f32(&format!("{name}.weight"), &[out, inp])?;
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

/// A whole causal LM: embedding, blocks, final norm and head.
pub struct Model {
    pub config: Arc<ModelConfig>,
    pub embed: Tensor,
    pub blocks: Vec<Block>,
    pub norm: Tensor,
    pub head: Box<dyn LinearLayer>,
    /// The head is the embedding matrix (not stored separately).
    pub tied_head: bool,
    pub rope: Rope,
    /// The checkpoint's quantization_config, when it is a quantized checkpoint.
    pub quant: Option<QuantConfig>,
}

impl Model {
    pub fn load(ckpt: &Checkpoint, max_len: usize) -> Result<Self> {
        let config = Arc::new(ckpt.config.clone());
        let c = &*config;
        let store = &ckpt.store;
        let quant = ckpt.quant.clone();
        let embed = store.f32("model.embed_tokens.weight", &[c.vocab_size, c.hidden_size])?;
        let blocks = (0..c.num_layers)
            .map(|i| Block::load(store, config.clone(), i, quant.as_ref()))
            .collect::<Result<Vec<_>>>()?;
        let norm = store.f32("model.norm.weight", &[c.hidden_size])?;
        let head_act = quant
            .as_ref()
            .filter(|q| q.quantize_head)
            .and_then(|q| q.activations);
        let has_head = store.contains("lm_head.weight") || store.contains("lm_head.weight_packed");
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
            quant,
        })
    }

    pub fn head_weight(&self) -> Tensor {
        self.head.weight().expect("head weight")
    }

    /// Every tensor of the model for a checkpoint (the head only when not tied).
    pub fn export(&self) -> Result<Vec<(String, StoredTensor)>> {
        let mut v = vec![
            (
                "model.embed_tokens.weight".to_string(),
                StoredTensor::from_f32(&self.embed)?,
            ),
            (
                "model.norm.weight".to_string(),
                StoredTensor::from_f32(&self.norm)?,
            ),
        ];
        if !self.tied_head {
            v.extend(self.head.export("lm_head")?);
        }
        for b in &self.blocks {
            v.extend(b.export()?);
        }
        Ok(v)
    }

    /// Hidden states entering block 0: `[B, T, hidden]`.
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let flat = ids.flatten_all()?;
        Ok(self
            .embed
            .index_select(&flat, 0)?
            .reshape((b, t, self.config.hidden_size))?)
    }

    /// Final-normed hidden states `[B, T, hidden]` for token ids `[B, T]`.
    pub fn hidden_states(&self, ids: &Tensor, mode: Mode) -> Result<Tensor> {
        let mut h = self.embed(ids)?;
        for block in &self.blocks {
            h = block.forward(&h, &self.rope, mode, &mut NoHook)?;
        }
        rms_norm(&h, &self.norm, self.config.rms_norm_eps, mode)
    }

    /// Replaces every quantized linear whose scheme has an integer kernel by its integer-kernel
    /// form and prepares each site's transform for the fused kernel (in bf16 with
    /// `bf16_transforms` where the CPU can). Returns how many layers were converted and how many
    /// transforms run in bf16.
    pub fn use_int_kernels(
        &mut self,
        isa: crate::kernels::int_gemm::Isa,
        bf16_transforms: bool,
    ) -> Result<(usize, usize)> {
        use crate::kernels::int_linear::{FusedTransform, IntLinear};
        let (mut n, mut bf16) = (0, 0);
        for b in &mut self.blocks {
            for site in Site::ALL {
                b.fused[site as usize] = match b.site(site) {
                    Some(t) => {
                        let mut f = FusedTransform::new(t)?;
                        if bf16_transforms {
                            f = f.with_bf16();
                            bf16 += f.is_bf16() as usize;
                        }
                        Some(Arc::new(f))
                    }
                    None => None,
                };
            }
            for kind in LinearKind::ALL {
                let conv = match b.linear(kind).as_quant() {
                    Some(q) => IntLinear::from_quant(q, isa)?,
                    None => None,
                };
                if let Some(l) = conv {
                    b.set_linear(kind, Box::new(l))?;
                    n += 1;
                }
            }
        }
        if let Some(l) = match self.head.as_quant() {
            Some(q) => IntLinear::from_quant(q, isa)?,
            None => None,
        } {
            self.head = Box::new(l);
            n += 1;
        }
        Ok((n, bf16))
    }

    /// Moves the integer sites to the GPU (after [`Self::use_int_kernels`]): uploads every
    /// integer layer's weights and each site's transform. Returns the number of layers moved.
    #[cfg(feature = "cuda")]
    pub fn use_cuda(&mut self, cuda: &Arc<crate::kernels::cuda::Cuda>) -> Result<usize> {
        use crate::kernels::cuda::{CudaTransform, GpuSites};
        let mut n = 0;
        for b in &mut self.blocks {
            let mut sites: [Option<CudaTransform>; 4] = Default::default();
            for site in Site::ALL {
                if let Some(f) = &b.fused[site as usize] {
                    sites[site as usize] = Some(CudaTransform::new(cuda, f)?);
                }
            }
            for kind in LinearKind::ALL {
                if let Some(l) = b.linear(kind).int_kernel() {
                    let mut l = l.detached_int();
                    l.attach_cuda(cuda)?;
                    b.set_linear(kind, Box::new(l))?;
                    n += 1;
                }
            }
            b.gpu = Some(Arc::new(GpuSites {
                cuda: cuda.clone(),
                sites,
            }));
        }
        Ok(n)
    }

    pub fn logits(&self, ids: &Tensor, mode: Mode) -> Result<Tensor> {
        let h = self.hidden_states(ids, mode)?;
        self.head.forward(&h)
    }

    /// Negative log-likelihood of `ids[t+1]` given `ids[..=t]` for one sequence, for the
    /// predicting positions `t = first..T−1` (so `T − 1 − first` values). The head runs in row
    /// chunks so the `[T, vocab]` logits never exist at once.
    pub fn nll(&self, ids: &[u32], first: usize) -> Result<Vec<f64>> {
        let t = ids.len();
        if t < 2 || first >= t - 1 {
            return Ok(Vec::new());
        }
        let ids_t = Tensor::from_slice(ids, (1, t), &Device::Cpu)?;
        let h = self.hidden_states(&ids_t, Mode::Eval)?.squeeze(0)?;
        nll_from_hidden(
            &h.narrow(0, first, t - 1 - first)?,
            self.head.as_ref(),
            &ids[first + 1..],
        )
    }
}

/// NLL of `targets[r]` under logits `h[r]·Wᵀ`, log-softmax accumulated in f64.
pub fn nll_from_hidden(h: &Tensor, head: &dyn LinearLayer, targets: &[u32]) -> Result<Vec<f64>> {
    const ROWS: usize = 256;
    let n = h.dim(0)?;
    let vocab = head.out_features();
    let mut out = Vec::with_capacity(n);
    let mut s = 0;
    while s < n {
        let r = ROWS.min(n - s);
        let logits = head.forward(&h.narrow(0, s, r)?)?.to_dtype(DType::F32)?;
        let flat: Vec<f32> = logits.flatten_all()?.to_vec1()?;
        let rows: Vec<&[f32]> = flat.chunks_exact(vocab).collect();
        let lse: Vec<f64> = rows
            .par_iter()
            .map(|row| crate::kernels::fastmath::logsumexp(row))
            .collect();
        for (i, row) in rows.iter().enumerate() {
            let target = targets[s + i] as usize;
            if target >= vocab {
                return Err(Error::Runtime(format!(
                    "token id {target} outside the vocabulary ({vocab})"
                )));
            }
            out.push(lse[i] - row[target] as f64);
        }
        s += r;
    }
    Ok(out)
}

//! The linear layers of a decoder block and the two small traits backends implement: a linear
//! layer, and an input-site kernel that turns a site's input into its linears' outputs.

use super::config::ModelConfig;
use crate::error::Result;
use crate::quant::{ActQuantizer, QuantizedWeight};
use candle_core::Tensor;
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

    pub(crate) fn index(self) -> usize {
        self as usize
    }

    /// The site whose input this linear reads.
    pub fn site(self) -> Site {
        match self {
            LinearKind::Q | LinearKind::K | LinearKind::V => Site::AttnIn,
            LinearKind::O => Site::OIn,
            LinearKind::Gate | LinearKind::Up => Site::MlpIn,
            LinearKind::Down => Site::DownIn,
        }
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

    /// Whether the architecture gives this layer a bias.
    pub fn has_bias(self, c: &ModelConfig) -> bool {
        match self {
            LinearKind::Q | LinearKind::K | LinearKind::V => c.qkv_bias,
            LinearKind::O => c.o_bias,
            LinearKind::Gate | LinearKind::Up | LinearKind::Down => c.mlp_bias,
        }
    }
}

/// A linear map `y = x·Wᵀ + b` over the last dimension. Quantized layers (simulated, integer
/// kernels) implement it too; the decoder sees only this trait.
pub trait LinearLayer: Send + Sync {
    /// `x`: `[..., in]` → `[..., out]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor>;
    /// The effective weight `[out, in]` in f32 (dequantized for quantized layers; a model loaded
    /// for evaluation may hold full-precision weights in their stored 16-bit dtype).
    fn weight_ref(&self) -> &Tensor;
    fn bias(&self) -> Option<&Tensor>;

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
    fn act_quantizer(&self) -> Option<Arc<dyn ActQuantizer>> {
        None
    }
    /// The weight's codes and grid when the layer holds its weight quantized (what a checkpoint
    /// stores and what an integer kernel packs); `None` for full-precision weights.
    fn quantized_weight(&self) -> Option<&QuantizedWeight> {
        None
    }
    /// The same layer with its tensors cut from any autograd graph.
    fn detached(&self) -> Box<dyn LinearLayer>;
}

/// A full-precision linear layer.
pub struct DenseLinear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

/// `x·Wᵀ + b` for any leading shape; `w` is `[out, in]`. A 16-bit `w` is widened to `x`'s dtype
/// for the product (exactly the values an f32 copy would hold).
/// `act(x)·Wᵀ + b`: in calibration, with a learnable clip on the input, one node
/// ([`train_ops::QuantLinearOp`](super::train_ops::QuantLinearOp)); otherwise the quantizer and
/// [`linear_forward`].
pub fn quantized_linear_forward(
    x: &Tensor,
    act: &dyn ActQuantizer,
    w: &Tensor,
    b: Option<&Tensor>,
) -> Result<Tensor> {
    use candle_core::DType::F32;
    let k = w.dim(1)?;
    if let Some((hi, lo, spec)) = act.learned_clip() {
        if (x.track_op() || w.track_op() || hi.track_op() || lo.track_op())
            && x.dtype() == F32
            && w.dtype() == F32
            && x.device().is_cpu()
            && hi.elem_count() == 1
            && lo.elem_count() == 1
        {
            let clip = Tensor::cat(&[hi.flatten_all()?, lo.flatten_all()?], 0)?;
            let y = x.contiguous()?.apply_op3(
                &clip,
                &w.contiguous()?,
                super::train_ops::QuantLinearOp::new(spec, k),
            )?;
            return Ok(match b {
                Some(b) => y.broadcast_add(b)?,
                None => y,
            });
        }
    }
    linear_forward(&act.apply(x, k)?, w, b)
}

pub fn linear_forward(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    use candle_core::DType::F32;
    if (x.track_op() || w.track_op()) && x.dtype() == F32 && w.dtype() == F32 && x.device().is_cpu()
    {
        // Calibration: one graph node with its explicit backward (train_ops::LinearOp).
        let y = x
            .contiguous()?
            .apply_op2(&w.contiguous()?, super::train_ops::LinearOp::default())?;
        return Ok(match b {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        });
    }
    let dims = x.dims().to_vec();
    let n_in = *dims.last().expect("linear input has a feature dim");
    let rows: usize = dims[..dims.len() - 1].iter().product();
    let x = x.reshape((rows, n_in))?;
    let y = match super::train_ops::grid_forward(&x, w)? {
        Some(y) => y,
        None => match widened_matmul(&x, w)? {
            Some(y) => y,
            None => x.matmul(&w.t()?)?,
        },
    };
    let y = match b {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    };
    let mut out_dims = dims;
    *out_dims.last_mut().unwrap() = w.dim(0)?;
    Ok(y.reshape(out_dims)?)
}

thread_local! {
    /// The 16-bit weight of the current product widened to f32, kept for the next product on
    /// this thread (see [`widened_matmul`]).
    static WIDE: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `x·Wᵀ` for f32 rows `x` and a 16-bit CPU weight `W`, widened exactly into a buffer reused
/// across products: a fresh buffer per product (hundreds of MB at 8B shapes, above glibc's
/// largest mmap threshold) is mapped and faulted in page by page each time, which cost an
/// 8B-shaped block a quarter of its evaluation time. The product is candle's matmul of the
/// widened weight — the same GEMM, strides and thread count — so the bits are the same. `None`
/// for other operands.
fn widened_matmul(x: &Tensor, w: &Tensor) -> Result<Option<Tensor>> {
    use crate::strided_gemm::product;
    use candle_core::{CpuStorage, DType, Storage};
    if !matches!(w.dtype(), DType::F16 | DType::BF16) || x.dtype() != DType::F32 {
        return Ok(None);
    }
    let (m, k) = x.dims2()?;
    let (n, kw) = w.dims2()?;
    if k != kw || m == 0 || n == 0 || k == 0 {
        return Ok(None);
    }
    let x = x.contiguous()?;
    let (storage, layout) = x.storage_and_layout();
    let xs = match (&*storage, layout.contiguous_offsets()) {
        (Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) => &v[a..b],
        _ => return Ok(None),
    };
    let par = crate::strided_gemm::candle_parallelism();
    let y = WIDE.with(|wide| -> Result<Option<Vec<f32>>> {
        let mut wide = wide.borrow_mut();
        if !super::ops::widen_into(w, &mut wide)? {
            return Ok(None);
        }
        // y = x·Wᵀ: Wᵀ's element (i, j) is W[j·k + i] (column stride k, row stride 1).
        Ok(Some(product(
            (m, n, k),
            (xs, 1, k),
            (&wide, k, 1),
            1.0,
            par,
        )))
    })?;
    drop(storage);
    Ok(match y {
        Some(y) => Some(Tensor::from_vec(y, (m, n), x.device())?),
        None => None,
    })
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

/// A kernel for a whole input site (inference only): the site's input `[.., k]`, *before* its
/// online transform, to the outputs of the site's linears side by side, `[.., Σ nᵢ]`, in the
/// order of [`Site::linears`]. Backends install one per site ([`super::Block::set_site_kernel`])
/// when they can fuse the transform, the activation quantization and the linears.
pub trait SiteKernel: Send + Sync {
    fn forward(&self, x: &Tensor) -> Result<Tensor>;
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn sixteen_bit_weight_gives_the_f32_product_exactly() {
        // Widening f16/bf16 weights per product is exact: the same values an f32 copy holds, and
        // the same GEMM as candle's matmul of that copy, so the same product bit for bit — at a
        // toy shape and at one past the GEMM's blocking (k > 256, several column panels), with a
        // bias, and again after a larger weight has grown the reused buffer.
        for (xdims, n) in [(vec![2, 3, 4], 12), (vec![150, 300], 500), (vec![5, 3], 7)] {
            let k = xdims[xdims.len() - 1];
            let len: usize = xdims.iter().product();
            let w32: Vec<f32> = (0..n * k)
                .map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.173)
                .collect();
            let x = Tensor::from_vec(
                (0..len)
                    .map(|i| (i as f32 * 0.31).sin())
                    .collect::<Vec<_>>(),
                xdims.as_slice(),
                &Device::Cpu,
            )
            .unwrap();
            let bias = Tensor::from_vec(
                (0..n).map(|i| i as f32 * 0.01).collect::<Vec<_>>(),
                n,
                &Device::Cpu,
            )
            .unwrap();
            for dt in [DType::F16, DType::BF16] {
                let w16 = Tensor::from_vec(w32.clone(), (n, k), &Device::Cpu)
                    .unwrap()
                    .to_dtype(dt)
                    .unwrap();
                let wide = w16.to_dtype(DType::F32).unwrap();
                for b in [None, Some(&bias)] {
                    let a: Vec<f32> = linear_forward(&x, &w16, b)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1()
                        .unwrap();
                    let want: Vec<f32> = linear_forward(&x, &wide, b)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1()
                        .unwrap();
                    assert_eq!(a, want, "{dt:?} {xdims:?}·{n}");
                }
            }
        }
    }
}

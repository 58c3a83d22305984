//! Full-precision linears for decoding: a step of a few tokens multiplies each weight by a few
//! rows, which `kernels::gemv` streams once (16-bit weights widened on the fly, exactly); larger
//! batches (a prompt) go through the ordinary GEMM of [`linear_forward`].

use crate::error::Result;
use crate::kernels::gemv::{gemv, Weights};
use crate::model::{linear_forward, LinearKind, LinearLayer, Model};
use candle_core::{CpuStorage, Storage, Tensor};

/// Rows up to which the matrix–vector kernel runs (a decode step, or a few speculative tokens).
const GEMV_ROWS: usize = 8;

pub struct GemvLinear {
    weight: Tensor,
    bias: Option<Tensor>,
    bias_v: Option<Vec<f32>>,
}

impl GemvLinear {
    /// The decode form of a full-precision layer (no quantized weight, no input quantizer).
    pub fn from_layer(l: &dyn LinearLayer) -> Result<Option<Self>> {
        if l.quantized_weight().is_some() || l.act_quantizer().is_some() {
            return Ok(None);
        }
        let weight = narrow_if_exact(l.weight_ref().contiguous()?)?;
        let bias_v = l
            .bias()
            .map(|b| {
                b.flatten_all()?
                    .to_dtype(candle_core::DType::F32)?
                    .to_vec1::<f32>()
            })
            .transpose()?;
        Ok(Some(GemvLinear {
            weight,
            bias: l.bias().cloned(),
            bias_v,
        }))
    }
}

impl LinearLayer for GemvLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let k = *dims.last().unwrap_or(&0);
        let m: usize = dims[..dims.len().saturating_sub(1)].iter().product();
        if m == 0 || m > GEMV_ROWS || x.dtype() != candle_core::DType::F32 {
            return linear_forward(x, &self.weight, self.bias.as_ref());
        }
        let n = self.out_features();
        let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
        let y = {
            let (storage, layout) = self.weight.storage_and_layout();
            let w = match (&*storage, layout.contiguous_offsets()) {
                (Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) => Some(Weights::F32(&v[a..b])),
                (Storage::Cpu(CpuStorage::F16(v)), Some((a, b))) => Some(Weights::F16(&v[a..b])),
                (Storage::Cpu(CpuStorage::BF16(v)), Some((a, b))) => Some(Weights::Bf16(&v[a..b])),
                _ => None,
            };
            w.map(|w| gemv(&xs, m, k, w, n, self.bias_v.as_deref()))
        };
        let Some(y) = y else {
            return linear_forward(x, &self.weight, self.bias.as_ref());
        };
        let mut out = dims;
        *out.last_mut().unwrap() = n;
        Ok(Tensor::from_vec(y, out, x.device())?)
    }
    fn weight_ref(&self) -> &Tensor {
        &self.weight
    }
    fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
    fn detached(&self) -> Box<dyn LinearLayer> {
        Box::new(GemvLinear {
            weight: self.weight.detach(),
            bias: self.bias.as_ref().map(Tensor::detach),
            bias_v: self.bias_v.clone(),
        })
    }
}

/// Puts every full-precision linear of `model` (blocks and head) on the decode kernel; returns
/// how many.
/// An f32 weight whose every value is an f16 value (a 16-bit checkpoint's tensor written in f32,
/// e.g. a tied embedding/head) as f16: the same values, half the bytes a decode step reads.
fn narrow_if_exact(w: Tensor) -> Result<Tensor> {
    if w.dtype() != candle_core::DType::F32 {
        return Ok(w);
    }
    let exact = {
        let (storage, layout) = w.storage_and_layout();
        match (&*storage, layout.contiguous_offsets()) {
            (Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) => v[a..b]
                .iter()
                .all(|&x| half::f16::from_f32(x).to_f32().to_bits() == x.to_bits()),
            _ => false,
        }
    };
    Ok(if exact {
        w.to_dtype(candle_core::DType::F16)?
    } else {
        w
    })
}

/// Whether `a` (f32) holds exactly the values of `b` (f16), element for element.
fn same_values(a: &Tensor, b: &Tensor) -> Result<bool> {
    if a.dims() != b.dims() || a.dtype() != candle_core::DType::F32 {
        return Ok(false);
    }
    let (sa, la) = a.storage_and_layout();
    let (sb, lb) = b.storage_and_layout();
    Ok(
        match (&*sa, la.contiguous_offsets(), &*sb, lb.contiguous_offsets()) {
            (
                Storage::Cpu(CpuStorage::F32(x)),
                Some((a0, a1)),
                Storage::Cpu(CpuStorage::F16(y)),
                Some((b0, b1)),
            ) => x[a0..a1]
                .iter()
                .zip(&y[b0..b1])
                .all(|(x, y)| y.to_f32().to_bits() == x.to_bits()),
            _ => false,
        },
    )
}

pub fn use_gemv(model: &mut Model) -> Result<usize> {
    let mut n = 0;
    for b in model.blocks.iter_mut() {
        for kind in LinearKind::ALL {
            if let Some(g) = GemvLinear::from_layer(b.linear(kind))? {
                b.set_linear(kind, Box::new(g))?;
                n += 1;
            }
        }
    }
    // Rows gathered from the embedding are widened to f32, so an exactly-f16 embedding is
    // gathered as the same values. A tied head holding the same values shares the narrowed
    // tensor (one 16-bit copy instead of an f32 one and two 16-bit ones).
    model.embed = narrow_if_exact(model.embed.clone())?;
    let shared = model.tied_head
        && model.head.bias().is_none()
        && same_values(model.head.weight_ref(), &model.embed)?;
    let head = if shared {
        Some(GemvLinear {
            weight: model.embed.clone(),
            bias: None,
            bias_v: None,
        })
    } else {
        GemvLinear::from_layer(model.head.as_ref())?
    };
    if let Some(g) = head {
        model.head = Box::new(g);
        n += 1;
    }
    Ok(n)
}

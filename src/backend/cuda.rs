//! The CUDA backend (`--features cuda`, `--device cuda`): each integer site runs on the GPU — the
//! input is uploaded, transformed and quantized per token by one kernel, each linear is an int8
//! tensor-core GEMM with the scales in the epilogue, and the outputs come back
//! (`kernels::cuda`). Norms, attention and the head stay on the CPU.

use super::int_cpu::IntLinear;
use crate::error::Result;
use crate::kernels::cuda::{self as gpu, CudaTransform, CudaWeights};
use crate::kernels::int_gemm::Isa;
use crate::kernels::transform_quant::{with_f32_slice, FusedTransform};
use crate::model::{Model, Site, SiteKernel};
use crate::quant::QuantSpec;
use candle_core::{Device, Tensor};
use std::sync::Arc;

pub use crate::kernels::cuda::Cuda;

/// One site on the GPU: its transform's factors and its linears' weights there.
struct GpuSiteKernel {
    cuda: Arc<Cuda>,
    transform: Option<CudaTransform>,
    spec: QuantSpec,
    weights: Vec<CudaWeights>,
}

impl SiteKernel for GpuSiteKernel {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let k = *dims.last().expect("feature dim");
        let ws: Vec<&CudaWeights> = self.weights.iter().collect();
        let outs = with_f32_slice(x, |xs| {
            gpu::forward_site(&self.cuda, xs, k, self.transform.as_ref(), &self.spec, &ws)
        })??;
        let m = x.elem_count() / k.max(1);
        let total: usize = self.weights.iter().map(|w| w.n).sum();
        let mut y = vec![0f32; m * total];
        let mut col = 0;
        for (w, o) in self.weights.iter().zip(&outs) {
            for r in 0..m {
                y[r * total + col..r * total + col + w.n]
                    .copy_from_slice(&o[r * w.n..(r + 1) * w.n]);
            }
            col += w.n;
        }
        let mut shape = dims[..dims.len() - 1].to_vec();
        shape.push(total);
        Ok(Tensor::from_vec(y, shape, &Device::Cpu)?)
    }
}

/// Moves every site whose linears all have integer kernels with one GPU-supported activation grid
/// onto the GPU (after [`super::int_cpu::use_int_kernels_block`]; other sites keep their CPU kernels).
/// Returns the number of linears moved.
pub fn use_cuda(model: &mut Model, cuda: &Arc<Cuda>) -> Result<usize> {
    let mut n = 0;
    for b in &mut model.blocks {
        for site in Site::ALL {
            let mut ints = Vec::new();
            for &kind in site.linears() {
                if let Some(l) = IntLinear::from_layer(b.linear(kind), Isa::detect())? {
                    ints.push(l);
                }
            }
            if ints.len() != site.linears().len() {
                continue;
            }
            let spec = ints[0].act_spec();
            if !gpu::act_supported(&spec) || ints.iter().any(|l| l.act_spec() != spec) {
                continue;
            }
            let transform = match b.site(site) {
                Some(t) => Some(CudaTransform::new(cuda, &FusedTransform::new(t)?)?),
                None => None,
            };
            let weights = ints
                .iter()
                .map(|l| CudaWeights::new(cuda, l.packed(), l.bias_values()))
                .collect::<Result<Vec<_>>>()?;
            n += weights.len();
            b.set_site_kernel(
                site,
                Some(Arc::new(GpuSiteKernel {
                    cuda: cuda.clone(),
                    transform,
                    spec,
                    weights,
                })),
            );
        }
    }
    Ok(n)
}

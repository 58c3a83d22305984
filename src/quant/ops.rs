//! Dynamic fake quantization as a candle op: every run of `unit` consecutive values along the last
//! dimension (a token row, or a (token, head) slice) is quantized with its own scale and
//! dequantized. The backward is the straight-through estimator with respect to the input.

use super::quantizer::{fake_quant_units, QuantSpec};
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

pub struct FakeQuant {
    pub spec: QuantSpec,
    pub unit: usize,
}

impl CustomOp1 for FakeQuant {
    fn name(&self) -> &'static str {
        "affq-fake-quant"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (a, b) = l.contiguous_offsets().ok_or_else(|| {
            candle_core::Error::Msg("fake quant: input must be contiguous".into())
        })?;
        let x = &s.as_slice::<f32>()?[a..b];
        if x.len() % self.unit != 0 {
            candle_core::bail!(
                "fake quant: {} values are not a multiple of the unit {}",
                x.len(),
                self.unit
            );
        }
        let mut out = x.to_vec();
        // Parallel over blocks of whole units (rows are independent).
        let per_task = self.unit * (4096 / self.unit).max(1);
        out.par_chunks_mut(per_task)
            .for_each(|c| fake_quant_units(c, self.unit, &self.spec));
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad_res.clone()))
    }
}

/// Fake-quantizes `x` in units of `unit` values along the last dimension.
pub fn fake_quant(x: &Tensor, spec: &QuantSpec, unit: usize) -> Result<Tensor> {
    if spec.bits >= 16 {
        return Ok(x.clone());
    }
    x.contiguous()?.apply_op1(FakeQuant { spec: *spec, unit })
}

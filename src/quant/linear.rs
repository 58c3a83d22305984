//! The simulated quantized linear layer: dequantized weights (exactly as stored), optional
//! per-token fake quantization of its input.

use super::act::ActQuantizer;
use super::pack;
use super::quantizer::{QuantSpec, UnitParams};
use super::weight::{Granularity, QuantizedWeight};
use crate::error::{Error, Result};
use crate::model::{linear_forward, LinearLayer};
use crate::weights::{StoredTensor, TensorStore};
use candle_core::{Device, Tensor};
use std::sync::Arc;

pub struct QuantLinear {
    /// `None`: weights kept in full precision (e.g. W16A4).
    pub qweight: Option<QuantizedWeight>,
    weight: Tensor,
    bias: Option<Tensor>,
    /// Per-token quantization of the input.
    pub act: Option<Arc<dyn ActQuantizer>>,
}

impl QuantLinear {
    /// `dense` is used when `qweight` is `None` (weights kept in full precision, or a training
    /// graph's already fake-quantized weight).
    pub fn new(
        qweight: Option<QuantizedWeight>,
        dense: Tensor,
        bias: Option<Tensor>,
        act: Option<QuantSpec>,
    ) -> Result<Self> {
        Self::with_quantizer(
            qweight,
            dense,
            bias,
            act.map(|a| Arc::new(a) as Arc<dyn ActQuantizer>),
        )
    }

    pub fn with_quantizer(
        qweight: Option<QuantizedWeight>,
        dense: Tensor,
        bias: Option<Tensor>,
        act: Option<Arc<dyn ActQuantizer>>,
    ) -> Result<Self> {
        let weight = match &qweight {
            Some(q) => Tensor::from_vec(q.dequantize(), (q.out, q.inp), &Device::Cpu)?,
            None => dense,
        };
        Ok(QuantLinear {
            qweight,
            weight,
            bias,
            act,
        })
    }

    /// Reads `{prefix}.weight_packed` & co. (docs/checkpoint-format.md).
    pub fn load(
        store: &TensorStore,
        prefix: &str,
        out: usize,
        inp: usize,
        spec: &QuantSpec,
        act: Option<QuantSpec>,
    ) -> Result<Self> {
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
        let zero: Vec<f32> = if spec.symmetric {
            vec![half; out * ng]
        } else if store.contains(&format!("{prefix}.weight_zero")) {
            store
                .i32s(&format!("{prefix}.weight_zero"), &[out, ng])?
                .into_iter()
                .map(|z| z as f32)
                .collect()
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
        Self::new(
            Some(q),
            Tensor::zeros((1, 1), candle_core::DType::F32, &Device::Cpu)?,
            bias,
            act,
        )
    }
}

impl QuantLinear {
    pub fn detached_copy(&self) -> QuantLinear {
        QuantLinear {
            qweight: self.qweight.clone(),
            weight: self.weight.detach(),
            bias: self.bias.as_ref().map(Tensor::detach),
            act: self.act.clone(),
        }
    }
}

impl LinearLayer for QuantLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = match &self.act {
            Some(a) => a.apply(x, self.in_features())?,
            None => x.clone(),
        };
        linear_forward(&x, &self.weight, self.bias.as_ref())
    }
    fn weight_ref(&self) -> &Tensor {
        &self.weight
    }
    fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
    fn act_quantizer(&self) -> Option<Arc<dyn ActQuantizer>> {
        self.act.clone()
    }
    fn detached(&self) -> Box<dyn LinearLayer> {
        Box::new(self.detached_copy())
    }
    fn as_quant(&self) -> Option<&QuantLinear> {
        Some(self)
    }
    fn export(&self, prefix: &str) -> Result<Vec<(String, StoredTensor)>> {
        let mut out = Vec::new();
        match &self.qweight {
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
                StoredTensor::from_f32(&self.weight)?,
            )),
        }
        if let Some(b) = &self.bias {
            out.push((format!("{prefix}.bias"), StoredTensor::from_f32(b)?));
        }
        if let Some(a) = &self.act {
            let a = a.spec()?;
            out.push((
                format!("{prefix}.input_clip"),
                StoredTensor::f32(&[a.clip, a.clip_min], &[2]),
            ));
        }
        Ok(out)
    }
}

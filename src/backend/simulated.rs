//! The simulated backend: the quantized linear layer as dequantized weights (exactly as stored), optional
//! per-token fake quantization of its input.

use crate::error::Result;
use crate::model::linear::quantized_linear_forward;
use crate::model::{linear_forward, LinearLayer};
use crate::quant::{ActQuantizer, QuantSpec, QuantizedWeight};
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

    /// A layer from a quantized weight and its already dequantized `weight` (no recomputation).
    pub fn from_parts(
        qweight: Option<QuantizedWeight>,
        weight: Tensor,
        bias: Option<Tensor>,
        act: Option<Arc<dyn ActQuantizer>>,
    ) -> Self {
        QuantLinear {
            qweight,
            weight,
            bias,
            act,
        }
    }

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
        match &self.act {
            Some(a) => quantized_linear_forward(x, &**a, &self.weight, self.bias.as_ref()),
            None => linear_forward(x, &self.weight, self.bias.as_ref()),
        }
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
    fn quantized_weight(&self) -> Option<&QuantizedWeight> {
        self.qweight.as_ref()
    }
}

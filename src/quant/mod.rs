//! Quantization math, independent of the model: grids and quantizers, activation quantizers,
//! bit packing, quantized weights, the clip-quantizer op and GPTQ.

pub mod act;
pub mod clipquant;
pub mod gptq;

pub mod ops;
pub mod pack;
pub mod quantizer;
pub mod weight;

pub use act::{ActQuantizer, LearnedClip};

pub use quantizer::{AsymZero, QuantSpec, ScaleDtype, SymScale, UnitParams};
pub use weight::{Granularity, QuantizedWeight};

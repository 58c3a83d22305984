//! Quantizers, bit packing, quantized weights and the simulated quantized linear layer.

pub mod act;
pub mod clipquant;
pub mod gptq;
pub mod linear;
pub mod ops;
pub mod pack;
pub mod quantizer;
pub mod weight;

pub use act::{ActQuantizer, LearnedClip};
pub use linear::QuantLinear;
pub use quantizer::{AsymZero, QuantSpec, SymScale, UnitParams};
pub use weight::{Granularity, QuantizedWeight};

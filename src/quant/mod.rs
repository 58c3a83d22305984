//! Quantizers, bit packing, quantized weights and the simulated quantized linear layer.

pub mod linear;
pub mod ops;
pub mod pack;
pub mod quantizer;
pub mod weight;

pub use linear::QuantLinear;
pub use quantizer::{AsymZero, QuantSpec, SymScale, UnitParams};
pub use weight::{Granularity, QuantizedWeight};

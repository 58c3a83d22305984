//! CPU kernels written for affq's hot paths, exposed as candle custom ops.

pub mod attention;
pub mod fastmath;
pub mod int_gemm;
pub mod int_linear;

//! CPU kernels written for affq's hot paths, exposed as candle custom ops.

pub mod attention;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod fastmath;
pub mod int_gemm;
pub mod int_linear;
pub mod small_gemm;

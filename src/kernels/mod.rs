//! Compute kernels for the quantized inference path, independent of the model: the integer GEMM
//! and per-token quantizer (AVX-512 VNNI / AVX2 / portable), the fused online transform +
//! quantization, the small f32/bf16 GEMMs it uses, the matrix–vector product of decode steps, and the CUDA driver path (`cuda` feature).

#[cfg(feature = "cuda")]
pub mod cuda;
pub mod gemv;
pub mod int_gemm;
pub mod small_gemm;
pub mod transform_quant;

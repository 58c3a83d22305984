//! Backends: the implementations of the model floor's traits (`LinearLayer`, `SiteKernel`) that
//! decide how a quantized model computes.
//!
//! - [`dense_cpu`]: full-precision linears on a matrix–vector kernel for decode steps;
//! - [`simulated`]: dequantized weights and fake-quantized activations in f32 (what checkpoints
//!   load into, and what calibration trains through);
//! - [`int_cpu`]: integer GEMMs with the online transform fused into the per-token quantization
//!   ([`int_cpu::use_int_kernels_block`] converts each block as it is loaded);
//! - [`grid_train`]: the training step's linear products in integers when their operands are
//!   fake-quantized (installed into `model::train_ops` by the calibration engine);
//! - [`cuda`]: the same sites on an NVIDIA GPU (`--features cuda`; without the feature a dummy
//!   module whose constructor says how to build it).

pub mod dense_cpu;
pub mod grid_train;
pub mod int_cpu;
pub mod simulated;

#[cfg(feature = "cuda")]
#[path = "cuda.rs"]
pub mod cuda;
#[cfg(not(feature = "cuda"))]
#[path = "cuda_off.rs"]
pub mod cuda;

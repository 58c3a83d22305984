//! affq: post-training quantization of LLMs with learned affine transforms.
//!
//! The pipeline, bottom up (each layer imports only the ones below it):
//! - `error`, `rng`, `fastmath`, `fsutil`, `heap`: the one error type, the seeded generator, SIMD
//!   math helpers, crash-safe output, the allocator policy;
//! - `quant` (grids, quantizers, GPTQ, packing) and `transforms` (Hadamard, Kronecker, inverses):
//!   math on tensors, no model;
//! - `model`: the decoder floor — blocks, attention, RoPE — behind its own small traits;
//! - `kernels`: integer GEMM, fused transform + quantization, CUDA; `backend`: the simulated,
//!   integer-CPU and CUDA implementations of the model's traits;
//! - `formats`: safetensors, `config.json`, GGUF, the affq checkpoint; `tokenizer`, `data`;
//! - `recipe`, `methods` (rtn, rotate, flatquant, affinequant behind one trait), `calib` (the
//!   block-by-block engine), `eval` (perplexity protocols);
//! - `plan` (arguments + recipe → one validated plan) and `quantize` (running it); `export`
//!   (a checkpoint in another runtime's format); `runtime` (loading onto kernels, the KV-cached
//!   decode loop, sampling, chat templates, `generate` and `bench`); the binary parses and prints.

pub mod backend;
pub mod calib;
pub mod data;
pub mod error;
pub mod eval;
pub mod export;
pub mod fastmath;
pub mod formats;
pub mod fsutil;
pub mod heap;
pub mod kernels;
pub mod methods;
pub mod model;
pub mod plan;
pub mod quant;
pub mod quantize;
pub mod recipe;
pub mod rng;
pub mod runtime;
pub mod strided_gemm;
pub mod tokenizer;
pub mod transforms;

pub use error::{Error, Result};

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

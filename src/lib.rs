//! affq: post-training quantization of LLMs with learned affine transforms.
//!
//! Layers: `weights` (checkpoint files) → `config` → `model` (the decoder, block by block) →
//! `eval` (perplexity); `gguf` + `tokenizer` import llama.cpp files; `data` finds texts;
//! `fsutil` makes every output crash-safe.

pub mod calib;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod error;
pub mod eval;
pub mod fsutil;
pub mod gguf;
pub mod kernels;
pub mod methods;
pub mod model;
pub mod quant;
pub mod tokenizer;
pub mod transforms;
pub mod weights;

pub use error::{Error, Result};

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

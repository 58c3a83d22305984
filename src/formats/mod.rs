//! File formats: everything that reads or writes bytes of a model. The safetensors store and
//! writer, Hugging Face `config.json`, llama.cpp's GGUF (import, with its tokenizer), and affq's
//! own quantized checkpoint with its `quantization_config` schema; exports to compressed-tensors
//! and GPTQ directories ([`hf_export`]).

pub mod checkpoint;
pub mod compressed_tensors;
pub mod config_json;
pub mod gguf;
pub mod gptq;
pub mod hf_export;
pub mod safetensors;
pub mod schema;

pub use checkpoint::Checkpoint;

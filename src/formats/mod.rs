//! File formats: everything that reads or writes bytes of a model. The safetensors store and
//! writer, Hugging Face `config.json`, llama.cpp's GGUF (import, with its tokenizer), and affq's
//! own quantized checkpoint with its `quantization_config` schema.

pub mod checkpoint;
pub mod config_json;
pub mod gguf;
pub mod safetensors;
pub mod schema;

pub use checkpoint::Checkpoint;

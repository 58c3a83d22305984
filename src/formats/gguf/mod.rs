//! llama.cpp's GGUF: the reader ([`file`]) and writer ([`write`]), the block types ([`blocks`]),
//! the vocabulary ↔ `tokenizer.json` mapping ([`vocab`]), the import into a Hugging Face directory
//! ([`import`]) and the export of a checkpoint ([`export`]).

pub mod blocks;
pub mod export;
pub mod file;
pub mod import;
pub mod vocab;
pub mod write;

pub use file::{GgufFile, TensorInfo, Value};
pub use import::{import, unpermute_rows, ImportDtype, ImportReport};

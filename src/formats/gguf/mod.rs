//! llama.cpp's GGUF: the reader ([`file`]), the vocabulary → `tokenizer.json` builder
//! ([`vocab`]) and the import into a Hugging Face directory ([`import`]).

pub mod file;
pub mod import;
pub mod vocab;

pub use file::{GgufFile, TensorInfo, Value};
pub use import::{import, unpermute_rows, ImportDtype, ImportReport};

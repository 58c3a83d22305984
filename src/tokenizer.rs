//! The tokenizer: `tokenizer.json` loaded by the tokenizers crate, one code path for every model
//! (GGUF vocabularies are converted to it on import, `crate::formats::gguf_vocab`).

use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

/// A loaded tokenizer.
pub struct Tok {
    inner: tokenizers::Tokenizer,
    pub path: PathBuf,
}

impl Tok {
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let inner = tokenizers::Tokenizer::from_bytes(&bytes)
            .map_err(|e| Error::format(path, format!("cannot load tokenizer: {e}")))?;
        Ok(Tok {
            inner,
            path: path.to_path_buf(),
        })
    }

    /// Token ids of `text`; `add_special` runs the post-processor (e.g. adds BOS for Llama 2).
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, add_special).map_err(|e| {
            Error::Runtime(format!("{}: tokenization failed: {e}", self.path.display()))
        })?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, false)
            .map_err(|e| Error::Runtime(format!("{}: decoding failed: {e}", self.path.display())))
    }

    /// The id of a token given by its text (a special token such as `<|im_end|>`).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

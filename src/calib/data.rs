//! Calibration windows: random token windows from a text that is never the test split.

use crate::data::{self, DataFile};
use crate::error::{Error, Result};
use crate::rng::Rng;
use crate::tokenizer::Tok;
use candle_core::{Device, Tensor};
use std::path::{Path, PathBuf};

/// Where calibration text comes from.
#[derive(Debug, Clone)]
pub enum CalibSource {
    /// WikiText-2 train split if present in the data directory, else the validation split.
    Wikitext2,
    C4,
    File(PathBuf),
}

/// Resolves the source to a file and a human-readable description.
pub fn resolve(src: &CalibSource, data_dir: &Path) -> Result<(PathBuf, String)> {
    Ok(match src {
        CalibSource::Wikitext2 => match data::locate(data_dir, DataFile::WikiTrain) {
            Ok(p) => (p, "WikiText-2 train split".to_string()),
            Err(_) => (
                data::locate(data_dir, DataFile::WikiValid)?,
                "WikiText-2 validation split (train split not in the data directory)".to_string(),
            ),
        },
        CalibSource::C4 => (
            data::locate(data_dir, DataFile::C4Validation)?,
            "C4 validation sample".to_string(),
        ),
        CalibSource::File(p) => {
            if !p.is_file() {
                return Err(Error::format(p, "calibration file not found"));
            }
            if crate::fsutil::sha256_file(p)? == DataFile::WikiTest.sha256() {
                return Err(Error::Usage(format!(
                    "{}: this is the WikiText-2 test split; calibrating on it is not allowed",
                    p.display()
                )));
            }
            (p.clone(), format!("file {}", p.display()))
        }
    })
}

/// The calibration text of a file: `.jsonl` → the `text` fields joined by blank lines; else the
/// file itself (UTF-8).
pub fn read(path: &Path) -> Result<String> {
    let text = if path.extension().is_some_and(|e| e == "jsonl") {
        data::jsonl_texts(path)?.join("\n\n")
    } else {
        data::read_text(path)?
    };
    if text.trim().is_empty() {
        return Err(Error::format(path, "calibration text is empty"));
    }
    Ok(text)
}

/// `n` windows of `len` tokens at seeded random offsets: `[n, len]` u32.
pub fn windows(
    tok: &Tok,
    text: &str,
    path: &Path,
    n: usize,
    len: usize,
    seed: u64,
) -> Result<Tensor> {
    if n == 0 || len < 2 {
        return Err(Error::Usage(
            "--nsamples must be ≥ 1 and --calib-seqlen ≥ 2".into(),
        ));
    }
    let ids = tok.encode(text, false)?;
    if ids.len() <= len {
        return Err(Error::format(
            path,
            format!(
                "calibration text has {} tokens, fewer than one window of {len}",
                ids.len()
            ),
        ));
    }
    let mut rng = Rng::new(seed);
    let mut out = Vec::with_capacity(n * len);
    for _ in 0..n {
        let start = (rng.next_u64() % (ids.len() - len) as u64) as usize;
        out.extend_from_slice(&ids[start..start + len]);
    }
    Ok(Tensor::from_vec(out, (n, len), &Device::Cpu)?)
}

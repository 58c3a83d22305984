//! Evaluation and calibration texts: where they are found and how each protocol builds its text
//! (algorithms.md §5).

use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

/// A text file affq knows by its place in the data directory (the layout of `../shared/data`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataFile {
    WikiTest,
    WikiValid,
    WikiTrain,
    C4Validation,
}

impl DataFile {
    pub fn rel_path(self) -> &'static str {
        match self {
            DataFile::WikiTest => "wikitext-2-raw/wiki.test.raw",
            DataFile::WikiValid => "wikitext-2-raw/wiki.valid.raw",
            DataFile::WikiTrain => "wikitext-2-raw/wiki.train.raw",
            DataFile::C4Validation => "calibration/c4_validation_2k.jsonl",
        }
    }

    pub fn sha256(self) -> &'static str {
        match self {
            DataFile::WikiTest => {
                "173c87a53759e0201f33e0ccf978e510c2042d7f2cb78229d9a50d79b9e7dd08"
            }
            DataFile::WikiValid => {
                "4cd0f6876d07a413aa911261ff6d363c72d757d47f0fdd6015702014c89cb9c7"
            }
            DataFile::WikiTrain => {
                "6707892fa3788b5ab9ed78ab5ff37d9fe825f6011a2ad4fcd6a6d467f0e7da57"
            }
            DataFile::C4Validation => {
                "118ef726b71172521feff878ce0e91f9d2da2d7772d47eb7e90391997da09cb4"
            }
        }
    }

    fn origin(self) -> &'static str {
        match self {
            DataFile::WikiTest | DataFile::WikiValid | DataFile::WikiTrain => {
                "a member of the wikitext-2-raw-v1 archive (Merity et al. 2016), LF line endings"
            }
            DataFile::C4Validation => {
                "the 2,000-document C4-en validation sample shipped in shared/data/calibration"
            }
        }
    }
}

/// The data directory: `--data-dir`, else `$AFFQ_DATA_DIR`, else `~/.cache/affq/data`.
pub fn data_dir(flag: Option<&Path>) -> PathBuf {
    if let Some(p) = flag {
        return p.to_path_buf();
    }
    if let Some(p) = std::env::var_os("AFFQ_DATA_DIR").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache/affq/data")
}

/// Path of `file` under `dir`, or an error saying what is missing and where it comes from.
pub fn locate(dir: &Path, file: DataFile) -> Result<PathBuf> {
    let p = dir.join(file.rel_path());
    if p.is_file() {
        Ok(p)
    } else {
        Err(Error::format(
            &p,
            format!(
                "missing data file (sha256 {}): {}; put it there or point --data-dir / AFFQ_DATA_DIR at a directory with the same layout",
                file.sha256(),
                file.origin()
            ),
        ))
    }
}

pub fn read_text(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    String::from_utf8(bytes).map_err(|e| {
        Error::format(
            path,
            format!("not valid UTF-8 (byte {})", e.utf8_error().valid_up_to()),
        )
    })
}

/// The rows of the Hugging Face `wikitext-2-raw-v1` split rebuilt from the raw file: lines split on
/// `\n` (the empty string after the final newline dropped); a line that is exactly `" "` becomes
/// `""`, any other line becomes `line + "\n"`.
pub fn wikitext_rows(raw: &str) -> Vec<String> {
    let body = raw.strip_suffix('\n').unwrap_or(raw);
    body.split('\n')
        .map(|l| {
            if l == " " {
                String::new()
            } else {
                format!("{l}\n")
            }
        })
        .collect()
}

/// Paper protocol text (GPTQ and successors): `"\n\n".join(rows)`.
pub fn paper_text(raw: &str) -> String {
    wikitext_rows(raw).join("\n\n")
}

/// llama.cpp's `llama-perplexity -f`: the file verbatim minus one trailing newline.
pub fn llamacpp_text(raw: &str) -> String {
    raw.strip_suffix('\n').unwrap_or(raw).to_string()
}

/// The non-empty rows concatenated (the text of the SmolLM2 oracle, test-data.md §4.1).
pub fn nonblank_rows_text(raw: &str) -> String {
    wikitext_rows(raw).concat()
}

/// The texts of a JSONL file with a `text` field per line.
pub fn jsonl_texts(path: &Path) -> Result<Vec<String>> {
    let raw = read_text(path)?;
    let mut out = Vec::new();
    for (i, line) in raw.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| Error::format(path, format!("line {}: invalid JSON: {e}", i + 1)))?;
        let t = v.get("text").and_then(|t| t.as_str()).ok_or_else(|| {
            Error::format(path, format!("line {}: no string field `text`", i + 1))
        })?;
        out.push(t.to_string());
    }
    Ok(out)
}

/// GPTQ's "c4" evaluation text: the first 1,100 validation documents joined with a space.
pub fn c4_eval_text(path: &Path) -> Result<String> {
    let docs = jsonl_texts(path)?;
    Ok(docs
        .iter()
        .take(1100)
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_follow_hf_mapping() {
        let raw = " \n = A = \n b \n";
        assert_eq!(wikitext_rows(raw), vec!["", " = A = \n", " b \n"]);
        assert_eq!(paper_text(raw), "\n\n = A = \n\n\n b \n");
        assert_eq!(nonblank_rows_text(raw), " = A = \n b \n");
        assert_eq!(llamacpp_text(raw), " \n = A = \n b ");
    }
}

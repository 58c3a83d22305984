//! `affq export`: a checkpoint written in a format another runtime loads. The request is
//! validated here and dispatched to the format's writer (`formats::gguf::export` for llama.cpp);
//! every output is written under a temporary name beside the target and renamed when complete.

use crate::error::{Error, Result};
use crate::formats::gguf::blocks::GgmlType;
use crate::formats::gguf::export::GgufReport;
use crate::formats::hf_export::HfReport;
use crate::formats::Checkpoint;
use crate::fsutil::TempDir;
use std::path::{Path, PathBuf};

/// Formats `affq export` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// llama.cpp's GGUF (one file).
    Gguf,
    /// compressed-tensors `pack-quantized` (a Hugging Face directory; transformers, vLLM).
    CompressedTensors,
    /// GPTQ v1 (a Hugging Face directory; GPTQModel, transformers, vLLM).
    Gptq,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::Gguf => "gguf",
            Format::CompressedTensors => "compressed-tensors",
            Format::Gptq => "gptq",
        }
    }
}

#[derive(Debug, Clone)]
pub struct ExportRequest {
    pub checkpoint: PathBuf,
    /// `None`: beside the checkpoint, `DIR.TYPE.gguf`.
    pub output: Option<PathBuf>,
    pub format: Format,
    /// GGUF type of the linears (`q4_0`, `q8_0`, `q4_1`, `f16`, `f32`); `None`: the
    /// checkpoint's own grid.
    pub gguf_type: Option<String>,
    pub allow_lossy: bool,
    pub force: bool,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ExportReport {
    pub format: &'static str,
    pub output: PathBuf,
    pub seconds: f64,
    #[serde(flatten)]
    pub gguf: Option<GgufReport>,
    #[serde(flatten)]
    pub hf: Option<HfReport>,
}

/// Where an export goes without `-o`: beside the checkpoint directory, named `name(DIR)`.
fn beside(checkpoint: &Path, name: impl Fn(&str) -> String) -> PathBuf {
    let dir = std::fs::canonicalize(checkpoint).unwrap_or_else(|_| checkpoint.to_path_buf());
    let dir = if dir.is_file() {
        dir.parent()
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
    } else {
        dir
    };
    let base = dir
        .file_name()
        .map_or("model".into(), |n| n.to_string_lossy().into_owned());
    dir.with_file_name(name(&base))
}

pub fn export(req: &ExportRequest) -> Result<ExportReport> {
    let t0 = std::time::Instant::now();
    let ty = req
        .gguf_type
        .as_deref()
        .map(|t| {
            GgmlType::parse(t).ok_or_else(|| {
                Error::Usage(format!("--type {t}: expected q4_0, q8_0, q4_1, f16 or f32"))
            })
        })
        .transpose()?;
    if ty.is_some() && req.format != Format::Gguf {
        return Err(Error::Usage(
            "--type chooses a GGUF type: it needs --format gguf".into(),
        ));
    }
    if req.allow_lossy && req.format != Format::Gguf {
        return Err(Error::Usage(format!(
            "--allow-lossy: the {} export is exact or refused (re-rounding is offered for GGUF)",
            req.format.name()
        )));
    }
    let ckpt = Checkpoint::open(&req.checkpoint)?;
    let output = match &req.output {
        Some(o) => o.clone(),
        None => {
            let o = match req.format {
                Format::Gguf => {
                    let t = match ty {
                        Some(t) => t,
                        None => crate::formats::gguf::export::default_linear_type(&ckpt)?,
                    };
                    beside(&req.checkpoint, |d| format!("{d}.{}.gguf", t.name()))
                }
                f => beside(&req.checkpoint, |d| format!("{d}-{}", f.name())),
            };
            if o.exists() && !req.force {
                return Err(Error::Usage(format!(
                    "{}: the default output exists; pass -o to choose another path, or --force",
                    o.display()
                )));
            }
            o
        }
    };
    crate::fsutil::check_output(&output, req.force)?;
    let tmp = TempDir::beside(&output)?;
    let (gguf, hf) = match req.format {
        Format::Gguf => {
            let file = "model.gguf";
            let r = crate::formats::gguf::export::export(
                &ckpt,
                &tmp.path().join(file),
                ty,
                req.allow_lossy,
            )?;
            tmp.persist_file(file, &output, req.force)?;
            (Some(r), None)
        }
        Format::CompressedTensors | Format::Gptq => {
            let f: &dyn crate::formats::hf_export::LinearFormat = match req.format {
                Format::Gptq => &crate::formats::gptq::Gptq,
                _ => &crate::formats::compressed_tensors::CompressedTensors,
            };
            let r = crate::formats::hf_export::export(&ckpt, tmp.path(), f)?;
            tmp.persist(&output, req.force)?;
            (None, Some(r))
        }
    };
    Ok(ExportReport {
        format: req.format.name(),
        output,
        seconds: t0.elapsed().as_secs_f64(),
        gguf,
        hf,
    })
}

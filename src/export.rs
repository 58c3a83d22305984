//! `affq export`: a checkpoint written in a format another runtime loads. The request is
//! validated here and dispatched to the format's writer (`formats::gguf::export` for llama.cpp);
//! every output is written under a temporary name beside the target and renamed when complete.

use crate::error::{Error, Result};
use crate::formats::gguf::blocks::GgmlType;
use crate::formats::gguf::export::GgufReport;
use crate::formats::Checkpoint;
use crate::fsutil::TempDir;
use std::path::{Path, PathBuf};

/// Formats `affq export` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// llama.cpp's GGUF (one file).
    Gguf,
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
    pub gguf: GgufReport,
}

/// Where an export goes without `-o`: a sibling of the checkpoint directory, `DIR.TYPE.gguf`.
pub fn default_output(checkpoint: &Path, ty: &str) -> PathBuf {
    let dir = std::fs::canonicalize(checkpoint).unwrap_or_else(|_| checkpoint.to_path_buf());
    let dir = if dir.is_file() {
        dir.parent()
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
    } else {
        dir
    };
    let name = dir
        .file_name()
        .map_or("model".into(), |n| n.to_string_lossy().into_owned());
    dir.with_file_name(format!("{name}.{ty}.gguf"))
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
    let ckpt = Checkpoint::open(&req.checkpoint)?;
    let output = match &req.output {
        Some(o) => o.clone(),
        None => {
            let name = ty.map_or_else(|| gguf_type_of(&ckpt), |t| t.name().to_string());
            let o = default_output(&req.checkpoint, &name);
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
    let file = "model.gguf";
    let report = match req.format {
        Format::Gguf => crate::formats::gguf::export::export(
            &ckpt,
            &tmp.path().join(file),
            ty,
            req.allow_lossy,
        )?,
    };
    tmp.persist_file(file, &output, req.force)?;
    Ok(ExportReport {
        format: "gguf",
        output,
        seconds: t0.elapsed().as_secs_f64(),
        gguf: report,
    })
}

/// The type name an export without `--type` uses, for the default file name.
fn gguf_type_of(ckpt: &Checkpoint) -> String {
    match ckpt.quant.as_ref().and_then(|q| q.weights.as_ref()) {
        Some(w) => match (w.spec.bits, w.spec.symmetric) {
            (4, true) => "Q4_0",
            (8, true) => "Q8_0",
            (4, false) => "Q4_1",
            _ => "gguf",
        }
        .to_string(),
        None => "F16".to_string(),
    }
}

//! Crash-safe, resumable calibration. Every finished block is written atomically (temporary file,
//! then rename) to a work directory beside the output, `.OUT.affq-work/`, in the checkpoint's own
//! tensor format with its report in the file's metadata; `affq quantize … --resume` loads the
//! finished blocks instead of calibrating them again and continues with the next one. Each block's
//! calibration depends only on the settings, the seed and the block's inputs (which are recomputed
//! from the model and the loaded blocks), so a resumed run writes the same checkpoint as an
//! uninterrupted one, byte for byte. The work directory is removed when the checkpoint is written.

use super::{BlockReport, BlockStore};
use crate::error::{Error, Result};
use crate::formats::checkpoint::{block_tensors, load_block, Precision};
use crate::formats::safetensors::{write_safetensors, TensorStore};
use crate::formats::schema::QuantConfig;
use crate::model::{Block, ModelConfig};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub struct WorkDir {
    dir: PathBuf,
    config: Arc<ModelConfig>,
    quant: QuantConfig,
    /// Blocks found on disk when the run started.
    pub resumed: usize,
}

/// `.NAME.affq-work` beside `out`.
pub fn work_dir_path(out: &Path) -> PathBuf {
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    parent.join(format!(".{name}.affq-work"))
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

impl WorkDir {
    /// Opens the work directory of `out` for a run whose settings are `fingerprint`. An existing
    /// one is continued with `resume` (its settings must match), replaced with `force`, and
    /// otherwise refused: it holds the work of an interrupted run.
    pub fn open(
        out: &Path,
        fingerprint: &str,
        resume: bool,
        force: bool,
        config: Arc<ModelConfig>,
        quant: QuantConfig,
    ) -> Result<Self> {
        let dir = work_dir_path(out);
        let run = dir.join("run.json");
        // A work directory without a finished block holds nothing to lose (e.g. the run stopped
        // at a bad calibration file): start it afresh.
        if dir.is_dir() && !dir.join("block-0000.safetensors").is_file() {
            std::fs::remove_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        }
        if dir.exists() {
            if resume {
                let found = std::fs::read_to_string(&run).unwrap_or_default();
                if found != fingerprint {
                    return Err(Error::Usage(format!(
                        "{}: the interrupted calibration used other settings (model, method, bits, recipe, data or seed); rerun with the same flags, or start over with --force",
                        dir.display()
                    )));
                }
            } else if force {
                std::fs::remove_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
            } else {
                return Err(Error::Usage(format!(
                    "{} holds an interrupted calibration of {}: pass --resume to continue it, or --force to start over",
                    dir.display(),
                    out.display()
                )));
            }
        }
        if !dir.exists() {
            std::fs::create_dir(&dir).map_err(|e| Error::io(&dir, e))?;
            write_atomic(&run, fingerprint.as_bytes())?;
        }
        let mut w = WorkDir {
            dir,
            config,
            quant,
            resumed: 0,
        };
        while w.block_path(w.resumed).is_file() {
            w.resumed += 1;
        }
        Ok(w)
    }

    fn block_path(&self, i: usize) -> PathBuf {
        self.dir.join(format!("block-{i:04}.safetensors"))
    }

    /// After a failed run: removes the work directory if no block was finished (nothing to
    /// resume), so a bad input leaves nothing behind.
    pub fn discard_if_empty(&self) {
        if !self.block_path(0).is_file() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    /// Removes the work directory (the checkpoint has been written).
    pub fn finish(self) -> Result<()> {
        std::fs::remove_dir_all(&self.dir).map_err(|e| Error::io(&self.dir, e))
    }
}

impl BlockStore for WorkDir {
    fn load(&self, i: usize) -> Result<Option<(Block, BlockReport)>> {
        let path = self.block_path(i);
        if !path.is_file() {
            return Ok(None);
        }
        let store = TensorStore::open(std::slice::from_ref(&path))?;
        let block = load_block(
            &store,
            self.config.clone(),
            i,
            Some(&self.quant),
            Precision::F32,
        )?;
        let report = store
            .metadata()
            .get("affq.report")
            .and_then(|r| serde_json::from_str(r).ok())
            .ok_or_else(|| Error::format(&path, "missing or invalid block report"))?;
        Ok(Some((block, report)))
    }

    fn save(&self, block: &Block, report: &BlockReport) -> Result<()> {
        let path = self.block_path(block.index());
        let tmp = path.with_extension("tmp");
        let mut tensors = block_tensors(block)?;
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        let mut meta = BTreeMap::new();
        meta.insert(
            "affq.report".to_string(),
            serde_json::to_string(report).map_err(|e| Error::Runtime(e.to_string()))?,
        );
        write_safetensors(&tmp, &tensors, &meta)?;
        std::fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))
    }
}

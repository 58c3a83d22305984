//! Crash-safe, resumable calibration. Every finished block is written atomically (temporary file,
//! then rename) to a work directory beside the output, `.OUT.affq-work/`, in the checkpoint's own
//! tensor format with its report in the file's metadata; `affq quantize … --resume` loads the
//! finished blocks instead of calibrating them again and continues with the next one. Each block's
//! calibration depends only on the settings, the seed and the block's inputs (which are recomputed
//! from the model and the loaded blocks), so a resumed run writes the same checkpoint as an
//! uninterrupted one, byte for byte. The work directory is removed when the checkpoint is written.
//!
//! The same directory is where the processes of a sharded calibration meet (`--shard I/N`, then
//! `--merge`): each shard claims a block with a lock file ([`super::lock`]) before calibrating
//! it, and writes it as above; the merge assembles the checkpoint from the finished blocks. The
//! settings are pinned in `run.json` by the first process (an atomic link, so two first
//! processes cannot both pin theirs); every later one must match them.

use super::lock::{self, private_tmp, Claim};
use super::{BlockClaim, BlockReport, BlockStore};
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
    pub resumed: Vec<usize>,
    /// A lock older than this without a heartbeat is stale.
    lock_timeout: std::time::Duration,
    /// Said when a stale lock is taken over (for the run's warnings).
    takeovers: std::sync::Mutex<Vec<String>>,
}

/// How a run uses the work directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// A whole calibration in one process: an existing directory is continued with `resume`,
    /// replaced with `force`, and otherwise refused.
    Single { resume: bool, force: bool },
    /// One shard: the directory is created or joined (its settings must match).
    Shard,
    /// Assembling the checkpoint: the directory must exist (its settings must match).
    Merge,
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

/// Writes `bytes` at `path` unless a file is there: through a private temporary and a hard link
/// (which fails if `path` exists), so of two processes pinning at once exactly one wins.
/// Returns what `path` holds afterwards.
fn pin(path: &Path, bytes: &[u8]) -> Result<String> {
    let tmp = private_tmp(path);
    std::fs::write(&tmp, bytes).map_err(|e| Error::io(&tmp, e))?;
    match std::fs::hard_link(&tmp, path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        // A filesystem without hard links (some FUSE and SMB mounts): a rename, atomic for the
        // reader but not exclusive between two first processes.
        Err(_) if !path.exists() => {
            std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(Error::io(path, e));
        }
    }
    let _ = std::fs::remove_file(&tmp);
    std::fs::read_to_string(path).map_err(|e| Error::io(path, e))
}

fn is_block_file(name: &str) -> bool {
    name.starts_with("block-") && name.ends_with(".safetensors")
}

impl WorkDir {
    /// Opens the work directory of `out` for a run whose settings are `fingerprint`, as
    /// `access` says.
    pub fn open(
        out: &Path,
        fingerprint: &str,
        access: Access,
        lock_timeout: std::time::Duration,
        config: Arc<ModelConfig>,
        quant: QuantConfig,
    ) -> Result<Self> {
        let dir = work_dir_path(out);
        let run = dir.join("run.json");
        let other_settings = || {
            Error::Usage(format!(
                "{}: its calibration used other settings (model, method, bits, recipe, data or seed; see its run.json); rerun with the same flags, or start over with --force (without --shard)",
                dir.display()
            ))
        };
        match access {
            Access::Single { resume, force } => {
                // A work directory without a finished block or a live lock holds nothing to
                // lose (e.g. the run stopped at a bad calibration file): start it afresh.
                if let Some(held) = Self::live_lock(&dir, lock_timeout) {
                    return Err(Error::Usage(format!(
                        "{}: shards are calibrating in it ({held}); let them finish and run --merge",
                        dir.display()
                    )));
                }
                if dir.is_dir() && !Self::holds_work(&dir, lock_timeout) {
                    std::fs::remove_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
                }
                if dir.exists() {
                    if resume {
                        let found = std::fs::read_to_string(&run).unwrap_or_default();
                        if found != fingerprint {
                            return Err(other_settings());
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
            }
            Access::Shard => {}
            Access::Merge => {
                if let Some(held) = Self::live_lock(&dir, lock_timeout) {
                    return Err(Error::Usage(format!(
                        "{}: a shard is still calibrating ({held}); merge once every shard has finished",
                        dir.display()
                    )));
                }
                if !dir.is_dir() {
                    return Err(Error::Usage(format!(
                        "{}: no work directory to merge (run the shards first: affq quantize … --shard I/N with the same flags)",
                        dir.display()
                    )));
                }
            }
        }
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && dir.is_dir() => {}
            Err(e) => return Err(Error::io(&dir, e)),
        }
        if pin(&run, fingerprint.as_bytes())? != fingerprint {
            return Err(other_settings());
        }
        let mut w = WorkDir {
            dir,
            config,
            quant,
            resumed: Vec::new(),
            lock_timeout,
            takeovers: Default::default(),
        };
        w.remove_stale_temporaries();
        w.resumed = (0..w.config.num_layers)
            .filter(|&i| w.contains(i))
            .collect();
        Ok(w)
    }

    /// Whether `dir` holds a finished block or a lock of a live process.
    fn holds_work(dir: &Path, lock_timeout: std::time::Duration) -> bool {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return false;
        };
        entries
            .flatten()
            .any(|e| is_block_file(&e.file_name().to_string_lossy()))
            || Self::live_lock(dir, lock_timeout).is_some()
    }

    /// `block N held by pid P on HOST` for a lock in `dir` held by a live process, if any.
    fn live_lock(dir: &Path, lock_timeout: std::time::Duration) -> Option<String> {
        let entries = std::fs::read_dir(dir).ok()?;
        entries.flatten().find_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let block = name
                .strip_prefix("block-")?
                .strip_suffix(".lock")?
                .to_string();
            match lock::state(&e.path(), lock_timeout) {
                lock::LockState::Held(o) => Some(format!("block {block} held by {}", o.describe())),
                _ => None,
            }
        })
    }

    /// Removes temporary files of processes that are gone (this host) or silent for longer than
    /// the lock timeout (any host): what a killed shard leaves behind is never a block file.
    fn remove_stale_temporaries(&self) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let me = lock::hostname();
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some((_, owner)) = name.split_once(".tmp.") else {
                continue;
            };
            let Some((host, pid)) = owner.rsplit_once('.') else {
                continue;
            };
            let Ok(pid) = pid.parse::<u32>() else {
                continue;
            };
            let old = e
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > self.lock_timeout);
            let gone = host == me && pid != std::process::id() && !lock::process_alive(pid);
            if gone || old {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }

    /// The work directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Whether the directory is still there (a merge removes it).
    pub fn exists(&self) -> bool {
        self.dir.join("run.json").is_file()
    }

    /// Blocks of `0..total` not finished.
    pub fn missing(&self, total: usize) -> Vec<usize> {
        (0..total).filter(|&i| !self.contains(i)).collect()
    }

    /// Waits until each of `blocks` is finished or its lock is gone or stale; returns the blocks
    /// that are still not finished (to be claimed again).
    pub fn wait_for(&self, blocks: &[usize], poll: std::time::Duration) -> Vec<usize> {
        loop {
            let mut open = Vec::new();
            let mut waiting = false;
            for &i in blocks {
                if self.contains(i) {
                    continue;
                }
                match lock::state(&self.lock_path(i), self.lock_timeout) {
                    lock::LockState::Held(_) => waiting = true,
                    _ => open.push(i),
                }
            }
            if !waiting {
                return open;
            }
            std::thread::sleep(poll);
        }
    }

    /// Stale locks this process took over, as `block N: why` (drained).
    pub fn take_takeovers(&self) -> Vec<String> {
        std::mem::take(&mut *self.takeovers.lock().unwrap())
    }

    /// Who holds block `i`'s lock, if a live process does.
    pub fn holder(&self, i: usize) -> Option<String> {
        match lock::state(&self.lock_path(i), self.lock_timeout) {
            lock::LockState::Held(o) => Some(o.describe()),
            _ => None,
        }
    }

    fn lock_path(&self, i: usize) -> PathBuf {
        self.dir.join(format!("block-{i:04}.lock"))
    }

    fn block_path(&self, i: usize) -> PathBuf {
        self.dir.join(format!("block-{i:04}.safetensors"))
    }

    /// After a failed run: removes the work directory if it holds no finished block and no live
    /// lock (nothing to resume, no shard at work), so a bad input leaves nothing behind.
    pub fn discard_if_empty(&self) {
        if !Self::holds_work(&self.dir, self.lock_timeout) {
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

    fn contains(&self, i: usize) -> bool {
        self.block_path(i).is_file()
    }

    fn claim(&self, i: usize) -> Result<BlockClaim> {
        let path = self.lock_path(i);
        let claim = lock::try_lock(&path, self.lock_timeout, &mut |why| {
            self.takeovers
                .lock()
                .unwrap()
                .push(format!("block {i}: took over a stale lock ({why})"))
        })?;
        Ok(match claim {
            // Finished between the caller's look and the lock.
            Claim::Granted(_) if self.contains(i) => BlockClaim::Done,
            Claim::Granted(l) => BlockClaim::Granted(Box::new(l)),
            Claim::Busy(o) => BlockClaim::Busy(o.describe()),
        })
    }

    fn save(&self, block: &Block, report: &BlockReport) -> Result<()> {
        let path = self.block_path(block.index());
        let tmp = private_tmp(&path);
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

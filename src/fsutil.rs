//! Crash-safe output: everything is written under a temporary sibling and renamed into place, so an
//! interrupted run never leaves a half-written result at the requested path.

use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

/// Refuses to replace an existing output unless `force` is set (checked before any expensive
/// work, and again when the result is moved into place).
pub fn check_output(out: &Path, force: bool) -> Result<()> {
    if out.exists() && !force {
        return Err(Error::Usage(format!(
            "{} already exists (use --force to replace it)",
            out.display()
        )));
    }
    Ok(())
}

/// Removes `.{name}.affq-tmp-PID` siblings left by runs that were killed (PID no longer running;
/// a quantization keeps its temporary directory for the whole calibration, so a killed one can
/// leave blocks' worth of spooled tensors behind).
fn remove_stale(parent: &Path, name: &str) {
    // Whether a process runs is read from /proc; without it nothing is removed.
    if !Path::new("/proc/self").exists() {
        return;
    }
    let prefix = format!(".{name}.affq-tmp-");
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for e in entries.flatten() {
        let file = e.file_name();
        let Some(pid) = file
            .to_str()
            .and_then(|f| f.strip_prefix(&prefix))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        let alive = Path::new("/proc").join(pid.to_string()).exists();
        if !alive && pid != std::process::id() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// A temporary directory next to the final output; removed on drop unless persisted.
pub struct TempDir {
    path: PathBuf,
    done: bool,
}

impl TempDir {
    pub fn beside(out: &Path) -> Result<Self> {
        let parent = match out.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        if !parent.is_dir() {
            return Err(Error::Usage(format!(
                "output directory {} does not exist",
                parent.display()
            )));
        }
        let name = out
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "out".into());
        remove_stale(&parent, &name);
        let path = parent.join(format!(".{name}.affq-tmp-{}", std::process::id()));
        if path.exists() {
            std::fs::remove_dir_all(&path).map_err(|e| Error::io(&path, e))?;
        }
        std::fs::create_dir(&path).map_err(|e| Error::io(&path, e))?;
        Ok(TempDir { path, done: false })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Moves the finished directory to `out`, replacing an existing one when `force` is set.
    pub fn persist(mut self, out: &Path, force: bool) -> Result<()> {
        check_output(out, force)?;
        if out.exists() {
            let meta = std::fs::symlink_metadata(out).map_err(|e| Error::io(out, e))?;
            if meta.is_dir() {
                std::fs::remove_dir_all(out).map_err(|e| Error::io(out, e))?;
            } else {
                std::fs::remove_file(out).map_err(|e| Error::io(out, e))?;
            }
        }
        std::fs::rename(&self.path, out).map_err(|e| Error::io(out, e))?;
        self.done = true;
        Ok(())
    }
}

impl TempDir {
    /// Moves the file `name` of this directory to `out` (a file), replacing an existing one when
    /// `force` is set; the directory itself is removed on drop.
    pub fn persist_file(self, name: &str, out: &Path, force: bool) -> Result<()> {
        check_output(out, force)?;
        if out.is_dir() {
            return Err(Error::Usage(format!("{}: is a directory", out.display())));
        }
        std::fs::rename(self.path.join(name), out).map_err(|e| Error::io(out, e))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

pub fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    let mut s = serde_json::to_string_pretty(v).map_err(|e| Error::Runtime(e.to_string()))?;
    s.push('\n');
    std::fs::write(path, s).map_err(|e| Error::io(path, e))
}

/// Hex sha256 of a file, streamed.
pub fn sha256_file(path: &Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

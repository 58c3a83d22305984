//! Per-block claims in a work directory shared by several processes, possibly on several machines
//! (a Slurm array or a Kubernetes Indexed Job on a shared filesystem).
//!
//! A claim is a lock file `block-NNNN.lock` created whole by hard-linking a private temporary
//! into place (`link` is atomic and exclusive on local filesystems and on NFS), holding the
//! owner's host, process id and a random token. While the owner works, a heartbeat thread touches
//! the file's mtime every [`HEARTBEAT`]. A lock is **stale**, and may be taken over, when
//! - its owner is on this host and its process is gone (read from `/proc`), or
//! - its mtime is older than the stale timeout (`--lock-timeout`, default 600 s): the owner, on any
//!   host, stopped beating (killed, node lost, filesystem cut off).
//!
//! `flock`/`fcntl` locks are not used: they vanish with the process that holds them, which is
//! what we want, but their behaviour on network filesystems depends on the server and mount
//! options, and a lock file can be read by a person (`cat`) to see who holds a block.
//!
//! Locks only prevent duplicated work. Correctness does not depend on them: a block's tensors are
//! a deterministic function of the settings and the model (on machines that pick the same CPU
//! kernels; only the report's timing differs), and a finished block is written to a private
//! temporary file and renamed into place, so two processes that both compute a block (e.g. after
//! a takeover raced with a slow owner) write the same tensors, and a reader sees either no file
//! or a whole one.

use crate::error::{Error, Result};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, SystemTime};

/// How often a held lock's mtime is refreshed.
pub const HEARTBEAT: Duration = Duration::from_secs(20);

/// Who holds a lock, as written in its file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub host: String,
    pub pid: u32,
    pub token: String,
}

impl Owner {
    /// This process.
    pub fn me() -> Self {
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        Owner {
            host: hostname(),
            pid: std::process::id(),
            token: format!("{:x}", nanos ^ ((std::process::id() as u128) << 64)),
        }
    }

    fn text(&self) -> String {
        format!(
            "host {}\npid {}\ntoken {}\n",
            self.host, self.pid, self.token
        )
    }

    fn parse(s: &str) -> Option<Self> {
        let mut host = None;
        let mut pid = None;
        let mut token = None;
        for line in s.lines() {
            match line.split_once(' ') {
                Some(("host", v)) => host = Some(v.to_string()),
                Some(("pid", v)) => pid = v.parse().ok(),
                Some(("token", v)) => token = Some(v.to_string()),
                _ => {}
            }
        }
        Some(Owner {
            host: host?,
            pid: pid?,
            token: token?,
        })
    }

    /// `pid P on HOST`.
    pub fn describe(&self) -> String {
        format!("pid {} on {}", self.pid, self.host)
    }
}

/// This process's node as locks name it: the host name and, where the kernel tells it, the pid
/// namespace (`HOST~pid:[INODE]`), so containers that share a host name but not their process
/// table (whose pids `/proc` cannot check for each other) are different nodes.
pub fn hostname() -> String {
    let ns = std::fs::read_link("/proc/self/ns/pid")
        .map(|p| format!("~{}", p.display()))
        .unwrap_or_default();
    format!("{}{ns}", gethostname())
}

/// This machine's host name (`gethostname`), or `unknown-host`.
fn gethostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname writes at most that many bytes.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "unknown-host".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// Whether process `pid` of this host runs (`/proc/PID` exists; without /proc, assumed alive).
pub fn process_alive(pid: u32) -> bool {
    if !Path::new("/proc/self").exists() {
        return true;
    }
    Path::new("/proc").join(pid.to_string()).exists()
}

/// A temporary name private to this process: `NAME.tmp.HOST.PID` (HOST as locks name it, so two
/// containers with the same host name and pid never share one). A work directory's next run
/// removes those of processes that are gone.
pub fn private_tmp(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp.{}.{}", hostname(), std::process::id()));
    path.with_file_name(name)
}

/// The state of a lock file found on disk.
#[derive(Debug)]
pub enum LockState {
    Free,
    /// Held by a live owner.
    Held(Owner),
    /// Held by an owner that is gone or stopped beating; `why` says which.
    Stale {
        owner: Option<Owner>,
        why: String,
    },
}

/// Reads the state of the lock at `path` under the stale timeout `stale`.
pub fn state(path: &Path, stale: Duration) -> LockState {
    let Ok(text) = std::fs::read_to_string(path) else {
        return LockState::Free;
    };
    let owner = Owner::parse(&text);
    let age = std::fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| SystemTime::now().duration_since(t).ok())
        .unwrap_or_default();
    match owner {
        Some(o) if o.host == hostname() && !process_alive(o.pid) => LockState::Stale {
            why: format!("{} has exited", o.describe()),
            owner: Some(o),
        },
        _ if age > stale => LockState::Stale {
            why: format!(
                "no heartbeat for {:.0} s (timeout {:.0} s)",
                age.as_secs_f64(),
                stale.as_secs_f64()
            ),
            owner,
        },
        Some(o) => LockState::Held(o),
        // A file being written by its creator (the owner's text not there yet).
        None => LockState::Held(Owner {
            host: "?".into(),
            pid: 0,
            token: String::new(),
        }),
    }
}

/// `(device, inode)` of the file at `path`.
fn inode(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// A held lock: beats while alive, removed on drop (if it is still ours).
pub struct Lock {
    path: PathBuf,
    owner: Owner,
    stop: Option<mpsc::Sender<()>>,
    beat: Option<std::thread::JoinHandle<()>>,
}

/// What [`try_lock`] found.
pub enum Claim {
    Granted(Lock),
    /// Held by a live owner.
    Busy(Owner),
}

/// Creates the lock at `path` holding `owner`'s text, unless a lock is there. The text is written
/// to a private temporary (`NAME.tmp.HOST.PID`, removed by the next run if this process dies) and
/// hard-linked into place (`link` fails if `path` exists; atomic and exclusive on NFS too), so a
/// lock file is never seen empty: a process killed between creating and writing an
/// `O_EXCL` file would leave an owner-less lock that only the timeout could clear.
fn create(path: &Path, owner: &Owner) -> std::io::Result<bool> {
    let tmp = private_tmp(path);
    let written = std::fs::File::create(&tmp).and_then(|mut f| {
        use std::io::Write;
        f.write_all(owner.text().as_bytes())?;
        f.sync_all()
    });
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    let linked = match std::fs::hard_link(&tmp, path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        // A filesystem without hard links (some FUSE and SMB mounts): `O_EXCL`, then the text.
        Err(_) => create_exclusive(path, owner),
    };
    let _ = std::fs::remove_file(&tmp);
    linked
}

/// `O_CREAT|O_EXCL` and a write: exclusive, but empty for a moment.
fn create_exclusive(path: &Path, owner: &Owner) -> std::io::Result<bool> {
    use std::io::Write;
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
    {
        Ok(mut f) => {
            let written = f
                .write_all(owner.text().as_bytes())
                .and_then(|()| f.sync_all());
            if let Err(e) = written {
                // No empty lock left behind (e.g. a full disk).
                drop(f);
                let _ = std::fs::remove_file(path);
                return Err(e);
            }
            Ok(true)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(e),
    }
}

/// Tries to take the lock at `path`; a stale lock is taken over (`on_takeover(why)` is told).
pub fn try_lock(path: &Path, stale: Duration, on_takeover: &mut dyn FnMut(&str)) -> Result<Claim> {
    let me = Owner::me();
    let io = |e| Error::io(path, e);
    for _ in 0..4 {
        if create(path, &me).map_err(io)? {
            return Ok(Claim::Granted(Lock::start(path.to_path_buf(), me)));
        }
        // The file judged, by inode: what is moved aside below must be this very file.
        let judged = inode(path);
        match state(path, stale) {
            LockState::Free => continue,
            LockState::Held(o) => return Ok(Claim::Busy(o)),
            LockState::Stale { why, .. } => {
                // Move the stale file aside under a private name (rename is atomic), then check
                // that what was moved is the lock judged stale and not a fresh one that another
                // process created in between; if it was fresh, put it back (a link fails if yet
                // another lock appeared meanwhile: then two holders may compute the block, which
                // costs time, not correctness).
                let aside = path.with_extension(format!("lock.stale.{}", me.token));
                if judged.is_none() || std::fs::rename(path, &aside).is_err() {
                    continue;
                }
                if inode(&aside) != judged {
                    let _ = std::fs::hard_link(&aside, path);
                    let _ = std::fs::remove_file(&aside);
                    continue;
                }
                let _ = std::fs::remove_file(&aside);
                on_takeover(&why);
            }
        }
    }
    Err(Error::Runtime(format!(
        "{}: could not take the lock (contended)",
        path.display()
    )))
}

impl Lock {
    fn start(path: PathBuf, owner: Owner) -> Self {
        let (tx, rx) = mpsc::channel::<()>();
        let p = path.clone();
        let beat = std::thread::spawn(move || {
            while let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(HEARTBEAT) {
                if let Ok(f) = std::fs::OpenOptions::new().write(true).open(&p) {
                    let _ = f.set_modified(SystemTime::now());
                }
            }
        });
        Lock {
            path,
            owner,
            stop: Some(tx),
            beat: Some(beat),
        }
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(b) = self.beat.take() {
            let _ = b.join();
        }
        let ours = std::fs::read_to_string(&self.path)
            .ok()
            .and_then(|t| Owner::parse(&t))
            .is_some_and(|o| o == self.owner);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_lock_is_busy_and_a_dead_owner_is_stale() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("block-0000.lock");
        let long = Duration::from_secs(3600);
        let Claim::Granted(lock) = try_lock(&p, long, &mut |_| panic!()).unwrap() else {
            panic!("free lock not granted")
        };
        assert!(matches!(
            try_lock(&p, long, &mut |_| panic!()).unwrap(),
            Claim::Busy(_)
        ));
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["block-0000.lock"], "temporary left beside the lock");
        assert_eq!(
            Owner::parse(&std::fs::read_to_string(&p).unwrap()),
            Some(Owner::me()).map(|o| Owner {
                token: lock.owner.token.clone(),
                ..o
            })
        );
        drop(lock);
        assert!(!p.exists(), "released lock left behind");

        // A lock of a process of this host that is gone is taken over at once.
        let dead = Owner {
            host: hostname(),
            pid: u32::MAX - 1,
            token: "x".into(),
        };
        std::fs::write(&p, dead.text()).unwrap();
        let mut why = String::new();
        let Claim::Granted(_l) = try_lock(&p, long, &mut |w| why = w.to_string()).unwrap() else {
            panic!("dead owner's lock not taken over")
        };
        assert!(why.contains("exited"), "{why}");
    }

    #[test]
    fn another_hosts_lock_is_stale_after_the_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("block-0001.lock");
        let other = Owner {
            host: "elsewhere".into(),
            pid: 1,
            token: "y".into(),
        };
        std::fs::write(&p, other.text()).unwrap();
        let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        f.set_modified(SystemTime::now() - Duration::from_secs(120))
            .unwrap();
        assert!(matches!(
            state(&p, Duration::from_secs(600)),
            LockState::Held(_)
        ));
        assert!(matches!(
            state(&p, Duration::from_secs(60)),
            LockState::Stale { .. }
        ));
    }
}

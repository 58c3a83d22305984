//! Crash-safe, resumable calibration through the binary: a run killed with SIGKILL after some
//! blocks, resumed with `--resume`, writes the same checkpoint byte for byte as an uninterrupted
//! run; a leftover work directory is never silently reused or discarded.

use crate::common::*;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// W4A4KV4 FlatQuant + GPTQ on 16 × 256 tokens, 3 epochs: long enough per block to be killed.
fn run() -> Calibrated {
    Calibrated::new(16, 256)
        .method("flatquant")
        .scheme(4, 4)
        .kv(4)
        .gptq()
        .epochs(3)
}

fn args_for(out: &std::path::Path, extra: &[&str]) -> Vec<String> {
    quantize_stories_args(out, &run().with(extra).args())
}

#[test]
fn killed_run_resumes_to_a_byte_identical_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let (full, cut) = (tmp.path().join("full"), tmp.path().join("cut"));
    quantize_stories(&full, &run().args());

    // Start the same run and SIGKILL it once two blocks are on disk.
    let work = tmp.path().join(".cut.affq-work");
    let mut child = Command::new(env!("CARGO_BIN_EXE_affq"))
        .args(args_for(&cut, &[]))
        .env("AFFQ_DATA_DIR", data_dir())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while !work.join("block-0001.safetensors").is_file() {
        assert!(t0.elapsed() < Duration::from_secs(120), "no block finished");
        assert!(child.try_wait().unwrap().is_none(), "run ended early");
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(!cut.exists(), "the run finished before it could be killed");
    assert!(work.join("run.json").is_file());

    // Without --resume the leftover work is refused, not silently reused or discarded.
    let o = affq(
        &args_for(&cut, &[])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("--resume"), "{err}");
    // Other settings cannot resume it.
    let o = affq(
        &args_for(&cut, &["--seed", "7", "--resume"])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("other settings"));

    let o = affq(
        &args_for(&cut, &["--resume"])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("resuming: blocks 0.."), "{err}");
    for f in ["model.safetensors", "config.json"] {
        assert!(
            std::fs::read(full.join(f)).unwrap() == std::fs::read(cut.join(f)).unwrap(),
            "{f} differs between the uninterrupted and the resumed run"
        );
    }
    assert!(!work.exists(), "work directory left behind");
}

#[test]
fn resume_needs_a_calibrated_run() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o");
    quantize_stories_refused(&out, &["--resume"], "--resume");
}

//! Sharded calibration through the binary: shards run as concurrent processes (one of them
//! duplicated, one killed mid-block and rerun), then `--merge`, give the same checkpoint byte for
//! byte as one process with the same flags; a failed or duplicated shard cannot corrupt it.

use crate::common::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// W4A4KV4 FlatQuant + GPTQ (Hessians from full-precision inputs) on stories260K: long enough per
/// block (≈ 1 s) for a shard to be killed inside one.
fn run() -> Calibrated {
    Calibrated::new(8, 256)
        .method("flatquant")
        .scheme(4, 4)
        .kv(4)
        .gptq()
        .epochs(2)
        .with(&["--gptq-fp-inputs"])
}

fn args(model: &Path, out: &Path, flags: &[String], extra: &[&str]) -> Vec<String> {
    let mut a = vec![
        "quantize".to_string(),
        model.to_str().unwrap().to_string(),
        "-o".to_string(),
        out.to_str().unwrap().to_string(),
    ];
    a.extend(flags.iter().cloned());
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

fn spawn(a: &[String]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_affq"))
        .args(a)
        .arg("--json")
        .env("AFFQ_DATA_DIR", data_dir())
        .env("RAYON_NUM_THREADS", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits for a shard; asserts success; returns its JSON report.
fn finish(c: Child, what: &str) -> serde_json::Value {
    let o = c.wait_with_output().unwrap();
    assert!(
        o.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap()
}

fn blocks_of(v: &serde_json::Value, key: &str) -> Vec<usize> {
    serde_json::from_value(v[key].clone()).unwrap()
}

fn assert_same(a: &Path, b: &Path) {
    for f in ["model.safetensors", "config.json"] {
        assert!(
            std::fs::read(a.join(f)).unwrap() == std::fs::read(b.join(f)).unwrap(),
            "{f} differs between the one-process run {} and the merged shards {}",
            a.display(),
            b.display()
        );
    }
}

/// Every `block-*.safetensors` in `work` is a whole file (its header parses and its length is
/// what the header says).
fn assert_whole_blocks(work: &Path) {
    for e in std::fs::read_dir(work).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("block-") && name.ends_with(".safetensors") {
            let bytes = std::fs::read(e.path()).unwrap();
            let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
            let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
            let end = header
                .as_object()
                .unwrap()
                .values()
                .filter_map(|t| t["data_offsets"][1].as_u64())
                .max()
                .unwrap() as usize;
            assert_eq!(bytes.len(), 8 + n + end, "{name} is partial");
        }
    }
}

fn one_process(model: &Path, out: &Path, flags: &[String]) {
    let c = spawn(&args(model, out, flags, &[]));
    finish(c, "one-process run");
}

#[test]
fn concurrent_duplicated_and_killed_shards_merge_to_the_one_process_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let model = stories_hf();
    let flags = run().args();
    let single = tmp.path().join("single");
    one_process(&model, &single, &flags);

    // Three shards and a duplicate of the second, all at once.
    let out = tmp.path().join("sharded");
    let work = tmp.path().join(".sharded.affq-work");
    let shards: Vec<Child> = ["0/3", "1/3", "2/3", "1/3"]
        .iter()
        .map(|s| spawn(&args(&model, &out, &flags, &["--shard", s])))
        .collect();
    let reports: Vec<serde_json::Value> = shards
        .into_iter()
        .enumerate()
        .map(|(k, c)| finish(c, &format!("shard process {k}")))
        .collect();
    // No block was calibrated twice, and together they calibrated every block.
    let mut all: Vec<usize> = reports
        .iter()
        .flat_map(|r| blocks_of(r, "calibrated"))
        .collect();
    all.sort();
    let total = reports[0]["total_blocks"].as_u64().unwrap() as usize;
    assert_eq!(all, (0..total).collect::<Vec<_>>(), "{reports:?}");
    // Each shard owns its balanced range; the duplicate only did what the original had not.
    assert_eq!(blocks_of(&reports[0], "blocks"), vec![0, 2]);
    assert_eq!(blocks_of(&reports[1], "blocks"), vec![2, 4]);
    assert!(!out.exists(), "a shard wrote the checkpoint");
    assert_whole_blocks(&work);
    let merged = finish(spawn(&args(&model, &out, &flags, &["--merge"])), "merge");
    assert!(merged["transforms"].is_array());
    assert_same(&single, &out);
    assert!(!work.exists(), "work directory left behind by the merge");

    // A shard killed inside a block leaves no partial block; its rerun takes the dead process's
    // lock over and completes the range.
    let out2 = tmp.path().join("killed");
    let work2 = tmp.path().join(".killed.affq-work");
    let mut child = spawn(&args(&model, &out2, &flags, &["--shard", "0/1"]));
    let t0 = Instant::now();
    let lock1 = work2.join("block-0001.lock");
    // Block 1 is claimed before block 0 is saved when block 0's weight quantizer runs beside
    // block 1's training, after it when one block runs at a time: wait for both.
    while !(lock1.is_file() && work2.join("block-0000.safetensors").is_file()) {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "block 1 never started"
        );
        assert!(child.try_wait().unwrap().is_none(), "shard ended early");
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL, inside block 1
    child.wait().unwrap();
    assert!(work2.join("block-0000.safetensors").is_file());
    assert!(!work2.join("block-0001.safetensors").is_file());
    assert!(
        lock1.is_file(),
        "a killed shard's lock stays until taken over"
    );
    assert_whole_blocks(&work2);

    // Merging now names what is missing and writes nothing.
    let o = affq(&args(&model, &out2, &flags, &["--merge"]));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("blocks 1.."), "{err}");
    assert!(!out2.exists());

    let o = affq(&args(&model, &out2, &flags, &["--shard", "0/1"]));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("took over a stale lock"), "{err}");
    assert!(!lock1.exists());
    let leftovers: Vec<String> = std::fs::read_dir(&work2)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp.") || n.ends_with(".lock"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    finish(spawn(&args(&model, &out2, &flags, &["--merge"])), "merge");
    assert_same(&single, &out2);
}

#[test]
fn shards_refuse_other_settings_and_unshardable_plans() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o");
    let quick = Calibrated::new(2, 64)
        .method("flatquant")
        .scheme(4, 4)
        .rtn()
        .epochs(1)
        .args();
    let mut a = quick.clone();
    a.extend(["--shard".to_string(), "1/2".to_string()]);
    quantize_stories(&out, &a);
    // Another seed is other settings: refused, the pinned settings kept.
    let mut b = a.clone();
    b.extend(["--seed".to_string(), "3".to_string()]);
    let o = affq(&quantize_stories_args(&out, &b));
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("other settings"));

    // GPTQ on the quantized model's own inputs cannot be sharded; RTN has nothing to shard.
    let gptq = Calibrated::new(2, 64)
        .method("rtn")
        .scheme(4, 16)
        .gptq()
        .with(&["--shard", "0/2"])
        .args();
    quantize_stories_refused(&tmp.path().join("g"), &gptq, "--gptq-fp-inputs");
    quantize_stories_refused(
        &tmp.path().join("r"),
        &["--bits", "4", "--shard", "0/2"],
        "--shard and --merge",
    );
    quantize_stories_refused(
        &tmp.path().join("s"),
        &["--method", "flatquant", "--shard", "2/2"],
        "0-based",
    );
    quantize_stories_refused(
        &tmp.path().join("m"),
        &quick
            .iter()
            .map(String::as_str)
            .chain(["--merge"])
            .collect::<Vec<_>>(),
        "no work directory",
    );
}

#[test]
fn shard_from_the_scheduler_environment() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o");
    let mut a = quantize_stories_args(
        &out,
        &Calibrated::new(2, 64)
            .method("flatquant")
            .scheme(4, 4)
            .rtn()
            .epochs(1)
            .with(&["--shard-from-env", "--json"])
            .args(),
    );
    let run = |a: &[String], env: &[(&str, &str)]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_affq"));
        c.args(a).env("AFFQ_DATA_DIR", data_dir());
        for k in [
            "SLURM_ARRAY_TASK_ID",
            "SLURM_ARRAY_TASK_MIN",
            "SLURM_ARRAY_TASK_COUNT",
            "JOB_COMPLETION_INDEX",
        ] {
            c.env_remove(k);
        }
        for (k, v) in env {
            c.env(k, v);
        }
        c.output().unwrap()
    };
    let o = run(
        &a,
        &[
            ("SLURM_ARRAY_TASK_ID", "11"),
            ("SLURM_ARRAY_TASK_MIN", "10"),
            ("SLURM_ARRAY_TASK_COUNT", "2"),
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["shard"], "1/2");
    // Kubernetes gives the index only: the count comes from --shards.
    let o = run(&a, &[("JOB_COMPLETION_INDEX", "0")]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--shards"));
    a.extend(["--shards".to_string(), "2".to_string()]);
    let o = run(&a, &[("JOB_COMPLETION_INDEX", "0")]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["shard"], "0/2");
    assert!(blocks_of(&v, "missing").is_empty(), "{v}");
}

/// SmolLM2-135M (30 blocks): two concurrent shards and a merge equal one process, byte for byte.
#[test]
fn smollm2_two_shards_merge_to_the_one_process_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let model: PathBuf = smollm2_dir();
    let flags = Calibrated::new(2, 64)
        .method("flatquant")
        .scheme(4, 4)
        .rtn()
        .epochs(1)
        .args();
    let single = tmp.path().join("single");
    one_process(&model, &single, &flags);
    let out = tmp.path().join("sharded");
    let shards: Vec<Child> = ["0/2", "1/2"]
        .iter()
        .map(|s| spawn(&args(&model, &out, &flags, &["--shard", s])))
        .collect();
    for (k, c) in shards.into_iter().enumerate() {
        finish(c, &format!("shard {k}/2"));
    }
    finish(spawn(&args(&model, &out, &flags, &["--merge"])), "merge");
    assert_same(&single, &out);
}

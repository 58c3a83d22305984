//! Bad input through the real binary: each case must give exit code 2, exactly one `error:` line
//! on stderr that names the offending file, no panic, and no output left behind.

use crate::common::*;
use std::path::{Path, PathBuf};

fn copy_stories(dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        std::fs::copy(stories_dir().join("hf").join(f), dst.join(f)).unwrap();
    }
}

/// Runs affq and checks the error contract; returns stderr.
fn expect_input_error(args: &[&str], must_name: &str, must_say: &str) -> String {
    let out = affq(args);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(2), "args {args:?}: stderr {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one line, got: {err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    assert!(
        err.contains(must_name),
        "error should name {must_name}: {err}"
    );
    assert!(
        err.to_lowercase().contains(&must_say.to_lowercase()),
        "error should say {must_say:?}: {err}"
    );
    assert!(out.stdout.is_empty(), "no stdout on error");
    err
}

fn eval_args(model: &Path) -> Vec<String> {
    vec![
        "eval".into(),
        model.display().to_string(),
        "--seqlen".into(),
        "64".into(),
        "--max-windows".into(),
        "1".into(),
    ]
}

fn run_eval_error(model: &Path, must_name: &str, must_say: &str) {
    let a = eval_args(model);
    let args: Vec<&str> = a.iter().map(String::as_str).collect();
    expect_input_error(&args, must_name, must_say);
}

fn edit_header(path: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    edit(&mut header);
    let mut h = serde_json::to_vec(&header).unwrap();
    while !(8 + h.len()).is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(&bytes[8 + n..]);
    std::fs::write(path, out).unwrap();
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let p = dir.join("config.json");
    let mut v = read_json(&p);
    edit(&mut v);
    std::fs::write(&p, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
}

#[test]
fn missing_model_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("nope");
    run_eval_error(&p, "nope", "no such file");
}

#[test]
fn missing_config() {
    let tmp = tempfile::tempdir().unwrap();
    copy_stories(tmp.path());
    std::fs::remove_file(tmp.path().join("config.json")).unwrap();
    run_eval_error(tmp.path(), "config.json", "missing");
}

#[test]
fn missing_weights() {
    let tmp = tempfile::tempdir().unwrap();
    copy_stories(tmp.path());
    std::fs::remove_file(tmp.path().join("model.safetensors")).unwrap();
    run_eval_error(
        tmp.path(),
        &tmp.path().display().to_string(),
        "no model.safetensors",
    );
}

#[test]
fn truncated_safetensors() {
    let tmp = tempfile::tempdir().unwrap();
    copy_stories(tmp.path());
    let p = tmp.path().join("model.safetensors");
    let len = std::fs::metadata(&p).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(len - 1000)
        .unwrap();
    run_eval_error(tmp.path(), "model.safetensors", "truncated");
}

#[test]
fn safetensors_header_lies_about_size() {
    let tmp = tempfile::tempdir().unwrap();
    copy_stories(tmp.path());
    edit_header(&tmp.path().join("model.safetensors"), |h| {
        // Claim a larger shape than the bytes the offsets give.
        h["model.norm.weight"]["shape"] = serde_json::json!([128]);
    });
    run_eval_error(
        tmp.path(),
        "model.safetensors",
        "invalid safetensors header",
    );
}

#[test]
fn safetensors_offsets_overlap() {
    let tmp = tempfile::tempdir().unwrap();
    copy_stories(tmp.path());
    edit_header(&tmp.path().join("model.safetensors"), |h| {
        let o = h["model.norm.weight"]["data_offsets"].clone();
        let (a, b) = (o[0].as_u64().unwrap(), o[1].as_u64().unwrap());
        h["model.norm.weight"]["data_offsets"] = serde_json::json!([a - 8, b - 8]);
    });
    run_eval_error(tmp.path(), "model.safetensors", "invalid");
}

#[test]
fn shape_disagrees_with_config() {
    let tmp = tempfile::tempdir().unwrap();
    copy_stories(tmp.path());
    edit_config(tmp.path(), |c| {
        c["intermediate_size"] = serde_json::json!(170)
    });
    run_eval_error(tmp.path(), "model.safetensors", "config.json implies");
}

#[test]
fn unknown_architecture() {
    let tmp = tempfile::tempdir().unwrap();
    copy_stories(tmp.path());
    edit_config(tmp.path(), |c| {
        c["architectures"] = serde_json::json!(["GPTNeoXForCausalLM"])
    });
    let a = eval_args(tmp.path());
    let args: Vec<&str> = a.iter().map(String::as_str).collect();
    let err = expect_input_error(&args, "config.json", "GPTNeoXForCausalLM");
    assert!(
        err.contains("LlamaForCausalLM") && err.contains("Qwen2ForCausalLM"),
        "lists supported: {err}"
    );
}

#[test]
fn invalid_config_json() {
    let tmp = tempfile::tempdir().unwrap();
    copy_stories(tmp.path());
    std::fs::write(tmp.path().join("config.json"), b"{\"architectures\": [").unwrap();
    run_eval_error(tmp.path(), "config.json", "invalid config.json");
}

#[test]
fn bad_tensor_dtype() {
    let tmp = tempfile::tempdir().unwrap();
    copy_stories(tmp.path());
    edit_header(&tmp.path().join("model.safetensors"), |h| {
        // Same byte size, integer type: not a weight dtype.
        h["model.norm.weight"]["dtype"] = serde_json::json!("I32");
    });
    run_eval_error(tmp.path(), "model.safetensors", "dtype");
}

#[test]
fn sharded_index_with_missing_shard() {
    let tmp = tempfile::tempdir().unwrap();
    copy_stories(tmp.path());
    std::fs::rename(
        tmp.path().join("model.safetensors"),
        tmp.path().join("model-00001-of-00002.safetensors"),
    )
    .unwrap();
    let index = serde_json::json!({"metadata": {"total_size": 1}, "weight_map": {
        "model.norm.weight": "model-00001-of-00002.safetensors",
        "model.embed_tokens.weight": "model-00002-of-00002.safetensors"}});
    std::fs::write(
        tmp.path().join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    run_eval_error(
        tmp.path(),
        "model.safetensors.index.json",
        "model-00002-of-00002.safetensors",
    );
}

#[test]
fn missing_eval_data_names_file_and_checksum() {
    let tmp = tempfile::tempdir().unwrap();
    let model = stories_dir().join("hf");
    let empty = tmp.path().display().to_string();
    let args = ["eval", model.to_str().unwrap(), "--data-dir", &empty];
    let err = expect_input_error(&args, "wiki.test.raw", "missing data file");
    assert!(
        err.contains("173c87a53759e0201f33e0ccf978e510c2042d7f2cb78229d9a50d79b9e7dd08"),
        "{err}"
    );
}

/// A minimal GGUF v3 with one metadata string and the given tensors `(name, dims(ne), type, bytes)`.
fn gguf_bytes(magic: &[u8; 4], tensors: &[(&str, Vec<u64>, u32, usize)]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(magic);
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    b.extend_from_slice(&1u64.to_le_bytes());
    let s = |b: &mut Vec<u8>, x: &str| {
        b.extend_from_slice(&(x.len() as u64).to_le_bytes());
        b.extend_from_slice(x.as_bytes());
    };
    s(&mut b, "general.architecture");
    b.extend_from_slice(&8u32.to_le_bytes());
    s(&mut b, "llama");
    let mut offset = 0u64;
    for (name, ne, ty, nbytes) in tensors {
        s(&mut b, name);
        b.extend_from_slice(&(ne.len() as u32).to_le_bytes());
        for d in ne {
            b.extend_from_slice(&d.to_le_bytes());
        }
        b.extend_from_slice(&ty.to_le_bytes());
        b.extend_from_slice(&offset.to_le_bytes());
        offset += (*nbytes as u64).div_ceil(32) * 32;
    }
    while b.len() % 32 != 0 {
        b.push(0);
    }
    b.resize(b.len() + offset as usize, 0);
    b
}

fn import_error(gguf: &[u8], must_say: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("model.gguf");
    std::fs::write(&p, gguf).unwrap();
    let out = tmp.path().join("out");
    expect_input_error(
        &["import", p.to_str().unwrap(), "-o", out.to_str().unwrap()],
        "model.gguf",
        must_say,
    );
    assert!(!out.exists(), "no output after a failed import");
    let leftovers: Vec<PathBuf> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(leftovers, vec![p], "no temporary files left behind");
}

#[test]
fn gguf_bad_magic() {
    import_error(&gguf_bytes(b"GGML", &[]), "not a GGUF file");
}

#[test]
fn gguf_unsupported_tensor_type() {
    // Type 16 is IQ2_XXS: not decodable here.
    import_error(
        &gguf_bytes(b"GGUF", &[("token_embd.weight", vec![256, 4], 16, 66 * 4)]),
        "unsupported GGML type",
    );
}

#[test]
fn gguf_truncated_header() {
    let b = gguf_bytes(b"GGUF", &[("token_embd.weight", vec![32, 4], 0, 512)]);
    import_error(&b[..40], "truncated");
}

#[test]
fn gguf_truncated_tensor_data() {
    let full = std::fs::read(stories_dir().join("stories260K.gguf")).unwrap();
    import_error(&full[..full.len() / 2], "truncated tensor data");
}

#[test]
fn gguf_absurd_counts_do_not_allocate() {
    let mut b = gguf_bytes(b"GGUF", &[]);
    b[8..16].copy_from_slice(&u64::MAX.to_le_bytes()); // tensor count
    import_error(&b, "cannot fit");
}

#[test]
fn import_refuses_existing_output_without_force() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let g = stories_dir().join("stories260K.gguf");
    expect_input_error(
        &["import", g.to_str().unwrap(), "-o", out.to_str().unwrap()],
        "out",
        "--force",
    );
}

#[test]
fn usage_errors_exit_2() {
    let out = affq(&["eval"]);
    assert_eq!(out.status.code(), Some(2));
    let out = affq(&["eval", "x", "--seqlen", "abc"]);
    assert_eq!(out.status.code(), Some(2));
}

/// Overwrites the bytes of tensor `name` in a safetensors file with `bytes` (repeated).
fn poke_tensor(path: &Path, name: &str, bytes: &[u8]) {
    let mut data = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(data[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&data[8..8 + n]).unwrap();
    let off = &header[name]["data_offsets"];
    let (a, b) = (
        8 + n + off[0].as_u64().unwrap() as usize,
        8 + n + off[1].as_u64().unwrap() as usize,
    );
    for (i, d) in data[a..b].iter_mut().enumerate() {
        *d = bytes[i % bytes.len()];
    }
    std::fs::write(path, data).unwrap();
}

#[test]
fn non_finite_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tmp.path().join("m");
    copy_stories(&m);
    // f32 NaN in every element of one projection.
    poke_tensor(
        &m.join("model.safetensors"),
        "model.layers.0.self_attn.q_proj.weight",
        &f32::NAN.to_le_bytes(),
    );
    run_eval_error(&m, "model.safetensors", "non-finite");
    let out = tmp.path().join("q");
    expect_input_error(
        &["quantize", m.to_str().unwrap(), "-o", out.to_str().unwrap()],
        "model.safetensors",
        "q_proj.weight",
    );
    assert!(!out.exists());
}

/// A small W4A4 checkpoint of stories260K.
fn quantized_stories(dir: &Path) {
    let o = affq(&[
        "quantize",
        stories_hf().to_str().unwrap(),
        "-o",
        dir.to_str().unwrap(),
        "--bits",
        "4",
        "--a-bits",
        "4",
    ]);
    assert!(o.status.success());
}

#[test]
fn quantized_checkpoint_with_a_missing_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let q = tmp.path().join("q");
    quantized_stories(&q);
    edit_header(&q.join("model.safetensors"), |h| {
        let scale = h["model.layers.1.mlp.down_proj.weight_scale"].clone();
        h.as_object_mut()
            .unwrap()
            .remove("model.layers.1.mlp.down_proj.weight_scale");
        // Keep the byte range accounted for under another (unused) name.
        h["unused.padding"] = scale;
    });
    run_eval_error(&q, "model.safetensors", "down_proj.weight_scale");
}

#[test]
fn quantized_checkpoint_with_a_corrupted_scale() {
    let tmp = tempfile::tempdir().unwrap();
    let q = tmp.path().join("q");
    quantized_stories(&q);
    poke_tensor(
        &q.join("model.safetensors"),
        "model.layers.0.self_attn.o_proj.weight_scale",
        &(-1.0f32).to_le_bytes(),
    );
    run_eval_error(&q, "model.safetensors", "weight_scale");
}

#[test]
fn conflicting_flags() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o");
    for args in [
        vec!["--sym", "--asym"],
        vec!["--weight-quantizer", "rtn", "--act-order"],
        vec!["--method", "rtn", "--epochs", "2"],
        vec!["--method", "flatquant", "--group-size", "7"],
    ] {
        let mut all = vec![
            "quantize",
            stories_hf().to_str().unwrap().to_string().leak(),
            "-o",
            out.to_str().unwrap().to_string().leak(),
        ];
        all.extend_from_slice(&args);
        let o = affq(&all);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
        assert!(!out.exists());
    }
}

#[test]
fn full_disk_leaves_no_output() {
    // Writes fail with ENOSPC after 4 KiB (fault injection): a run-time I/O failure (exit 1)
    // naming the file being written, and nothing at the output path or beside it.
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("q");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_affq"))
        .args([
            "quantize",
            stories_hf().to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
        ])
        .env("AFFQ_DATA_DIR", data_dir())
        .env("AFFQ_TEST_DISK_LIMIT", "4096")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("model.safetensors"), "{err}");
    assert!(err.to_lowercase().contains("no space left"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn a_killed_runs_temporary_directory_is_removed() {
    // A run killed mid-calibration leaves `.OUT.affq-tmp-PID` (its spooled blocks): the next run
    // writing OUT removes it when PID no longer runs, and leaves a live process's one alone.
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("q");
    let dead = tmp.path().join(".q.affq-tmp-999999999");
    let live = tmp
        .path()
        .join(format!(".q.affq-tmp-{}", std::process::id()));
    for d in [&dead, &live] {
        std::fs::create_dir(d).unwrap();
        std::fs::write(d.join("model.safetensors.spool"), b"partial").unwrap();
    }
    quantize_stories(&out, &["--bits", "4"]);
    assert!(out.join("model.safetensors").is_file());
    assert!(!dead.exists(), "stale temporary directory left");
    assert!(live.exists(), "a running process's directory was removed");
}

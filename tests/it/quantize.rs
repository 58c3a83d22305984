//! The quantization core end to end: checkpoints written and read back, RTN and rotation through
//! the binary on stories260K, rotation equivalence, and the bad-input cases of `affq quantize`.

use crate::common::*;
use affq::formats::Checkpoint;
use affq::methods::{self, QuantPlan};
use affq::model::{Mode, Model};
use affq::quant::{Granularity, QuantSpec};
use candle_core::{Device, Tensor};
use std::path::Path;

fn ids() -> Vec<u32> {
    valid_ids(&stories_hf(), 6000, true, 256)
}

fn logits(m: &Model, ids: &[u32]) -> Tensor {
    let t = Tensor::from_slice(ids, (1, ids.len()), &Device::Cpu).unwrap();
    m.logits(&t, Mode::Eval).unwrap()
}

#[test]
fn rtn_checkpoint_round_trip_gives_identical_logits() {
    // Quantize in memory, write, read back: the loaded model computes bit-identical logits.
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = Checkpoint::open(&stories_hf()).unwrap();
    for (bits, gran, asym, a, kv) in [
        (4u8, Granularity::Channel, false, Some(4u8), Some(4u8)),
        (3, Granularity::Group(4), true, None, None),
        (5, Granularity::Group(2), false, Some(8), None),
        (2, Granularity::Channel, true, Some(6), Some(3)),
    ] {
        let mut m = ckpt.load_model(512).unwrap();
        let spec = if asym {
            QuantSpec::asym(bits)
        } else {
            QuantSpec::sym(bits)
        };
        let plan = QuantPlan {
            weights: Some(affq::formats::checkpoint::WeightScheme {
                spec,
                granularity: gran,
                clip_search: false,
                quantizer: "rtn".into(),
                dense: Vec::new(),
            }),
            activations: a.map(QuantSpec::sym),
            kv_cache: kv.map(QuantSpec::asym),
            quantize_head: false,
        };
        methods::plan::quantize(&mut m, &plan).unwrap();
        let qcfg = affq::formats::checkpoint::QuantConfig {
            quant_method: "affq".into(),
            format: affq::formats::checkpoint::FORMAT.into(),
            format_version: affq::formats::checkpoint::FORMAT_VERSION,
            affq_version: affq::VERSION.into(),
            method: "rtn".into(),
            weights: plan.weights.clone(),
            activations: plan.activations,
            kv_cache: plan.kv_cache,
            quantize_head: false,
            transforms: vec![],
            seed: 0,
        };
        let out = tmp.path().join(format!("q{bits}"));
        affq::formats::checkpoint::write(
            &m,
            &ckpt.files.dir,
            &ckpt.files.config,
            &qcfg,
            &out,
            false,
            &[],
        )
        .unwrap();
        let back = Checkpoint::open(&out).unwrap();
        assert_eq!(back.quant.as_ref(), Some(&qcfg));
        let m2 = back.load_model(512).unwrap();
        // Same codes and scales → same dequantized weights → identical logits.
        for (b1, b2) in m.blocks.iter().zip(&m2.blocks) {
            for kind in affq::model::LinearKind::ALL {
                let w1 = b1.linear(kind).weight().unwrap();
                let w2 = b2.linear(kind).weight().unwrap();
                assert_eq!(max_abs(&(w1 - w2).unwrap()), 0.0);
            }
        }
        let ids = ids();
        assert_eq!(
            max_abs(&(logits(&m, &ids) - logits(&m2, &ids)).unwrap()),
            0.0,
            "W{bits}"
        );
    }
}

#[test]
fn rotation_without_quantization_preserves_the_function() {
    {
        let dir = stories_hf();
        let ckpt = Checkpoint::open(&dir).unwrap();
        let base = ckpt.load_model(512).unwrap();
        let mut rot = ckpt.load_model(512).unwrap();
        let log = methods::rotate::rotate(&mut rot, 7).unwrap();
        assert!(
            log.iter().any(|l| l.contains("random orthogonal 172")),
            "{log:?}"
        );
        let ids = ids();
        let (a, b) = (logits(&base, &ids), logits(&rot, &ids));
        let rel = max_abs(&(a - &b).unwrap()) / max_abs(&b);
        // Orthogonal merges in f64, stored in f32: differences at f32 rounding level.
        assert!(rel < 1e-5, "relative logit difference {rel}");
    }
}

#[test]
fn rotation_preserves_smollm2() {
    let ckpt = Checkpoint::open(&smollm2_dir()).unwrap();
    let base = ckpt.load_model(512).unwrap();
    let mut rot = ckpt.load_model(512).unwrap();
    methods::rotate::rotate(&mut rot, 0).unwrap();
    let ids = valid_ids(&smollm2_dir(), 3000, false, 200);
    let (a, b) = (logits(&base, &ids), logits(&rot, &ids));
    let rel = max_abs(&(a - &b).unwrap()) / max_abs(&b);
    assert!(rel < 1e-4, "relative logit difference {rel}");
}

fn eval_ppl(model: &Path) -> f64 {
    eval_json(model, &["--seqlen", "256", "--max-windows", "4"])["ppl"]
        .as_f64()
        .unwrap()
}

#[test]
fn rtn_and_rotate_through_the_binary() {
    let tmp = tempfile::tempdir().unwrap();
    let fp = eval_ppl(&stories_hf());
    let mut results = Vec::new();
    for (method, flags) in [
        ("rtn", vec!["--bits", "16"]),
        ("rtn", vec!["--bits", "8", "--a-bits", "8"]),
        ("rtn", vec!["--bits", "4", "--group-size", "4", "--asym"]),
        ("rotate", vec!["--bits", "16"]),
        (
            "rotate",
            vec![
                "--bits",
                "4",
                "--a-bits",
                "4",
                "--kv-bits",
                "4",
                "--weight-clip-search",
            ],
        ),
    ] {
        let out = tmp.path().join(format!("{method}-{}", results.len()));
        let v = quantize_stories(&out, &[&["--method", method][..], &flags].concat());
        assert_eq!(v["method"], method);
        assert_eq!(v["format"], "affq-packed");
        assert!(out.join("tokenizer.json").exists() && out.join("config.json").exists());
        let cfg = read_json(&out.join("config.json"));
        assert_eq!(cfg["quantization_config"]["quant_method"], "affq");
        results.push((method, flags.clone(), eval_ppl(&out)));
    }
    // No quantization: the same function (rotation exact up to f32 rounding).
    assert!((results[0].2 / fp - 1.0).abs() < 1e-9);
    assert!(
        (results[3].2 / fp - 1.0).abs() < 1e-4,
        "rotate fp {} vs {fp}",
        results[3].2
    );
    // W8A8 stays within a few percent of FP (8-bit steps are 1/127 of each row's range);
    // every quantized model gives a finite PPL.
    assert!((results[1].2 / fp - 1.0).abs() < 0.05, "{results:?}");
    for r in &results[1..] {
        assert!(r.2.is_finite(), "{r:?}");
    }
}

#[test]
fn packed_weights_are_what_the_config_says() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("q3");
    quantize_stories(&out, &["--bits", "3", "--group-size", "4"]);
    let c = Checkpoint::open(&out).unwrap();
    let name = "model.layers.0.mlp.down_proj";
    // 3-bit codes densely packed: 172 codes × 3 bits = 516 bits → 17 words per row.
    let raw = c.store.raw(&format!("{name}.weight_packed")).unwrap();
    assert_eq!(raw.shape, vec![64, 17]);
    assert_eq!(
        c.store.shape(&format!("{name}.weight_scale")).unwrap(),
        vec![64, 172 / 4]
    );
}

fn expect_usage_error(args: &[&str], must_say: &str) {
    let out = affq(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
    assert!(
        err.contains(must_say),
        "{args:?}: expected {must_say:?} in {err}"
    );
    assert!(!err.contains("panicked"));
}

#[test]
fn bad_quantize_flags() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o");
    let model = stories_hf();
    let (m, o) = (model.to_str().unwrap(), out.to_str().unwrap().to_string());
    expect_usage_error(&["quantize", m, "-o", &o, "--bits", "1"], "--bits 1");
    expect_usage_error(&["quantize", m, "-o", &o, "--bits", "9"], "--bits 9");
    expect_usage_error(&["quantize", m, "-o", &o, "--a-bits", "12"], "--a-bits 12");
    expect_usage_error(
        &["quantize", m, "-o", &o, "--group-size", "24"],
        "model.layers.0.self_attn.q_proj",
    );
    expect_usage_error(
        &["quantize", m, "-o", &o, "--sym", "--asym"],
        "cannot be used with",
    );
    expect_usage_error(&["quantize", m, "-o", &o, "--clip", "1.5"], "--clip");
    expect_usage_error(
        &["quantize", m, "-o", &o, "--no-key-smoothing"],
        "--no-key-smoothing applies to a quantized KV cache",
    );
    assert!(!out.exists(), "nothing written on errors");
    // An output inside the model directory.
    let copy = tmp.path().join("model");
    std::fs::create_dir(&copy).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(stories_hf().join(f), copy.join(f)).unwrap();
    }
    let inside = copy.join("q");
    expect_usage_error(
        &[
            "quantize",
            copy.to_str().unwrap(),
            "-o",
            inside.to_str().unwrap(),
        ],
        "inside the model directory",
    );
}

#[test]
fn non_finite_weight_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    std::fs::create_dir(&dir).unwrap();
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(stories_hf().join(f), dir.join(f)).unwrap();
    }
    // Overwrite one value of layer 2's up_proj with NaN.
    let src = Checkpoint::open(&stories_hf()).unwrap();
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for n in src.store.names() {
        let r = src.store.raw(&n).unwrap();
        let mut bytes = r.data.to_vec();
        if n == "model.layers.2.mlp.up_proj.weight" {
            bytes[40..44].copy_from_slice(&f32::NAN.to_le_bytes());
        }
        tensors.push((n, r.shape.clone(), bytes));
    }
    let views: Vec<_> = tensors
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                    .unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
    let out = tmp.path().join("o");
    let r = affq(&[
        "quantize",
        dir.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&r.stderr);
    assert_ne!(r.status.code(), Some(0));
    assert!(
        err.contains("model.layers.2.mlp.up_proj") && err.contains("NaN"),
        "{err}"
    );
    assert!(!out.exists());
}

#[test]
fn without_output_the_checkpoint_goes_beside_the_model_and_never_over_a_path() {
    // `affq quantize model.safetensors --bits 4`, as llama-quantize is used: the default output
    // is a sibling of the model directory named after method and scheme.
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("stories");
    std::fs::create_dir(&model).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(stories_hf().join(f), model.join(f)).unwrap();
    }
    let file = model.join("model.safetensors");
    let v = affq_json(&["quantize", file.to_str().unwrap(), "--bits", "4"]);
    let want = tmp.path().join("stories-affq-rtn-w4a16");
    assert!(want.join("model.safetensors").is_file(), "{v}");
    assert_eq!(
        std::fs::canonicalize(v["output"].as_str().unwrap()).unwrap(),
        std::fs::canonicalize(&want).unwrap()
    );
    let again = affq(&["quantize", file.to_str().unwrap(), "--bits", "4"]);
    let err = String::from_utf8_lossy(&again.stderr);
    assert_eq!(again.status.code(), Some(2), "{err}");
    assert!(
        err.contains("stories-affq-rtn-w4a16") && err.contains("-o"),
        "{err}"
    );
}

#[test]
fn affinequant_picks_the_recipe_of_the_scheme() {
    // Weight-only AffineQuant without --recipe trains the weight-only setting (dense norm
    // matrices, stability factor 1e-2) and says so.
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("aq");
    let v = quantize_stories(
        &out,
        &Calibrated::new(2, 64)
            .method("affinequant")
            .epochs(2)
            .with(&["--bits", "4"])
            .args(),
    );
    let notes: Vec<&str> = v["transforms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap())
        .collect();
    assert!(
        notes[0].contains("recipe affinequant-w4a16 for W4A16"),
        "{notes:?}"
    );
    assert!(
        notes.iter().any(|n| n.contains("dense matrices")),
        "{notes:?}"
    );
}

#[test]
fn flatquant_picks_the_gptq_recipe_of_the_scheme() {
    // Without --recipe, FlatQuant at W4A16, W4A4 and W4A4KV4 on the per-channel grid takes the
    // measured GPTQ v2 preset of the scheme (W4A16's with asymmetric weights, which `--sym`
    // overrides); RTN weights asked for, or a group grid, keep `cpu`.
    let tmp = tempfile::tempdir().unwrap();
    // (flags, recipe named in the notes, weights on the symmetric grid)
    for (i, (flags, recipe, symmetric)) in [
        (
            &["--bits", "4"][..],
            Some("flatquant-w4a16-gptq for W4A16"),
            false,
        ),
        (
            &["--bits", "4", "--sym"][..],
            Some("flatquant-w4a16-gptq for W4A16"),
            true,
        ),
        (
            &["--bits", "4", "--a-bits", "4"][..],
            Some("flatquant-w4a4-gptq for W4A4"),
            true,
        ),
        (
            &["--bits", "4", "--a-bits", "4", "--kv-bits", "4"][..],
            Some("flatquant-w4a4kv4-gptq for W4A4"),
            true,
        ),
        (
            &["--bits", "4", "--a-bits", "4", "--weight-quantizer", "rtn"][..],
            None,
            true,
        ),
        (&["--bits", "4", "--group-size", "4"][..], None, true),
    ]
    .into_iter()
    .enumerate()
    {
        let out = tmp.path().join(format!("f{i}"));
        let v = quantize_stories(
            &out,
            &Calibrated::new(2, 64)
                .method("flatquant")
                .epochs(1)
                .with(flags)
                .args(),
        );
        let notes = v["transforms"].to_string();
        assert_eq!(v["weights"]["symmetric"], symmetric, "{flags:?}: {v}");
        match recipe {
            Some(r) => {
                assert!(notes.contains(&format!("recipe {r}")), "{flags:?}: {notes}");
                assert!(notes.contains("GPTQ v2"), "{flags:?}: {notes}");
            }
            None => {
                assert!(!notes.contains("recipe "), "{flags:?}: {notes}");
                assert!(!notes.contains("GPTQ"), "{flags:?}: {notes}");
            }
        }
    }
}

#[test]
fn kv_quantization_smooths_and_centres_the_keys() {
    // With --kv-bits even round to nearest calibrates: each block's keys are smoothed and centred
    // (algorithms.md §10), the offsets travel in the checkpoint, and --no-key-smoothing turns it
    // off (no calibration, no offsets).
    let tmp = tempfile::tempdir().unwrap();
    let name = "model.layers.0.self_attn.k_center";
    let on = tmp.path().join("on");
    let v = quantize_stories(&on, &["--bits", "16", "--kv-bits", "4"]);
    let notes = v["transforms"].to_string();
    assert!(notes.contains("keys smoothed"), "{notes}");
    assert!(Checkpoint::open(&on).unwrap().store.contains(name));
    let off = tmp.path().join("off");
    quantize_stories(
        &off,
        &["--bits", "16", "--kv-bits", "4", "--no-key-smoothing"],
    );
    assert!(!Checkpoint::open(&off).unwrap().store.contains(name));
    let fp = eval_ppl(&stories_hf());
    let (p_on, p_off) = (eval_ppl(&on), eval_ppl(&off));
    assert!(p_on.is_finite() && p_off.is_finite(), "{p_on} {p_off}");
    // 4-bit keys and values on stories260K: within a few percent of FP either way.
    assert!((p_on / fp - 1.0).abs() < 0.1, "{p_on} vs FP {fp}");
}

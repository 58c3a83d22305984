//! FlatQuant end to end: the reparameterisation is exact with quantization off, calibration on
//! stories260K lowers every block's loss below plain RTN (through the binary), and a fixed seed
//! gives a byte-identical checkpoint.

use crate::common::*;
use affq::methods::flatquant::{FlatQuant, FlatQuantConfig};
use affq::methods::plan::Grids;
use affq::model::{LinearKind, Site};
use affq::quant::QuantSpec;

/// The configuration the reparameterisation tests use (also on Qwen2 shapes).
pub(crate) fn config(kv: bool) -> FlatQuantConfig {
    FlatQuantConfig {
        grids: Grids {
            weights: Some(QuantSpec::sym(4)),
            group_size: None,
            activations: Some(QuantSpec::sym(4)),
            kv_cache: kv.then(|| QuantSpec::asym(4)),
            dense: [false; 7],
        },
        epochs: 1,
        batch: 1,
        lr: 5e-3,
        scale_lr: 5e-3,
        clip_lr_mult: 10.0,
        weight_decay: 0.01,
        alpha: 0.3,
        seed: 0,
        merged_only: false,
    }
}

#[test]
fn reparameterisation_without_quantization_is_exact() {
    // Random orthogonal Kronecker factors, SmoothQuant-style channel scales, head mixer, P_v and
    // P_k, merged in f64: the deployed model must compute the original function.
    let fq = FlatQuant::new(config(true)).unwrap();
    let rel = stories_reparameterisation_error(&mut |block, stats, _| {
        let b = fq.deploy_initial_unquantized(block, stats).unwrap();
        assert!(b.site(Site::DownIn).is_some());
        b
    });
    assert!(rel < 1e-4, "relative logit difference {rel}");
}

#[test]
fn merged_only_reparameterisation_is_exact_and_leaves_no_online_transform() {
    // Channel scales folded into the norms and up_proj, a random orthogonal P_v merged into
    // v_proj and o_proj (also with a quantized KV cache, where P_k is then left out).
    for kv in [false, true] {
        let fq = FlatQuant::new(FlatQuantConfig {
            merged_only: true,
            ..config(kv)
        })
        .unwrap();
        let rel = stories_reparameterisation_error(&mut |block, stats, i| {
            let b = fq.deploy_initial_unquantized(block, stats).unwrap();
            for site in Site::ALL {
                assert!(b.site(site).is_none(), "block {i}: online {site:?}");
            }
            assert!(b.qk_transform().is_none());
            let before = block.linear(LinearKind::V).weight().unwrap();
            let after = b.linear(LinearKind::V).weight().unwrap();
            assert!(max_abs(&(after - before).unwrap()) > 1e-3, "P_v not merged");
            b
        });
        assert!(rel < 1e-4, "kv {kv}: relative logit difference {rel}");
    }
}

fn quantize(out: &std::path::Path, extra: &[&str]) -> serde_json::Value {
    let run = Calibrated::new(4, 128)
        .method("flatquant")
        .scheme(4, 4)
        .epochs(2);
    quantize_stories(out, &run.with(extra).args())
}

/// Rows `[block, loss_rtn, loss_final, seconds]` of a checkpoint's calibration.csv.
#[test]
fn weight_only_groups_beat_group_rtn() {
    // W3A16 in groups of 4 (LWC per (row, group)): the checkpoint stores groups, and the trained
    // transforms lower the total block loss and the perplexity against group-wise RTN at the
    // same bits (two epochs on four windows: single blocks may not improve).
    let tmp = tempfile::tempdir().unwrap();
    let (fq, rtn) = (tmp.path().join("fq"), tmp.path().join("rtn"));
    let scheme = ["--bits", "3", "--group-size", "4"];
    let run = Calibrated::new(4, 128).method("flatquant").epochs(2);
    let v = quantize_stories(&fq, &run.with(&scheme).args());
    assert_eq!(v["weights"]["granularity"]["group"], 4, "{v}");
    let rows = block_table(&fq);
    let (l_rtn, l_fq) = rows
        .iter()
        .fold((0.0, 0.0), |(a, b), r| (a + r.loss_rtn, b + r.loss_final));
    assert!(
        l_fq < l_rtn,
        "total block loss: flatquant {l_fq} vs rtn {l_rtn}"
    );
    quantize_stories(&rtn, &scheme);
    let ppl = |d: &std::path::Path| {
        eval_json(d, &["--seqlen", "128", "--max-windows", "16"])["ppl"]
            .as_f64()
            .unwrap()
    };
    let (p_fq, p_rtn) = (ppl(&fq), ppl(&rtn));
    assert!(p_fq < p_rtn, "PPL: flatquant {p_fq} vs rtn {p_rtn}");
}

#[test]
fn calibration_lowers_every_block_loss_and_is_deterministic() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let v = quantize(&a, &["--kv-bits", "4"]);
    assert_eq!(v["method"], "flatquant");
    // The per-block log: the deployed block's output MSE beats plain RTN's on every block.
    let rows = block_table(&a);
    assert_eq!(rows.len(), 5);
    for r in &rows {
        assert!(
            r.loss_final < r.loss_rtn && r.deployed == "trained",
            "block {}: flatquant {} ({}) not below rtn {}",
            r.block,
            r.loss_final,
            r.deployed,
            r.loss_rtn
        );
    }
    // Same inputs, seed and threads: byte-identical checkpoint.
    quantize(&b, &["--kv-bits", "4"]);
    let (ma, mb) = (checkpoint_bytes(&a), checkpoint_bytes(&b));
    assert!(
        ma == mb,
        "checkpoints differ between two runs with the same seed"
    );
    // And the checkpoint evaluates through the binary.
    let v = eval_json(&a, &["--seqlen", "128", "--max-windows", "2"]);
    assert!(v["ppl"].as_f64().unwrap().is_finite());
}

#[test]
fn never_calibrates_on_the_test_split() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o");
    // Runs flatquant with `--calib FILE` and checks the usage-error contract.
    let expect_error = |calib: &std::path::Path, must_say: &str| {
        quantize_stories_refused(
            &out,
            &["--method", "flatquant", "--calib", calib.to_str().unwrap()],
            must_say,
        );
        assert!(
            !tmp.path().join(".o.affq-work").exists(),
            "work directory left behind"
        );
    };
    expect_error(
        &data_dir().join("wikitext-2-raw/wiki.test.raw"),
        "test split",
    );
    // A calibration file shorter than one window, and an empty one.
    let short = tmp.path().join("short.txt");
    std::fs::write(&short, "Once upon a time.").unwrap();
    expect_error(&short, "fewer than one window");
    let empty = tmp.path().join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    expect_error(&empty, "empty");
    let binary = tmp.path().join("binary.txt");
    std::fs::write(&binary, b"\xff\xfe\x00not text").unwrap();
    expect_error(&binary, "not valid UTF-8");
}

#[test]
fn thread_count_does_not_change_the_checkpoint() {
    // No reduction is split across threads (quantizer rows, GPTQ rows, GEMM output tiles), so
    // one and two worker threads must write the same bytes.
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("t1"), tmp.path().join("t2"));
    let extra = ["--kv-bits", "4", "--weight-quantizer", "gptq"];
    quantize(&a, &[&extra[..], &["--threads", "1"]].concat());
    quantize(&b, &[&extra[..], &["--threads", "2"]].concat());
    assert!(
        checkpoint_bytes(&a) == checkpoint_bytes(&b),
        "checkpoints differ between 1 and 2 threads"
    );
}

#[test]
fn the_weight_quantizer_beside_the_next_training_changes_nothing() {
    // With two worker threads each block's GPTQ (the W4A4 recipe: v2 and act order) runs beside
    // the next block's forward and training; every block reads only what it would read alone, so
    // one block at a time must write the same bytes.
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("overlap"), tmp.path().join("sequential"));
    let extra = ["--weight-quantizer", "gptq", "--threads", "2"];
    quantize(&a, &extra);
    quantize(&b, &[&extra[..], &["--sequential-blocks"]].concat());
    let transforms = transforms_summary(&a);
    assert!(transforms.contains("GPTQ v2"), "{transforms}");
    assert!(
        checkpoint_bytes(&a) == checkpoint_bytes(&b),
        "checkpoints differ between overlapped and sequential blocks"
    );
}

#[test]
fn channel_scales_keep_their_own_learning_rate() {
    // The CPU budget trains the channel scales `s = ln c` at 4e-2 whatever `--lr` says: under
    // `--lr 5e-3` the checkpoint names that rate, and `--scale-lr 5e-3` (one rate for all, the
    // reference's) gives other weights. Other methods and a non-positive rate are refused.
    let tmp = tempfile::tempdir().unwrap();
    let (own, one) = (tmp.path().join("own"), tmp.path().join("one"));
    let extra = ["--weight-quantizer", "rtn", "--lr", "5e-3"];
    quantize(&own, &extra);
    quantize(&one, &[&extra[..], &["--scale-lr", "5e-3"]].concat());
    let (notes_own, notes_one) = (transforms_summary(&own), transforms_summary(&one));
    assert!(notes_own.contains("channel scales lr 0.04"), "{notes_own}");
    assert!(!notes_one.contains("channel scales"), "{notes_one}");
    assert!(
        checkpoint_bytes(&own) != checkpoint_bytes(&one),
        "the channel scales' rate changed nothing"
    );
    let refused = tmp.path().join("refused");
    quantize_stories_refused(
        &refused,
        &Calibrated::new(4, 128)
            .method("affinequant")
            .scheme(4, 4)
            .with(&["--scale-lr", "1e-2"])
            .args(),
        "--scale-lr need --method flatquant",
    );
    quantize_stories_refused(
        &refused,
        &Calibrated::new(4, 128)
            .method("flatquant")
            .scheme(4, 4)
            .rtn()
            .with(&["--scale-lr", "0"])
            .args(),
        "(--scale-lr) 0: must be a positive number",
    );
}

#[test]
fn a_diverged_block_is_never_deployed() {
    // A learning rate far past stable (AdamW moves every factor entry by ~lr per step): the
    // trained blocks end worse than RTN, and the engine deploys the untrained start instead,
    // saying so in the per-block table and in the checkpoint's notes.
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("q");
    let v = quantize(&out, &["--lr", "2"]);
    let rows = block_table(&out);
    assert!(rows.iter().any(|r| r.deployed == "untrained"), "{rows:?}");
    for r in &rows {
        assert!(r.loss_final <= r.loss_rtn, "{r:?}");
    }
    let notes = v["transforms"].as_array().unwrap();
    assert!(
        notes
            .iter()
            .any(|n| n.as_str().unwrap().contains("deployed the untrained block")),
        "{notes:?}"
    );
    let ppl = eval_json(&out, &["--seqlen", "128", "--max-windows", "2"])["ppl"]
        .as_f64()
        .unwrap();
    assert!(ppl.is_finite(), "{ppl}");
}

#[test]
fn keep_trained_deploys_the_trained_blocks() {
    // The same diverging learning rate with --keep-trained: every block is the trained one, even
    // where it lost to RTN (speed measurements and ablations want the method's own blocks); an
    // untrained method refuses the flag.
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("q");
    quantize(&out, &["--lr", "2", "--keep-trained"]);
    let rows = block_table(&out);
    assert!(rows.iter().all(|r| r.deployed == "trained"), "{rows:?}");
    assert!(rows.iter().any(|r| r.loss_final > r.loss_rtn), "{rows:?}");
    quantize_stories_refused(
        &tmp.path().join("r"),
        &["--method", "rtn", "--keep-trained"],
        "need a trained method",
    );
}

#[test]
fn bf16_calibration_activations() {
    // Block inputs and targets kept in bf16 between blocks (half the activation memory; every
    // product still in f32): the run says so in its notes and the trained blocks still beat RTN
    // in total. A command without calibration refuses the flag.
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("fq");
    let v = quantize(&out, &["--calib-activations", "bf16"]);
    let notes = v["transforms"].as_array().unwrap();
    assert!(
        notes
            .iter()
            .any(|n| n.as_str().unwrap().contains("activations kept in bf16")),
        "{v}"
    );
    let rows = block_table(&out);
    let (l_rtn, l_fq) = rows
        .iter()
        .fold((0.0, 0.0), |(a, b), r| (a + r.loss_rtn, b + r.loss_final));
    assert!(l_fq < l_rtn, "total block loss: {l_fq} vs rtn {l_rtn}");
    quantize_stories_refused(
        &tmp.path().join("rtn"),
        &["--calib-activations", "bf16"],
        "calibration data flags",
    );
}

#[test]
fn a_bf16_store_is_the_f32_block_on_rounded_values() {
    // The engine's block pass on bf16-kept activations = the f32 block on the bf16 values,
    // rounded back to bf16: only the storage rounding changes, every product is f32.
    use candle_core::DType;
    let ckpt = affq::formats::Checkpoint::open(&stories_hf()).unwrap();
    let model = ckpt.load_model(64).unwrap();
    let ids: Vec<u32> = (0..3 * 64).map(|i| (i * 37 % 500) as u32).collect();
    let ids = candle_core::Tensor::from_vec(ids, (3, 64), &candle_core::Device::Cpu).unwrap();
    let x16 = model.embed(&ids).unwrap().to_dtype(DType::BF16).unwrap();
    let run = |x: &candle_core::Tensor| {
        affq::calib::run_block(
            &model.blocks[0],
            &model.rope,
            x,
            2,
            &mut affq::model::NoHook,
        )
        .unwrap()
    };
    let a = run(&x16);
    assert_eq!(a.dtype(), DType::BF16);
    let b = run(&x16.to_dtype(DType::F32).unwrap())
        .to_dtype(DType::BF16)
        .unwrap();
    let v = |t: candle_core::Tensor| -> Vec<f32> {
        t.to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    assert_eq!(v(a), v(b));
}

#[test]
fn quantized_inputs_train_on_the_deployed_blocks_outputs() {
    // Block 0's inputs are the embeddings either way (same RTN start); every later block trains
    // on the outputs of the quantized blocks before it, which carry their error, so its RTN
    // start is further from the full-precision targets than on full-precision inputs. Refused
    // together with --gptq-fp-inputs and by an untrained method.
    let tmp = tempfile::tempdir().unwrap();
    let (fp, q) = (tmp.path().join("fp"), tmp.path().join("q"));
    quantize(&fp, &[]);
    let v = quantize(&q, &["--quantized-inputs"]);
    let notes = v["transforms"].as_array().unwrap();
    assert!(
        notes.iter().any(|n| n
            .as_str()
            .unwrap()
            .contains("trained on the quantized model's own block inputs")),
        "{v}"
    );
    let (a, b) = (block_table(&fp), block_table(&q));
    assert_eq!(a[0].loss_rtn, b[0].loss_rtn, "{a:?} {b:?}");
    for (x, y) in a.iter().zip(&b).skip(1) {
        assert!(y.loss_rtn > x.loss_rtn, "{x:?} {y:?}");
    }
    quantize_stories_refused(
        &tmp.path().join("g"),
        &[
            "--method",
            "flatquant",
            "--quantized-inputs",
            "--weight-quantizer",
            "gptq",
            "--gptq-fp-inputs",
        ],
        "pick one",
    );
    quantize_stories_refused(
        &tmp.path().join("r"),
        &["--method", "rtn", "--quantized-inputs"],
        "need a trained method",
    );
    quantize_stories_refused(
        &tmp.path().join("s"),
        &[
            "--method",
            "flatquant",
            "--quantized-inputs",
            "--shard",
            "0/2",
        ],
        "run in one process",
    );
}

#[test]
fn step_products_modes() {
    // `int` trains through the integer products where the machine has an integer kernel and says
    // so in the notes; f32 (the default) runs without them; both lower every block's loss below
    // RTN on stories260K. A bad mode and an untrained method are refused.
    let tmp = tempfile::tempdir().unwrap();
    let int_kernel = affq::kernels::int_gemm::Isa::detect() != affq::kernels::int_gemm::Isa::Scalar;
    for (mode, note) in [
        (None, ""),
        (Some("int"), "integer products (8-bit gradients)"),
        (Some("f32"), ""),
    ] {
        let out = tmp.path().join(mode.unwrap_or("default"));
        let extra: Vec<&str> = mode.map_or(vec![], |m| vec!["--step-products", m]);
        let v = quantize(&out, &extra);
        let summary: String = v["transforms"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n.as_str().unwrap_or(""))
            .collect();
        let says = |n: &str| summary.contains(n);
        if note.is_empty() || !int_kernel {
            assert!(!says("integer"), "{mode:?}: {summary}");
        } else {
            assert!(says(note), "{mode:?}: {summary}");
        }
        for r in block_table(&out) {
            assert!(
                r.loss_final < r.loss_rtn && r.deployed == "trained",
                "{mode:?}: block {} loss {} vs rtn {}",
                r.block,
                r.loss_final,
                r.loss_rtn
            );
        }
    }
    quantize_stories_refused(
        &tmp.path().join("bad"),
        &["--method", "flatquant", "--step-products", "int8"],
        "step_products must be f32 or int",
    );
    quantize_stories_refused(
        &tmp.path().join("rtn"),
        &["--method", "rtn", "--step-products", "int"],
        "need a trained method",
    );
}

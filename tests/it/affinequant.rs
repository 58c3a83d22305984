//! AffineQuant end to end: the merges are exact with quantization off (random matrices, vector
//! and dense-norm forms, per-head Q/K matrices), a checkpoint with the online dense inverse and
//! per-head Q/K matrices round-trips, and calibration on stories260K through the binary lowers
//! every block's loss below plain RTN.

use crate::common::*;
use affq::calib::run_block;
use affq::formats::Checkpoint;
use affq::methods::affinequant::{AffineQuant, AffineQuantConfig};
use affq::methods::plan::Grids;
use affq::methods::SiteStats;
use affq::model::Mode;
use affq::quant::QuantSpec;
use candle_core::{Device, Tensor};

/// The configuration the reparameterisation tests use (also on Qwen2 shapes).
pub(crate) fn config(ln_matrix: bool, kv: bool) -> AffineQuantConfig {
    AffineQuantConfig {
        grids: Grids {
            weights: Some(QuantSpec::asym(4)),
            group_size: None,
            activations: Some(QuantSpec::asym(4)),
            kv_cache: kv.then(|| QuantSpec::asym(4)),
        },
        epochs: 2,
        lr: 5e-3,
        lwc_lr: 1e-2,
        alpha: 0.5,
        stability_factor: 0.1,
        ln_matrix,
        merged_only: false,
    }
}

#[test]
fn reparameterisation_without_quantization_is_exact() {
    // Perturbed (non-diagonal) matrices, merged in f64 at the full band: the deployed model must
    // compute the original function, for both norm forms and with the post-RoPE Q/K matrices.
    let ckpt = Checkpoint::open(&stories_hf()).unwrap();
    let base = ckpt.load_model(512).unwrap();
    let tok = affq::tokenizer::Tok::load(&stories_hf().join("tokenizer.json")).unwrap();
    let raw = std::fs::read_to_string(data_dir().join("wikitext-2-raw/wiki.valid.raw")).unwrap();
    let ids = tok.encode(&raw[..8000], true).unwrap()[..200].to_vec();
    let t = Tensor::from_slice(&ids, (1, ids.len()), &Device::Cpu).unwrap();
    let want = base.logits(&t, Mode::Eval).unwrap();
    for (ln_matrix, kv) in [(false, true), (true, false), (true, true)] {
        let mut model = ckpt.load_model(512).unwrap();
        let aq = AffineQuant {
            cfg: config(ln_matrix, kv),
        };
        let mut x = model.embed(&t).unwrap();
        for i in 0..model.blocks.len() {
            let mut stats = SiteStats::default();
            let y = run_block(&model.blocks[i], &model.rope, &x, 1, &mut stats).unwrap();
            model.blocks[i] = aq
                .deploy_initial_unquantized(&model.blocks[i], &stats, Some(i as u64 + 1))
                .unwrap();
            assert_eq!(model.blocks[i].qk_transform().is_some(), kv);
            assert_eq!(
                model.blocks[i].site(affq::model::Site::AttnIn).is_some(),
                ln_matrix
            );
            x = y;
        }
        let got = model.logits(&t, Mode::Eval).unwrap();
        let rel = max_abs(&(&got - &want).unwrap()) / max_abs(&want);
        assert!(
            rel < 1e-4,
            "ln_matrix {ln_matrix} kv {kv}: relative logit difference {rel}"
        );
    }
}

fn quantize(out: &std::path::Path, extra: &[&str]) {
    let run = Calibrated::new(8, 128).method("affinequant").epochs(5);
    quantize_stories(out, &run.with(extra).args());
}

#[test]
fn calibration_through_the_binary_lowers_every_block_loss() {
    let tmp = tempfile::tempdir().unwrap();
    for (i, extra) in [
        &["--recipe", "affinequant-w4a4", "--kv-bits", "4"][..],
        &["--recipe", "affinequant-w4a16"][..],
        &["--recipe", "affinequant-w3a16-g64", "--group-size", "4"][..],
    ]
    .into_iter()
    .enumerate()
    {
        let out = tmp.path().join(format!("o{i}"));
        quantize(&out, extra);
        for r in block_table(&out) {
            assert!(
                r.loss_final < r.loss_rtn && r.deployed == "trained",
                "{extra:?} block {}: affinequant {} ({}) not below rtn {}",
                r.block,
                r.loss_final,
                r.deployed,
                r.loss_rtn
            );
        }
        // The checkpoint (online dense inverses, per-head Q/K matrices) loads and evaluates.
        let v = eval_json(&out, &["--seqlen", "128", "--max-windows", "2"]);
        assert!(v["ppl"].as_f64().unwrap().is_finite());
    }
}

#[test]
fn affinequant_flags_need_affinequant() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o");
    for extra in [&["--stability-factor", "0.1"][..], &["--ln-matrix"][..]] {
        let args = [&["--method", "flatquant"][..], extra].concat();
        quantize_stories_refused(&out, &args, "affinequant");
    }
}

//! AffineQuant end to end: the merges are exact with quantization off (random matrices, vector
//! and dense-norm forms, per-head Q/K matrices), a checkpoint with the online dense inverse and
//! per-head Q/K matrices round-trips, and calibration on stories260K through the binary lowers
//! every block's loss below plain RTN.

use crate::common::*;
use affq::methods::affinequant::{AffineQuant, AffineQuantConfig};
use affq::methods::plan::Grids;
use affq::quant::QuantSpec;

/// The configuration the reparameterisation tests use (also on Qwen2 shapes).
pub(crate) fn config(ln_matrix: bool, kv: bool) -> AffineQuantConfig {
    AffineQuantConfig {
        grids: Grids {
            weights: Some(QuantSpec::asym(4)),
            group_size: None,
            activations: Some(QuantSpec::asym(4)),
            kv_cache: kv.then(|| QuantSpec::asym(4)),
            dense: [false; 7],
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
    for (ln_matrix, kv) in [(false, true), (true, false), (true, true)] {
        let aq = AffineQuant {
            cfg: config(ln_matrix, kv),
        };
        let rel = stories_reparameterisation_error(&mut |block, stats, i| {
            let b = aq
                .deploy_initial_unquantized(block, stats, Some(i as u64 + 1))
                .unwrap();
            assert_eq!(b.qk_transform().is_some(), kv);
            assert_eq!(b.site(affq::model::Site::AttnIn).is_some(), ln_matrix);
            b
        });
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

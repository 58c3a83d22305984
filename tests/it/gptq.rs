//! GPTQ as the weight quantizer: layer output error against RTN on real activations, and the
//! `--weight-quantizer gptq` path through the binary under rtn, rotate and flatquant.

use crate::common::*;
use affq::calib::{observe_block, run_block};
use affq::formats::Checkpoint;
use affq::model::{BlockHook, LinearKind, Site};
use affq::quant::gptq::{gptq, output_error, GptqConfig, Hessian};
use affq::quant::{Granularity, QuantSpec, QuantizedWeight};
use candle_core::{Device, Tensor};
use std::collections::HashMap;

/// stories260K and the embeddings of `n` windows of `len` tokens from the first `chars`
/// characters of the validation text ([`valid_ids`]).
fn stories_windows(chars: usize, n: usize, len: usize) -> (affq::model::Model, Tensor) {
    let model = Checkpoint::open(&stories_hf())
        .unwrap()
        .load_model(256)
        .unwrap();
    let ids = valid_ids(&stories_hf(), chars, false, n * len);
    let ids = Tensor::from_vec(ids, (n, len), &Device::Cpu).unwrap();
    let x = model.embed(&ids).unwrap();
    (model, x)
}

/// Hessians of every linear input of a block.
struct Capture(HashMap<usize, Hessian>);

impl BlockHook for Capture {
    fn linear_input(&mut self, kind: LinearKind, x: &Tensor) -> affq::Result<()> {
        let n = x.dims()[x.dims().len() - 1];
        self.0
            .entry(kind as usize)
            .or_insert_with(|| Hessian::new(n))
            .add(x)
    }
}

/// Records the linears it is shown and the Hessian of `kind`'s input; wants nothing past `kind`.
struct Until {
    kind: LinearKind,
    seen: Vec<LinearKind>,
    h: Option<Hessian>,
}

impl BlockHook for Until {
    fn linear_input(&mut self, kind: LinearKind, x: &Tensor) -> affq::Result<()> {
        self.seen.push(kind);
        if kind == self.kind {
            let n = x.dims()[x.dims().len() - 1];
            self.h.get_or_insert_with(|| Hessian::new(n)).add(x)?;
        }
        Ok(())
    }

    fn last_wanted(&self) -> Option<LinearKind> {
        Some(self.kind)
    }
}

#[test]
fn a_partial_forward_sees_what_the_whole_forward_sees_and_stops_at_its_site() {
    // GPTQ's group Hessians run each block only up to the group's input (Block::observe): that
    // input must be the whole forward's, bit for bit, and no later site may run.
    let (model, x) = stories_windows(20_000, 3, 128);
    let block = &model.blocks[1];
    let mut whole = Capture(HashMap::new());
    run_block(block, &model.rope, &x, 2, &mut whole).unwrap();
    for kind in LinearKind::ALL {
        let mut part = Until {
            kind,
            seen: Vec::new(),
            h: None,
        };
        observe_block(block, &model.rope, &x, 2, &mut part).unwrap();
        assert_eq!(
            part.h.as_ref().unwrap().matrix(),
            whole.0[&(kind as usize)].matrix(),
            "{kind:?}"
        );
        // Sites in forward order, up to and including the one that reads `kind`; twice (two
        // batches of windows).
        let upto: Vec<LinearKind> = Site::ALL
            .iter()
            .take(
                Site::ALL
                    .iter()
                    .position(|s| s.linears().contains(&kind))
                    .unwrap()
                    + 1,
            )
            .flat_map(|s| s.linears().iter().copied())
            .collect();
        assert_eq!(part.seen, [upto.clone(), upto].concat(), "{kind:?}");
    }
}

#[test]
fn the_staged_forward_is_the_forward() {
    // GPTQ carries each batch site by site (Block::enter / show / advance) so that a group's
    // Hessian sees the earlier groups quantized without a forward per group: site by site it must
    // show the whole forward's inputs and end at its output, bit for bit.
    use affq::model::Stage;
    let (model, x) = stories_windows(30_000, 2, 128);
    let block = &model.blocks[1];
    let mut whole = Capture(HashMap::new());
    let y = run_block(block, &model.rope, &x, 2, &mut whole).unwrap();
    let mut staged = Capture(HashMap::new());
    let mut stage = Stage::At(block.enter(&x).unwrap());
    let mut sites = Vec::new();
    while let Stage::At(s) = stage {
        sites.push(s.site());
        let s = block.show(s, &mut staged).unwrap();
        stage = block.advance(s, &model.rope).unwrap();
    }
    assert_eq!(sites, Site::ALL);
    for kind in LinearKind::ALL {
        assert_eq!(
            staged.0[&(kind as usize)].matrix(),
            whole.0[&(kind as usize)].matrix(),
            "{kind:?}"
        );
    }
    let Stage::Out(out) = stage else {
        unreachable!()
    };
    let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(flat(&out), flat(&y));
}

#[test]
fn gptq_with_bounded_states_gives_the_same_weights() {
    // Above STAGED_MAX_BYTES GPTQ observes each group with its own partial forward instead of
    // carrying every window site by site: the same weights; the carried states' output is the
    // quantized block's forward (the next block's GPTQ inputs).
    use affq::calib::weight_quant::{quantize_block_weights, WeightQuantizer};
    use affq::methods::QuantPlan;
    use affq::model::NoHook;
    let (model, x) = stories_windows(50_000, 6, 128);
    let plan = QuantPlan {
        weights: Some(affq::formats::checkpoint::WeightScheme {
            spec: QuantSpec::sym(4),
            granularity: Granularity::Channel,
            clip_search: false,
            quantizer: "gptq".into(),
            dense: Vec::new(),
        }),
        activations: None,
        kv_cache: None,
        quantize_head: false,
    };
    let wq = WeightQuantizer::Gptq(GptqConfig::default());
    let quantized = |budget: usize| {
        let mut b = model.blocks[1].clone();
        let out = quantize_block_weights(
            &mut b,
            &plan,
            &wq,
            &model.rope,
            &x,
            None,
            &mut Vec::new(),
            budget,
        )
        .unwrap();
        (b, out)
    };
    let (staged, out) = quantized(usize::MAX);
    let (bounded, none) = quantized(0);
    assert!(none.is_none());
    let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    for kind in LinearKind::ALL {
        assert_eq!(
            flat(&staged.linear(kind).weight().unwrap()),
            flat(&bounded.linear(kind).weight().unwrap()),
            "{kind:?}"
        );
    }
    let y = run_block(&staged, &model.rope, &x, 4, &mut NoHook).unwrap();
    assert_eq!(flat(&out.expect("carried site by site")), flat(&y));
}

#[test]
fn gptq_lowers_every_layer_output_error_on_stories260k() {
    // GPTQ minimises tr(ΔW·H·ΔWᵀ) column by column; on real calibration activations it must come
    // out below round-to-nearest for every linear of every block.
    let (model, mut x) = stories_windows(40_000, 4, 256);
    for (bi, block) in model.blocks.iter().enumerate() {
        let mut cap = Capture(HashMap::new());
        let y = run_block(block, &model.rope, &x, 4, &mut cap).unwrap();
        for kind in LinearKind::ALL {
            let h = cap.0[&(kind as usize)].matrix();
            let w = block.linear(kind).weight().unwrap();
            let (out, inp) = w.dims2().unwrap();
            let w: Vec<f32> = w.flatten_all().unwrap().to_vec1().unwrap();
            for (spec, gran) in [
                (QuantSpec::sym(3), Granularity::Channel),
                (QuantSpec::asym(2), Granularity::Group(4)),
            ] {
                for act_order in [false, true] {
                    let cfg = GptqConfig {
                        act_order,
                        ..Default::default()
                    };
                    let g = gptq("t", &w, out, inp, &h, spec, gran, false, &cfg)
                        .unwrap()
                        .weight
                        .dequantize();
                    let r = QuantizedWeight::quantize("t", &w, out, inp, spec, gran, false)
                        .unwrap()
                        .dequantize();
                    let (eg, er) = (
                        output_error(&w, &g, out, inp, &h),
                        output_error(&w, &r, out, inp, &h),
                    );
                    assert!(
                        eg < er,
                        "block {bi} {kind:?} {gran:?} act_order {act_order}: gptq {eg} rtn {er}"
                    );
                }
            }
        }
        x = y;
    }
}

/// A one-epoch FlatQuant W4A4 calibration (with the helpers' 4 training windows).
const FLATQUANT_W4A4: [&str; 8] = [
    "--method",
    "flatquant",
    "--bits",
    "4",
    "--a-bits",
    "4",
    "--epochs",
    "1",
];

fn quantize(out: &std::path::Path, args: &[&str]) -> serde_json::Value {
    quantize_stories(out, &Calibrated::new(4, 128).gptq().with(args).args())
}

fn eval_ppl(dir: &std::path::Path) -> f64 {
    eval_json(dir, &["--seqlen", "128", "--max-windows", "4"])["ppl"]
        .as_f64()
        .unwrap()
}

#[test]
fn gptq_under_every_method_through_the_binary() {
    let tmp = tempfile::tempdir().unwrap();
    for (i, args) in [
        vec!["--method", "rtn", "--bits", "3", "--group-size", "4"],
        vec!["--method", "rtn", "--bits", "4", "--act-order", "--asym"],
        vec!["--method", "rotate", "--bits", "4", "--a-bits", "8"],
        FLATQUANT_W4A4.to_vec(),
    ]
    .into_iter()
    .enumerate()
    {
        let out = tmp.path().join(format!("o{i}"));
        let v = quantize(&out, &args);
        assert_eq!(v["weights"]["quantizer"], "gptq", "{args:?}");
        assert!(out.join("calibration.csv").is_file());
        let cfg = read_json(&out.join("config.json"));
        assert_eq!(
            cfg["quantization_config"]["weights"]["quantizer"], "gptq",
            "{args:?}"
        );
        assert!(eval_ppl(&out).is_finite(), "{args:?}");
        // Trained methods draw at least 32 windows for GPTQ's Hessians beyond their 4 training
        // windows; untrained ones use --nsamples.
        let summary = cfg["quantization_config"]["transforms"].to_string();
        let more = summary.contains("4 × 128 tokens (32 windows for GPTQ's Hessians)");
        assert_eq!(more, args.contains(&"flatquant"), "{args:?}: {summary}");
    }
}

#[test]
fn gptq_flags_need_gptq() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o");
    for extra in [
        &["--act-order"][..],
        &["--gptq-damp", "0.1"][..],
        &["--nsamples", "4"][..],
        &["--gptq-nsamples", "8"][..],
    ] {
        quantize_stories_refused(&out, extra, "gptq");
    }
    quantize_stories_refused(
        &out,
        &["--weight-quantizer", "gptq", "--gptq-damp=-1"],
        "--gptq-damp -1",
    );
    // GPTQ's windows include the training windows.
    quantize_stories_refused(
        &out,
        &[
            "--method",
            "flatquant",
            "--weight-quantizer",
            "gptq",
            "--nsamples",
            "8",
            "--gptq-nsamples",
            "4",
        ],
        "--gptq-nsamples 4 is fewer than --nsamples 8",
    );
}

#[test]
fn gptq_v2_through_the_binary() {
    // GPTQ v2 (algorithms.md §4.5; its least squares are checked in quant::gptq's unit tests):
    // under an untrained method (the full-precision stream carried beside the 4 probe windows)
    // and a trained one (4 training windows, 32 GPTQ windows), the checkpoint says so, scores,
    // and holds other weights than plain GPTQ's (`--no-gptq-v2`). FlatQuant's W4A4 recipe, chosen
    // without `--recipe`, is GPTQ v2: the same bytes as the flag.
    let tmp = tempfile::tempdir().unwrap();
    for (i, args) in [
        vec!["--method", "rtn", "--bits", "4", "--a-bits", "8"],
        FLATQUANT_W4A4.to_vec(),
    ]
    .into_iter()
    .enumerate()
    {
        let with =
            |flag: &'static str| -> Vec<&str> { args.iter().copied().chain([flag]).collect() };
        let plain = tmp.path().join(format!("p{i}"));
        quantize(&plain, &with("--no-gptq-v2"));
        let v2 = tmp.path().join(format!("v{i}"));
        quantize(&v2, &with("--gptq-v2"));
        let summary = transforms_summary(&v2);
        assert!(summary.contains("GPTQ v2"), "{args:?}: {summary}");
        assert!(eval_ppl(&v2).is_finite(), "{args:?}");
        assert_ne!(
            checkpoint_bytes(&plain),
            checkpoint_bytes(&v2),
            "{args:?}: GPTQ v2 changed no weight"
        );
        if args.contains(&"flatquant") {
            let preset = tmp.path().join(format!("d{i}"));
            quantize(&preset, &args);
            assert_eq!(
                checkpoint_bytes(&preset),
                checkpoint_bytes(&v2),
                "{args:?}: the preset is not GPTQ v2"
            );
        }
    }
    let out = tmp.path().join("o");
    quantize_stories_refused(&out, &["--gptq-v2"], "need --weight-quantizer gptq");
    let gptq = ["--weight-quantizer", "gptq"];
    let refused = |extra: &[&str], say: &str| {
        let args: Vec<&str> = gptq.iter().chain(extra).copied().collect();
        quantize_stories_refused(&out, &args, say);
    };
    refused(
        &["--gptq-v2-alpha", "0.5"],
        "--gptq-v2-alpha needs --gptq-v2",
    );
    refused(&["--gptq-v2", "--gptq-v2-alpha", "0"], "--gptq-v2-alpha 0");
    refused(&["--gptq-v2", "--gptq-fp-inputs"], "pick one");
    refused(
        &["--no-gptq-v2", "--gptq-v2-alpha", "0.5"],
        "--gptq-v2-alpha needs --gptq-v2",
    );
    refused(&["--gptq-v2", "--no-gptq-v2"], "cannot be used with");
    refused(
        &["--gptq-v2-windows", "4"],
        "--gptq-v2-windows needs --gptq-v2",
    );
    refused(
        &["--gptq-v2", "--gptq-v2-windows", "0"],
        "--gptq-v2-windows 0",
    );
}

#[test]
fn act_order_flags_override_the_scheme_recipe() {
    // FlatQuant's W4A4 recipe sets act order: `--no-act-order` turns it off (the checkpoint
    // says so and still scores), `--act-order` with it refused.
    let tmp = tempfile::tempdir().unwrap();
    let order = |d: &std::path::Path| {
        let s = transforms_summary(d);
        match (s.contains("act order true"), s.contains("act order false")) {
            (true, false) => true,
            (false, true) => false,
            _ => panic!("no act order in {s}"),
        }
    };
    let with = |flag: &'static str| -> Vec<&str> {
        FLATQUANT_W4A4.iter().copied().chain([flag]).collect()
    };
    let preset = tmp.path().join("preset");
    quantize(&preset, &FLATQUANT_W4A4);
    assert!(order(&preset), "the W4A4 recipe sets act order");
    let off = tmp.path().join("off");
    quantize(&off, &with("--no-act-order"));
    assert!(!order(&off));
    assert!(eval_ppl(&off).is_finite());
    quantize_stories_refused(
        &tmp.path().join("both"),
        &[&with("--no-act-order")[..], &["--act-order"]].concat(),
        "--act-order",
    );
}

#[test]
fn gptq_v2_cross_moment_from_the_first_windows() {
    // `--gptq-v2-windows N`: GPTQ v2's cross moment from the first N of GPTQ's 32 windows (the
    // Hessians still from all). N = 32 is the default's weights; N = 4, the training windows,
    // needs no full-precision stream of its own; N = 6 carries one for 2 windows, whose last
    // batch is shorter than the quantized batch beside it. Each scores and names N.
    let tmp = tempfile::tempdir().unwrap();
    // The tensors' bytes: the file less its header, whose metadata names N.
    let bytes = |d: &std::path::Path| {
        let f = std::fs::read(d.join("model.safetensors")).unwrap();
        let n = u64::from_le_bytes(f[..8].try_into().unwrap()) as usize;
        f[8 + n..].to_vec()
    };
    let run = |n: Option<&'static str>| {
        let out = tmp.path().join(n.unwrap_or("all"));
        let mut args = FLATQUANT_W4A4.to_vec();
        if let Some(n) = n {
            args.extend(["--gptq-v2-windows", n]);
        }
        let v = quantize(&out, &args);
        (out, v["transforms"].to_string())
    };
    let (all, _) = run(None);
    let (same, summary) = run(Some("32"));
    assert!(
        summary.contains("cross moment from 32 windows"),
        "{summary}"
    );
    assert!(
        bytes(&all) == bytes(&same),
        "32 of 32 windows is the default"
    );
    for n in ["4", "6"] {
        let (d, summary) = run(Some(n));
        assert!(
            summary.contains(&format!("cross moment from {n} windows")),
            "{summary}"
        );
        assert!(
            bytes(&d) != bytes(&all),
            "{n} windows: the same weights as 32"
        );
        assert!(eval_ppl(&d).is_finite(), "{n} windows");
    }
}

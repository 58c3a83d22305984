//! Full-precision correctness against independent references: the SmolLM2 oracle
//! (../shared/notes/smollm2-oracle.json, test-data.md §4) and the stories260K reference outputs
//! (reference_outputs.json, test-data.md §6), plus tokenizer checksums (test-data.md §5).

use crate::common::*;
use affq::data;
use affq::eval::{perplexity, PplOptions, Protocol};
use affq::formats::Checkpoint;
use affq::model::{Mode, Model};
use affq::tokenizer::Tok;
use candle_core::{Device, Tensor};

fn load(dir: &std::path::Path, max_len: usize) -> (Model, Tok) {
    let ckpt = Checkpoint::open(dir).unwrap();
    let model = ckpt.load_model(max_len).unwrap();
    let tok = Tok::load(&dir.join("tokenizer.json")).unwrap();
    (model, tok)
}

fn wiki_test_raw() -> String {
    data::read_text(&data_dir().join("wikitext-2-raw/wiki.test.raw")).unwrap()
}

#[test]
fn stories260k_greedy_and_logits_match_reference() {
    let refs = read_json(&stories_dir().join("reference_outputs.json"));
    let (model, _) = load(&stories_dir().join("hf"), 512);
    let g = &refs["greedy_from_bos"];
    let (want, _) = reference_greedy();
    // Logits at position 0 (after BOS): the reference is float64; f32 accumulation over 64-wide
    // dot products in 5 layers leaves ~1e-5 absolute error, and the values are printed to 5 decimals.
    let bos = Tensor::new(&[[1u32]], &Device::Cpu).unwrap();
    let logits: Vec<f32> = model
        .logits(&bos, Mode::Eval)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    for (i, w) in g["logits_at_pos0_first8"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
    {
        let w = w.as_f64().unwrap();
        assert!(
            (logits[i] as f64 - w).abs() < 1e-4,
            "logit {i}: {} vs {w}",
            logits[i]
        );
    }
    // Greedy decoding, recomputing the full prefix at each step (no cache involved).
    let mut ids = vec![1u32];
    while ids.len() < want.len() {
        let t = Tensor::from_slice(&ids, (1, ids.len()), &Device::Cpu).unwrap();
        let l = model.logits(&t, Mode::Eval).unwrap();
        let last = l.squeeze(0).unwrap().get(ids.len() - 1).unwrap();
        ids.push(last.argmax(0).unwrap().to_scalar::<u32>().unwrap());
    }
    assert_eq!(ids, want);
}

#[test]
fn stories260k_wikitext_ppl_and_tokens_match_reference() {
    let refs = read_json(&stories_dir().join("reference_outputs.json"));
    let r = &refs["wikitext2_ppl"]["wiki.test.raw"];
    let (model, tok) = load(&stories_dir().join("hf"), 512);
    // Protocol of reference_outputs.json: whole file verbatim, with BOS; 512-token windows, all
    // 511 predictions scored, no per-window BOS.
    let ids = tok.encode(&wiki_test_raw(), true).unwrap();
    assert_eq!(ids.len() as u64, r["n_tokens_with_bos"].as_u64().unwrap());
    assert_eq!(id_checksum(&ids), 18369262458724078410);
    let opts = PplOptions {
        seqlen: 512,
        max_windows: Some(8),
        protocol: Protocol::Paper,
    };
    let res = perplexity(&model, &ids, &opts, None, |_, _, _| {}).unwrap();
    let w0 = r["window0_ppl"].as_f64().unwrap();
    let f8 = r["first8_ppl"].as_f64().unwrap();
    // f32 forward vs the float64 reference: a few 1e-6 relative in PPL.
    assert!(
        (res.window_ppl[0] / w0 - 1.0).abs() < 1e-4,
        "{} vs {w0}",
        res.window_ppl[0]
    );
    assert!((res.ppl / f8 - 1.0).abs() < 1e-4, "{} vs {f8}", res.ppl);
    let nll = model.nll(&ids[..512], 0).unwrap();
    for (i, w) in r["window0_nll_first8"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
    {
        assert!((nll[i] - w.as_f64().unwrap()).abs() < 1e-4, "nll {i}");
    }
}

#[test]
fn eval_and_train_paths_agree() {
    // The fused eval ops and the differentiable composed ops compute the same function.
    let (model, tok) = load(&stories_dir().join("hf"), 512);
    let ids = tok.encode(&wiki_test_raw()[..4000], true).unwrap();
    let t = Tensor::from_slice(&ids[..300], (1, 300), &Device::Cpu).unwrap();
    let a = model.logits(&t, Mode::Eval).unwrap();
    let b = model.logits(&t, Mode::Train).unwrap();
    let diff = (a - &b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let scale = b
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(diff / scale < 1e-5, "max diff {diff} (scale {scale})");
}

#[test]
fn imported_stories260k_gguf_equals_reference_conversion() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("s260");
    affq::formats::gguf::import(
        &stories_dir().join("stories260K.gguf"),
        &out,
        affq::formats::gguf::ImportDtype::F32,
        false,
    )
    .unwrap();
    let mine = Checkpoint::open(&out).unwrap();
    let refc = Checkpoint::open(&stories_dir().join("hf")).unwrap();
    assert_eq!(mine.store.names(), refc.store.names());
    for name in refc.store.names() {
        let (a, b) = (
            mine.store.raw(&name).unwrap(),
            refc.store.raw(&name).unwrap(),
        );
        assert_eq!(a.shape, b.shape, "{name}");
        assert_eq!(a.dtype, b.dtype, "{name}");
        assert!(a.data == b.data, "{name} differs");
    }
    let (a, b) = (&mine.config, &refc.config);
    assert_eq!(
        (
            a.architecture,
            a.hidden_size,
            a.intermediate_size,
            a.num_layers,
            a.num_heads,
            a.num_kv_heads,
            a.head_dim
        ),
        (
            b.architecture,
            b.hidden_size,
            b.intermediate_size,
            b.num_layers,
            b.num_heads,
            b.num_kv_heads,
            b.head_dim
        )
    );
    assert_eq!(
        (a.rope_theta, a.tie_word_embeddings, a.vocab_size),
        (b.rope_theta, b.tie_word_embeddings, b.vocab_size)
    );
    assert!((a.rms_norm_eps - b.rms_norm_eps).abs() < 1e-12);
    // The tokenizer built from the GGUF vocabulary tokenizes like the reference tokenizer.json.
    let t_mine = Tok::load(&out.join("tokenizer.json")).unwrap();
    let ids = t_mine.encode(&wiki_test_raw(), true).unwrap();
    assert_eq!(ids.len(), 809_290);
    assert_eq!(id_checksum(&ids), 18369262458724078410);
    let text = t_mine.decode(&ids[1..200]).unwrap();
    assert!(
        wiki_test_raw().starts_with(&text),
        "decode round trip: {text:?}"
    );
}

mod smollm2 {
    use super::*;

    fn oracle() -> serde_json::Value {
        read_json(&notes_dir().join("smollm2-oracle.json"))
    }

    #[test]
    fn tokenizer_streams_match_checksums() {
        let tok = Tok::load(&smollm2_dir().join("tokenizer.json")).unwrap();
        let raw = wiki_test_raw();
        for (name, text, count, sum) in [
            (
                "oracle",
                data::nonblank_rows_text(&raw),
                301_948,
                654879207665191243u64,
            ),
            (
                "paper",
                data::paper_text(&raw),
                304_978,
                1517955485722653245,
            ),
            ("verbatim", raw.clone(), 303_415, 13187966137288608152),
        ] {
            let ids = tok.encode(&text, false).unwrap();
            assert_eq!(ids.len(), count, "{name}");
            assert_eq!(id_checksum(&ids), sum, "{name}");
        }
    }

    #[test]
    fn oracle_window_nll_logits_and_ppl() {
        let o = oracle();
        let (model, tok) = load(&smollm2_dir(), 512);
        let ids = tok
            .encode(&data::nonblank_rows_text(&wiki_test_raw()), false)
            .unwrap();
        assert_eq!(ids.len() as u64, o["total_tokens"].as_u64().unwrap());
        let w0 = &o["windows"][0];
        let first: Vec<u32> = w0["first_32_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(&ids[..32], &first[..]);

        // Logits at positions 0..3, vocab 0..7, within 5e-3 (test-data.md §4.2, f16-rounded weights).
        let t = Tensor::from_slice(&ids[..512], (1, 512), &Device::Cpu).unwrap();
        let h = model
            .hidden_states(&t, Mode::Eval)
            .unwrap()
            .squeeze(0)
            .unwrap();
        let logits = h
            .narrow(0, 0, 16)
            .unwrap()
            .matmul(&model.head_weight().t().unwrap())
            .unwrap();
        let lv: Vec<Vec<f32>> = logits.to_vec2().unwrap();
        for (p, row) in w0["first_4_positions_logits_first_8_vocab"]
            .as_array()
            .unwrap()
            .iter()
            .enumerate()
        {
            for (v, w) in row.as_array().unwrap().iter().enumerate() {
                let w = w.as_f64().unwrap();
                assert!(
                    (lv[p][v] as f64 - w).abs() < 5e-3,
                    "logit[{p}][{v}] {} vs {w}",
                    lv[p][v]
                );
            }
        }
        let argmax: Vec<u32> = w0["first_16_argmax"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let mine: Vec<u32> = lv
            .iter()
            .map(|r| {
                r.iter()
                    .enumerate()
                    .fold((0, f32::MIN), |a, (i, &x)| if x > a.1 { (i, x) } else { a })
                    .0 as u32
            })
            .collect();
        assert_eq!(mine, argmax);

        // Per-token NLL of the first 31 predictions within 1e-3.
        let nll = model.nll(&ids[..512], 0).unwrap();
        for (i, w) in w0["first_32_nll"].as_array().unwrap().iter().enumerate() {
            let w = w.as_f64().unwrap();
            assert!((nll[i] - w).abs() < 1e-3, "nll[{i}] {} vs {w}", nll[i]);
        }

        // 8 × 512 PPL within 0.01 (and each window's PPL within 1e-4 relative).
        let opts = PplOptions {
            seqlen: 512,
            max_windows: Some(8),
            protocol: Protocol::Paper,
        };
        let res = perplexity(&model, &ids, &opts, None, |_, _, _| {}).unwrap();
        let want = o["ppl_8x512"].as_f64().unwrap();
        assert!((res.ppl - want).abs() < 0.01, "{} vs {want}", res.ppl);
        for (w, win) in o["windows"].as_array().unwrap().iter().enumerate() {
            let p = win["ppl"].as_f64().unwrap();
            assert!(
                (res.window_ppl[w] / p - 1.0).abs() < 1e-4,
                "window {w}: {} vs {p}",
                res.window_ppl[w]
            );
        }
    }

    #[test]
    fn paper_protocol_through_the_binary() {
        // test-data.md §4.4: paper protocol at 512 × 8 windows gives 30.641 (transformers, f32).
        let dir = smollm2_dir();
        let out = affq(&[
            "eval",
            dir.to_str().unwrap(),
            "--seqlen",
            "512",
            "--max-windows",
            "8",
            "--json",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        for k in ["ppl", "windows", "seqlen", "tokens", "seconds", "tok_per_s"] {
            assert!(v.get(k).is_some(), "missing key {k}");
        }
        assert_eq!(v["windows"], 8);
        assert_eq!(v["text_tokens"], 304_978);
        let ppl = v["ppl"].as_f64().unwrap();
        assert!((ppl - 30.641).abs() < 0.01, "{ppl}");
    }
}

#[test]
fn llamacpp_protocol_replaces_bos_and_scores_second_half() {
    let dir = stories_dir().join("hf");
    let v = eval_json(
        &dir,
        &[
            "--protocol",
            "llamacpp",
            "--seqlen",
            "128",
            "--max-windows",
            "3",
        ],
    );
    assert_eq!(v["predictions"], 3 * (128 - 1 - 64));
    // The same computation by hand: verbatim text minus one trailing newline, BOS added by the
    // vocabulary; each chunk's first token replaced by BOS; positions 64..126 scored.
    let (model, tok) = load(&dir, 128);
    let ids = tok
        .encode(&data::llamacpp_text(&wiki_test_raw()), true)
        .unwrap();
    assert_eq!(ids[0], 1);
    let mut sum = 0.0;
    for c in 0..3 {
        let mut w = ids[c * 128..(c + 1) * 128].to_vec();
        w[0] = 1;
        sum += model.nll(&w, 64).unwrap().iter().sum::<f64>();
    }
    let want = (sum / 189.0).exp();
    let got = v["ppl"].as_f64().unwrap();
    assert!((got / want - 1.0).abs() < 1e-12, "{got} vs {want}");
}

#[test]
fn c4_uses_first_1100_documents() {
    let dir = stories_dir().join("hf");
    let v = eval_json(
        &dir,
        &["--ppl", "c4", "--seqlen", "128", "--max-windows", "2"],
    );
    let (model, tok) = load(&dir, 128);
    let text = data::c4_eval_text(&data_dir().join("calibration/c4_validation_2k.jsonl")).unwrap();
    let ids = tok.encode(&text, false).unwrap();
    assert_eq!(
        v["text_tokens"].as_u64().unwrap() as usize,
        ids.len().min(256 * 128)
    );
    let sum: f64 = (0..2)
        .map(|c| {
            model
                .nll(&ids[c * 128..(c + 1) * 128], 0)
                .unwrap()
                .iter()
                .sum::<f64>()
        })
        .sum();
    let want = (sum / 254.0).exp();
    assert!((v["ppl"].as_f64().unwrap() / want - 1.0).abs() < 1e-12);
}

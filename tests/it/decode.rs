//! The decode runtime: KV-cached generation against the full-sequence forward and the float64
//! reference, the stored (quantized) cache against the simulation, chat templates, seeded
//! sampling, `affq bench`, and bad input to `generate`.

use crate::common::*;
use affq::formats::Checkpoint;
use affq::model::{Mode, Model};
use affq::runtime::chat::{ChatTemplate, Message};
use affq::runtime::generate::generate_ids;
use affq::runtime::sampler::{argmax, Sampler, SamplerConfig};
use affq::runtime::{load, Device, Kernels, Purpose};
use candle_core::Tensor;
use std::path::Path;

fn greedy() -> Sampler {
    Sampler::new(SamplerConfig {
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
        seed: 0,
    })
}

/// A prompt from the WikiText-2 validation text, tokenized for stories260K.
fn prompt(n: usize) -> Vec<u32> {
    let text = std::fs::read_to_string(data_dir().join("wikitext-2-raw/wiki.valid.raw")).unwrap();
    let tok = Checkpoint::open(&stories_hf())
        .unwrap()
        .tokenizer("test")
        .unwrap();
    let mut ids = tok.encode(&text[..4000], true).unwrap();
    ids.truncate(n);
    ids
}

/// Greedy generation over the cache, then the full-sequence forward of prompt + generation:
/// every generated token is the argmax of the full forward at the position before it.
fn check_cached_equals_full(model: &Model, what: &str) {
    let p = prompt(24);
    let g = generate_ids(model, &p, 40, &mut greedy(), &[], |_| Ok(())).unwrap();
    assert_eq!(g.ids.len(), 40, "{what}");
    let all: Vec<u32> = p.iter().chain(&g.ids).copied().collect();
    let ids = Tensor::from_slice(&all, (1, all.len()), &candle_core::Device::Cpu).unwrap();
    let logits: Vec<Vec<f32>> = model
        .logits(&ids, Mode::Eval)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec2()
        .unwrap();
    for (i, &tok) in g.ids.iter().enumerate() {
        let row = &logits[p.len() - 1 + i];
        let best = argmax(row);
        assert_eq!(
            best, tok,
            "{what}: step {i}: cached decoding chose {tok} (logit {}), the full forward {best} (logit {})",
            row[tok as usize], row[best as usize]
        );
    }
}

fn loaded(dir: &Path, kernels: Kernels) -> (Model, String) {
    load(
        &Checkpoint::open(dir).unwrap(),
        128,
        kernels,
        Device::Cpu,
        Purpose::Decode,
    )
    .unwrap()
}

/// stories260K W4A4KV4 FlatQuant (one epoch on four windows): online transforms, quantized
/// activations and a 4-bit cache.
fn w4a4kv4(dir: &Path) {
    quantize_stories(
        dir,
        &Calibrated::new(4, 128)
            .method("flatquant")
            .scheme(4, 4)
            .kv(4)
            .epochs(1)
            .args(),
    );
}

#[test]
fn fp_greedy_reproduces_the_float64_reference() {
    let (want, text) = reference_greedy();
    let v = affq_json(&[
        "generate",
        stories_hf().to_str().unwrap(),
        "--temperature",
        "0",
        "-n",
        "200",
    ]);
    let mut got: Vec<u32> = serde_json::from_value(v["prompt_ids"].clone()).unwrap();
    got.extend(serde_json::from_value::<Vec<u32>>(v["ids"].clone()).unwrap());
    assert_eq!(got, want);
    assert_eq!(v["text"].as_str().unwrap(), text);
    assert_eq!(v["stop"], "max_tokens");
    assert!(v["decode_tok_per_s"].as_f64().unwrap() > 0.0);
}

#[test]
fn cached_greedy_equals_the_full_forward_fp_simulated_and_integer() {
    let (fp, _) = loaded(&stories_hf(), Kernels::Int);
    check_cached_equals_full(&fp, "fp");
    let tmp = tempfile::tempdir().unwrap();
    let q = tmp.path().join("q");
    w4a4kv4(&q);
    let (sim, ks) = loaded(&q, Kernels::Simulate);
    assert_eq!(ks, "simulate");
    check_cached_equals_full(&sim, "simulated W4A4KV4");
    let (int, ki) = loaded(&q, Kernels::Int);
    assert!(ki.starts_with("int ("), "{ki}");
    check_cached_equals_full(&int, "integer W4A4KV4");
}

/// Each layer's cached keys and values against the full forward's quantized ones for `ids`:
/// returns, over all values, the largest difference and how many differ at all.
fn cache_vs_simulation(
    model: &Model,
    cache: &affq::model::KvCache,
    ids: &[u32],
) -> (f32, usize, usize) {
    let t = Tensor::from_slice(ids, (1, ids.len()), &candle_core::Device::Cpu).unwrap();
    let mut h = model.embed(&t).unwrap();
    let (mut worst, mut differ, mut total) = (0f32, 0, 0);
    for (block, layer) in model.blocks.iter().zip(&cache.layers) {
        let (k, v) = block.simulated_kv(&h, &model.rope).unwrap();
        let flat = |t: Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (got, want) in [(layer.k.values(), flat(k)), (layer.v.values(), flat(v))] {
            assert_eq!(got.len(), want.len());
            for (a, b) in got.iter().zip(&want) {
                worst = worst.max((a - b).abs());
                differ += (a != b) as usize;
            }
            total += got.len();
        }
        h = block
            .forward(&h, &model.rope, Mode::Eval, &mut affq::model::NoHook)
            .unwrap();
    }
    (worst, differ, total)
}

/// The prompt run through the cache one block at a time, prefilling `prefill` tokens and then
/// decoding the rest one by one; returns the cache and each layer's inputs as the cached path
/// computed them (`[1, T, hidden]`), so each layer can be checked on its own inputs.
fn cached_layer_inputs(
    model: &Model,
    ids: &[u32],
    prefill: usize,
) -> (affq::model::KvCache, Vec<Tensor>) {
    let mut cache = model.new_cache().unwrap();
    let mut inputs: Vec<Vec<Tensor>> = vec![Vec::new(); model.blocks.len()];
    let mut step = |chunk: &[u32], cache: &mut affq::model::KvCache| {
        let t = Tensor::from_slice(chunk, (1, chunk.len()), &candle_core::Device::Cpu).unwrap();
        let mut h = model.embed(&t).unwrap();
        for (l, (block, layer)) in model.blocks.iter().zip(&mut cache.layers).enumerate() {
            inputs[l].push(h.clone());
            h = block.forward_cached(&h, &model.rope, layer).unwrap();
        }
    };
    step(&ids[..prefill], &mut cache);
    for t in prefill..ids.len() {
        step(&ids[t..t + 1], &mut cache);
    }
    let inputs = inputs
        .into_iter()
        .map(|rows| Tensor::cat(&rows, 1).unwrap())
        .collect();
    (cache, inputs)
}

#[test]
fn quantized_cache_stores_the_simulation_values_in_four_bits() {
    // The cache dequantizes to the keys and values the full forward quantizes. After the prompt's
    // prefill (the same ops on the same rows) bit for bit, on both kernels.
    let tmp = tempfile::tempdir().unwrap();
    let q = tmp.path().join("q");
    w4a4kv4(&q);
    let p = prompt(20);
    let prefill = 12;
    for kernels in [Kernels::Simulate, Kernels::Int] {
        let (model, _) = loaded(&q, kernels);
        let mut cache = model.new_cache().unwrap();
        model.forward_cached(&p[..prefill], &mut cache).unwrap();
        let (worst, differ, _) = cache_vs_simulation(&model, &cache, &p[..prefill]);
        assert_eq!((worst, differ), (0.0, 0), "{kernels:?}: prefill cache");
        for &t in &p[prefill..] {
            model.forward_cached(&[t], &mut cache).unwrap();
        }
        assert_eq!(cache.bits(), (4, 4));
        let c = &model.config;
        // Four bits per value plus three f32 parameters per (token, head), keys and values.
        let want = c.num_layers * 2 * c.num_kv_heads * (c.head_dim / 2 + 12);
        assert_eq!(cache.bytes_per_token(), want);

        // Decode steps, each layer on the inputs the cached path gave it (the full forward's
        // hidden states differ from the cached path's by float rounding, which 4-bit activations
        // can turn into whole steps in later layers: that is not the cache's doing). A decode
        // step computes its projections as a 1-row product instead of one row of a T-row
        // product, so its pre-quantization keys move by float rounding (≈ 1e-7 relative, and
        // through the 4-bit activation codes of the online transform's output a little more);
        // a unit's scale moves with them, so stored values agree to ~1e-6 of their size
        // (|x| ≤ 16 here: < 1e-4), except where a value sat on a rounding boundary: its code
        // then moves by exactly one step of its (token, head) unit. Such moves must be rare.
        let (cache, inputs) = cached_layer_inputs(&model, &p, prefill);
        let (hd, heads, t) = (c.head_dim, c.num_kv_heads, p.len());
        let (mut moved, mut total, mut worst_rounding) = (0usize, 0usize, 0f32);
        for (l, (block, layer)) in model.blocks.iter().zip(&cache.layers).enumerate() {
            let (k, v) = block.simulated_kv(&inputs[l], &model.rope).unwrap();
            let flat = |t: Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for (name, got, want) in [
                ("k", layer.k.values(), flat(k)),
                ("v", layer.v.values(), flat(v)),
            ] {
                assert_eq!(got.len(), heads * t * hd);
                for (u, (a, b)) in got.chunks_exact(hd).zip(want.chunks_exact(hd)).enumerate() {
                    let (head, pos) = (u / t, u % t);
                    let lo = b.iter().copied().fold(f32::INFINITY, f32::min);
                    let hi = b.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let step = (hi - lo) / 15.0;
                    for (x, y) in a.iter().zip(b) {
                        let d = (x - y).abs();
                        if pos < prefill {
                            assert_eq!(d, 0.0, "{kernels:?} layer {l} {name} head {head} pos {pos}: prefill entry changed");
                            continue;
                        }
                        total += 1;
                        if d < 1e-4 {
                            worst_rounding = worst_rounding.max(d);
                        } else {
                            assert!(
                                d <= step * 1.001 + 1e-4,
                                "{kernels:?} layer {l} {name} head {head} pos {pos}: {x} vs {y}, more than one step {step}"
                            );
                            moved += 1;
                        }
                    }
                }
            }
        }
        assert!(
            moved * 100 <= total,
            "{kernels:?}: {moved} of {total} decoded cache values moved by a step"
        );
        eprintln!("{kernels:?}: decode cache: worst rounding {worst_rounding:e}, {moved}/{total} moved by one step");
    }
}

/// SmolLM2-135M-Instruct's template as its tokenizer_config.json carries it.
const SMOLLM2_TEMPLATE: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

#[test]
fn smollm2_chat_template_renders_as_transformers_does() {
    // The strings transformers' apply_chat_template(tokenize=False) gives for this template.
    let t = ChatTemplate::from_source(SMOLLM2_TEMPLATE, "<|im_start|>", "<|im_end|>").unwrap();
    let user = Message {
        role: "user".into(),
        content: "What is 2+2?".into(),
    };
    assert_eq!(
        t.render(std::slice::from_ref(&user), true).unwrap(),
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    );
    let sys = Message {
        role: "system".into(),
        content: "Be brief.".into(),
    };
    assert_eq!(
        t.render(&[sys, user], false).unwrap(),
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
    );
    // The same template read from the imported model's tokenizer_config.json, through the
    // binary: the prompt it reports is the rendering, and the answer stops at <|im_end|>.
    let m = smollm2_dir();
    let v = affq_json(&[
        "generate",
        m.to_str().unwrap(),
        "--chat",
        "--prompt",
        "What is 2+2?",
        "--temperature",
        "0",
        "-n",
        "24",
    ]);
    assert_eq!(
        v["prompt"].as_str().unwrap(),
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    );
    assert!(v["text"].as_str().unwrap().contains('4'), "{}", v["text"]);
}

#[test]
fn seeded_sampling_is_deterministic() {
    let run = |seed: &str| -> Vec<u32> {
        let v = affq_json(&[
            "generate",
            stories_hf().to_str().unwrap(),
            "--prompt",
            "Once upon a time",
            "--temperature",
            "1.0",
            "--seed",
            seed,
            "-n",
            "60",
        ]);
        serde_json::from_value(v["ids"].clone()).unwrap()
    };
    let a = run("7");
    assert_eq!(a, run("7"));
    assert_ne!(a, run("8"));
}

#[test]
fn bench_reports_llama_bench_figures() {
    let v = affq_json(&[
        "bench",
        stories_hf().to_str().unwrap(),
        "-p",
        "64",
        "-n",
        "16",
        "-r",
        "2",
    ]);
    for key in ["prefill_tok_per_s", "decode_tok_per_s", "peak_rss_mb"] {
        assert!(v[key].as_f64().unwrap() > 0.0, "{key}: {v}");
    }
    assert_eq!(v["prompt_tokens"], 64);
    assert_eq!(v["gen_tokens"], 16);
    assert!(v["kernels"].is_string());
    // stories260K in f32: 5 layers × 2 × 4 KV heads × 8 values × 4 bytes.
    assert_eq!(v["kv_bytes_per_token"], 5 * 2 * 4 * 8 * 4);
}

#[test]
fn generate_bad_input_is_one_line_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("no-such-prompt.txt");
    let o = affq(&[
        "generate",
        stories_hf().to_str().unwrap(),
        "--prompt-file",
        missing.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("no-such-prompt.txt"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    // stories260K has no chat template.
    let o = affq(&[
        "generate",
        stories_hf().to_str().unwrap(),
        "--chat",
        "--prompt",
        "hi",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("tokenizer_config.json") && err.contains("chat_template"),
        "{err}"
    );
}

//! A Llama-shaped checkpoint with random f16 weights and only a few blocks, for measuring how
//! calibration and evaluation cost grow with model size (`scripts/bench-scale.sh`; not a test).
//!
//!   cargo run --release --example synthetic_model -- SHAPE LAYERS OUT_DIR TOKENIZER_DIR
//!
//! SHAPE: smollm2 (576/1536, 9:3 heads), 1b (Llama-3.2-1B: 2048/8192, 32:8), 8b (Llama-3-8B:
//! 4096/14336, 32:8), 70b (Llama-3-70B: 8192/28672, 64:8), qwen2-1.5b (Qwen2: 1536/8960, 12:2,
//! q/k/v biases, untied head: 1.78 B parameters with the 151 936 vocabulary); head_dim 64 for
//! smollm2, else 128. The
//! vocabulary is the tokenizer's (TOKENIZER_DIR's tokenizer.json and config.json vocab_size, e.g.
//! SmolLM2's 49 152), so `affq eval` and calibration run on real text; the real models' 128k
//! vocabularies only change the embedding and head, which the scale table accounts for apart.
//! Weights are N(0, 1/fan_in), norms 1: outputs keep their scale through the blocks.

use affq::formats::safetensors::{SpooledSafetensors, StoredTensor};
use affq::rng::Rng;
use std::collections::BTreeMap;
use std::path::PathBuf;

fn f16_normal(rng: &mut Rng, n: usize, sigma: f64) -> Vec<u8> {
    let mut out = Vec::with_capacity(n * 2);
    for _ in 0..n {
        out.extend(half::f16::from_f64(rng.normal() * sigma).to_le_bytes());
    }
    out
}

fn f16_ones(n: usize) -> Vec<u8> {
    (0..n).flat_map(|_| half::f16::ONE.to_le_bytes()).collect()
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    anyhow::ensure!(
        args.len() == 5,
        "usage: synthetic_model SHAPE LAYERS OUT_DIR TOKENIZER_DIR"
    );
    let (d, f, nh, nkv, hd) = match args[1].as_str() {
        "smollm2" => (576, 1536, 9, 3, 64),
        "1b" => (2048, 8192, 32, 8, 128),
        "8b" => (4096, 14336, 32, 8, 128),
        "70b" => (8192, 28672, 64, 8, 128),
        "qwen2-1.5b" => (1536, 8960, 12, 2, 128),
        s => anyhow::bail!("unknown shape {s}: smollm2, 1b, 8b, 70b or qwen2-1.5b"),
    };
    let qwen2 = args[1].starts_with("qwen2");
    let layers: usize = args[2].parse()?;
    let out = PathBuf::from(&args[3]);
    let tok_dir = PathBuf::from(&args[4]);
    let tok_cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tok_dir.join("config.json"))?)?;
    let vocab = tok_cfg["vocab_size"]
        .as_u64()
        .ok_or_else(|| anyhow::anyhow!("{}: no vocab_size", tok_dir.display()))?
        as usize;
    std::fs::create_dir_all(&out)?;
    let mut rng = Rng::new(20261202);
    let mut st = SpooledSafetensors::create(&out.join("model.safetensors"))?;
    let f16 = |shape: &[usize], bytes: Vec<u8>| StoredTensor {
        dtype: safetensors::Dtype::F16,
        shape: shape.to_vec(),
        bytes,
    };
    st.add(vec![(
        "model.embed_tokens.weight".into(),
        f16(&[vocab, d], f16_normal(&mut rng, vocab * d, 1.0)),
    )])?;
    st.add(vec![
        ("model.norm.weight".into(), f16(&[d], f16_ones(d))),
        (
            "lm_head.weight".into(),
            f16(
                &[vocab, d],
                f16_normal(&mut rng, vocab * d, 1.0 / (d as f64).sqrt()),
            ),
        ),
    ])?;
    for i in 0..layers {
        let p = format!("model.layers.{i}");
        let lin = |rng: &mut Rng, o: usize, n: usize| {
            f16(&[o, n], f16_normal(rng, o * n, 1.0 / (n as f64).sqrt()))
        };
        let mut block = vec![
            (
                format!("{p}.input_layernorm.weight"),
                f16(&[d], f16_ones(d)),
            ),
            (
                format!("{p}.post_attention_layernorm.weight"),
                f16(&[d], f16_ones(d)),
            ),
            (
                format!("{p}.self_attn.q_proj.weight"),
                lin(&mut rng, nh * hd, d),
            ),
            (
                format!("{p}.self_attn.k_proj.weight"),
                lin(&mut rng, nkv * hd, d),
            ),
            (
                format!("{p}.self_attn.v_proj.weight"),
                lin(&mut rng, nkv * hd, d),
            ),
            (
                format!("{p}.self_attn.o_proj.weight"),
                lin(&mut rng, d, nh * hd),
            ),
            (format!("{p}.mlp.gate_proj.weight"), lin(&mut rng, f, d)),
            (format!("{p}.mlp.up_proj.weight"), lin(&mut rng, f, d)),
            (format!("{p}.mlp.down_proj.weight"), lin(&mut rng, d, f)),
        ];
        if qwen2 {
            for (name, n) in [
                ("q_proj", nh * hd),
                ("k_proj", nkv * hd),
                ("v_proj", nkv * hd),
            ] {
                block.push((
                    format!("{p}.self_attn.{name}.bias"),
                    f16(&[n], f16_normal(&mut rng, n, 0.1)),
                ));
            }
        }
        st.add(block)?;
    }
    let mut meta = BTreeMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    meta.insert(
        "note".to_string(),
        format!("synthetic {}-shaped model, random weights", args[1]),
    );
    st.finish(&meta)?;
    let (arch, model_type) = if qwen2 {
        ("Qwen2ForCausalLM", "qwen2")
    } else {
        ("LlamaForCausalLM", "llama")
    };
    let config = serde_json::json!({
        "architectures": [arch],
        "model_type": model_type,
        "hidden_size": d,
        "intermediate_size": f,
        "num_hidden_layers": layers,
        "num_attention_heads": nh,
        "num_key_value_heads": nkv,
        "head_dim": hd,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "max_position_embeddings": 8192,
        "vocab_size": vocab,
        "tie_word_embeddings": false,
        "hidden_act": "silu",
        "torch_dtype": "float16",
    });
    std::fs::write(
        out.join("config.json"),
        serde_json::to_string_pretty(&config)?,
    )?;
    for name in ["tokenizer.json", "tokenizer_config.json"] {
        let src = tok_dir.join(name);
        if src.is_file() {
            std::fs::copy(&src, out.join(name))?;
        }
    }
    Ok(())
}

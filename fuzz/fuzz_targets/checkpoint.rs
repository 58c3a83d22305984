//! Loading a quantized checkpoint: a fixed tiny W4A4KV4 config.json with fuzzed weights; the
//! loader must reject anything inconsistent (packed codes, scales, transforms, clips) with an
//! error, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]

const CONFIG: &str = r#"{
  "architectures": ["LlamaForCausalLM"], "model_type": "llama",
  "hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2,
  "num_key_value_heads": 1, "num_hidden_layers": 1, "vocab_size": 32,
  "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 64,
  "tie_word_embeddings": true,
  "quantization_config": {"quant_method": "affq", "format": "affq-packed", "format_version": 1,
    "affq_version": "fuzz", "method": "flatquant",
    "weights": {"bits": 4, "symmetric": true, "sym_scale": "max_pos", "asym_zero": "integer",
      "clip": 1.0, "clip_min": 1.0, "granularity": "channel", "clip_search": false, "quantizer": "rtn"},
    "activations": {"bits": 4, "symmetric": true, "sym_scale": "max_pos", "asym_zero": "integer", "clip": 1.0, "clip_min": 1.0},
    "kv_cache": {"bits": 4, "symmetric": false, "sym_scale": "max_pos", "asym_zero": "integer", "clip": 1.0, "clip_min": 1.0},
    "quantize_head": false, "transforms": [], "seed": 0}
}"#;

fuzz_target!(|data: &[u8]| {
    let p = common::scratch("model.safetensors", data);
    let dir = p.parent().unwrap().to_path_buf();
    let cfg = dir.join("config.json");
    if !cfg.exists() {
        std::fs::write(&cfg, CONFIG).unwrap();
    }
    if let Ok(ckpt) = affq::formats::Checkpoint::open(&dir) {
        let _ = ckpt.load_model(8);
    }
});

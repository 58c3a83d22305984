//! Hugging Face `config.json` of a causal LM, reduced to the [`ModelConfig`] the decoder needs and
//! validated (architecture, head layout, RoPE scaling, sliding window).

use crate::error::{Error, Result};
use crate::model::config::{Architecture, Llama3RopeScaling, ModelConfig};
use serde::Deserialize;
use std::path::Path;

/// The fields of `config.json` as written by transformers; unknown keys are ignored.
#[derive(Debug, Clone, Deserialize)]
struct RawConfig {
    architectures: Option<Vec<String>>,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    #[serde(default = "default_eps")]
    rms_norm_eps: f64,
    rope_theta: Option<f64>,
    rope_scaling: Option<serde_json::Value>,
    max_position_embeddings: Option<usize>,
    vocab_size: usize,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    hidden_act: Option<String>,
    sliding_window: Option<serde_json::Value>,
    use_sliding_window: Option<bool>,
    bos_token_id: Option<serde_json::Value>,
    eos_token_id: Option<serde_json::Value>,
}

fn default_eps() -> f64 {
    1e-6
}

fn first_id(v: &Option<serde_json::Value>) -> Option<u32> {
    match v {
        Some(serde_json::Value::Number(n)) => n.as_u64().map(|x| x as u32),
        Some(serde_json::Value::Array(a)) => a.first().and_then(|x| x.as_u64()).map(|x| x as u32),
        _ => None,
    }
}

impl ModelConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json_str(&text).map_err(|msg| Error::format(path, msg))
    }

    pub fn from_json_str(text: &str) -> std::result::Result<Self, String> {
        let raw: RawConfig =
            serde_json::from_str(text).map_err(|e| format!("invalid config.json: {e}"))?;
        let arch_name = raw
            .architectures
            .as_ref()
            .and_then(|a| a.first().cloned())
            .ok_or("config.json has no `architectures` entry")?;
        let architecture = Architecture::parse(&arch_name).ok_or_else(|| {
            format!(
                "unsupported architecture `{arch_name}`; supported: {}",
                Architecture::SUPPORTED.join(", ")
            )
        })?;
        if let Some(act) = &raw.hidden_act {
            if act != "silu" {
                return Err(format!("unsupported hidden_act `{act}` (only silu)"));
            }
        }
        let num_kv_heads = raw.num_key_value_heads.unwrap_or(raw.num_attention_heads);
        for (name, v) in [
            ("hidden_size", raw.hidden_size),
            ("intermediate_size", raw.intermediate_size),
            ("num_hidden_layers", raw.num_hidden_layers),
            ("num_attention_heads", raw.num_attention_heads),
            ("num_key_value_heads", num_kv_heads),
            ("vocab_size", raw.vocab_size),
        ] {
            if v == 0 {
                return Err(format!("{name} must be positive"));
            }
        }
        if !raw.num_attention_heads.is_multiple_of(num_kv_heads) {
            return Err(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {num_kv_heads}",
                raw.num_attention_heads
            ));
        }
        let head_dim = match raw.head_dim {
            Some(d) => d,
            None => {
                if !raw.hidden_size.is_multiple_of(raw.num_attention_heads) {
                    return Err(format!(
                        "hidden_size {} is not divisible by num_attention_heads {}",
                        raw.hidden_size, raw.num_attention_heads
                    ));
                }
                raw.hidden_size / raw.num_attention_heads
            }
        };
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(format!(
                "head_dim {head_dim} must be even and positive for RoPE"
            ));
        }
        let rope_scaling = match &raw.rope_scaling {
            None | Some(serde_json::Value::Null) => None,
            Some(v) => {
                let kind = v
                    .get("rope_type")
                    .or_else(|| v.get("type"))
                    .and_then(|t| t.as_str())
                    .unwrap_or("");
                match kind {
                    "llama3" => Some(
                        serde_json::from_value::<Llama3RopeScaling>(v.clone())
                            .map_err(|e| format!("invalid llama3 rope_scaling: {e}"))?,
                    ),
                    "default" => None,
                    other => return Err(format!("unsupported rope_scaling type `{other}`")),
                }
            }
        };
        let attention_bias = raw.attention_bias.unwrap_or(false);
        let is_qwen2 = architecture == Architecture::Qwen2ForCausalLM;
        let sliding_window = match architecture {
            Architecture::MistralForCausalLM => raw
                .sliding_window
                .as_ref()
                .and_then(|v| v.as_u64())
                .map(|v| v as usize),
            Architecture::Qwen2ForCausalLM | Architecture::Qwen3ForCausalLM
                if raw.use_sliding_window == Some(true) =>
            {
                return Err("use_sliding_window = true is not supported for Qwen models".into())
            }
            _ => None,
        };
        Ok(ModelConfig {
            architecture,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_layers: raw.num_hidden_layers,
            num_heads: raw.num_attention_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: raw.rms_norm_eps,
            rope_theta: raw.rope_theta.unwrap_or(10000.0),
            rope_scaling,
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(2048),
            vocab_size: raw.vocab_size,
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            qkv_bias: is_qwen2 || attention_bias,
            o_bias: attention_bias && !is_qwen2,
            mlp_bias: raw.mlp_bias.unwrap_or(false),
            qk_norm: architecture == Architecture::Qwen3ForCausalLM,
            sliding_window,
            bos_token_id: first_id(&raw.bos_token_id),
            eos_token_id: first_id(&raw.eos_token_id),
        })
    }
}

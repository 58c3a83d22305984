//! The configuration of a decoder: what the block needs of a Hugging Face `config.json`
//! (parsed and validated by `crate::formats::config_json`).

use serde::{Deserialize, Serialize};

/// Decoder families affq implements. They share one block; the differences are flags below.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Architecture {
    LlamaForCausalLM,
    MistralForCausalLM,
    Qwen2ForCausalLM,
    Qwen3ForCausalLM,
}

impl Architecture {
    pub const SUPPORTED: [&'static str; 4] = [
        "LlamaForCausalLM",
        "MistralForCausalLM",
        "Qwen2ForCausalLM",
        "Qwen3ForCausalLM",
    ];

    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "LlamaForCausalLM" => Self::LlamaForCausalLM,
            "MistralForCausalLM" => Self::MistralForCausalLM,
            "Qwen2ForCausalLM" => Self::Qwen2ForCausalLM,
            "Qwen3ForCausalLM" => Self::Qwen3ForCausalLM,
            _ => return None,
        })
    }
}

/// Llama 3.x frequency-dependent RoPE rescaling (`rope_scaling.rope_type == "llama3"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Llama3RopeScaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: usize,
}

/// A validated model configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<Llama3RopeScaling>,
    pub max_position_embeddings: usize,
    pub vocab_size: usize,
    pub tie_word_embeddings: bool,
    /// Bias on q/k/v (Qwen2 always; Llama with `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on o_proj (Llama with `attention_bias`).
    pub o_bias: bool,
    pub mlp_bias: bool,
    /// Per-head RMSNorm on q and k before RoPE (Qwen3).
    pub qk_norm: bool,
    /// Mistral-style sliding-window attention: a token attends to at most this many positions.
    pub sliding_window: Option<usize>,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
}

impl ModelConfig {
    /// Inverse frequencies of RoPE, `θ^(−2i/d)`, with the Llama 3 rescaling applied when configured.
    pub fn rope_inv_freq(&self) -> Vec<f64> {
        let d = self.head_dim;
        let base: Vec<f64> = (0..d / 2)
            .map(|i| 1.0 / self.rope_theta.powf(2.0 * i as f64 / d as f64))
            .collect();
        let Some(s) = &self.rope_scaling else {
            return base;
        };
        // Llama 3.1 (transformers `_compute_llama3_parameters`): long wavelengths are divided by
        // `factor`, short ones kept, and the band in between interpolated smoothly.
        let old = s.original_max_position_embeddings as f64;
        let low_wavelen = old / s.low_freq_factor;
        let high_wavelen = old / s.high_freq_factor;
        base.into_iter()
            .map(|f| {
                let wavelen = 2.0 * std::f64::consts::PI / f;
                if wavelen < high_wavelen {
                    f
                } else if wavelen > low_wavelen {
                    f / s.factor
                } else {
                    let smooth = (old / wavelen - s.low_freq_factor)
                        / (s.high_freq_factor - s.low_freq_factor);
                    (1.0 - smooth) * f / s.factor + smooth * f
                }
            })
            .collect()
    }

    pub fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }

    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_architecture_lists_supported() {
        let e = ModelConfig::from_json_str(
            r#"{"architectures":["GPT2LMHeadModel"],"hidden_size":8,"intermediate_size":8,
                "num_hidden_layers":1,"num_attention_heads":2,"vocab_size":4}"#,
        )
        .unwrap_err();
        assert!(
            e.contains("GPT2LMHeadModel") && e.contains("Qwen3ForCausalLM"),
            "{e}"
        );
    }

    #[test]
    fn llama3_rope_scaling_matches_transformers_rule() {
        let cfg = ModelConfig::from_json_str(
            r#"{"architectures":["LlamaForCausalLM"],"hidden_size":2048,"intermediate_size":8192,
                "num_hidden_layers":1,"num_attention_heads":32,"num_key_value_heads":8,
                "vocab_size":4,"rope_theta":500000.0,
                "rope_scaling":{"factor":32.0,"low_freq_factor":1.0,"high_freq_factor":4.0,
                "original_max_position_embeddings":8192,"rope_type":"llama3"}}"#,
        )
        .unwrap();
        let f = cfg.rope_inv_freq();
        // Highest frequency (wavelength 2π < 2048) is kept; the lowest is divided by the factor.
        assert_eq!(f[0], 1.0);
        let base_last = 1.0 / 500000f64.powf(62.0 / 64.0);
        assert!((f[31] - base_last / 32.0).abs() < 1e-18);
    }
}

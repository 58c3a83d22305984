//! The schema of `config.json:quantization_config` for affq checkpoints (docs/checkpoint-format.md):
//! one definition shared by the checkpoint reader, its writer and the exporters.

use crate::error::{Error, Result};
use crate::model::LinearKind;
use crate::quant::{Granularity, QuantSpec};
use serde::{Deserialize, Serialize};
use std::path::Path;

pub const FORMAT: &str = "affq-packed";
pub const FORMAT_VERSION: u32 = 1;

/// Weight quantization scheme.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WeightScheme {
    #[serde(flatten)]
    pub spec: QuantSpec,
    pub granularity: Granularity,
    /// Per-unit MSE search of the clip range (algorithms.md §1.3).
    pub clip_search: bool,
    /// "rtn" or "gptq".
    pub quantizer: String,
    /// Decoder linears kept in full precision, by module name within a layer (`mlp.down_proj`):
    /// the target format's layout cannot tile their shape (GGUF's 32-weight blocks, GPTQ's and
    /// compressed-tensors' packed words), so they are stored dense, as llama-quantize falls back
    /// to a float type and llm-compressor's `ignore` skips a module.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dense: Vec<String>,
}

impl WeightScheme {
    /// Whether `kind`'s linears stay in full precision.
    pub fn keeps_dense(&self, kind: LinearKind) -> bool {
        self.dense.iter().any(|d| d == kind.hf_name())
    }
}

/// `config.json:quantization_config` for `quant_method: "affq"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuantConfig {
    pub quant_method: String,
    pub format: String,
    pub format_version: u32,
    pub affq_version: String,
    /// "rtn", "rotate", …
    pub method: String,
    /// `None`: weights in full precision.
    pub weights: Option<WeightScheme>,
    /// Dynamic per-token quantization of every decoder linear input.
    pub activations: Option<QuantSpec>,
    /// Per-(token, head) quantization of keys (after RoPE and any Q/K transform) and values.
    pub kv_cache: Option<QuantSpec>,
    pub quantize_head: bool,
    /// Human-readable list of the transforms in the checkpoint.
    pub transforms: Vec<String>,
    pub seed: u64,
}

impl QuantConfig {
    /// Parses `quantization_config` from a config.json value, if present.
    pub fn from_config_json(path: &Path, v: &serde_json::Value) -> Result<Option<Self>> {
        let Some(q) = v.get("quantization_config") else {
            return Ok(None);
        };
        let method = q.get("quant_method").and_then(|m| m.as_str()).unwrap_or("");
        if method != "affq" {
            return Err(Error::Unsupported(format!(
                "{}: quantization_config.quant_method `{method}` is not supported (only affq checkpoints)",
                path.display()
            )));
        }
        let qc: QuantConfig = serde_json::from_value(q.clone())
            .map_err(|e| Error::format(path, format!("invalid quantization_config: {e}")))?;
        if qc.format != FORMAT || qc.format_version > FORMAT_VERSION {
            return Err(Error::format(
                path,
                format!("quantization format {} v{} is newer than this affq reads ({FORMAT} v{FORMAT_VERSION})", qc.format, qc.format_version),
            ));
        }
        for (what, s) in [
            ("weights", qc.weights.as_ref().map(|w| &w.spec)),
            ("activations", qc.activations.as_ref()),
            ("kv_cache", qc.kv_cache.as_ref()),
        ] {
            if let Some(s) = s {
                if !(2..=8).contains(&s.bits) {
                    return Err(Error::format(
                        path,
                        format!(
                            "quantization_config.{what}.bits = {} (2..8 allowed)",
                            s.bits
                        ),
                    ));
                }
            }
        }
        Ok(Some(qc))
    }
}

//! affq's quantized checkpoint format (docs/checkpoint-format.md): `config.json` with a
//! `quantization_config`, `model.safetensors` with packed codes, scales, zero points and the
//! online transforms, tokenizer files copied from the source model.

use crate::error::{Error, Result};
use crate::fsutil::{write_json, TempDir};
use crate::model::Model;
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

/// Writes `model` (quantized in memory) as a checkpoint in `out`, next to a copy of the source
/// model's config and tokenizer files, plus `extra` files (name, contents) such as the calibration
/// log. Crash-safe: written to a temporary directory, then renamed.
pub fn write(
    model: &Model,
    src_dir: &Path,
    src_config: &Path,
    qcfg: &QuantConfig,
    out: &Path,
    force: bool,
    extra: &[(String, String)],
) -> Result<()> {
    crate::fsutil::check_output(out, force)?;
    let tmp = TempDir::beside(out)?;
    let mut tensors = model.export()?;
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let mut meta = std::collections::BTreeMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    meta.insert("affq.version".to_string(), crate::VERSION.to_string());
    meta.insert(
        "affq.quantization".to_string(),
        serde_json::to_string(qcfg).unwrap_or_default(),
    );
    crate::weights::write_safetensors(&tmp.path().join("model.safetensors"), &tensors, &meta)?;

    let text = std::fs::read_to_string(src_config).map_err(|e| Error::io(src_config, e))?;
    let mut cfg: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::format(src_config, e.to_string()))?;
    cfg["quantization_config"] =
        serde_json::to_value(qcfg).map_err(|e| Error::Runtime(e.to_string()))?;
    cfg["tie_word_embeddings"] = serde_json::json!(model.tied_head);
    write_json(&tmp.path().join("config.json"), &cfg)?;
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "generation_config.json",
        "tokenizer.model",
    ] {
        let p = src_dir.join(f);
        if p.is_file() {
            std::fs::copy(&p, tmp.path().join(f)).map_err(|e| Error::io(&p, e))?;
        }
    }
    for (name, contents) in extra {
        let p = tmp.path().join(name);
        std::fs::write(&p, contents).map_err(|e| Error::io(&p, e))?;
    }
    tmp.persist(out, force)
}

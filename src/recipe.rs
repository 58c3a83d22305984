//! Calibration recipes: small TOML files (calib/*.toml, built into the binary) that set method,
//! bit widths and calibration budget. Precedence: command-line flags, then the recipe, then the
//! method's default preset (its registry entry names it, e.g. `cpu` for FlatQuant).

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    pub method: Option<String>,
    pub bits: Option<u8>,
    pub a_bits: Option<u8>,
    pub kv_bits: Option<u8>,
    pub nsamples: Option<usize>,
    pub calib_seqlen: Option<usize>,
    pub epochs: Option<usize>,
    pub batch: Option<usize>,
    pub lr: Option<f64>,
    /// FlatQuant: learning rate of the channel scales, trained as `s = ln c` (the `cpu` budget
    /// every FlatQuant run starts from sets 4e-2; a recipe without it anywhere: `lr`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_lr: Option<f64>,
    pub alpha: Option<f64>,
    pub calib: Option<String>,
    /// `rtn` or `gptq`.
    pub weight_quantizer: Option<String>,
    pub gptq_damp: Option<f64>,
    pub act_order: Option<bool>,
    /// Calibration windows for GPTQ's Hessians (at least `nsamples`).
    pub gptq_nsamples: Option<usize>,
    /// Asymmetric weights.
    pub asym: Option<bool>,
    pub group_size: Option<usize>,
    /// AffineQuant: off-diagonal factor of the gradual mask.
    pub stability_factor: Option<f64>,
    /// AffineQuant: dense norm→linear matrices (weight-only recipes).
    pub ln_matrix: Option<bool>,
    /// How the engine keeps the calibration activations (block inputs and targets): `f32`
    /// (default) or `bf16` (half the memory; widened per batch).
    pub calib_activations: Option<String>,
    /// Only transforms that merge into the weights (no online transform): the checkpoint exports
    /// to formats that carry plain weights (GGUF, GPTQ).
    pub merged_only: Option<bool>,
    /// GPTQ: each group's grid from the error-updated weights by a Hessian-weighted scale search.
    pub gptq_grid_search: Option<bool>,
    /// GPTQ: Hessians from the full-precision model's inputs instead of the quantized model's own
    /// (what lets a sharded calibration run GPTQ).
    pub gptq_fp_inputs: Option<bool>,
    /// GPTQ v2 (asymmetric calibration): fit the quantized layer on the quantized model's input
    /// to the full-precision layer on the full-precision input.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gptq_v2: Option<bool>,
    /// GPTQ v2: the share of the asymmetric correction (default 0.25).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gptq_v2_alpha: Option<f64>,
    /// GPTQ v2: the cross moment from the first this many calibration windows (default: all of
    /// GPTQ's windows).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gptq_v2_windows: Option<usize>,
    /// Trained methods: deploy every trained block, even one whose calibration loss is above its
    /// untrained start's (the engine otherwise deploys the start; speed measurements and
    /// ablations want the method's own blocks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_trained: Option<bool>,
    /// Trained methods: learn on the quantized model's own block inputs against the
    /// full-precision outputs (`false`: on the full-precision inputs, the paper's way).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantized_inputs: Option<bool>,
    /// With a quantized KV cache: smooth and centre the keys of every block before its method
    /// (algorithms.md §10); on by default, `false` turns it off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_smoothing: Option<bool>,
    /// How the calibration runs the products of linears whose activations and weights are both
    /// fake-quantized: `f32` (default) or `int` (forwards as exact integer GEMMs, the two
    /// gradient products with the upstream gradient rounded to 8 bits; needs an integer
    /// dot-product kernel, else f32).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_products: Option<String>,
}

/// Recipes shipped in calib/.
pub const BUILTIN: &[(&str, &str)] = &[
    ("cpu", include_str!("../calib/cpu.toml")),
    ("paper", include_str!("../calib/paper.toml")),
    (
        "flatquant-w4a4",
        include_str!("../calib/flatquant-w4a4.toml"),
    ),
    (
        "flatquant-w4a4kv4",
        include_str!("../calib/flatquant-w4a4kv4.toml"),
    ),
    (
        "flatquant-w4a16-gptq",
        include_str!("../calib/flatquant-w4a16-gptq.toml"),
    ),
    (
        "flatquant-w4a4-gptq",
        include_str!("../calib/flatquant-w4a4-gptq.toml"),
    ),
    (
        "flatquant-w4a4kv4-gptq",
        include_str!("../calib/flatquant-w4a4kv4-gptq.toml"),
    ),
    (
        "affinequant-cpu",
        include_str!("../calib/affinequant-cpu.toml"),
    ),
    (
        "affinequant-w4a4",
        include_str!("../calib/affinequant-w4a4.toml"),
    ),
    (
        "affinequant-w4a16",
        include_str!("../calib/affinequant-w4a16.toml"),
    ),
    (
        "affinequant-w3a16-g64",
        include_str!("../calib/affinequant-w3a16-g64.toml"),
    ),
];

impl Recipe {
    fn parse(text: &str, origin: &Path) -> Result<Self> {
        toml::from_str(text)
            .map_err(|e| Error::format(origin, format!("invalid recipe: {}", e.message())))
    }

    /// A built-in recipe by name, or a TOML file by path.
    pub fn load(name_or_path: &str) -> Result<Self> {
        if let Some((_, text)) = BUILTIN.iter().find(|(n, _)| *n == name_or_path) {
            return Self::parse(text, Path::new(&format!("calib/{name_or_path}.toml")));
        }
        let p = Path::new(name_or_path);
        if p.is_file() {
            let text = std::fs::read_to_string(p).map_err(|e| Error::io(p, e))?;
            return Self::parse(&text, p);
        }
        let names: Vec<&str> = BUILTIN.iter().map(|(n, _)| *n).collect();
        Err(Error::Usage(format!(
            "unknown recipe `{name_or_path}` (built-in: {}; or a path to a .toml file)",
            names.join(", ")
        )))
    }

    /// The keys this recipe sets (TOML names, e.g. `stability_factor`).
    pub fn keys_set(&self) -> Vec<String> {
        match serde_json::to_value(self) {
            Ok(serde_json::Value::Object(m)) => m
                .into_iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, _)| k)
                .collect(),
            _ => Vec::new(),
        }
    }

    /// `self` with every field that `over` sets replaced.
    pub fn overridden_by(self, over: &Recipe) -> Recipe {
        Recipe {
            method: over.method.clone().or(self.method),
            bits: over.bits.or(self.bits),
            a_bits: over.a_bits.or(self.a_bits),
            kv_bits: over.kv_bits.or(self.kv_bits),
            nsamples: over.nsamples.or(self.nsamples),
            calib_seqlen: over.calib_seqlen.or(self.calib_seqlen),
            epochs: over.epochs.or(self.epochs),
            batch: over.batch.or(self.batch),
            lr: over.lr.or(self.lr),
            scale_lr: over.scale_lr.or(self.scale_lr),
            alpha: over.alpha.or(self.alpha),
            calib: over.calib.clone().or(self.calib),
            weight_quantizer: over.weight_quantizer.clone().or(self.weight_quantizer),
            gptq_damp: over.gptq_damp.or(self.gptq_damp),
            act_order: over.act_order.or(self.act_order),
            gptq_nsamples: over.gptq_nsamples.or(self.gptq_nsamples),
            asym: over.asym.or(self.asym),
            group_size: over.group_size.or(self.group_size),
            stability_factor: over.stability_factor.or(self.stability_factor),
            ln_matrix: over.ln_matrix.or(self.ln_matrix),
            calib_activations: over.calib_activations.clone().or(self.calib_activations),
            merged_only: over.merged_only.or(self.merged_only),
            gptq_grid_search: over.gptq_grid_search.or(self.gptq_grid_search),
            gptq_fp_inputs: over.gptq_fp_inputs.or(self.gptq_fp_inputs),
            gptq_v2: over.gptq_v2.or(self.gptq_v2),
            gptq_v2_alpha: over.gptq_v2_alpha.or(self.gptq_v2_alpha),
            gptq_v2_windows: over.gptq_v2_windows.or(self.gptq_v2_windows),
            keep_trained: over.keep_trained.or(self.keep_trained),
            quantized_inputs: over.quantized_inputs.or(self.quantized_inputs),
            key_smoothing: over.key_smoothing.or(self.key_smoothing),
            step_products: over.step_products.clone().or(self.step_products),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_recipes_parse() {
        for (name, _) in BUILTIN {
            Recipe::load(name).unwrap();
        }
        let cpu = Recipe::load("cpu").unwrap();
        let r = cpu.clone().overridden_by(&Recipe {
            epochs: Some(9),
            ..Default::default()
        });
        assert_eq!(r.epochs, Some(9));
        assert_eq!(r.nsamples, cpu.nsamples);
    }
}

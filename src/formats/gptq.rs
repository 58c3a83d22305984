//! GPTQ v1 (`quant_method: "gptq"`, `checkpoint_format: "gptq"`; formats.md §2), the layout
//! AutoGPTQ wrote and GPTQModel, transformers (through it) and vLLM read. Per linear `P`:
//! `P.qweight` (I32 `[in·b/32, out]`, codes packed along the input, low bits first),
//! `P.qzeros` (I32 `[groups, out·b/32]`, zero points **minus one** packed along the output),
//! `P.scales` (F16 `[groups, out]`), `P.g_idx` (I32 `[in]`, `i / g`), `P.bias` (F16).
//! `W[o, i] = scales[g, o]·(q[i, o] − (qzeros[g, o] + 1))`, `g = g_idx[i]`.

use super::hf_export::{exact_scales, pack_rows, transpose, zero_free, LinearFormat};
use super::safetensors::StoredTensor;
use crate::model::LinearKind;
use crate::quant::{Granularity, QuantSpec, QuantizedWeight};
use safetensors::Dtype;

pub struct Gptq;

/// Why GPTQ's layout cannot tile an `out × inp` linear of `bits`-bit codes, if it cannot:
/// `qweight` packs `32/b` codes per 32-bit word along the input, `qzeros` along the output.
pub fn untileable(out: usize, inp: usize, bits: u8) -> Option<String> {
    let per_word = 32 / bits as usize;
    (!inp.is_multiple_of(per_word) || !out.is_multiple_of(per_word))
        .then(|| format!("GPTQ packs {per_word} codes per 32-bit word along both dimensions"))
}

impl LinearFormat for Gptq {
    fn name(&self) -> &'static str {
        "GPTQ"
    }

    fn bias_dtype(&self, _model: Dtype) -> Dtype {
        Dtype::F16
    }

    fn linear(
        &self,
        q: &QuantizedWeight,
        _act: Option<&QuantSpec>,
        prefix: &str,
        _dtype: Dtype,
    ) -> Result<Vec<(String, StoredTensor)>, String> {
        let bits = q.spec.bits;
        if ![2, 4, 8].contains(&bits) {
            return Err(format!("has {bits}-bit codes; affq writes GPTQ's 2-, 4- and 8-bit layouts (3-bit has its own packing)"));
        }
        if q.params.iter().any(|p| p.offset != 0.0) {
            return Err("has float offsets (Q4_1-style); GPTQ stores integer zero points: quantize with --zero-point integer".into());
        }
        if let Some(why) = untileable(q.out, q.inp, bits) {
            return Err(format!("is {}×{}: {why}", q.out, q.inp));
        }
        let per_word = 32 / bits as usize;
        let ng = q.n_groups();
        if let Some((i, p)) = q.params.iter().enumerate().find(|(_, p)| p.zero < 1.0) {
            return Err(format!(
                "has zero point {} (row {}, group {}); GPTQ v1 stores z − 1 and cannot hold z = 0: quantize with --format gptq",
                p.zero,
                i / ng,
                i % ng
            ));
        }
        let scale: Vec<f32> = q.params.iter().map(|p| p.scale).collect();
        let st = transpose(&scale, q.out, ng); // [ng, out]
        let sbytes = exact_scales(
            q,
            &st,
            Dtype::F16,
            "GPTQ's scale dtype: quantize with --format gptq",
        )?;
        let wpr = q.inp / per_word;
        let packed = pack_rows(&q.codes, q.inp, bits); // [out, in/pw]
        let z: Vec<u8> = q.params.iter().map(|p| p.zero as u8 - 1).collect();
        let wpo = q.out / per_word;
        let g = q.group_size();
        let g_idx: Vec<i32> = (0..q.inp).map(|i| (i / g) as i32).collect();
        Ok(vec![
            (
                format!("{prefix}.qweight"),
                StoredTensor::i32(&transpose(&packed, q.out, wpr), &[wpr, q.out]),
            ),
            (
                format!("{prefix}.qzeros"),
                StoredTensor::i32(
                    &pack_rows(&transpose(&z, q.out, ng), q.out, bits),
                    &[ng, wpo],
                ),
            ),
            (
                format!("{prefix}.scales"),
                StoredTensor {
                    dtype: Dtype::F16,
                    shape: vec![ng, q.out],
                    bytes: sbytes,
                },
            ),
            (
                format!("{prefix}.g_idx"),
                StoredTensor::i32(&g_idx, &[q.inp]),
            ),
        ])
    }

    fn quantization_config(
        &self,
        q: &QuantizedWeight,
        _act: Option<&QuantSpec>,
        quantize_head: bool,
        dense: &[String],
    ) -> serde_json::Value {
        let group = match q.granularity {
            Granularity::Group(g) => g as i64,
            _ => -1,
        };
        let mut c = serde_json::json!({
            "quant_method": "gptq", "bits": q.spec.bits, "group_size": group, "desc_act": false,
            "sym": zero_free(q), "damp_percent": 0.01, "true_sequential": true,
            "static_groups": false, "lm_head": quantize_head, "checkpoint_format": "gptq",
            "meta": {"quantizer": [format!("affq:{}", crate::VERSION)]}
        });
        if !dense.is_empty() {
            // transformers/optimum quantize only the listed modules of each block.
            let kept: Vec<&str> = LinearKind::ALL
                .iter()
                .map(|k| k.hf_name())
                .filter(|n| !dense.iter().any(|d| d == n))
                .collect();
            c["modules_in_block_to_quantize"] = serde_json::json!([kept]);
        }
        c
    }

    fn extra_files(&self, config: &serde_json::Value) -> Vec<(String, String)> {
        vec![(
            "quantize_config.json".into(),
            serde_json::to_string_pretty(config).unwrap_or_default() + "\n",
        )]
    }
}

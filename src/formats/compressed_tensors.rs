//! compressed-tensors `pack-quantized` (formats.md §1): the format transformers decompresses on
//! load and vLLM runs. Per quantized linear `P`: `P.weight_packed` (I32 `[out, in·b/32]`, the
//! offset-binary code `q + 2^(b−1)` — affq's unsigned code — low bits first along the input),
//! `P.weight_scale` (model dtype, `[out, groups]`), `P.weight_zero_point` for asymmetric grids
//! (I32 `[out·b/32, groups]`, the offset-binary zero packed along the output), `P.weight_shape`.
//! `W = (q − zp)·s`. 2-, 4- and 8-bit codes only (the layouts every version agrees on).
//!
//! Quantized input activations (formats.md §1.5) are `input_activations` with `dynamic: true`,
//! `strategy: "token"`: on every call the quantizer takes each token's extremes (widened to
//! include 0) and uses `s = amax/((2^b − 1)/2)` (symmetric, codes −2^(b−1)…2^(b−1)−1) or
//! `s = (max − min)/(2^b − 1)`, `zp = round(−2^(b−1) − min/s)` (asymmetric), ties to even —
//! affq's half-range and integer-zero grids with no clipping. 8-bit weights with quantized
//! activations are `int-quantized` (llm-compressor's W8A8): `P.weight` holds the signed codes
//! `q − 2^(b−1)` as I8 `[out, in]` and `P.weight_zero_point` the signed zeros as I8 `[out, groups]`.

use super::hf_export::{exact_scales, pack_rows, transpose, zero_free, LinearFormat};
use super::safetensors::StoredTensor;
use crate::quant::{AsymZero, Granularity, QuantSpec, QuantizedWeight, SymScale};
use safetensors::Dtype;

/// `int-quantized` (one signed byte per weight) rather than `pack-quantized`: W8A8, as
/// llm-compressor writes it.
fn int_quantized(q: &QuantizedWeight, act: Option<&QuantSpec>) -> bool {
    is_int_quantized(q.spec.bits, act.is_some())
}

/// Whether `bits`-bit weights (with quantized inputs or not) take the `int-quantized` layout.
pub fn is_int_quantized(bits: u8, quantized_inputs: bool) -> bool {
    bits == 8 && quantized_inputs
}

/// Why `pack-quantized` cannot tile an `out × inp` linear of `bits`-bit codes, if it cannot:
/// `32/b` codes per 32-bit word along the input, and, with packed zero points (`zero_points`),
/// `32/b` of them per word along the output.
pub fn untileable(out: usize, inp: usize, bits: u8, zero_points: bool) -> Option<String> {
    let per_word = 32 / bits as usize;
    if !inp.is_multiple_of(per_word) {
        return Some(format!(
            "compressed-tensors packs {per_word} codes per 32-bit word along the input"
        ));
    }
    (zero_points && !out.is_multiple_of(per_word)).then(|| {
        format!("compressed-tensors packs {per_word} zero points per 32-bit word along the output")
    })
}

pub struct CompressedTensors;

impl LinearFormat for CompressedTensors {
    fn name(&self) -> &'static str {
        "compressed-tensors"
    }

    fn activations(&self, a: &QuantSpec) -> Result<(), String> {
        if a.clip != 1.0 || a.clip_min != 1.0 {
            return Err(format!(
                "its clip ratio {} has no place in compressed-tensors' dynamic per-token quantizer (min-max, no clipping): quantize with --format compressed-tensors",
                a.clip
            ));
        }
        if !(2..=8).contains(&a.bits) || !a.scale_dtype.is_f32() {
            return Err(format!(
                "{}-bit activations with rounded scales are not a compressed-tensors grid",
                a.bits
            ));
        }
        if a.symmetric && a.sym_scale != SymScale::HalfRange {
            return Err("its symmetric scale is amax/(2^(b−1)−1); compressed-tensors divides by (2^b−1)/2: quantize with --format compressed-tensors (or --sym-scale half-range)".into());
        }
        if !a.symmetric && a.asym_zero != AsymZero::Integer {
            return Err("float offsets: compressed-tensors stores integer zero points".into());
        }
        Ok(())
    }

    fn linear(
        &self,
        q: &QuantizedWeight,
        act: Option<&QuantSpec>,
        prefix: &str,
        dtype: Dtype,
    ) -> Result<Vec<(String, StoredTensor)>, String> {
        let bits = q.spec.bits;
        if ![2, 4, 8].contains(&bits) {
            return Err(format!("has {bits}-bit codes; compressed-tensors' layout is stable for 2, 4 and 8 bits only"));
        }
        if q.params.iter().any(|p| p.offset != 0.0) {
            return Err("has float offsets (Q4_1-style); compressed-tensors stores integer zero points: quantize with --zero-point integer".into());
        }
        let ng = q.n_groups();
        let scale: Vec<f32> = q.params.iter().map(|p| p.scale).collect();
        let sbytes = exact_scales(
            q,
            &scale,
            dtype,
            "the model's dtype, compressed-tensors' scale dtype: quantize with --format compressed-tensors",
        )?;
        let scale = (
            format!("{prefix}.weight_scale"),
            StoredTensor {
                dtype,
                shape: vec![q.out, ng],
                bytes: sbytes,
            },
        );
        if int_quantized(q, act) {
            let half = 1i32 << (bits - 1);
            let codes: Vec<i8> = q.codes.iter().map(|&c| (c as i32 - half) as i8).collect();
            let mut t = vec![
                (
                    format!("{prefix}.weight"),
                    StoredTensor::i8(&codes, &[q.out, q.inp]),
                ),
                scale,
            ];
            if !zero_free(q) {
                let z: Vec<i8> = q
                    .params
                    .iter()
                    .map(|p| (p.zero as i32 - half) as i8)
                    .collect();
                t.push((
                    format!("{prefix}.weight_zero_point"),
                    StoredTensor::i8(&z, &[q.out, ng]),
                ));
            }
            return Ok(t);
        }
        if let Some(why) = untileable(q.out, q.inp, bits, !zero_free(q)) {
            return Err(format!("is {}×{}: {why}", q.out, q.inp));
        }
        let wpr = q.inp * bits as usize / 32;
        let mut t = vec![
            (
                format!("{prefix}.weight_packed"),
                StoredTensor::i32(&pack_rows(&q.codes, q.inp, bits), &[q.out, wpr]),
            ),
            scale,
            (
                format!("{prefix}.weight_shape"),
                StoredTensor::i64(&[q.out as i64, q.inp as i64], &[2]),
            ),
        ];
        if !zero_free(q) {
            let z: Vec<u8> = q.params.iter().map(|p| p.zero as u8).collect();
            let packed = pack_rows(&transpose(&z, q.out, ng), q.out, bits); // [ng, out·b/32]
            let wpo = q.out * bits as usize / 32;
            t.push((
                format!("{prefix}.weight_zero_point"),
                StoredTensor::i32(&transpose(&packed, ng, wpo), &[wpo, ng]),
            ));
        }
        Ok(t)
    }

    fn quantization_config(
        &self,
        q: &QuantizedWeight,
        act: Option<&QuantSpec>,
        quantize_head: bool,
        dense: &[String],
    ) -> serde_json::Value {
        // `ignore` takes module names or `re:` patterns (matched against the full name).
        let mut ignore: Vec<String> = dense
            .iter()
            .map(|d| format!("re:.*{}$", d.replace('.', "\\.")))
            .collect();
        if !quantize_head {
            ignore.insert(0, "lm_head".into());
        }
        let (strategy, group) = match q.granularity {
            Granularity::Group(g) => ("group", serde_json::json!(g)),
            Granularity::Channel => ("channel", serde_json::Value::Null),
            Granularity::Tensor => ("tensor", serde_json::Value::Null),
        };
        let input = act.map_or(serde_json::Value::Null, |a| {
            serde_json::json!({"num_bits": a.bits, "type": "int", "symmetric": a.symmetric,
                               "strategy": "token", "group_size": null, "dynamic": true,
                               "actorder": null, "block_structure": null, "observer": null,
                               "observer_kwargs": {}})
        });
        let format = if int_quantized(q, act) {
            "int-quantized"
        } else {
            "pack-quantized"
        };
        serde_json::json!({
            "quant_method": "compressed-tensors",
            "format": format,
            "quantization_status": "compressed",
            "version": "0.20.1",
            "config_groups": {"group_0": {
                "targets": ["Linear"], "format": format,
                "weights": {"num_bits": q.spec.bits, "type": "int", "symmetric": zero_free(q),
                            "strategy": strategy, "group_size": group, "dynamic": false,
                            "actorder": null, "block_structure": null, "observer": null,
                            "observer_kwargs": {}},
                "input_activations": input, "output_activations": null}},
            "ignore": ignore,
            "kv_cache_scheme": null,
            "global_compression_ratio": null,
            "sparsity_config": {},
            "transform_config": {},
            "quantizer": format!("affq {}", crate::VERSION),
        })
    }
}

//! Uniform integer quantizers (algorithms.md §1): one implementation for weights (per tensor,
//! per output channel, per group), activations (per token) and the KV cache (per token and head).
//! A "unit" is a run of consecutive values sharing one scale: a weight row or group, a token row,
//! a (token, head) slice.

use serde::{Deserialize, Serialize};

/// How the scale of a symmetric grid is derived from `amax = max |x|` over a unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SymScale {
    /// `s = amax / (2^(b−1) − 1)` (amax/7 at 4 bits): FlatQuant, QuaRot, OmniQuant. Code −2^(b−1)
    /// is reached only when clipping. **affq's default.**
    MaxPos,
    /// `s = amax / ((2^b − 1)/2)` (amax/7.5): the GPTQ repository and compressed-tensors observers.
    HalfRange,
    /// `s = amax / 2^(b−1)` with the zero at `2^(b−1)` when the extreme is negative (levels
    /// −8s…7s at 4 bits) and at `2^(b−1) − 1` when it is positive (−7s…8s): every one of the 2^b
    /// levels is used and the extreme is exact — llama.cpp's Q4_0/Q8_0 rule `d = x_extreme/−8`
    /// (a negative `d` mirrors the grid; algorithms.md §1.2). Weights only: activation and
    /// training-time quantizers treat it as `s = amax / 2^(b−1)` with the zero at `2^(b−1)`.
    SignedMax,
}

/// How an asymmetric grid is anchored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AsymZero {
    /// Range widened to include 0; integer zero point `z = round(−xmin/s)`, `x̂ = s·(q − z)`.
    /// FlatQuant, QuaRot, GPTQ. **affq's default.**
    Integer,
    /// No widening; float offset `m = xmin`, `x̂ = s·q + m` (GGUF Q4_1 style).
    FloatOffset,
}

/// The dtype a format stores scales (and float offsets) in. A grid whose scales are rounded to it
/// *before* codes are chosen is exactly the grid the format stores (formats.md §2, §3.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScaleDtype {
    /// affq's own checkpoint: f32 scales.
    #[default]
    F32,
    /// GGUF and GPTQ: f16 scales (and Q4_1's f16 offsets); compressed-tensors of an f16 model.
    F16,
    /// compressed-tensors of a bf16 model (its scales are stored in the model's dtype).
    Bf16,
}

impl ScaleDtype {
    pub fn is_f32(&self) -> bool {
        *self == ScaleDtype::F32
    }

    /// `x` rounded to this dtype (to nearest, ties to even). A positive scale stays positive:
    /// below the dtype's smallest subnormal it becomes that subnormal; above its largest finite
    /// value it becomes that value (the grid then clips).
    pub fn round_scale(&self, s: f32) -> f32 {
        let r = self.round_offset(s);
        match self {
            ScaleDtype::F16 if r == 0.0 && s > 0.0 => half::f16::from_bits(1).to_f32(),
            ScaleDtype::Bf16 if r == 0.0 && s > 0.0 => half::bf16::from_bits(1).to_f32(),
            _ => r,
        }
    }

    /// A float offset rounded to this dtype (saturating like [`Self::round_scale`]).
    pub fn round_offset(&self, m: f32) -> f32 {
        match self {
            ScaleDtype::F32 => m,
            ScaleDtype::F16 => {
                let r = half::f16::from_f32(m).to_f32();
                if r.is_infinite() {
                    half::f16::MAX.to_f32().copysign(m)
                } else {
                    r
                }
            }
            ScaleDtype::Bf16 => {
                let r = half::bf16::from_f32(m).to_f32();
                if r.is_infinite() && m.is_finite() {
                    half::bf16::MAX.to_f32().copysign(m)
                } else {
                    r
                }
            }
        }
    }

    /// Whether `x` is a value of this dtype.
    pub fn holds(&self, x: f32) -> bool {
        match self {
            ScaleDtype::F32 => true,
            ScaleDtype::F16 => half::f16::from_f32(x).to_f32() == x,
            ScaleDtype::Bf16 => half::bf16::from_f32(x).to_f32() == x,
        }
    }
}

/// A quantization grid.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct QuantSpec {
    pub bits: u8,
    pub symmetric: bool,
    pub sym_scale: SymScale,
    pub asym_zero: AsymZero,
    /// Multiplies `xmax` before the scale is computed (1.0 = no clipping).
    pub clip: f32,
    /// Multiplies `xmin` (learned activation clipping has separate ratios for the two ends).
    #[serde(default = "one")]
    pub clip_min: f32,
    /// Scales (and float offsets) are rounded to this dtype before codes are chosen: a checkpoint
    /// that targets GGUF or GPTQ quantizes on their f16 grid.
    #[serde(default, skip_serializing_if = "ScaleDtype::is_f32")]
    pub scale_dtype: ScaleDtype,
}

fn one() -> f32 {
    1.0
}

impl QuantSpec {
    pub fn sym(bits: u8) -> Self {
        QuantSpec {
            bits,
            symmetric: true,
            sym_scale: SymScale::MaxPos,
            asym_zero: AsymZero::Integer,
            clip: 1.0,
            clip_min: 1.0,
            scale_dtype: ScaleDtype::F32,
        }
    }

    pub fn asym(bits: u8) -> Self {
        QuantSpec {
            symmetric: false,
            ..Self::sym(bits)
        }
    }

    /// Largest unsigned code, `2^b − 1`.
    pub fn qmax(&self) -> u32 {
        (1u32 << self.bits) - 1
    }

    /// Parameters of one unit from its extremes.
    pub fn params(&self, xmin: f32, xmax: f32) -> UnitParams {
        let (xmin, xmax) = (xmin * self.clip_min, xmax * self.clip);
        let half = (1u32 << (self.bits - 1)) as f32;
        if self.symmetric {
            let amax = xmax.max(-xmin).max(0.0);
            let div = match self.sym_scale {
                SymScale::MaxPos => half - 1.0,
                SymScale::HalfRange => self.qmax() as f32 / 2.0,
                SymScale::SignedMax => half,
            };
            // An all-zero unit gets s = 1 (its codes are 0 under any positive scale).
            let s = self
                .scale_dtype
                .round_scale(if amax > 0.0 { amax / div } else { 1.0 });
            let positive_extreme = self.sym_scale == SymScale::SignedMax && xmax > -xmin;
            UnitParams {
                scale: s,
                zero: if positive_extreme { half - 1.0 } else { half },
                offset: 0.0,
            }
        } else {
            let q = self.qmax() as f32;
            match self.asym_zero {
                AsymZero::Integer => {
                    let (mut lo, mut hi) = (xmin.min(0.0), xmax.max(0.0));
                    if hi - lo <= 0.0 {
                        (lo, hi) = (-1.0, 1.0);
                    }
                    let s = self.scale_dtype.round_scale((hi - lo) / q);
                    UnitParams {
                        scale: s,
                        zero: round_even(-lo / s),
                        offset: 0.0,
                    }
                }
                AsymZero::FloatOffset => {
                    let s = self.scale_dtype.round_scale(if xmax > xmin {
                        (xmax - xmin) / q
                    } else {
                        1.0
                    });
                    UnitParams {
                        scale: s,
                        zero: 0.0,
                        offset: self.scale_dtype.round_offset(xmin),
                    }
                }
            }
        }
    }
}

/// Scale `s`, zero point `z` (in code units) and float offset `m` of one unit:
/// `code = clamp(round((x − m)/s) + z, 0, 2^b − 1)`, `x̂ = s·(code − z) + m`.
/// Symmetric grids use `z = 2^(b−1)` (offset-binary codes), `m = 0`.
/// Round half to even (torch.round's mode, §1.4) without a libm call: for |x| ≤ 2²² adding
/// 1.5·2²³ puts x in [2²³, 2²⁴), where the float spacing is 1, so the addition itself rounds to
/// the nearest integer with ties to even; larger magnitudes are clamped first (every caller
/// clamps to a code range far smaller than that). NaN stays NaN.
#[inline(always)]
pub fn round_even(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    let x = x.clamp(-4_194_304.0, 4_194_304.0);
    (x + MAGIC) - MAGIC
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UnitParams {
    pub scale: f32,
    pub zero: f32,
    pub offset: f32,
}

impl UnitParams {
    #[inline]
    pub fn code(&self, x: f32, qmax: f32) -> u8 {
        round_even((x - self.offset) / self.scale + self.zero).clamp(0.0, qmax) as u8
    }

    #[inline]
    pub fn value(&self, code: u8) -> f32 {
        self.scale * (code as f32 - self.zero) + self.offset
    }
}

fn min_max(xs: &[f32]) -> (f32, f32) {
    xs.iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &x| {
            (lo.min(x), hi.max(x))
        })
}

/// Quantizes consecutive units of `unit` values each: writes codes, returns the parameters.
pub fn quantize_units(
    xs: &[f32],
    unit: usize,
    spec: &QuantSpec,
    codes: &mut [u8],
) -> Vec<UnitParams> {
    let qmax = spec.qmax() as f32;
    xs.chunks(unit)
        .zip(codes.chunks_mut(unit))
        .map(|(u, c)| {
            let (lo, hi) = min_max(u);
            let p = spec.params(lo, hi);
            for (x, c) in u.iter().zip(c.iter_mut()) {
                *c = p.code(*x, qmax);
            }
            p
        })
        .collect()
}

/// In-place quantize-dequantize of consecutive units (dynamic: parameters from each unit itself).
pub fn fake_quant_units(xs: &mut [f32], unit: usize, spec: &QuantSpec) {
    let qmax = spec.qmax() as f32;
    for u in xs.chunks_mut(unit) {
        let (lo, hi) = min_max(u);
        let p = spec.params(lo, hi);
        for x in u.iter_mut() {
            *x = p.value(p.code(*x, qmax));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    #[test]
    fn error_is_at_most_half_a_step_without_clipping() {
        let mut seed = 7;
        for bits in 2..=8u8 {
            for spec in [
                QuantSpec::sym(bits),
                QuantSpec::asym(bits),
                QuantSpec {
                    sym_scale: SymScale::HalfRange,
                    ..QuantSpec::sym(bits)
                },
                QuantSpec {
                    asym_zero: AsymZero::FloatOffset,
                    ..QuantSpec::asym(bits)
                },
                QuantSpec {
                    sym_scale: SymScale::SignedMax,
                    ..QuantSpec::sym(bits)
                },
            ] {
                let xs: Vec<f32> = (0..999).map(|_| lcg(&mut seed) * 3.0 + 0.5).collect();
                let mut codes = vec![0u8; xs.len()];
                let params = quantize_units(&xs, 37, &spec, &mut codes);
                for (i, (&x, &c)) in xs.iter().zip(&codes).enumerate() {
                    let p = params[i / 37];
                    assert!(c as u32 <= spec.qmax());
                    let err = (p.value(c) - x).abs();
                    // Half a step, plus float rounding of s·(q − z); signed-max gives the side
                    // opposite the extreme one level less (up to one step).
                    let steps = if spec.sym_scale == SymScale::SignedMax {
                        1.0
                    } else {
                        0.5
                    };
                    assert!(
                        err <= p.scale * steps * (1.0 + 1e-5) + 1e-6,
                        "{spec:?}: x {x} err {err} s {}",
                        p.scale
                    );
                }
            }
        }
    }

    #[test]
    fn symmetric_maxpos_is_amax_over_7_at_4_bits() {
        let p = QuantSpec::sym(4).params(-3.5, 2.0);
        assert_eq!(p.scale, 0.5);
        assert_eq!(p.zero, 8.0);
        let p = QuantSpec {
            sym_scale: SymScale::HalfRange,
            ..QuantSpec::sym(4)
        }
        .params(-3.75, 2.0);
        assert_eq!(p.scale, 0.5);
    }

    /// Signed-max uses all 2^b levels: the extreme of either sign is exact.
    #[test]
    fn signed_max_puts_the_extreme_on_the_grid() {
        let spec = QuantSpec {
            sym_scale: SymScale::SignedMax,
            ..QuantSpec::sym(4)
        };
        let p = spec.params(-4.0, 3.0);
        assert_eq!((p.scale, p.zero), (0.5, 8.0));
        assert_eq!(p.value(p.code(-4.0, 15.0)), -4.0);
        let p = spec.params(-3.0, 4.0);
        assert_eq!((p.scale, p.zero), (0.5, 7.0));
        assert_eq!(p.value(p.code(4.0, 15.0)), 4.0);
        assert_eq!(p.value(p.code(-3.5, 15.0)), -3.5);
    }

    #[test]
    fn constant_and_zero_units() {
        for spec in [
            QuantSpec::sym(4),
            QuantSpec::asym(4),
            QuantSpec {
                asym_zero: AsymZero::FloatOffset,
                ..QuantSpec::asym(3)
            },
        ] {
            for v in [0.0f32, 2.5, -1.25] {
                let mut xs = vec![v; 10];
                fake_quant_units(&mut xs, 10, &spec);
                for x in xs {
                    assert!(x.is_finite());
                    assert!((x - v).abs() <= v.abs() / 7.0 + 1e-6, "{spec:?} {v} -> {x}");
                }
            }
        }
        // All-zero rows stay exactly zero.
        let mut z = vec![0.0f32; 8];
        fake_quant_units(&mut z, 8, &QuantSpec::asym(4));
        assert!(z.iter().all(|&x| x == 0.0));
    }

    #[test]
    fn rounds_half_to_even() {
        // x/s = 2.5 → 2, 3.5 → 4 (PyTorch semantics).
        let spec = QuantSpec::sym(8);
        let p = UnitParams {
            scale: 1.0,
            zero: 128.0,
            offset: 0.0,
        };
        assert_eq!(p.code(2.5, spec.qmax() as f32), 130);
        assert_eq!(p.code(3.5, spec.qmax() as f32), 132);
    }

    #[test]
    fn fast_rounding_is_ties_to_even() {
        let mut vals: Vec<f32> = (-2000..=2000).map(|i| i as f32 * 0.25).collect();
        vals.extend([
            0.49999997,
            -0.49999997,
            1e-30,
            -0.0,
            4_194_303.5,
            -4_194_303.5,
            1.5e6 + 0.5,
        ]);
        for v in vals {
            assert_eq!(round_even(v), v.round_ties_even(), "{v}");
        }
        assert_eq!(round_even(1e30), 4_194_304.0);
        assert!(round_even(f32::NAN).is_nan());
    }

    #[test]
    fn clipping_saturates() {
        let spec = QuantSpec {
            clip: 0.5,
            clip_min: 0.5,
            ..QuantSpec::sym(4)
        };
        let mut xs = vec![-4.0, 4.0, 0.1];
        fake_quant_units(&mut xs, 3, &spec);
        // s = 2/7: codes clamp to −8..7.
        assert!((xs[0] + 8.0 * 2.0 / 7.0).abs() < 1e-6);
        assert!((xs[1] - 2.0).abs() < 1e-6);
    }
}

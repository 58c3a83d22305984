//! GGML tensor types affq writes (formats.md §3.2) and their encoders: exact encodings of affq's
//! quantized rows, llama.cpp's reference quantizers for lossy exports, f16/f32 rows.
//!
//! A block holds 32 consecutive weights of one row (along the input dimension):
//! - Q4_0: f16 `d`, 16 bytes; byte `j` holds `q[j] | q[j+16] << 4`; `x = d·(q − 8)`;
//! - Q4_1: f16 `d`, f16 `m`, the same nibbles; `x = d·q + m`;
//! - Q8_0: f16 `d`, 32 `i8`; `x = d·q`.

use crate::quant::{QuantizedWeight, UnitParams};
use half::f16;

/// Weights per block of the quantized types.
pub const QK: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q8_0,
}

impl GgmlType {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s.to_ascii_lowercase().as_str() {
            "f32" => Self::F32,
            "f16" => Self::F16,
            "q4_0" => Self::Q4_0,
            "q4_1" => Self::Q4_1,
            "q8_0" => Self::Q8_0,
            _ => return None,
        })
    }

    /// GGML's type id.
    pub fn id(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q4_0 => 2,
            Self::Q4_1 => 3,
            Self::Q8_0 => 8,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "F32",
            Self::F16 => "F16",
            Self::Q4_0 => "Q4_0",
            Self::Q4_1 => "Q4_1",
            Self::Q8_0 => "Q8_0",
        }
    }

    /// `general.file_type` of a file whose linears are of this type (llama_ftype).
    pub fn file_type(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q4_0 => 2,
            Self::Q4_1 => 3,
            Self::Q8_0 => 7,
        }
    }

    pub fn is_quantized(self) -> bool {
        !matches!(self, Self::F32 | Self::F16)
    }

    /// Bytes of a row of `n` values (`n` a multiple of 32 for the quantized types).
    pub fn row_bytes(self, n: usize) -> usize {
        match self {
            Self::F32 => 4 * n,
            Self::F16 => 2 * n,
            Self::Q4_0 => n / QK * 18,
            Self::Q4_1 => n / QK * 20,
            Self::Q8_0 => n / QK * 34,
        }
    }

    /// Bits of the quantized type's codes.
    pub fn bits(self) -> Option<u8> {
        match self {
            Self::Q4_0 | Self::Q4_1 => Some(4),
            Self::Q8_0 => Some(8),
            _ => None,
        }
    }
}

/// f32 rows, little-endian.
pub fn f32_bytes(xs: &[f32]) -> Vec<u8> {
    xs.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// f16 rows (round to nearest even, as ggml's conversion).
pub fn f16_bytes(xs: &[f32]) -> Vec<u8> {
    xs.iter()
        .flat_map(|x| f16::from_f32(*x).to_bits().to_le_bytes())
        .collect()
}

/// Decodes blocks of `t` back to f32 with llama.cpp's formulas (`x = d·(q − 8)`, `d·q + m`,
/// `d·q`), the reference for exactness checks.
pub fn decode(t: GgmlType, bytes: &[u8]) -> Vec<f32> {
    let h = |b: &[u8]| f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
    match t {
        GgmlType::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect(),
        GgmlType::F16 => bytes.chunks_exact(2).map(h).collect(),
        GgmlType::Q4_0 | GgmlType::Q4_1 => {
            let bb = t.row_bytes(QK);
            let mut out = Vec::with_capacity(bytes.len() / bb * QK);
            for b in bytes.chunks_exact(bb) {
                let d = h(b);
                let (m, qs) = if t == GgmlType::Q4_1 {
                    (h(&b[2..]), &b[4..])
                } else {
                    (0.0, &b[2..])
                };
                let mut v = [0f32; QK];
                for j in 0..16 {
                    let (lo, hi) = ((qs[j] & 15) as f32, (qs[j] >> 4) as f32);
                    if t == GgmlType::Q4_0 {
                        v[j] = (lo - 8.0) * d;
                        v[j + 16] = (hi - 8.0) * d;
                    } else {
                        v[j] = lo * d + m;
                        v[j + 16] = hi * d + m;
                    }
                }
                out.extend_from_slice(&v);
            }
            out
        }
        GgmlType::Q8_0 => {
            let mut out = Vec::with_capacity(bytes.len() / 34 * QK);
            for b in bytes.chunks_exact(34) {
                let d = h(b);
                out.extend(b[2..].iter().map(|&q| (q as i8) as f32 * d));
            }
            out
        }
    }
}

fn f16_le(x: f32) -> [u8; 2] {
    f16::from_f32(x).to_bits().to_le_bytes()
}

/// One block of `t` from affq's codes and the grid of their unit: `d = s`, and for Q4_0/Q8_0
/// the code shifted by the grid's zero (`q = c − z + 8`, `q = c − z`), for Q4_1 `m = o − z·s`,
/// `q = c`. Parameters are rounded to f16; whether that is exact is for the caller to check
/// (by decoding). `None`: a code does not fit the type's range.
fn block_from_codes(t: GgmlType, codes: &[u8], p: &UnitParams, out: &mut Vec<u8>) -> Option<()> {
    match t {
        GgmlType::Q4_0 => {
            // A grid with its zero at 7 (levels −7s…8s, signed-max scales) is Q4_0 with `d = −s`
            // and `q = 15 − c`: `(q − 8)·d = (c − 7)·s`.
            let mirrored = p.zero == 7.0;
            let shift = |c: u8| -> Option<u8> {
                let q = if mirrored {
                    15.0 - c as f32
                } else {
                    c as f32 - p.zero + 8.0
                };
                (0.0..=15.0).contains(&q).then_some(q as u8)
            };
            out.extend_from_slice(&f16_le(if mirrored { -p.scale } else { p.scale }));
            for j in 0..16 {
                out.push(shift(codes[j])? | shift(codes[j + 16])? << 4);
            }
        }
        GgmlType::Q4_1 => {
            out.extend_from_slice(&f16_le(p.scale));
            out.extend_from_slice(&f16_le(p.offset - p.zero * p.scale));
            for j in 0..16 {
                if codes[j] > 15 || codes[j + 16] > 15 {
                    return None;
                }
                out.push(codes[j] | codes[j + 16] << 4);
            }
        }
        GgmlType::Q8_0 => {
            // Zero at 127 (signed-max scales): `d = −s`, `q = 127 − c`.
            let mirrored = p.zero == 127.0;
            out.extend_from_slice(&f16_le(if mirrored { -p.scale } else { p.scale }));
            for &c in codes {
                let q = if mirrored {
                    127.0 - c as f32
                } else {
                    c as f32 - p.zero
                };
                if !(-128.0..=127.0).contains(&q) {
                    return None;
                }
                out.push((q as i8) as u8);
            }
        }
        GgmlType::F32 | GgmlType::F16 => unreachable!("not a block type"),
    }
    Some(())
}

/// Why a quantized weight cannot be written as a block type by keeping its codes.
pub fn structure_mismatch(q: &QuantizedWeight, t: GgmlType) -> Option<String> {
    let bits = t.bits()?;
    if q.spec.bits != bits {
        return Some(format!(
            "{}-bit codes, {} holds {bits}-bit",
            q.spec.bits,
            t.name()
        ));
    }
    if t == GgmlType::Q4_1 && q.spec.symmetric {
        return Some("a symmetric grid (Q4_1 is the asymmetric type; use q4_0)".into());
    }
    if t != GgmlType::Q4_1 && !q.spec.symmetric {
        return Some(format!(
            "an asymmetric grid ({} is symmetric; use q4_1)",
            t.name()
        ));
    }
    if !q.inp.is_multiple_of(QK) {
        return Some(format!("{} input columns, not a multiple of {QK}", q.inp));
    }
    let g = q.group_size();
    if !g.is_multiple_of(QK) {
        return Some(format!(
            "groups of {g} (a {} block of {QK} needs one scale: groups of a multiple of {QK}, or one per channel)",
            t.name()
        ));
    }
    None
}

/// The rows of `q` (in the order `rows`, indices of `q`'s rows) as `t` blocks, keeping affq's
/// codes; `exact` asks that the decoded blocks equal `q`'s dequantized values bit for bit, and
/// returns `Err((row, column, affq value, decoded value))` at the first difference.
pub fn encode_codes(
    q: &QuantizedWeight,
    t: GgmlType,
    rows: &[usize],
    exact: bool,
) -> Result<Vec<u8>, (usize, usize, f32, f32)> {
    let (inp, g, ng) = (q.inp, q.group_size(), q.n_groups());
    let mut out = Vec::with_capacity(rows.len() * t.row_bytes(inp));
    for &r in rows {
        let start = out.len();
        for b in 0..inp / QK {
            let p = q.params[r * ng + b * QK / g];
            let codes = &q.codes[r * inp + b * QK..r * inp + (b + 1) * QK];
            let pos = out.len();
            if block_from_codes(t, codes, &p, &mut out).is_none() {
                let j = codes
                    .iter()
                    .position(|&c| {
                        let mut tmp = Vec::new();
                        block_from_codes(t, &[c; QK], &p, &mut tmp).is_none()
                    })
                    .unwrap_or(0);
                return Err((r, b * QK + j, p.value(codes[j]), f32::NAN));
            }
            if exact {
                let dec = decode(t, &out[pos..]);
                for (j, (&c, &d)) in codes.iter().zip(&dec).enumerate() {
                    let v = p.value(c);
                    if v.to_bits() != d.to_bits() && !(v == 0.0 && d == 0.0) {
                        return Err((r, b * QK + j, v, d));
                    }
                }
            }
        }
        debug_assert_eq!(out.len() - start, t.row_bytes(inp));
    }
    Ok(out)
}

/// llama.cpp's reference quantizer of one row (`quantize_row_q4_0_ref` & co., algorithms.md
/// §1.2): Q4_0 `d = x_amax / −8` (the signed value of largest magnitude, so code 0 is used),
/// `q = min(15, trunc(x/d + 8.5))`; Q4_1 `d = (max − min)/15`, `m = min`,
/// `q = min(15, trunc((x − min)/d + 0.5))`; Q8_0 `d = amax/127`, `q = round(x/d)` (half away
/// from zero). The inverse `1/d` is taken before `d` is rounded to f16, as llama.cpp does.
pub fn quantize_row_ref(t: GgmlType, xs: &[f32], out: &mut Vec<u8>) {
    for b in xs.chunks_exact(QK) {
        match t {
            GgmlType::Q4_0 => {
                let (mut amax, mut max) = (0f32, 0f32);
                for &x in b {
                    if amax < x.abs() {
                        amax = x.abs();
                        max = x;
                    }
                }
                let d = max / -8.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend_from_slice(&f16_le(d));
                let q = |x: f32| ((x * id + 8.5) as i8).min(15) as u8;
                for j in 0..16 {
                    out.push(q(b[j]) | q(b[j + 16]) << 4);
                }
            }
            GgmlType::Q4_1 => {
                let (mut min, mut max) = (f32::MAX, f32::MIN);
                for &x in b {
                    min = min.min(x);
                    max = max.max(x);
                }
                let d = (max - min) / 15.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend_from_slice(&f16_le(d));
                out.extend_from_slice(&f16_le(min));
                let q = |x: f32| (((x - min) * id + 0.5) as i8).min(15) as u8;
                for j in 0..16 {
                    out.push(q(b[j]) | q(b[j + 16]) << 4);
                }
            }
            GgmlType::Q8_0 => {
                let amax = b.iter().fold(0f32, |a, x| a.max(x.abs()));
                let d = amax / 127.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend_from_slice(&f16_le(d));
                out.extend(b.iter().map(|&x| ((x * id).round() as i8) as u8));
            }
            GgmlType::F32 | GgmlType::F16 => unreachable!("not a block type"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{AsymZero, Granularity, QuantSpec, ScaleDtype};

    fn weights(out: usize, inp: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..out * inp)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.2
            })
            .collect()
    }

    fn q(spec: QuantSpec, g: Granularity, w: &[f32], out: usize, inp: usize) -> QuantizedWeight {
        QuantizedWeight::quantize("w", w, out, inp, spec, g, false).unwrap()
    }

    fn f16_spec(spec: QuantSpec) -> QuantSpec {
        QuantSpec {
            scale_dtype: ScaleDtype::F16,
            ..spec
        }
    }

    /// Grids on f16 scales map exactly: the decoded blocks equal affq's dequantized weight bit
    /// for bit, and candle's GGML decoder (an independent reader) agrees.
    #[test]
    fn f16_grids_are_exact_and_candle_decodes_them_alike() {
        let (out, inp) = (6, 128);
        let w = weights(out, inp, 3);
        let float_offset = QuantSpec {
            asym_zero: AsymZero::FloatOffset,
            ..QuantSpec::asym(4)
        };
        let signed = |b: u8| QuantSpec {
            sym_scale: crate::quant::SymScale::SignedMax,
            ..QuantSpec::sym(b)
        };
        for (t, spec) in [
            (GgmlType::Q4_0, QuantSpec::sym(4)),
            (GgmlType::Q4_0, signed(4)),
            (GgmlType::Q8_0, QuantSpec::sym(8)),
            (GgmlType::Q8_0, signed(8)),
            (GgmlType::Q4_1, float_offset),
        ] {
            for g in [
                Granularity::Group(32),
                Granularity::Group(64),
                Granularity::Channel,
            ] {
                let qw = q(f16_spec(spec), g, &w, out, inp);
                assert!(structure_mismatch(&qw, t).is_none());
                let rows: Vec<usize> = (0..out).collect();
                let bytes = encode_codes(&qw, t, &rows, true)
                    .unwrap_or_else(|e| panic!("{t:?} {g:?}: not exact at {e:?}"));
                assert_eq!(bytes.len(), out * t.row_bytes(inp));
                let ours = qw.dequantize();
                assert_eq!(decode(t, &bytes), ours, "{t:?} {g:?}");
                let dt = match t {
                    GgmlType::Q4_0 => candle_core::quantized::GgmlDType::Q4_0,
                    GgmlType::Q4_1 => candle_core::quantized::GgmlDType::Q4_1,
                    _ => candle_core::quantized::GgmlDType::Q8_0,
                };
                let qt = candle_core::quantized::QTensor::new(
                    candle_core::quantized::QStorage::from_data(
                        std::borrow::Cow::Borrowed(&bytes),
                        &candle_core::Device::Cpu,
                        dt,
                    )
                    .unwrap(),
                    (out, inp),
                )
                .unwrap();
                let theirs: Vec<f32> = qt
                    .dequantize(&candle_core::Device::Cpu)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                assert_eq!(theirs, ours, "candle {t:?} {g:?}");
            }
        }
    }

    /// f32 scales are generally not f16 values: the exact encoder reports where.
    #[test]
    fn f32_scales_are_refused_with_the_place() {
        let (out, inp) = (2, 64);
        let w = weights(out, inp, 5);
        let qw = q(QuantSpec::sym(4), Granularity::Group(32), &w, out, inp);
        let e = encode_codes(&qw, GgmlType::Q4_0, &[0, 1], true).unwrap_err();
        assert!(e.2 != e.3);
        // Kept codes with rounded scales stay close (relative error ≈ 2⁻¹¹).
        let bytes = encode_codes(&qw, GgmlType::Q4_0, &[0, 1], false).unwrap();
        let (a, b) = (decode(GgmlType::Q4_0, &bytes), qw.dequantize());
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() <= y.abs() * 1e-3 + 1e-7);
        }
    }

    #[test]
    fn structure_mismatches_are_named() {
        let w = weights(2, 96, 9);
        let g48 = q(QuantSpec::sym(4), Granularity::Group(48), &w, 2, 96);
        assert!(structure_mismatch(&g48, GgmlType::Q4_0)
            .unwrap()
            .contains("groups of 48"));
        let b3 = q(QuantSpec::sym(3), Granularity::Channel, &w, 2, 96);
        assert!(structure_mismatch(&b3, GgmlType::Q4_0)
            .unwrap()
            .contains("3-bit"));
        let asym = q(QuantSpec::asym(4), Granularity::Channel, &w, 2, 96);
        assert!(structure_mismatch(&asym, GgmlType::Q4_0)
            .unwrap()
            .contains("asymmetric"));
    }

    /// The reference quantizers stay within half a step of each block's grid.
    #[test]
    fn reference_quantizers_round_to_their_grid() {
        let w = weights(4, 64, 11);
        for t in [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0] {
            let mut bytes = Vec::new();
            quantize_row_ref(t, &w, &mut bytes);
            let dec = decode(t, &bytes);
            for (b, (x, y)) in w.chunks(QK).zip(dec.chunks(QK)).enumerate() {
                let (lo, hi) = b_range(x);
                let step = match t {
                    GgmlType::Q4_0 => lo.abs().max(hi.abs()) / 8.0,
                    GgmlType::Q4_1 => (hi - lo) / 15.0,
                    _ => lo.abs().max(hi.abs()) / 127.0,
                };
                // Q4_0's code 15 stands for +7·|d|: the side opposite the extreme may clip by
                // up to one step.
                let bound = if t == GgmlType::Q4_0 { 1.0 } else { 0.5 };
                for (a, c) in x.iter().zip(y) {
                    assert!(
                        (a - c).abs() <= step * bound * 1.01 + 1e-4,
                        "{t:?} block {b}: {a} vs {c}"
                    );
                }
            }
        }
    }

    fn b_range(x: &[f32]) -> (f32, f32) {
        x.iter()
            .fold((f32::MAX, f32::MIN), |(l, h), &v| (l.min(v), h.max(v)))
    }
}

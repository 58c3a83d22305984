//! Matrix–vector products for decoding: `y[r] = W·x[r] (+ b)` for a few rows `x[r]` (one per
//! token of a decode step) and a full-precision `W` `[n, k]` held as f32, f16 or bf16. The step
//! is bound by reading `W` once (docs/decode.md §6): each task streams a band of weight rows,
//! 16-bit rows widened into a small f32 buffer (exact: every f16/bf16 value is an f32), and
//! multiplies each against all `x` rows while it is in cache.

use crate::fastmath::{dot, dot_f16};
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use rayon::prelude::*;

/// Weight storage the kernel reads.
pub enum Weights<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    Bf16(&'a [bf16]),
}

/// Rows per task: enough work to pay for a rayon task (~µs), enough tasks to balance threads.
const BAND: usize = 64;

/// Up to this many rows an f16 weight row is converted per product instead of once into a
/// buffer (re-reading it from L1 is cheaper than the buffer's extra pass).
const FUSED_ROWS: usize = 2;

/// `out[r·n + o] = Σ_j w[o·k + j]·x[r·k + j] + bias[o]` for `m` rows of `x`.
pub fn gemv(
    x: &[f32],
    m: usize,
    k: usize,
    w: Weights<'_>,
    n: usize,
    bias: Option<&[f32]>,
) -> Vec<f32> {
    assert_eq!(x.len(), m * k);
    let mut out = vec![0f32; m * n];
    // Bands of output features; each task returns its [m × band] block.
    let bands: Vec<(usize, Vec<f32>)> = (0..n.div_ceil(BAND))
        .into_par_iter()
        .map(|bi| {
            let (o0, o1) = (bi * BAND, ((bi + 1) * BAND).min(n));
            let mut blk = vec![0f32; m * (o1 - o0)];
            let mut buf = vec![0f32; k];
            for o in o0..o1 {
                let b = bias.map_or(0.0, |b| b[o]);
                // A few rows: f16 converted in registers as it is read (the same sums).
                if let (Weights::F16(w), true) = (&w, m <= FUSED_ROWS) {
                    let row = &w[o * k..(o + 1) * k];
                    for r in 0..m {
                        blk[r * (o1 - o0) + o - o0] = dot_f16(row, &x[r * k..(r + 1) * k]) + b;
                    }
                    continue;
                }
                let row: &[f32] = match &w {
                    Weights::F32(w) => &w[o * k..(o + 1) * k],
                    Weights::F16(w) => {
                        w[o * k..(o + 1) * k].convert_to_f32_slice(&mut buf);
                        &buf
                    }
                    Weights::Bf16(w) => {
                        w[o * k..(o + 1) * k].convert_to_f32_slice(&mut buf);
                        &buf
                    }
                };
                for r in 0..m {
                    blk[r * (o1 - o0) + o - o0] = dot(row, &x[r * k..(r + 1) * k]) + b;
                }
            }
            (o0, blk)
        })
        .collect();
    for (o0, blk) in bands {
        let w = blk.len() / m.max(1);
        for r in 0..m {
            out[r * n + o0..r * n + o0 + w].copy_from_slice(&blk[r * w..(r + 1) * w]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_f64_products_for_every_storage() {
        // f32 accumulation of k = 300 products of size ≤ 1: error ≲ k·2⁻²⁴ ≈ 2e-5.
        let (m, k, n) = (3usize, 300usize, 70usize);
        let mut rng = crate::rng::Rng::new(11);
        let x: Vec<f32> = (0..m * k).map(|_| rng.normal() as f32).collect();
        let w32: Vec<f32> = (0..n * k).map(|_| rng.normal() as f32).collect();
        let w16: Vec<f16> = w32.iter().map(|&v| f16::from_f32(v)).collect();
        let wb: Vec<bf16> = w32.iter().map(|&v| bf16::from_f32(v)).collect();
        let bias: Vec<f32> = (0..n).map(|i| i as f32 * 0.01).collect();
        let cases: [(Weights, Vec<f32>); 3] = [
            (Weights::F32(&w32), w32.clone()),
            (Weights::F16(&w16), w16.iter().map(|v| v.to_f32()).collect()),
            (Weights::Bf16(&wb), wb.iter().map(|v| v.to_f32()).collect()),
        ];
        for (w, wide) in cases {
            let y = gemv(&x, m, k, w, n, Some(&bias));
            for r in 0..m {
                for o in 0..n {
                    let want: f64 = (0..k)
                        .map(|j| wide[o * k + j] as f64 * x[r * k + j] as f64)
                        .sum::<f64>()
                        + bias[o] as f64;
                    let got = y[r * n + o] as f64;
                    assert!((got - want).abs() < 1e-3, "r {r} o {o}: {got} vs {want}");
                }
            }
        }
    }
}

//! Integer products for the calibration's linears ([`GridProducts`]): when a linear's activations
//! and weights are fake-quantized, each row of them is `scale·code` with small integer codes, so
//! `y = x·Wᵀ` is an integer GEMM on the inference kernels ([`int_gemm`]) and is exact up to the
//! final scaling. The two gradient products take the upstream gradient `g` to 8-bit codes per row
//! (symmetric, round to nearest) and the other operand's codes as they are (algorithms.md §7.6;
//! installed by `--step-products int`):
//!
//! ```text
//! y[i, o]  = s_x[i]·s_w[o]·Σ_j c_x[i, j]·c_w[o, j]
//! dx[i, j] = Σ_o (g[i, o]·s_w[o])·c_w[o, j]   ≈ σ_i·Σ_o q_h[i, o]·c_w[o, j]
//! dW[o, j] = Σ_i (g[i, o]·s_x[i])·c_x[i, j]   ≈ τ_o·Σ_i q_e[o, i]·c_x[i, j]
//! ```
//!
//! with `q_h = round(h/σ)`, `σ_i = max_o |h[i, o]|/127` (and `q_e`, `τ_o` likewise over `i`). Each
//! element of the quantized gradient is off by at most half its row's step, so
//! `|dx[i, j] − exact| ≤ σ_i/2·Σ_o |c_w[o, j]|` (and `τ_o/2·Σ_i |c_x[i, j]|` for `dW`): about 0.4 %
//! of the row's largest term per element, with errors that do not accumulate across steps the
//! way a bias would (round to nearest is unbiased on average over many rows).

use crate::kernels::int_gemm::{self, Isa, PackedWeights, QuantizedActs, RowCodes};
use crate::model::{GridLinear, GridProducts};
use crate::quant::quantizer::round_even;
use rayon::prelude::*;
use std::sync::Arc;

/// Largest |code| a grid may have: codes fit the kernel's signed operand, and with an offset
/// their range (≤ 254) fits its unsigned one.
const MAX_CODE: usize = 127;
/// Distance from an integer within which `x/step` counts as on the grid. A value written as
/// `step·c` in f32 and read back with a step recomputed from the row's largest |value| is off by
/// at most a few ulps times |c| ≤ 127 (≈ 2e-5); a value off the grid is at a random distance, so
/// a row of k values passes by chance with probability ≈ (2·TOL)^k.
const TOL: f32 = 1e-3;
/// Rows per parallel task.
const ROWS: usize = 16;

/// Rows of a matrix on integer grids: `x[i, j] = scale[i]·codes[i·kp + j]` (rows zero-padded to
/// `kp`, the kernels' multiple of 8), with each row's code sum and the codes' range.
struct GridRows {
    kp: usize,
    codes: Vec<i8>,
    scale: Vec<f32>,
    sum: Vec<i32>,
    min: i32,
    max: i32,
}

impl GridRows {
    /// The codes with their range, as [`pack`] takes them.
    fn codes_range(&self) -> (&[i8], i32, i32) {
        (&self.codes, self.min, self.max)
    }
}

/// Lanes of the row loops (a zmm of f32).
const LANES: usize = 16;

/// `max |x|` over 16 lanes (NaN propagates: `f32::max` would drop it).
#[inline(always)]
fn abs_max(x: &[f32]) -> f32 {
    let mut m = [0f32; LANES];
    let mut nan = false;
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for j in 0..LANES {
            let v = c[j].abs();
            nan |= v.is_nan();
            m[j] = if v > m[j] { v } else { m[j] };
        }
    }
    for (j, &v) in tail.iter().enumerate() {
        let v = v.abs();
        nan |= v.is_nan();
        m[j] = if v > m[j] { v } else { m[j] };
    }
    if nan {
        f32::NAN
    } else {
        m.iter().fold(0f32, |a, &b| a.max(b))
    }
}

/// The step and codes of one row, the coarsest grid (smallest largest code) that holds it;
/// `NaN` if none with codes ≤ 127 does.
#[inline(always)]
fn grid_row_generic(x: &[f32], codes: &mut [i8]) -> f32 {
    let a = abs_max(x);
    if !a.is_finite() {
        return f32::NAN;
    }
    if a == 0.0 {
        codes.fill(0);
        return 0.0;
    }
    let codes = &mut codes[..x.len()];
    'k: for kk in 1..=MAX_CODE {
        let inv = kk as f32 / a;
        // A cheap rejection on the first lanes before the full pass.
        for &v in x.iter().take(LANES) {
            let t = v * inv;
            if (t - round_even(t)).abs() > TOL {
                continue 'k;
            }
        }
        let mut off = [false; LANES];
        let mut xc = x.chunks_exact(LANES);
        let mut cc = codes.chunks_exact_mut(LANES);
        for (xs, cs) in (&mut xc).zip(&mut cc) {
            for j in 0..LANES {
                let t = xs[j] * inv;
                let r = round_even(t);
                off[j] |= (t - r).abs() > TOL;
                // SAFETY: |r| ≤ 127 (|x| ≤ a).
                cs[j] = unsafe { r.to_int_unchecked::<i32>() } as i8;
            }
        }
        for (&v, c) in xc.remainder().iter().zip(cc.into_remainder()) {
            let t = v * inv;
            let r = round_even(t);
            off[0] |= (t - r).abs() > TOL;
            // SAFETY: as above.
            *c = unsafe { r.to_int_unchecked::<i32>() } as i8;
        }
        if off.iter().any(|&o| o) {
            continue;
        }
        return a / kk as f32;
    }
    f32::NAN
}

crate::fastmath::dispatch!(
    /// [`grid_row_generic`] compiled for the machine's widest vectors.
    grid_row, grid_row_generic, (x: &[f32], codes: &mut [i8]) -> f32
);

/// Symmetric 8-bit codes of `row` (`q = round(row/σ)`, `σ = max |row|/127`); the scale is `NaN`
/// when a value is not finite.
#[inline(always)]
fn code_row_generic(row: &[f32], q: &mut [i8]) -> RowCodes {
    let amax = abs_max(row);
    if !amax.is_finite() {
        return RowCodes {
            scale: f32::NAN,
            sum: 0,
            max_abs: 0,
        };
    }
    let step = amax / 127.0;
    let inv = if step > 0.0 { 1.0 / step } else { 0.0 };
    let q = &mut q[..row.len()];
    let mut sum = [0i32; LANES];
    let mut mx = [0i32; LANES];
    let mut rc = row.chunks_exact(LANES);
    let mut qc = q.chunks_exact_mut(LANES);
    for (xs, qs) in (&mut rc).zip(&mut qc) {
        for j in 0..LANES {
            // SAFETY: |x·inv| ≤ 127 up to rounding; the clamp keeps it there.
            let c = unsafe {
                round_even(xs[j] * inv)
                    .clamp(-127.0, 127.0)
                    .to_int_unchecked::<i32>()
            };
            qs[j] = c as i8;
            sum[j] += c;
            mx[j] = mx[j].max(c.abs());
        }
    }
    for (&v, d) in rc.remainder().iter().zip(qc.into_remainder()) {
        // SAFETY: as above.
        let c = unsafe {
            round_even(v * inv)
                .clamp(-127.0, 127.0)
                .to_int_unchecked::<i32>()
        };
        *d = c as i8;
        sum[0] += c;
        mx[0] = mx[0].max(c.abs());
    }
    RowCodes {
        scale: step,
        sum: sum.iter().sum(),
        max_abs: mx.iter().copied().max().unwrap_or(0),
    }
}

crate::fastmath::dispatch!(
    /// [`code_row_generic`] compiled for the machine's widest vectors.
    code_row, code_row_generic, (row: &[f32], q: &mut [i8]) -> RowCodes
);

/// `dst[j] = a[j]·b[j]`.
#[inline(always)]
fn mul_row_generic(a: &[f32], b: &[f32], dst: &mut [f32]) {
    for ((d, &x), &y) in dst.iter_mut().zip(a).zip(b) {
        *d = x * y;
    }
}

crate::fastmath::dispatch!(
    /// [`mul_row_generic`] compiled for the machine's widest vectors.
    mul_row, mul_row_generic, (a: &[f32], b: &[f32], dst: &mut [f32]) -> ()
);

/// `buf[r·m + i] = g[i·ld + r]·s[i]` for `r < buf.len()/m`, `i < m`: a strip of `gᵀ` with
/// the rows of `g` scaled.
#[inline(always)]
fn gather_t_generic(g: &[f32], ld: usize, s: &[f32], buf: &mut [f32]) {
    let m = s.len();
    let n = buf.len() / m.max(1);
    // Blocks of 16 rows of `g`: each output row gets 16 contiguous values per block.
    const B: usize = 16;
    let mut i0 = 0;
    while i0 < m {
        let bi = B.min(m - i0);
        let mut blk = [[0f32; B]; B];
        for ii in 0..bi {
            let src = &g[(i0 + ii) * ld..(i0 + ii) * ld + n];
            let si = s[i0 + ii];
            for (r, &v) in src.iter().enumerate() {
                blk[r][ii] = v * si;
            }
        }
        for (r, row) in blk.iter().enumerate().take(n) {
            buf[r * m + i0..r * m + i0 + bi].copy_from_slice(&row[..bi]);
        }
        i0 += bi;
    }
}

crate::fastmath::dispatch!(
    /// [`gather_t_generic`] compiled for the machine's widest vectors.
    gather_t, gather_t_generic, (g: &[f32], ld: usize, s: &[f32], buf: &mut [f32]) -> ()
);

/// `x` (`[m, k]`) as grid rows, or `None` if any row is off every grid with codes ≤ 127.
fn grid_rows(x: &[f32], m: usize, k: usize) -> Option<GridRows> {
    if m == 0 || k == 0 || x.len() != m * k {
        return None;
    }
    let kp = k.div_ceil(int_gemm::KB) * int_gemm::KB;
    let mut codes = crate::heap::zeroed::<i8>(m * kp);
    let mut scale = crate::heap::zeroed::<f32>(m);
    let mut sum = crate::heap::zeroed::<i32>(m);
    let range = codes
        .par_chunks_mut(kp * ROWS)
        .zip(scale.par_chunks_mut(ROWS))
        .zip(sum.par_chunks_mut(ROWS))
        .enumerate()
        .map(|(b, ((c, s), sm))| {
            let (mut lo, mut hi) = (0i32, 0i32);
            for (i, (si, smi)) in s.iter_mut().zip(sm.iter_mut()).enumerate() {
                let r = b * ROWS + i;
                let row = &mut c[i * kp..i * kp + k];
                let step = grid_row(&x[r * k..(r + 1) * k], row);
                if step.is_nan() {
                    return None;
                }
                *si = step;
                let (l, h, t) = row_range(row);
                (lo, hi, *smi) = (lo.min(l), hi.max(h), t);
            }
            Some((lo, hi))
        })
        .try_reduce(|| (0, 0), |a, b| Some((a.0.min(b.0), a.1.max(b.1))))?;
    Some(GridRows {
        kp,
        codes,
        scale,
        sum,
        min: range.0,
        max: range.1,
    })
}

/// `(min, max, Σ)` of a row of codes.
#[inline(always)]
fn row_range_generic(c: &[i8]) -> (i32, i32, i32) {
    let (mut lo, mut hi, mut s) = ([0i32; LANES], [0i32; LANES], [0i32; LANES]);
    let chunks = c.chunks_exact(LANES);
    let tail = chunks.remainder();
    for ch in chunks {
        for j in 0..LANES {
            let v = ch[j] as i32;
            lo[j] = lo[j].min(v);
            hi[j] = hi[j].max(v);
            s[j] += v;
        }
    }
    for (j, &v) in tail.iter().enumerate() {
        lo[j] = lo[j].min(v as i32);
        hi[j] = hi[j].max(v as i32);
        s[j] += v as i32;
    }
    (
        lo.iter().copied().min().unwrap_or(0),
        hi.iter().copied().max().unwrap_or(0),
        s.iter().sum(),
    )
}

crate::fastmath::dispatch!(
    /// [`row_range_generic`] compiled for the machine's widest vectors.
    row_range, row_range_generic, (c: &[i8]) -> (i32, i32, i32)
);

/// Rows of 8-bit codes from `fill(first_row, buf)`, which writes the f32 values of a tile of
/// rows (`len` each) into `buf`; `None` if a value is not finite.
fn quantize_grad(
    rows: usize,
    len: usize,
    fill: impl Fn(usize, &mut [f32]) + Sync,
) -> Option<QuantizedActs> {
    let a = QuantizedActs::build(
        rows,
        len,
        ROWS,
        || vec![0f32; ROWS * len],
        |buf: &mut Vec<f32>, r0, kp, q, rc: &mut [RowCodes]| {
            let n = rc.len();
            let buf = &mut buf[..n * len];
            fill(r0, buf);
            for (i, rc) in rc.iter_mut().enumerate() {
                *rc = code_row(&buf[i * len..(i + 1) * len], &mut q[i * kp..i * kp + len]);
            }
        },
    );
    a.scale.iter().all(|s| !s.is_nan()).then_some(a)
}

/// Grid codes (range `min..=max`, |code| ≤ [`MAX_CODE`]) as the packed right operand, `n`
/// outputs × `kk` inputs with code `(o, j)` at `codes[at(o, j)]`, offset by `−min` to be
/// non-negative; scale `scale`, zero the offset.
fn pack(
    (codes, min, max): (&[i8], i32, i32),
    n: usize,
    kk: usize,
    scale: Vec<f32>,
    at: impl Fn(usize, usize) -> usize + Sync,
) -> PackedWeights {
    let off = -min;
    let top = max + off;
    debug_assert!(top <= 2 * MAX_CODE as i32);
    let bits = if top <= 15 { 4 } else { 8 };
    PackedWeights::from_fn(n, kk, bits, scale, vec![off; n], |o, j| {
        (codes[at(o, j)] as i32 + off) as u8
    })
}

/// While alive, every training linear tries the machine's integer products first.
pub struct Installed(());

impl Installed {
    /// Installs [`IntGridProducts`] (nothing where the machine has no integer kernel).
    pub fn install() -> Self {
        crate::model::set_grid_products(
            IntGridProducts::detect().map(|p| Arc::new(p) as Arc<dyn GridProducts>),
        );
        Installed(())
    }
}

impl Drop for Installed {
    fn drop(&mut self) {
        crate::model::set_grid_products(None);
    }
}

/// The integer products on the machine's dot-product kernel.
pub struct IntGridProducts {
    isa: Isa,
}

impl IntGridProducts {
    /// `None` where the machine has no integer dot-product kernel (only the portable loop).
    pub fn detect() -> Option<Self> {
        match Isa::detect() {
            Isa::Scalar => None,
            isa => Some(IntGridProducts { isa }),
        }
    }
}

impl GridProducts for IntGridProducts {
    fn prepare(
        &self,
        x: &[f32],
        w: &[f32],
        m: usize,
        k: usize,
        out: usize,
    ) -> Option<Box<dyn GridLinear>> {
        // x first: an input off every grid fails at its first row.
        let gx = grid_rows(x, m, k)?;
        let gw = grid_rows(w, out, k)?;
        let x_range = (gx.min, gx.max);
        let x = QuantizedActs::new(m, gx.kp, gx.codes, gx.scale, gx.sum, gx.max.max(-gx.min));
        Some(Box::new(IntLinear {
            isa: self.isa,
            k,
            out,
            x,
            x_range,
            gw,
        }))
    }
}

/// One linear's operands on their grids: `x` as the kernel's left operand (its codes also packed,
/// transposed, for `dW`), `W` as grid rows.
struct IntLinear {
    isa: Isa,
    k: usize,
    out: usize,
    x: QuantizedActs,
    x_range: (i32, i32),
    gw: GridRows,
}

impl IntLinear {
    fn gemm(&self, a: &QuantizedActs, w: &PackedWeights) -> Option<Vec<f32>> {
        int_gemm::gemm_new(a, w, self.isa).ok()
    }
}

impl GridLinear for IntLinear {
    fn forward(&self) -> Vec<f32> {
        let (gw, k) = (&self.gw, self.k);
        let packed = pack(gw.codes_range(), self.out, k, gw.scale.clone(), |o, j| {
            o * gw.kp + j
        });
        self.gemm(&self.x, &packed)
            .expect("shapes checked in prepare")
    }

    fn input_grad(&self, g: &[f32]) -> Option<Vec<f32>> {
        let (gw, m, k, out) = (&self.gw, self.x.m, self.k, self.out);
        // W's per-row steps multiply g's columns: h[i, o] = g[i, o]·s_w[o].
        let h = quantize_grad(m, out, |r0, buf| {
            for (i, row) in buf.chunks_mut(out).enumerate() {
                mul_row(&g[(r0 + i) * out..(r0 + i + 1) * out], &gw.scale, row);
            }
        })?;
        // Right operand Wᵀ: output j, input o reads c_w[o, j].
        let packed = pack(gw.codes_range(), k, out, vec![1.0; k], |j, o| o * gw.kp + j);
        self.gemm(&h, &packed)
    }

    fn weight_grad(&self, g: &[f32]) -> Option<Vec<f32>> {
        let (x, m, k, out) = (&self.x, self.x.m, self.k, self.out);
        // e[o, i] = g[i, o]·s_x[i]: gᵀ with x's per-row steps.
        let e = quantize_grad(out, m, |o0, buf| gather_t(&g[o0..], out, &x.scale, buf))?;
        // Right operand xᵀ: output j, input i reads c_x[i, j].
        let (lo, hi) = self.x_range;
        let packed = pack((&x.q, lo, hi), k, m, vec![1.0; k], |j, i| i * x.kp + j);
        self.gemm(&e, &packed)
    }
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    /// Rows `scale·c` with codes in `lo..=hi`.
    fn grid(m: usize, k: usize, lo: i32, hi: i32, rng: &mut Rng) -> Vec<f32> {
        let mut v = Vec::with_capacity(m * k);
        for _ in 0..m {
            let s = 0.01 + rng.uniform() as f32;
            for _ in 0..k {
                let c = lo + (rng.uniform() * (hi - lo + 1) as f64).floor() as i32;
                v.push((c.min(hi) as f32) * s);
            }
        }
        v
    }

    fn matmul(a: &[f32], b: &[f32], m: usize, k: usize, n: usize, bt: bool) -> Vec<f64> {
        // a [m, k] · (b [n, k])ᵀ if bt, else a · b [k, n].
        let mut y = vec![0f64; m * n];
        for i in 0..m {
            for o in 0..n {
                let mut s = 0f64;
                for j in 0..k {
                    let bv = if bt { b[o * k + j] } else { b[j * n + o] };
                    s += a[i * k + j] as f64 * bv as f64;
                }
                y[i * n + o] = s;
            }
        }
        y
    }

    #[test]
    fn grid_rows_recover_steps_and_reject_off_grid_rows() {
        let mut rng = Rng::new(3);
        let x = grid(5, 40, -15, 15, &mut rng);
        let g = grid_rows(&x, 5, 40).expect("on a grid");
        for (i, row) in x.chunks(40).enumerate() {
            for (j, &v) in row.iter().enumerate() {
                let back = g.scale[i] * g.codes[i * g.kp + j] as f32;
                assert!(
                    (back - v).abs() <= 4.0 * f32::EPSILON * v.abs(),
                    "{back} vs {v}"
                );
            }
        }
        let mut y = x.clone();
        y[47] += 0.3 * g.scale[1];
        assert!(grid_rows(&y, 5, 40).is_none());
        let noise: Vec<f32> = (0..200).map(|_| rng.normal() as f32).collect();
        assert!(grid_rows(&noise, 5, 40).is_none());
    }

    #[test]
    fn integer_products_match_the_f64_products_within_the_gradient_rounding_bound() {
        let Some(p) = IntGridProducts::detect() else {
            return;
        };
        let (m, k, out) = (37, 72, 21);
        let mut rng = Rng::new(7);
        let x = grid(m, k, -15, 15, &mut rng); // per-token asymmetric 4-bit codes, q − z
        let w = grid(out, k, -8, 7, &mut rng); // per-channel symmetric 4-bit codes
        let g: Vec<f32> = (0..m * out).map(|_| rng.normal() as f32).collect();

        // Forward: exact integer sums of the codes. Each f32 operand is its step times its code
        // to within one rounding (and the recovered step within two), so the product is off by
        // at most ≈ 4ε·Σ_j |x[i, j]·W[o, j]| — the same bound as an f32 GEMM's.
        let lin = p.prepare(&x, &w, m, k, out).unwrap();
        let y = lin.forward();
        let yr = matmul(&x, &w, m, k, out, true);
        let xa: Vec<f32> = x.iter().map(|v| v.abs()).collect();
        let wa: Vec<f32> = w.iter().map(|v| v.abs()).collect();
        let mag = matmul(&xa, &wa, m, k, out, true);
        for ((a, b), s) in y.iter().zip(&yr).zip(&mag) {
            let bound = 4.0 * f32::EPSILON as f64 * s;
            assert!((*a as f64 - b).abs() <= bound, "{a} vs {b} (bound {bound})");
        }

        // dx = g·W: |error| ≤ σ_i/2·Σ_o |c_w[o, j]| (module doc), in values: σ_i/2·Σ_o |W[o, j]|/s_w[o].
        let gw = grid_rows(&w, out, k).unwrap();
        let dx = lin.input_grad(&g).unwrap();
        let dxr = matmul(&g, &w, m, out, k, false);
        for i in 0..m {
            let sigma = (0..out)
                .map(|o| (g[i * out + o] * gw.scale[o]).abs())
                .fold(0f32, f32::max) as f64
                / 127.0;
            for j in 0..k {
                let bound: f64 = (0..out)
                    .map(|o| gw.codes[o * gw.kp + j].unsigned_abs() as f64)
                    .sum::<f64>()
                    * sigma
                    / 2.0;
                let e = (dx[i * k + j] as f64 - dxr[i * k + j]).abs();
                assert!(e <= bound * 1.001 + 1e-5, "dx[{i},{j}]: {e} > {bound}");
            }
        }

        // dW = gᵀ·x: |error| ≤ τ_o/2·Σ_i |c_x[i, j]|.
        let gx = grid_rows(&x, m, k).unwrap();
        let dw = lin.weight_grad(&g).unwrap();
        let gt: Vec<f32> = (0..out * m).map(|t| g[(t % m) * out + t / m]).collect();
        let dwr = matmul(&gt, &x, out, m, k, false);
        for o in 0..out {
            let tau = (0..m)
                .map(|i| (g[i * out + o] * gx.scale[i]).abs())
                .fold(0f32, f32::max) as f64
                / 127.0;
            for j in 0..k {
                let bound: f64 = (0..m)
                    .map(|i| gx.codes[i * gx.kp + j].unsigned_abs() as f64)
                    .sum::<f64>()
                    * tau
                    / 2.0;
                let e = (dw[o * k + j] as f64 - dwr[o * k + j]).abs();
                assert!(e <= bound * 1.001 + 1e-5, "dW[{o},{j}]: {e} > {bound}");
            }
        }

        // Off the grid: no integer product.
        let noise: Vec<f32> = (0..m * k).map(|_| rng.normal() as f32).collect();
        assert!(p.prepare(&noise, &w, m, k, out).is_none());
        assert!(p.prepare(&x, &noise[..out * k], m, k, out).is_none());
        // A gradient that is not finite leaves the products to the f32 path.
        let mut gn = g.clone();
        gn[5] = f32::NAN;
        assert!(lin.input_grad(&gn).is_none() && lin.weight_grad(&gn).is_none());
    }
}

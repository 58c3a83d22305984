//! GPTQ (algorithms.md §4.3): column-by-column rounding of a weight matrix where each column's
//! rounding error is compensated on the columns not yet quantized, weighted by the inverse
//! Hessian `H = 2/N·Σ x·xᵀ` of the layer's calibration inputs.
//!
//! With `U` upper triangular and `H⁻¹ = Uᵀ·U`, quantizing column `i` of a row `w` and updating
//! `w_j −= (w_i − q_i)/U_ii · U_ij` for `j > i` is the OBQ update of the GPTQ paper (eq. 3 with
//! the Cholesky reformulation of §3 "Step 3"). Every row is independent given `U`, so rows run in
//! parallel; within a row the update is split into blocks of `block` columns exactly as the
//! reference's lazy batch updates are, including where the grid of a group is taken from: the row
//! as updated by all *previous* blocks, not by the columns of the current block before it.

use super::quantizer::{QuantSpec, UnitParams};
use super::weight::{check_finite, unit_len, unit_params, Granularity, QuantizedWeight};
use crate::error::{Error, Result};
use crate::strided_gemm::{gemm, product, Parallelism};
use crate::transforms::linalg::upper_cholesky_of_inverse_shifted;
use candle_core::{DType, Tensor};
use rayon::prelude::*;

/// GPTQ settings (`--gptq-damp`, `--act-order`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GptqConfig {
    /// Dampening, as a fraction of the mean Hessian diagonal added to the diagonal.
    pub damp: f64,
    /// Quantize columns in order of decreasing Hessian diagonal. With groups the grids are then
    /// computed per group in the natural column order before any update ("static groups"), so
    /// the checkpoint keeps contiguous groups (no `g_idx`).
    pub act_order: bool,
    /// Lazy-update block width.
    pub block: usize,
    /// Each dynamic group's grid from the error-updated weights (the reference reads them before
    /// the current block's updates), chosen by a search weighted by the Hessian diagonal
    /// ([`weighted_unit_params`]): llama.cpp's importance-matrix rule inside GPTQ.
    pub grid_search: bool,
    /// GPTQ v2 (GPTAQ's asymmetric calibration, algorithms.md §4.5): the quantized layer on the
    /// quantized model's input `X̃` is fitted to the full-precision layer on the full-precision
    /// input `X`, with this share `α` of the correction; `None` is plain GPTQ.
    pub v2_alpha: Option<f64>,
    /// GPTQ v2: `C` from the first this many calibration windows (`None`: all of GPTQ's). The
    /// full-precision stream costs a block forward per window beyond the method's training
    /// windows (on those it is the training targets' stream), so `C` from the training windows
    /// lets the Hessians take more windows for little more than their own passes.
    pub v2_windows: Option<usize>,
}

impl Default for GptqConfig {
    fn default() -> Self {
        GptqConfig {
            damp: 0.01,
            act_order: false,
            block: 128,
            grid_search: false,
            v2_alpha: None,
            v2_windows: None,
        }
    }
}

/// The values of `x` (`[..., n]`, any float dtype) as f32 rows of `n`.
fn rows_of(x: &Tensor, n: usize) -> Result<Vec<f32>> {
    Ok(x.to_dtype(DType::F32)?
        .reshape(((), n))?
        .flatten_all()?
        .to_vec1()?)
}

/// `sum += aᵀ·b` (`sum` `[n, n]` f64, `a`, `b` `[t, n]` row-major f32), a strip of output rows at
/// a time, each strip's GEMM in f32 across the threads; with `lower` only the lower triangle (and
/// diagonal) of each strip is formed. Returns `t`.
fn add_products(sum: &mut [f64], n: usize, a: &[f32], b: &[f32], lower: bool) -> usize {
    let t = a.len() / n.max(1);
    const ROWS: usize = 256;
    for (s, sum) in sum.chunks_mut(ROWS * n).enumerate() {
        let (r0, mr) = (s * ROWS, sum.len() / n);
        let w = if lower { r0 + mr } else { n };
        // Rows r0..r0+mr of aᵀ (a's columns, read through strides) times b's columns 0..w.
        let strip = product(
            (mr, w, t),
            (&a[r0..], n, 1),
            (b, 1, n),
            1.0,
            Parallelism::Rayon(0),
        );
        for (row, srow) in sum.chunks_mut(n).zip(strip.chunks(w)) {
            for (acc, &v) in row.iter_mut().zip(srow) {
                *acc += v as f64;
            }
        }
    }
    t
}

/// Accumulates `Σ x·xᵀ` over calibration tokens of one linear input.
#[derive(Debug, Clone)]
pub struct Hessian {
    pub n: usize,
    sum: Vec<f64>,
    tokens: usize,
}

impl Hessian {
    pub fn new(n: usize) -> Self {
        Hessian {
            n,
            sum: vec![0.0; n * n],
            tokens: 0,
        }
    }

    /// Adds the rows of `x` (`[..., n]`): `Σ x·xᵀ` is symmetric, so only its lower triangle is
    /// formed, a strip of rows at a time, each strip's GEMM across the threads (`matrix` mirrors
    /// it).
    pub fn add(&mut self, x: &Tensor) -> Result<()> {
        let x = rows_of(x, self.n)?;
        self.tokens += add_products(&mut self.sum, self.n, &x, &x, true);
        Ok(())
    }

    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// `H = 2/N·Σ x·xᵀ`.
    pub fn matrix(&self) -> Vec<f64> {
        self.clone().into_matrix()
    }

    /// [`Hessian::matrix`] in the accumulator's own buffer: the lower triangle scaled, then
    /// mirrored (only lower-triangle and diagonal entries are read, only strictly upper ones
    /// are written by the mirror).
    pub fn into_matrix(self) -> Vec<f64> {
        let (n, k) = (self.n, 2.0 / self.tokens.max(1) as f64);
        let mut h = self.sum;
        for i in 0..n {
            for j in 0..=i {
                let v = h[i * n + j] * k;
                h[i * n + j] = v;
                h[j * n + i] = v;
            }
        }
        h
    }
}

/// Accumulates `Σ (x − x̃)·x̃ᵀ` over calibration tokens: `x` a linear's input in the
/// full-precision model, `x̃` the same token's input in the quantized model (GPTQ v2).
#[derive(Debug, Clone)]
pub struct CrossMoment {
    pub n: usize,
    sum: Vec<f64>,
    tokens: usize,
}

impl CrossMoment {
    pub fn new(n: usize) -> Self {
        CrossMoment {
            n,
            sum: vec![0.0; n * n],
            tokens: 0,
        }
    }

    /// Adds the token rows of `x` and `xq` (both `[..., n]`, the same tokens in the same order),
    /// a strip of output rows at a time like [`Hessian::add`] (the matrix is not symmetric).
    pub fn add(&mut self, x: &Tensor, xq: &Tensor) -> Result<()> {
        let (x, xq) = (rows_of(x, self.n)?, rows_of(xq, self.n)?);
        let d: Vec<f32> = x.iter().zip(&xq).map(|(a, b)| a - b).collect();
        self.tokens += add_products(&mut self.sum, self.n, &d, &xq, false);
        Ok(())
    }

    /// `C = 2/N·Σ (x − x̃)·x̃ᵀ` (the scale of [`Hessian::into_matrix`]).
    pub fn into_matrix(self) -> Vec<f64> {
        let k = 2.0 / self.tokens.max(1) as f64;
        self.sum.into_iter().map(|v| v * k).collect()
    }
}

/// `H⁻¹`'s upper Cholesky factor after dampening, in `h`'s buffer; more dampening (×10, up to 3
/// times) if the factorisation fails. Returns the factor and the dampening used.
fn inverse_factor(name: &str, h: Vec<f64>, n: usize, damp: f64) -> Result<(Vec<f64>, f64)> {
    let mean_diag = (0..n).map(|i| h[i * n + i]).sum::<f64>() / n as f64;
    let mut damps = vec![damp];
    for _ in 1..4 {
        let d = damps[damps.len() - 1];
        damps.push(if d > 0.0 { d * 10.0 } else { 0.01 });
    }
    let shifts: Vec<f64> = damps.iter().map(|d| d * mean_diag).collect();
    match upper_cholesky_of_inverse_shifted(h, n, &shifts) {
        Ok((u, k)) => Ok((u, damps[k])),
        Err(_) => Err(Error::Runtime(format!(
            "{name}: GPTQ Hessian is not positive definite even with dampening {}",
            damps[damps.len() - 1]
        ))),
    }
}

/// What GPTQ takes from one input's Hessian, computed once and shared by the linears that read
/// that input (q/k/v, gate/up): the dead inputs, the column order, the Hessian's diagonal (the
/// importance of [`weighted_unit_params`]) and the factor `U` of `H⁻¹`. Built in the Hessian's
/// own buffer: at its peak it holds two `inp × inp` f64 matrices (three with act order).
pub struct GptqFactor {
    inp: usize,
    /// Inputs never non-zero in calibration: their column is irrelevant and zeroed.
    dead: Vec<usize>,
    perm: Vec<usize>,
    diag: Vec<f64>,
    u: Vec<f64>,
    damp: f64,
}

impl GptqFactor {
    pub fn new(name: &str, mut h: Vec<f64>, inp: usize, cfg: &GptqConfig) -> Result<Self> {
        if h.len() != inp * inp {
            return Err(Error::Runtime(format!(
                "{name}: Hessian is {} values, expected {inp}²",
                h.len()
            )));
        }
        if let Some(i) = h.iter().position(|x| !x.is_finite()) {
            return Err(Error::Runtime(format!(
                "{name}: calibration Hessian has a non-finite entry at ({}, {})",
                i / inp,
                i % inp
            )));
        }
        let mut dead = Vec::new();
        for j in 0..inp {
            if h[j * inp + j] == 0.0 {
                h[j * inp + j] = 1.0;
                dead.push(j);
            }
        }
        let diag: Vec<f64> = (0..inp).map(|j| h[j * inp + j]).collect();
        let mut perm: Vec<usize> = (0..inp).collect();
        let hp = if cfg.act_order {
            perm.sort_by(|&a, &b| diag[b].total_cmp(&diag[a]));
            (0..inp * inp)
                .map(|k| h[perm[k / inp] * inp + perm[k % inp]])
                .collect()
        } else {
            h
        };
        let (u, damp) = inverse_factor(name, hp, inp, cfg.damp)?;
        Ok(GptqFactor {
            inp,
            dead,
            perm,
            diag,
            u,
            damp,
        })
    }
}

impl GptqFactor {
    /// GPTQ v2's target for `w` `[out, inp]` (algorithms.md §4.5): `w + α·w·C·(H + λI)⁻¹`, with
    /// `C` from [`CrossMoment`] and `(H + λI)⁻¹ = Uᵀ·U` this factor's (in its column order). GPTQ
    /// around it minimises `‖w·X − ŵ·X̃‖²` for `α = 1`.
    pub fn asymmetric_target(&self, w: &[f32], out: usize, c: &[f64], alpha: f64) -> Vec<f32> {
        let n = self.inp;
        let w64: Vec<f64> = w.iter().map(|&v| v as f64).collect();
        // R = w·C, its columns in the factor's order.
        let mut r = product(
            (out, n, n),
            (&w64, 1, n),
            (c, 1, n),
            1.0,
            Parallelism::Rayon(0),
        );
        let rp: Vec<f64> = (0..out * n)
            .map(|k| r[(k / n) * n + self.perm[k % n]])
            .collect();
        // S = R·Uᵀ·U.
        let t = product(
            (out, n, n),
            (&rp, 1, n),
            (&self.u, n, 1),
            1.0,
            Parallelism::Rayon(0),
        );
        gemm(
            (out, n, n),
            &mut r,
            n,
            false,
            (&t, 1, n),
            (&self.u, 1, n),
            1.0,
            Parallelism::Rayon(0),
        );
        let mut target = w.to_vec();
        for row in 0..out {
            for (a, &j) in self.perm.iter().enumerate() {
                target[row * n + j] += (alpha * r[row * n + a]) as f32;
            }
        }
        target
    }
}

/// Result of [`gptq`]: the quantized weight and the dampening that was needed.
pub struct GptqOutput {
    pub weight: QuantizedWeight,
    pub damp: f64,
}

/// The grid of one unit minimising the importance-weighted squared error `Σ a_j (x̂_j − x_j)²`
/// (`a`: the Hessian diagonal, `Σ x_j²` over the calibration tokens — llama.cpp's importance
/// matrix): candidate ranges shrunk by `p = 1 − i/100`, `i < 20`, each refitted by weighted least
/// squares on its codes (`s* = Σ a x q / Σ a q²`, `q = c − z`, for symmetric grids) and rounded
/// as the grid rounds its scales before the codes are taken again.
pub fn weighted_unit_params(xs: &[f32], a: &[f32], spec: &QuantSpec) -> UnitParams {
    let (lo, hi) = xs
        .iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(l, h), &x| {
            (l.min(x), h.max(x))
        });
    let qmax = spec.qmax() as f32;
    let err = |p: &UnitParams| -> f64 {
        xs.iter()
            .zip(a)
            .map(|(&x, &w)| w as f64 * ((p.value(p.code(x, qmax)) - x) as f64).powi(2))
            .sum()
    };
    let mut best = spec.params(lo, hi);
    let mut best_err = err(&best);
    for i in 0..20 {
        let r = 1.0 - i as f32 / 100.0;
        let cand = spec.params(r * lo, r * hi);
        let mut cands = vec![cand];
        if spec.symmetric {
            let (mut num, mut den) = (0f64, 0f64);
            for (&x, &w) in xs.iter().zip(a) {
                let q = (cand.code(x, qmax) as f32 - cand.zero) as f64;
                num += w as f64 * x as f64 * q;
                den += w as f64 * q * q;
            }
            if den > 0.0 && num > 0.0 {
                let s = spec.scale_dtype.round_scale((num / den) as f32);
                cands.push(UnitParams { scale: s, ..cand });
            }
        }
        for c in cands {
            let e = err(&c);
            if e < best_err {
                best = c;
                best_err = e;
            }
        }
    }
    best
}

/// Rows of the weight swept together (see [`gptq`]).
const GPTQ_TILE_ROWS: usize = 16;
/// Columns of the lazy update handled at once: the block's rows of `U` over this slab (128 ×
/// 512 f64 = 512 KiB) stay in L2 while each row of the tile passes over them.
const GPTQ_SLAB_COLS: usize = 512;

/// Quantizes `w` (`out × inp`, row-major) with GPTQ against the Hessian `h` (`inp × inp`).
#[allow(clippy::too_many_arguments)]
pub fn gptq(
    name: &str,
    w: &[f32],
    out: usize,
    inp: usize,
    h: &[f64],
    spec: QuantSpec,
    granularity: Granularity,
    clip_search: bool,
    cfg: &GptqConfig,
) -> Result<GptqOutput> {
    check_finite(name, w, inp)?;
    unit_len(name, inp, granularity)?;
    let factor = GptqFactor::new(name, h.to_vec(), inp, cfg)?;
    gptq_factored(name, w, out, &factor, spec, granularity, clip_search, cfg)
}

/// [`gptq`] with the Hessian's [`GptqFactor`] (`w` is `out × factor.inp`).
#[allow(clippy::too_many_arguments)]
pub fn gptq_factored(
    name: &str,
    w: &[f32],
    out: usize,
    factor: &GptqFactor,
    spec: QuantSpec,
    granularity: Granularity,
    clip_search: bool,
    cfg: &GptqConfig,
) -> Result<GptqOutput> {
    let inp = factor.inp;
    if w.len() != out * inp {
        return Err(Error::Runtime(format!(
            "{name}: weight of {} values for a {out} × {inp} Hessian factor",
            w.len()
        )));
    }
    check_finite(name, w, inp)?;
    let g = unit_len(name, inp, granularity)?;
    let (perm, u, h_diag, damp) = (&factor.perm, &factor.u, &factor.diag, factor.damp);
    let mut w: Vec<f32> = w.to_vec();
    for &j in &factor.dead {
        for r in 0..out {
            w[r * inp + j] = 0.0;
        }
    }

    let ng = inp / g;
    let qmax = spec.qmax() as f32;
    // Grids fixed before the loop: per tensor, per channel, or static groups under act order.
    let tensor_params =
        (granularity == Granularity::Tensor).then(|| unit_params(&w, &spec, clip_search));
    let fixed = |row: &[f32]| -> Vec<UnitParams> {
        match granularity {
            Granularity::Tensor => vec![tensor_params.expect("tensor params")],
            Granularity::Channel => vec![unit_params(row, &spec, clip_search)],
            Granularity::Group(_) => row
                .chunks(g)
                .map(|c| unit_params(c, &spec, clip_search))
                .collect(),
        }
    };
    let dynamic_groups = matches!(granularity, Granularity::Group(_)) && !cfg.act_order;
    let bs = cfg.block.max(1);

    let mut codes = vec![0u8; out * inp];
    let mut params = vec![
        UnitParams {
            scale: 1.0,
            zero: 0.0,
            offset: 0.0
        };
        out * ng
    ];
    // Rows are independent given U: a tile of rows sweeps the columns together so that each row
    // of U, read once from memory, serves every row of the tile in the lazy update (the update
    // of each element keeps its order, so the result does not depend on the tile).
    let tile = GPTQ_TILE_ROWS;
    codes
        .par_chunks_mut(inp * tile)
        .zip(params.par_chunks_mut(ng * tile))
        .zip(w.par_chunks(inp * tile))
        .for_each(|((c_tile, p_tile), w_tile)| {
            let rows = w_tile.len() / inp;
            let fixed_p: Vec<Vec<UnitParams>> = w_tile
                .chunks(inp)
                .map(|w_row| {
                    if dynamic_groups {
                        Vec::new()
                    } else {
                        fixed(w_row)
                    }
                })
                .collect();
            // The rows in quantization order, in f64.
            let mut wr: Vec<f64> = w_tile
                .chunks(inp)
                .flat_map(|w_row| perm.iter().map(|&j| w_row[j] as f64))
                .collect();
            let mut cur: Vec<UnitParams> = fixed_p
                .iter()
                .map(|f| {
                    f.first().copied().unwrap_or(UnitParams {
                        scale: 1.0,
                        zero: 0.0,
                        offset: 0.0,
                    })
                })
                .collect();
            let mut e1 = vec![0f64; rows * bs];
            let mut i1 = 0;
            while i1 < inp {
                let i2 = (i1 + bs).min(inp);
                let nb = i2 - i1;
                for r in 0..rows {
                    let wr = &wr[r * inp..(r + 1) * inp];
                    let c_row = &mut c_tile[r * inp..(r + 1) * inp];
                    let p_row = &mut p_tile[r * ng..(r + 1) * ng];
                    let e1 = &mut e1[r * bs..r * bs + nb];
                    let mut w1: Vec<f64> = wr[i1..i2].to_vec();
                    for i in 0..nb {
                        let col = i1 + i;
                        let orig = perm[col];
                        let p = if dynamic_groups {
                            if col % g == 0 {
                                cur[r] = if cfg.grid_search {
                                    // The group as it stands now: this block's updates (`w1`)
                                    // and the lazy ones of earlier blocks beyond it (`wr`).
                                    let vals: Vec<f32> = (col..col + g)
                                        .map(|j| if j < i2 { w1[j - i1] } else { wr[j] } as f32)
                                        .collect();
                                    let imp: Vec<f32> =
                                        (col..col + g).map(|j| h_diag[j] as f32).collect();
                                    weighted_unit_params(&vals, &imp, &spec)
                                } else {
                                    // `wr` beyond i1 holds the updates of previous blocks only.
                                    let vals: Vec<f32> =
                                        wr[col..col + g].iter().map(|&v| v as f32).collect();
                                    unit_params(&vals, &spec, clip_search)
                                };
                                p_row[col / g] = cur[r];
                            }
                            cur[r]
                        } else {
                            // One grid per unit of g columns (g = inp per channel or tensor).
                            fixed_p[r][orig / g]
                        };
                        let code = p.code(w1[i] as f32, qmax);
                        c_row[orig] = code;
                        let q = p.value(code) as f64;
                        let urow = &u[col * inp..(col + 1) * inp];
                        let err = (w1[i] - q) / urow[col];
                        for j in i..nb {
                            w1[j] -= err * urow[i1 + j];
                        }
                        e1[i] = err;
                    }
                }
                // Lazy batch update of the columns after this block (Eq. 4's deferred terms),
                // a slab of columns at a time so that the block's rows of U stay in cache.
                let mut j0 = i2;
                while j0 < inp {
                    let j1 = (j0 + GPTQ_SLAB_COLS).min(inp);
                    for r in 0..rows {
                        let wr = &mut wr[r * inp + j0..r * inp + j1];
                        for (k, &e) in e1[r * bs..r * bs + nb].iter().enumerate() {
                            if e != 0.0 {
                                let urow = &u[(i1 + k) * inp + j0..(i1 + k) * inp + j1];
                                for (x, &v) in wr.iter_mut().zip(urow) {
                                    *x -= e * v;
                                }
                            }
                        }
                    }
                    j0 = j1;
                }
                i1 = i2;
            }
            if !dynamic_groups {
                for (r, f) in fixed_p.iter().enumerate() {
                    p_tile[r * ng..(r + 1) * ng].copy_from_slice(f);
                }
            }
        });
    Ok(GptqOutput {
        weight: QuantizedWeight {
            out,
            inp,
            spec,
            granularity,
            codes,
            params,
        },
        damp,
    })
}

/// `tr((W − Ŵ)·H·(W − Ŵ)ᵀ)`: the layer's output error on the calibration inputs (up to the
/// factor 2/N), the quantity GPTQ minimises.
pub fn output_error(w: &[f32], w_hat: &[f32], out: usize, inp: usize, h: &[f64]) -> f64 {
    (0..out)
        .into_par_iter()
        .map(|r| {
            let d: Vec<f64> = (0..inp)
                .map(|j| (w[r * inp + j] - w_hat[r * inp + j]) as f64)
                .collect();
            let mut s = 0.0;
            for i in 0..inp {
                let hi = &h[i * inp..(i + 1) * inp];
                s += d[i] * hi.iter().zip(&d).map(|(a, b)| a * b).sum::<f64>();
            }
            s
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    /// GPTQ and RTN of the same weight on the same grid.
    #[allow(clippy::too_many_arguments)]
    fn both(
        w: &[f32],
        out: usize,
        inp: usize,
        h: &[f64],
        spec: QuantSpec,
        gran: Granularity,
        act_order: bool,
    ) -> (QuantizedWeight, QuantizedWeight) {
        let g = gptq(
            "t",
            w,
            out,
            inp,
            h,
            spec,
            gran,
            false,
            &cfg(0.01, act_order),
        )
        .unwrap();
        let r = QuantizedWeight::quantize("t", w, out, inp, spec, gran, false).unwrap();
        (g.weight, r)
    }

    /// The weighted search never does worse, in its own weighted error, than the plain min/max
    /// grid (its first candidate), and its scales stay on the grid's dtype.
    #[test]
    fn weighted_grid_search_beats_min_max() {
        use crate::quant::{ScaleDtype, SymScale};
        let mut seed = 3u64;
        let mut r = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 40) as f32 / (1u64 << 24) as f32
        };
        for sym_scale in [SymScale::MaxPos, SymScale::SignedMax] {
            let spec = QuantSpec {
                sym_scale,
                scale_dtype: ScaleDtype::F16,
                ..QuantSpec::sym(4)
            };
            for _ in 0..50 {
                let xs: Vec<f32> = (0..32).map(|_| (r() - 0.5) * 0.1).collect();
                let a: Vec<f32> = (0..32).map(|_| r() * r() * 10.0).collect();
                let err = |p: &UnitParams| -> f64 {
                    xs.iter()
                        .zip(&a)
                        .map(|(&x, &w)| w as f64 * ((p.value(p.code(x, 15.0)) - x) as f64).powi(2))
                        .sum()
                };
                let (lo, hi) = xs
                    .iter()
                    .fold((f32::MAX, f32::MIN), |(l, h), &x| (l.min(x), h.max(x)));
                let best = weighted_unit_params(&xs, &a, &spec);
                assert!(err(&best) <= err(&spec.params(lo, hi)));
                assert!(ScaleDtype::F16.holds(best.scale));
            }
        }
    }

    fn cfg(damp: f64, act_order: bool) -> GptqConfig {
        GptqConfig {
            damp,
            act_order,
            block: 128,
            grid_search: false,
            v2_alpha: None,
            v2_windows: None,
        }
    }

    #[test]
    fn v2_target_solves_the_asymmetric_least_squares() {
        // Undamped, α = 1: w' = w + w·C·H⁻¹ satisfies the normal equations of
        // min ‖w·Xᵀ − w'·X̃ᵀ‖² (tokens as rows): w'·X̃ᵀX̃ = w·XᵀX̃. Checked in f64 against the
        // f32-accumulated moments (300 tokens: relative error ≲ 300·2⁻²⁴ ≈ 2e-5 of the sums, and
        // H⁻¹'s condition number, ≈ 10 for 300 Gaussian rows of 24, amplifies it: 1e-3 bound).
        let mut rng = Rng::new(5);
        let (t, n, out) = (300, 24, 5);
        let xq: Vec<f32> = (0..t * n).map(|_| rng.normal() as f32).collect();
        let x: Vec<f32> = xq.iter().map(|v| v + 0.3 * rng.normal() as f32).collect();
        let w: Vec<f32> = (0..out * n).map(|_| rng.normal() as f32).collect();
        let dev = candle_core::Device::Cpu;
        let (xt, xqt) = (
            Tensor::from_vec(x.clone(), (t, n), &dev).unwrap(),
            Tensor::from_vec(xq.clone(), (t, n), &dev).unwrap(),
        );
        let (mut h, mut c) = (Hessian::new(n), CrossMoment::new(n));
        h.add(&xqt).unwrap();
        c.add(&xt, &xqt).unwrap();
        let c = c.into_matrix();
        for act_order in [false, true] {
            let f = GptqFactor::new("t", h.matrix(), n, &cfg(0.0, act_order)).unwrap();
            let target = f.asymmetric_target(&w, out, &c, 1.0);
            // Σ_k (row·input_k)·x̃_kj in f64.
            let moment = |row: &[f32], input: &[f32], j: usize| -> f64 {
                (0..t)
                    .map(|k| {
                        let p: f64 = (0..n)
                            .map(|i| row[i] as f64 * input[k * n + i] as f64)
                            .sum();
                        p * xq[k * n + j] as f64
                    })
                    .sum()
            };
            for r in 0..out {
                for j in 0..n {
                    let lhs = moment(&target[r * n..(r + 1) * n], &xq, j);
                    let rhs = moment(&w[r * n..(r + 1) * n], &x, j);
                    assert!(
                        (lhs - rhs).abs() <= 1e-3 * rhs.abs().max(t as f64),
                        "act order {act_order}: ({r}, {j}) {lhs} vs {rhs}"
                    );
                }
            }
        }
    }

    #[test]
    fn hessian_is_the_sum_of_outer_products() {
        // 300 inputs: two strips of the lower triangle, the second ragged.
        let mut rng = Rng::new(3);
        let (t, n) = (37, 300);
        let x: Vec<f32> = (0..t * n).map(|_| rng.normal() as f32).collect();
        let mut hs = Hessian::new(n);
        let xt = Tensor::from_vec(x.clone(), (t, n), &candle_core::Device::Cpu).unwrap();
        hs.add(&xt.narrow(0, 0, 20).unwrap()).unwrap();
        hs.add(&xt.narrow(0, 20, t - 20).unwrap()).unwrap();
        let h = hs.matrix();
        for i in 0..n {
            for j in 0..n {
                let want: f64 = (0..t)
                    .map(|k| x[k * n + i] as f64 * x[k * n + j] as f64)
                    .sum::<f64>()
                    * 2.0
                    / t as f64;
                // f32 products summed over ≤ 20 tokens: relative error ≲ 20·2⁻²⁴ of Σ|x_i·x_j|.
                let bound: f64 = (0..t)
                    .map(|k| (x[k * n + i] as f64 * x[k * n + j] as f64).abs())
                    .sum::<f64>()
                    * 2.0
                    / t as f64
                    * 20.0
                    * f32::EPSILON as f64;
                assert!((h[i * n + j] - want).abs() <= bound, "({i}, {j})");
                assert_eq!(h[i * n + j], h[j * n + i]);
            }
        }
    }

    #[test]
    fn two_correlated_columns_closed_form() {
        // Row [0.34, 0.04, 0.7], 4-bit symmetric per channel: s = 0.7/7 = 0.1.
        // Column 0 rounds to 0.3 (error 0.04). The OBQ update moves column 1 by
        // (w0 − q0)·H01/H11 = 0.04·1/2 = 0.02 (column 2 is uncorrelated), so 0.04 → 0.06 → 0.1,
        // where plain rounding gives 0.0. Column 2 stays 0.7.
        let w = [0.34f32, 0.04, 0.7];
        let h = [2.0, 1.0, 0.0, 1.0, 2.0, 0.0, 0.0, 0.0, 1.0];
        let spec = QuantSpec::sym(4);
        let out = gptq(
            "t",
            &w,
            1,
            3,
            &h,
            spec,
            Granularity::Channel,
            false,
            &cfg(0.0, false),
        )
        .unwrap();
        let got = out.weight.dequantize();
        let want = [0.3f32, 0.1, 0.7];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{got:?}");
        }
        let rtn = QuantizedWeight::quantize("t", &w, 1, 3, spec, Granularity::Channel, false)
            .unwrap()
            .dequantize();
        assert!((rtn[1] - 0.0).abs() < 1e-7);
    }

    #[test]
    fn diagonal_hessian_is_round_to_nearest() {
        let mut rng = Rng::new(3);
        let (out, inp) = (5, 64);
        let w: Vec<f32> = (0..out * inp).map(|_| rng.normal() as f32).collect();
        let mut h = vec![0.0; inp * inp];
        for i in 0..inp {
            h[i * inp + i] = 0.5 + rng.uniform();
        }
        for gran in [
            Granularity::Channel,
            Granularity::Group(16),
            Granularity::Tensor,
        ] {
            for act_order in [false, true] {
                let (g, r) = both(&w, out, inp, &h, QuantSpec::asym(3), gran, act_order);
                assert_eq!(g.codes, r.codes, "{gran:?} act_order {act_order}");
                assert_eq!(g.params, r.params);
            }
        }
    }

    #[test]
    fn lowers_output_error_on_correlated_inputs() {
        // X = Z·M: correlated features. GPTQ minimises tr(ΔW·H·ΔWᵀ) greedily (there is no
        // guarantee per matrix, only that each step is optimal given the previous ones); it must
        // come out below RTN here.
        let mut rng = Rng::new(7);
        let (out, inp, t) = (16, 96, 400);
        let m: Vec<f32> = (0..inp * inp).map(|_| rng.normal() as f32).collect();
        let z: Vec<f32> = (0..t * inp).map(|_| rng.normal() as f32).collect();
        let zt = Tensor::from_vec(z, (t, inp), &candle_core::Device::Cpu).unwrap();
        let mt = Tensor::from_vec(m, (inp, inp), &candle_core::Device::Cpu).unwrap();
        let x = zt.matmul(&mt).unwrap();
        let mut hs = Hessian::new(inp);
        hs.add(&x).unwrap();
        let h = hs.matrix();
        let w: Vec<f32> = (0..out * inp).map(|_| rng.normal() as f32).collect();
        for (gran, act_order) in [
            (Granularity::Channel, false),
            (Granularity::Channel, true),
            (Granularity::Group(32), false),
            (Granularity::Group(32), true),
        ] {
            let (g, r) = both(&w, out, inp, &h, QuantSpec::sym(3), gran, act_order);
            let (g, r) = (g.dequantize(), r.dequantize());
            let (eg, er) = (
                output_error(&w, &g, out, inp, &h),
                output_error(&w, &r, out, inp, &h),
            );
            assert!(eg < er, "{gran:?} {act_order}: gptq {eg} rtn {er}");
        }
    }

    #[test]
    fn dead_columns_are_zeroed_and_singular_hessians_get_more_damping() {
        let (out, inp) = (2, 4);
        let w = [1.0f32, 2.0, 3.0, 4.0, -1.0, -2.0, -3.0, -4.0];
        // Column 3 never active; columns 0 and 1 identical (rank-deficient H).
        let mut h = vec![0.0; 16];
        for (i, j) in [(0, 0), (0, 1), (1, 0), (1, 1), (2, 2)] {
            h[i * 4 + j] = 1.0;
        }
        let o = gptq(
            "t",
            &w,
            out,
            inp,
            &h,
            QuantSpec::sym(4),
            Granularity::Channel,
            false,
            &cfg(0.0, false),
        )
        .unwrap();
        let d = o.weight.dequantize();
        assert_eq!(d[3], 0.0);
        assert_eq!(d[7], 0.0);
        assert!(o.damp > 0.0);
    }
}

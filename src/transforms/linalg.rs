//! Small dense linear algebra in f64 (candle has none): orthogonal matrices for rotations.
//! Matrices are row-major `Vec<f64>` of size `n × n`.

use crate::rng::Rng;
use crate::strided_gemm::{gemm, product, Parallelism};

/// A Haar-random orthogonal matrix: QR (Householder) of a Gaussian matrix with the signs of
/// `diag(R)` folded into Q's columns.
pub fn random_orthogonal(n: usize, rng: &mut Rng) -> Vec<f64> {
    let mut a: Vec<f64> = (0..n * n).map(|_| rng.normal()).collect();
    // Householder QR in place: a holds R above the diagonal; reflectors kept in `vs`.
    let mut vs: Vec<Vec<f64>> = Vec::with_capacity(n);
    let mut rdiag = vec![0.0; n];
    for k in 0..n {
        let norm: f64 = (k..n).map(|i| a[i * n + k].powi(2)).sum::<f64>().sqrt();
        let alpha = if a[k * n + k] > 0.0 { -norm } else { norm };
        let mut v: Vec<f64> = (k..n).map(|i| a[i * n + k]).collect();
        v[0] -= alpha;
        let vn: f64 = v.iter().map(|x| x * x).sum::<f64>();
        if vn > 0.0 {
            for j in k..n {
                let dot: f64 = (k..n).map(|i| v[i - k] * a[i * n + j]).sum();
                let f = 2.0 * dot / vn;
                for i in k..n {
                    a[i * n + j] -= f * v[i - k];
                }
            }
        }
        rdiag[k] = a[k * n + k];
        vs.push(v);
    }
    // Q = H_0 H_1 … H_{n−1}; apply to the identity from the right-most reflector.
    let mut q = identity(n);
    for k in (0..n).rev() {
        let v = &vs[k];
        let vn: f64 = v.iter().map(|x| x * x).sum();
        if vn == 0.0 {
            continue;
        }
        for j in 0..n {
            let dot: f64 = (k..n).map(|i| v[i - k] * q[i * n + j]).sum();
            let f = 2.0 * dot / vn;
            for i in k..n {
                q[i * n + j] -= f * v[i - k];
            }
        }
    }
    for (j, &r) in rdiag.iter().enumerate() {
        if r < 0.0 {
            for i in 0..n {
                q[i * n + j] = -q[i * n + j];
            }
        }
    }
    q
}

pub fn identity(n: usize) -> Vec<f64> {
    let mut m = vec![0.0; n * n];
    for i in 0..n {
        m[i * n + i] = 1.0;
    }
    m
}

/// `A ⊗ B` for square `A` (`na × na`) and `B` (`nb × nb`).
pub fn kron(a: &[f64], na: usize, b: &[f64], nb: usize) -> Vec<f64> {
    let n = na * nb;
    let mut out = vec![0.0; n * n];
    for i in 0..na {
        for j in 0..na {
            let aij = a[i * na + j];
            for k in 0..nb {
                for l in 0..nb {
                    out[(i * nb + k) * n + j * nb + l] = aij * b[k * nb + l];
                }
            }
        }
    }
    out
}

pub fn transpose(a: &[f64], n: usize) -> Vec<f64> {
    let mut t = vec![0.0; n * n];
    for i in 0..n {
        for j in 0..n {
            t[j * n + i] = a[i * n + j];
        }
    }
    t
}

/// `max |A·Aᵀ − I|`.
pub fn orthogonality_error(a: &[f64], n: usize) -> f64 {
    let mut worst = 0f64;
    for i in 0..n {
        for j in 0..n {
            let d: f64 = (0..n).map(|k| a[i * n + k] * a[j * n + k]).sum();
            worst = worst.max((d - if i == j { 1.0 } else { 0.0 }).abs());
        }
    }
    worst
}

/// Diagonal and panel blocks of the blocked factorisations below: the GEMMs on `NB`-wide panels
/// do the O(n³) work; only `NB × NB` blocks are done element by element.
pub(crate) const NB: usize = 128;
/// The panel GEMMs run one per rayon task, each on one thread.
const SEQ: Parallelism = Parallelism::None;

/// Unblocked lower Cholesky of the `b × b` block at `a[o..]` (row stride `n`), in place on its
/// lower triangle. Fails with the block-local column whose pivot is not positive.
fn cholesky_block(a: &mut [f64], n: usize, o: usize, b: usize) -> Result<(), usize> {
    for j in 0..b {
        let rj = o + j * n;
        let d = a[rj + j] - (0..j).map(|k| a[rj + k] * a[rj + k]).sum::<f64>();
        if !(d > 0.0 && d.is_finite()) {
            return Err(j);
        }
        let d = d.sqrt();
        a[rj + j] = d;
        for i in j + 1..b {
            let ri = o + i * n;
            let dot: f64 = (0..j).map(|k| a[ri + k] * a[rj + k]).sum();
            a[ri + j] = (a[ri + j] - dot) / d;
        }
    }
    Ok(())
}

/// Inverse of the lower-triangular `b × b` block at `l[o..]` (row stride `n`), as a dense
/// row-major `b × b` (zero above the diagonal), by forward substitution column by column.
fn lower_inverse_block(l: &[f64], n: usize, o: usize, b: usize) -> Vec<f64> {
    let mut x = vec![0.0; b * b];
    for j in 0..b {
        x[j * b + j] = 1.0 / l[o + j * n + j];
        for i in j + 1..b {
            let s: f64 = (j..i).map(|k| l[o + i * n + k] * x[k * b + j]).sum();
            x[i * b + j] = -s / l[o + i * n + i];
        }
    }
    x
}

/// Lower Cholesky factor `L` of a symmetric positive definite `a` (`a = L·Lᵀ`), in place (the
/// upper triangle is zeroed). Fails with the first column whose pivot is not positive.
///
/// Blocked right-looking form (docs/algorithms.md §9): for each `NB`-wide panel, factor its
/// diagonal block `A₁₁ = L₁₁·L₁₁ᵀ`, solve the panel `L₂₁ = A₂₁·L₁₁⁻ᵀ`, and update the trailing
/// matrix `A₂₂ −= L₂₁·L₂₁ᵀ` (lower half only, a block row at a time, in parallel).
pub fn cholesky_lower(a: &mut [f64], n: usize) -> Result<(), usize> {
    use rayon::prelude::*;
    let mut k0 = 0;
    while k0 < n {
        let k1 = (k0 + NB).min(n);
        let b = k1 - k0;
        cholesky_block(a, n, k0 * n + k0, b).map_err(|j| k0 + j)?;
        let m = n - k1;
        if m > 0 {
            let inv = lower_inverse_block(a, n, k0 * n + k0, b);
            // L₂₁ = A₂₁·L₁₁⁻ᵀ into a packed `m × b` panel, then back into place.
            let mut p = vec![0.0; m * b];
            p.par_chunks_mut(NB * b).enumerate().for_each(|(s, rows)| {
                let r0 = k1 + s * NB;
                let mr = rows.len() / b;
                let panel = (&a[r0 * n + k0..], 1, n);
                gemm((mr, b, b), rows, b, true, panel, (&inv, b, 1), 1.0, SEQ);
            });
            for (i, row) in p.chunks(b).enumerate() {
                a[(k1 + i) * n + k0..(k1 + i) * n + k1].copy_from_slice(row);
            }
            // A₂₂ −= L₂₁·L₂₁ᵀ, each block row up to its diagonal.
            let p = &p;
            a[k1 * n..]
                .par_chunks_mut(NB * n)
                .enumerate()
                .for_each(|(s, rows)| {
                    let (i0, mr) = (s * NB, rows.len() / n);
                    let dst = &mut rows[k1..];
                    gemm(
                        (mr, i0 + mr, b),
                        dst,
                        n,
                        true,
                        (&p[i0 * b..], 1, b),
                        (p, b, 1),
                        -1.0,
                        SEQ,
                    );
                });
        }
        k0 = k1;
    }
    for i in 0..n {
        a[i * n + i + 1..(i + 1) * n]
            .iter_mut()
            .for_each(|x| *x = 0.0);
    }
    Ok(())
}

/// Inverse of a lower-triangular `l` with a non-zero diagonal (itself lower triangular).
///
/// By block rows (docs/algorithms.md §9): `X_ii = L_ii⁻¹` and, for the columns left of it,
/// `X_{i,<i} = −X_ii·(L_{i,<i}·X_{<i,<i})`, a column block at a time (in parallel) over only the
/// rows where `X` is non-zero.
pub fn lower_triangular_inverse(l: &[f64], n: usize) -> Vec<f64> {
    use rayon::prelude::*;
    let mut x = vec![0.0; n * n];
    let mut r0 = 0;
    while r0 < n {
        let r1 = (r0 + NB).min(n);
        let b = r1 - r0;
        let xii = lower_inverse_block(l, n, r0 * n + r0, b);
        let xr = &x;
        let blocks: Vec<(usize, Vec<f64>)> = (0..r0.div_ceil(NB))
            .into_par_iter()
            .map(|cb| {
                let (c0, c1) = (cb * NB, ((cb + 1) * NB).min(r0));
                let w = c1 - c0;
                // T = L[r, c0..r0]·X[c0..r0, c0..c1] (X is zero above row c0 in these columns).
                let mut t = vec![0.0; b * w];
                let ll = &l[r0 * n + c0..];
                let xc = (&xr[c0 * n + c0..], 1, n);
                gemm((b, w, r0 - c0), &mut t, w, true, (ll, 1, n), xc, 1.0, SEQ);
                let mut out = vec![0.0; b * w];
                gemm(
                    (b, w, b),
                    &mut out,
                    w,
                    true,
                    (&xii, 1, b),
                    (&t, 1, w),
                    -1.0,
                    SEQ,
                );
                (c0, out)
            })
            .collect();
        for (c0, out) in blocks {
            let w = out.len() / b;
            for i in 0..b {
                x[(r0 + i) * n + c0..(r0 + i) * n + c0 + w]
                    .copy_from_slice(&out[i * w..(i + 1) * w]);
            }
        }
        for i in 0..b {
            x[(r0 + i) * n + r0..(r0 + i) * n + r1].copy_from_slice(&xii[i * b..(i + 1) * b]);
        }
        r0 = r1;
    }
    x
}

/// Inverse of a general `n × n` matrix by blocked LU with partial pivoting, with the ratio of the
/// smallest to the largest pivot magnitude (`|U_jj|`, the pivots Gauss–Jordan would choose).
/// `None` if a pivot is zero or not finite.
///
/// `P·A = L·U` right-looking by `NB`-wide panels (docs/algorithms.md §9): factor the panel
/// element by element (row swaps over the whole width), solve `U₁₂ = L₁₁⁻¹·A₁₂`, update
/// `A₂₂ −= L₂₁·U₁₂` with GEMMs. Then `A⁻¹ = U⁻¹·L⁻¹·P`, the triangular inverses from
/// [`lower_triangular_inverse`] (of `L` and of `Uᵀ`). About `3n³` flops, nearly all in GEMMs,
/// where Gauss–Jordan's `2n³` stream the whole matrix through memory once per column.
pub fn lu_inverse(a: &[f64], n: usize) -> Option<(Vec<f64>, f64)> {
    use rayon::prelude::*;
    assert_eq!(
        a.len(),
        n * n,
        "matrix of {} values, expected {n}²",
        a.len()
    );
    let mut a = a.to_vec();
    let mut perm: Vec<usize> = (0..n).collect();
    let (mut pmin, mut pmax) = (f64::INFINITY, 0f64);
    let mut k0 = 0;
    while k0 < n {
        let k1 = (k0 + NB).min(n);
        let b = k1 - k0;
        for j in k0..k1 {
            let piv = (j..n).max_by(|&x, &y| a[x * n + j].abs().total_cmp(&a[y * n + j].abs()))?;
            let p = a[piv * n + j];
            if p == 0.0 || !p.is_finite() {
                return None;
            }
            pmin = pmin.min(p.abs());
            pmax = pmax.max(p.abs());
            if piv != j {
                let (lo, hi) = a.split_at_mut(piv * n);
                lo[j * n..(j + 1) * n].swap_with_slice(&mut hi[..n]);
                perm.swap(j, piv);
            }
            let (top, rest) = a.split_at_mut((j + 1) * n);
            let pivot_row = &top[j * n + j + 1..j * n + k1];
            for row in rest.chunks_exact_mut(n) {
                let f = row[j] / p;
                row[j] = f;
                if f != 0.0 {
                    for (x, &u) in row[j + 1..k1].iter_mut().zip(pivot_row) {
                        *x -= f * u;
                    }
                }
            }
        }
        let m = n - k1;
        if m > 0 {
            // U₁₂ = L₁₁⁻¹·A₁₂ (L₁₁ unit lower triangular).
            let mut l11 = vec![0.0; b * b];
            for i in 0..b {
                l11[i * b..i * b + i].copy_from_slice(&a[(k0 + i) * n + k0..(k0 + i) * n + k0 + i]);
                l11[i * b + i] = 1.0;
            }
            let l11inv = lower_triangular_inverse(&l11, b);
            let u12 = product(
                (b, m, b),
                (&l11inv, 1, b),
                (&a[k0 * n + k1..], 1, n),
                1.0,
                SEQ,
            );
            for i in 0..b {
                a[(k0 + i) * n + k1..(k0 + i + 1) * n].copy_from_slice(&u12[i * m..(i + 1) * m]);
            }
            // A₂₂ −= L₂₁·U₁₂, a block of rows per task.
            let l21: Vec<f64> = (k1..n)
                .flat_map(|i| a[i * n + k0..i * n + k1].iter().copied())
                .collect();
            let (l21, u12) = (&l21, &u12);
            a[k1 * n..]
                .par_chunks_mut(NB * n)
                .enumerate()
                .for_each(|(s, rows)| {
                    let mr = rows.len() / n;
                    gemm(
                        (mr, m, b),
                        &mut rows[k1..],
                        n,
                        true,
                        (&l21[s * NB * b..], 1, b),
                        (u12, 1, m),
                        -1.0,
                        SEQ,
                    );
                });
        }
        k0 = k1;
    }
    // L (unit diagonal) and Uᵀ, both lower triangular.
    let mut l = vec![0.0; n * n];
    let mut ut = vec![0.0; n * n];
    for i in 0..n {
        l[i * n..i * n + i].copy_from_slice(&a[i * n..i * n + i]);
        l[i * n + i] = 1.0;
        for j in i..n {
            ut[j * n + i] = a[i * n + j];
        }
    }
    let linv = lower_triangular_inverse(&l, n);
    let utinv = lower_triangular_inverse(&ut, n);
    // X = U⁻¹·L⁻¹ = (Uᵀ⁻¹)ᵀ·L⁻¹, then A⁻¹ = X·P: column i of X is column perm[i] of A⁻¹.
    let par = Parallelism::Rayon(rayon::current_num_threads());
    let x = product((n, n, n), (&utinv, n, 1), (&linv, 1, n), 1.0, par);
    let mut inv = vec![0.0; n * n];
    for (dst, src) in inv.chunks_exact_mut(n).zip(x.chunks_exact(n)) {
        for (i, &v) in src.iter().enumerate() {
            dst[perm[i]] = v;
        }
    }
    Some((inv, if pmax > 0.0 { pmin / pmax } else { 0.0 }))
}

/// The upper-triangular `U` with `H⁻¹ = Uᵀ·U` (GPTQ's "Cholesky of the inverse", §4.3), from one
/// Cholesky factorisation: with `J` the reversal permutation, `J·H·J = L'·L'ᵀ` gives
/// `H⁻¹ = J·L'⁻ᵀ·L'⁻¹·J = Uᵀ·U` for `U = J·L'⁻¹·J`, which is upper triangular with a positive
/// diagonal — the unique such factor. Fails with the column (of `H`) where positivity is lost.
pub fn upper_cholesky_of_inverse(h: &[f64], n: usize) -> Result<Vec<f64>, usize> {
    upper_cholesky_of_inverse_shifted(h.to_vec(), n, &[0.0]).map(|(u, _)| u)
}

/// [`upper_cholesky_of_inverse`] of `H + δ·I` for the first `δ` of `shifts` at which that is
/// positive definite (GPTQ's dampening), in `H`'s own buffer and one more of its size. Each shift
/// is added to the diagonal as its difference from the one before (`(h + δ₀) + (δ₁ − δ₀)`, …).
/// Returns the factor and the index of the shift used; fails with the column where positivity is
/// lost at the last shift.
///
/// In row-major storage `J·H·J` is `H` reversed, and so is `U` of `L'⁻¹`. A failed
/// factorisation has overwritten the lower triangle and, inside the `NB × NB` diagonal blocks,
/// part of the upper one (the trailing updates run a block row up to its diagonal); the strict
/// upper triangle outside those blocks is still `H`'s, so keeping the diagonal blocks and the
/// running diagonal is enough to start again.
pub fn upper_cholesky_of_inverse_shifted(
    mut h: Vec<f64>,
    n: usize,
    shifts: &[f64],
) -> Result<(Vec<f64>, usize), usize> {
    assert_eq!(
        h.len(),
        n * n,
        "matrix of {} values, expected {n}²",
        h.len()
    );
    h.reverse();
    let blocks: Vec<(usize, usize)> = (0..n)
        .step_by(NB)
        .map(|k0| (k0, (k0 + NB).min(n)))
        .collect();
    let saved: Vec<f64> = if shifts.len() > 1 {
        blocks
            .iter()
            .flat_map(|&(k0, k1)| (k0..k1).flat_map(move |i| i * n + k0..i * n + k1))
            .map(|k| h[k])
            .collect()
    } else {
        Vec::new()
    };
    let mut diag: Vec<f64> = (0..n).map(|i| h[i * n + i]).collect();
    let (mut added, mut failed) = (0.0, 0);
    for (attempt, &d) in shifts.iter().enumerate() {
        if attempt > 0 {
            let mut it = saved.iter();
            for &(k0, k1) in &blocks {
                for i in k0..k1 {
                    for (x, s) in h[i * n + k0..i * n + k1].iter_mut().zip(&mut it) {
                        *x = *s;
                    }
                }
            }
            for i in 0..n {
                for j in 0..i / NB * NB {
                    h[i * n + j] = h[j * n + i];
                }
            }
        }
        for (i, di) in diag.iter_mut().enumerate() {
            *di += d - added;
            h[i * n + i] = *di;
        }
        added = d;
        match cholesky_lower(&mut h, n) {
            Ok(()) => {
                let mut u = lower_triangular_inverse(&h, n);
                drop(h);
                u.reverse();
                return Ok((u, attempt));
            }
            Err(j) => failed = n - 1 - j,
        }
    }
    Err(failed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_orthogonal_is_orthogonal() {
        let mut rng = Rng::new(3);
        for n in [1, 2, 9, 43, 64] {
            let q = random_orthogonal(n, &mut rng);
            assert!(orthogonality_error(&q, n) < 1e-12, "n = {n}");
        }
    }

    #[test]
    fn upper_factor_of_the_inverse() {
        let mut rng = Rng::new(5);
        let mm = |a: &[f64], b: &[f64], n: usize| -> Vec<f64> {
            let mut c = vec![0.0; n * n];
            for i in 0..n {
                for k in 0..n {
                    for j in 0..n {
                        c[i * n + j] += a[i * n + k] * b[k * n + j];
                    }
                }
            }
            c
        };
        // Sizes within one panel, across one panel boundary and across several (NB = 128).
        for n in [1, 3, 17, 130, 300] {
            // H = A·Aᵀ + n·I: symmetric positive definite, condition number ≈ 5.
            let a: Vec<f64> = (0..n * n).map(|_| rng.normal()).collect();
            let mut h = mm(&a, &transpose(&a, n), n);
            for i in 0..n {
                h[i * n + i] += n as f64;
            }
            let u = upper_cholesky_of_inverse(&h, n).unwrap();
            for i in 0..n {
                for j in 0..i {
                    assert_eq!(u[i * n + j], 0.0);
                }
                assert!(u[i * n + i] > 0.0);
            }
            // Uᵀ·U·H = I, to f64 rounding times n and the condition number.
            let p = mm(&mm(&transpose(&u, n), &u, n), &h, n);
            let err = (0..n * n)
                .map(|k| (p[k] - if k % (n + 1) == 0 { 1.0 } else { 0.0 }).abs())
                .fold(0.0, f64::max);
            assert!(err < 1e-10, "n = {n}: {err}");
            // The factor and the triangular inverse on their own: L·Lᵀ = H and L·L⁻¹ = I.
            let mut l = h.clone();
            cholesky_lower(&mut l, n).unwrap();
            let llt = mm(&l, &transpose(&l, n), n);
            let scale = h.iter().fold(0.0f64, |m, v| m.max(v.abs()));
            let err = (0..n * n)
                .map(|k| (llt[k] - h[k]).abs())
                .fold(0.0, f64::max);
            assert!(err < 1e-12 * scale * n as f64, "n = {n}: L·Lᵀ off by {err}");
            let li = mm(&l, &lower_triangular_inverse(&l, n), n);
            let err = (0..n * n)
                .map(|k| (li[k] - if k % (n + 1) == 0 { 1.0 } else { 0.0 }).abs())
                .fold(0.0, f64::max);
            assert!(err < 1e-10, "n = {n}: L·L⁻¹ off by {err}");
        }
        // A failing pivot is reported by its column, also beyond the first panel.
        let n = 200;
        let mut bad: Vec<f64> = identity(n);
        bad[150 * n + 150] = -1.0;
        assert_eq!(cholesky_lower(&mut bad, n), Err(150));
        let singular = [1.0, 1.0, 1.0, 1.0];
        assert!(upper_cholesky_of_inverse(&singular, 2).is_err());
    }

    /// After failed attempts the shifted factorisation starts again from the matrix it was given
    /// (its lower triangle and diagonal blocks overwritten in between): the factor equals, bit for
    /// bit, that of a fresh copy carrying the same running diagonal.
    #[test]
    fn shifted_factor_starts_again_from_the_matrix() {
        let mut rng = Rng::new(9);
        for n in [5, 130, 300] {
            // H = A·Aᵀ − I with A of rank n/2: eigenvalues −1 (n/2 times) and above.
            let k = n / 2;
            let a: Vec<f64> = (0..n * k).map(|_| rng.normal()).collect();
            let mut h = vec![0.0; n * n];
            for i in 0..n {
                for j in 0..n {
                    h[i * n + j] = (0..k).map(|t| a[i * k + t] * a[j * k + t]).sum();
                }
                h[i * n + i] -= 1.0;
            }
            let shifts = [0.0, 0.5, 0.75, 2.0];
            let (u, used) = upper_cholesky_of_inverse_shifted(h.clone(), n, &shifts).unwrap();
            assert_eq!(used, 3, "n = {n}");
            let mut fresh = h.clone();
            for i in 0..n {
                let mut d = h[i * n + i];
                let mut added = 0.0;
                for s in shifts {
                    d += s - added;
                    added = s;
                }
                fresh[i * n + i] = d;
            }
            assert_eq!(u, upper_cholesky_of_inverse(&fresh, n).unwrap(), "n = {n}");
            assert!(upper_cholesky_of_inverse_shifted(h, n, &shifts[..3]).is_err());
        }
    }
}

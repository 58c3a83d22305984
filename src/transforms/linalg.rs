//! Small dense linear algebra in f64 (candle has none): orthogonal matrices for rotations.
//! Matrices are row-major `Vec<f64>` of size `n × n`.

use crate::rng::Rng;

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

/// Lower Cholesky factor `L` of a symmetric positive definite `a` (`a = L·Lᵀ`), in place (the
/// upper triangle is zeroed). Fails with the first column whose pivot is not positive.
pub fn cholesky_lower(a: &mut [f64], n: usize) -> Result<(), usize> {
    use rayon::prelude::*;
    for j in 0..n {
        let (head, tail) = a.split_at_mut((j + 1) * n);
        let row_j = &mut head[j * n..];
        let d = row_j[j] - row_j[..j].iter().map(|x| x * x).sum::<f64>();
        if !(d > 0.0 && d.is_finite()) {
            return Err(j);
        }
        let d = d.sqrt();
        row_j[j] = d;
        row_j[j + 1..].iter_mut().for_each(|x| *x = 0.0);
        let row_j = &head[j * n..j * n + j];
        // L[i][j] = (a[i][j] − Σ_k<j L[i][k]·L[j][k]) / L[j][j] for every row below.
        tail.par_chunks_mut(n).for_each(|row_i| {
            let dot: f64 = row_i[..j].iter().zip(row_j).map(|(a, b)| a * b).sum();
            row_i[j] = (row_i[j] - dot) / d;
        });
    }
    Ok(())
}

/// Inverse of a lower-triangular `l` with a positive diagonal (itself lower triangular).
pub fn lower_triangular_inverse(l: &[f64], n: usize) -> Vec<f64> {
    use rayon::prelude::*;
    // Column j of X = L⁻¹ solves L·x = e_j by forward substitution; x[i] = 0 for i < j.
    // Columns are independent: solve them in parallel, then transpose into place.
    let cols: Vec<Vec<f64>> = (0..n)
        .into_par_iter()
        .map(|j| {
            let mut x = vec![0.0; n];
            x[j] = 1.0 / l[j * n + j];
            for i in j + 1..n {
                let row = &l[i * n..i * n + i];
                let s: f64 = row[j..i].iter().zip(&x[j..i]).map(|(a, b)| a * b).sum();
                x[i] = -s / l[i * n + i];
            }
            x
        })
        .collect();
    let mut out = vec![0.0; n * n];
    for (j, c) in cols.iter().enumerate() {
        for i in j..n {
            out[i * n + j] = c[i];
        }
    }
    out
}

/// The upper-triangular `U` with `H⁻¹ = Uᵀ·U` (GPTQ's "Cholesky of the inverse", §4.3), from one
/// Cholesky factorisation: with `J` the reversal permutation, `J·H·J = L'·L'ᵀ` gives
/// `H⁻¹ = J·L'⁻ᵀ·L'⁻¹·J = Uᵀ·U` for `U = J·L'⁻¹·J`, which is upper triangular with a positive
/// diagonal — the unique such factor. Fails with the column (of `H`) where positivity is lost.
pub fn upper_cholesky_of_inverse(h: &[f64], n: usize) -> Result<Vec<f64>, usize> {
    let mut r = vec![0.0; n * n];
    for i in 0..n {
        for j in 0..n {
            r[i * n + j] = h[(n - 1 - i) * n + (n - 1 - j)];
        }
    }
    cholesky_lower(&mut r, n).map_err(|j| n - 1 - j)?;
    let li = lower_triangular_inverse(&r, n);
    let mut u = vec![0.0; n * n];
    for i in 0..n {
        for j in 0..n {
            u[i * n + j] = li[(n - 1 - i) * n + (n - 1 - j)];
        }
    }
    Ok(u)
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
        for n in [1, 3, 17, 130] {
            // H = A·Aᵀ + n·I: symmetric positive definite.
            let a: Vec<f64> = (0..n * n).map(|_| rng.normal()).collect();
            let mut h = vec![0.0; n * n];
            for i in 0..n {
                for j in 0..n {
                    h[i * n + j] = (0..n).map(|k| a[i * n + k] * a[j * n + k]).sum::<f64>()
                        + if i == j { n as f64 } else { 0.0 };
                }
            }
            let u = upper_cholesky_of_inverse(&h, n).unwrap();
            for i in 0..n {
                for j in 0..i {
                    assert_eq!(u[i * n + j], 0.0);
                }
                assert!(u[i * n + i] > 0.0);
            }
            // Uᵀ·U·H = I.
            let mut err: f64 = 0.0;
            for i in 0..n {
                for j in 0..n {
                    let mut s = 0.0;
                    for k in 0..n {
                        let utu: f64 = (0..n).map(|m| u[m * n + i] * u[m * n + k]).sum();
                        s += utu * h[k * n + j];
                    }
                    err = err.max((s - if i == j { 1.0 } else { 0.0 }).abs());
                }
            }
            assert!(err < 1e-10, "n = {n}: {err}");
        }
        let singular = [1.0, 1.0, 1.0, 1.0];
        assert!(upper_cholesky_of_inverse(&singular, 2).is_err());
    }
}

//! Matrix inverse (candle has none): partial pivoting in f64 (Gauss–Jordan, or blocked LU for
//! matrices larger than one panel), as a differentiable candle op. For `Y = A⁻¹` and upstream
//! gradient `G`, `∂L/∂A = −Yᵀ·G·Yᵀ`.

use crate::error::{Error, Result};
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};

/// Inverse of the row-major `n × n` matrix `a`, with the ratio of the smallest to the largest pivot
/// magnitude (a cheap conditioning indicator: near 0 means near-singular). `None` if singular.
///
/// Up to one panel (`n ≤ 128`: FlatQuant's Kronecker factors, per-head matrices) by Gauss–Jordan
/// elimination; above it (AffineQuant's dense `d × d` norm matrices) by the blocked LU of
/// [`super::linalg::lu_inverse`], whose GEMMs keep the matrix in cache. Both pivot the same way.
pub fn inverse_f64(a: &[f64], n: usize) -> Option<(Vec<f64>, f64)> {
    if n > super::linalg::NB {
        super::linalg::lu_inverse(a, n)
    } else {
        gauss_jordan(a, n)
    }
}

/// Gauss–Jordan elimination with partial pivoting (the `n ≤ 128` case of [`inverse_f64`]).
pub fn gauss_jordan(a: &[f64], n: usize) -> Option<(Vec<f64>, f64)> {
    let mut m = a.to_vec();
    let mut inv = super::linalg::identity(n);
    let (mut pmin, mut pmax) = (f64::INFINITY, 0f64);
    for col in 0..n {
        let piv =
            (col..n).max_by(|&i, &j| m[i * n + col].abs().total_cmp(&m[j * n + col].abs()))?;
        let p = m[piv * n + col];
        if p == 0.0 || !p.is_finite() {
            return None;
        }
        pmin = pmin.min(p.abs());
        pmax = pmax.max(p.abs());
        if piv != col {
            for k in 0..n {
                m.swap(piv * n + k, col * n + k);
                inv.swap(piv * n + k, col * n + k);
            }
        }
        let r = 1.0 / p;
        for k in 0..n {
            m[col * n + k] *= r;
            inv[col * n + k] *= r;
        }
        for i in 0..n {
            if i != col {
                let f = m[i * n + col];
                if f != 0.0 {
                    for k in 0..n {
                        m[i * n + k] -= f * m[col * n + k];
                        inv[i * n + k] -= f * inv[col * n + k];
                    }
                }
            }
        }
    }
    Some((inv, if pmax > 0.0 { pmin / pmax } else { 0.0 }))
}

struct Inverse;

impl CustomOp1 for Inverse {
    fn name(&self) -> &'static str {
        "affq-inverse"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, m) = l.shape().dims2()?;
        if n != m {
            candle_core::bail!("inverse of a non-square {n}×{m} matrix");
        }
        let (a, b) = l
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("inverse: input must be contiguous".into()))?;
        let x: Vec<f64> = s.as_slice::<f32>()?[a..b]
            .iter()
            .map(|&v| v as f64)
            .collect();
        let (inv, _) = inverse_f64(&x, n)
            .ok_or_else(|| candle_core::Error::Msg("inverse: matrix is singular".into()))?;
        Ok((
            CpuStorage::F32(inv.iter().map(|&v| v as f32).collect()),
            l.shape().clone(),
        ))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let yt = res.t()?;
        Ok(Some(yt.matmul(grad)?.matmul(&yt)?.neg()?))
    }
}

/// Differentiable `A⁻¹` of a square f32 matrix.
pub fn inverse(a: &Tensor) -> Result<Tensor> {
    a.contiguous()?
        .apply_op1(Inverse)
        .map_err(|e| Error::Runtime(format!("matrix inverse: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn inverse_times_matrix_is_identity() {
        let mut rng = crate::rng::Rng::new(5);
        for n in [1, 3, 24, 48] {
            let a: Vec<f64> = (0..n * n)
                .map(|i| rng.normal() + if i % (n + 1) == 0 { 3.0 } else { 0.0 })
                .collect();
            let (inv, ratio) = inverse_f64(&a, n).unwrap();
            assert!(ratio > 0.0);
            for i in 0..n {
                for j in 0..n {
                    let v: f64 = (0..n).map(|k| a[i * n + k] * inv[k * n + j]).sum();
                    assert!((v - if i == j { 1.0 } else { 0.0 }).abs() < 1e-10);
                }
            }
        }
        assert!(inverse_f64(&[1.0, 2.0, 2.0, 4.0], 2).is_none());
    }

    #[test]
    fn blocked_lu_inverse_matches_gauss_jordan() {
        // Sizes across the 128-wide panels (one, several, a ragged last one); rows scaled so
        // that partial pivoting reorders them. Both are backward stable: entries agree to
        // ~n·ε·cond relative to the largest, and the pivot ratios (same pivots) to rounding.
        let mut rng = crate::rng::Rng::new(11);
        for n in [1, 5, 128, 129, 300, 576] {
            let a: Vec<f64> = (0..n * n)
                .map(|i| rng.normal() * (1.0 + (i / n % 7) as f64))
                .collect();
            let (gj, rg) = gauss_jordan(&a, n).unwrap();
            let (lu, rl) = crate::transforms::linalg::lu_inverse(&a, n).unwrap();
            let big = gj.iter().fold(0f64, |m, v| m.max(v.abs()));
            let err = gj
                .iter()
                .zip(&lu)
                .fold(0f64, |m, (x, y)| m.max((x - y).abs()));
            assert!(
                err <= 1e-9 * big,
                "n = {n}: max |GJ − LU| = {err:e} (largest {big:e})"
            );
            assert!(
                (rg - rl).abs() <= 1e-9 * rg,
                "n = {n}: pivot ratio {rg} vs {rl}"
            );
            for i in (0..n).step_by(n.div_ceil(7)) {
                for j in 0..n {
                    let v: f64 = (0..n).map(|k| a[i * n + k] * lu[k * n + j]).sum();
                    assert!(
                        (v - if i == j { 1.0 } else { 0.0 }).abs() < 1e-9,
                        "n = {n}: (A·A⁻¹)[{i},{j}] = {v}"
                    );
                }
            }
        }
        let mut singular = vec![0.0; 200 * 200];
        for i in 0..200 {
            singular[i * 200 + i] = 1.0;
        }
        singular[199 * 200 + 199] = 0.0;
        assert!(crate::transforms::linalg::lu_inverse(&singular, 200).is_none());
    }

    #[test]
    fn inverse_gradient_matches_finite_differences() {
        // L = Σ W ⊙ A⁻¹ for a fixed random W; compare ∂L/∂A with central differences in f64.
        let n = 4;
        let a0: Vec<f32> = vec![
            2.0, 0.3, -0.1, 0.5, 0.2, 1.5, 0.4, -0.3, 0.1, -0.2, 1.8, 0.6, 0.3, 0.1, -0.4, 2.2,
        ];
        let w: Vec<f32> = (0..16)
            .map(|i| ((i * 37 % 11) as f32 - 5.0) / 5.0)
            .collect();
        let wt = Tensor::from_vec(w.clone(), (n, n), &Device::Cpu).unwrap();
        let a =
            Var::from_tensor(&Tensor::from_vec(a0.clone(), (n, n), &Device::Cpu).unwrap()).unwrap();
        let loss = (inverse(a.as_tensor()).unwrap() * &wt)
            .unwrap()
            .sum_all()
            .unwrap();
        let g: Vec<f32> = loss
            .backward()
            .unwrap()
            .get(a.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let f = |a: &[f64]| -> f64 {
            let (inv, _) = inverse_f64(a, n).unwrap();
            inv.iter().zip(&w).map(|(x, &y)| x * y as f64).sum()
        };
        let base: Vec<f64> = a0.iter().map(|&x| x as f64).collect();
        for i in 0..16 {
            let h = 1e-6;
            let (mut p, mut m) = (base.clone(), base.clone());
            p[i] += h;
            m[i] -= h;
            let fd = (f(&p) - f(&m)) / (2.0 * h);
            // f32 forward/backward against an f64 central difference.
            assert!(
                (g[i] as f64 - fd).abs() < 1e-4 * (1.0 + fd.abs()),
                "entry {i}: {} vs {fd}",
                g[i]
            );
        }
    }
}

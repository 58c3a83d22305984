//! The online transform `x ↦ x·diag(c)·(P1⊗P2)` (algorithms.md §0, §2.1).
//!
//! With `x` viewed as `X` `[n1, n2]` (feature `k = i·n2 + j`), `x·(P1⊗P2) = vec(P1ᵀ·X·P2)`: two small
//! matmuls, never the `n × n` matrix. Either factor may be absent (identity), which also expresses
//! a full `n × n` matrix (`n1 = 1`) or a head-mixing `P⊗I`.

use crate::error::{Error, Result};
use candle_core::{Device, Tensor};

#[derive(Clone)]
pub struct KroneckerTransform {
    pub n1: usize,
    pub n2: usize,
    /// `[n1, n1]`; `None` = identity.
    pub p1: Option<Tensor>,
    /// `[n2, n2]`; `None` = identity.
    pub p2: Option<Tensor>,
    /// Per-channel scale `c` `[n]`, applied first; `None` = ones.
    pub scale: Option<Tensor>,
}

fn to_tensor(m: &[f64], n: usize) -> Result<Tensor> {
    Ok(Tensor::from_vec(
        m.iter().map(|&x| x as f32).collect::<Vec<f32>>(),
        (n, n),
        &Device::Cpu,
    )?)
}

fn to_f64(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.flatten_all()?
        .to_vec1::<f32>()?
        .into_iter()
        .map(f64::from)
        .collect())
}

impl KroneckerTransform {
    pub fn new(n1: usize, p1: Option<&[f64]>, n2: usize, p2: Option<&[f64]>) -> Result<Self> {
        Ok(KroneckerTransform {
            n1,
            n2,
            p1: p1.map(|m| to_tensor(m, n1)).transpose()?,
            p2: p2.map(|m| to_tensor(m, n2)).transpose()?,
            scale: None,
        })
    }

    pub fn dim(&self) -> usize {
        self.n1 * self.n2
    }

    /// `x` `[..., n]` ↦ `x·diag(c)·(P1⊗P2)`.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let n = *dims.last().unwrap();
        if n != self.dim() {
            return Err(Error::Runtime(format!(
                "transform of size {} applied to {n} features",
                self.dim()
            )));
        }
        let rows = x.elem_count() / n;
        let mut y = match &self.scale {
            Some(c) => x.broadcast_mul(c)?,
            None => x.clone(),
        };
        if let Some(p2) = &self.p2 {
            y = y.reshape((rows * self.n1, self.n2))?.matmul(p2)?;
        }
        if let Some(p1) = &self.p1 {
            // P1ᵀ·X for each row: (Xᵀ·P1)ᵀ.
            let xt = y.reshape((rows, self.n1, self.n2))?.transpose(1, 2)?;
            y = xt.broadcast_matmul(p1)?.transpose(1, 2)?;
        }
        Ok(y.contiguous()?.reshape(dims)?)
    }

    /// The dense `n × n` matrix `T = diag(c)·(P1⊗P2)` in f64 (`x ↦ x·T`), for merging into weights.
    pub fn dense(&self) -> Result<Vec<f64>> {
        let p1 = match &self.p1 {
            Some(p) => to_f64(p)?,
            None => super::linalg::identity(self.n1),
        };
        let p2 = match &self.p2 {
            Some(p) => to_f64(p)?,
            None => super::linalg::identity(self.n2),
        };
        let mut t = super::linalg::kron(&p1, self.n1, &p2, self.n2);
        if let Some(c) = &self.scale {
            let n = self.dim();
            for (i, ci) in to_f64(c)?.into_iter().enumerate() {
                t[i * n..(i + 1) * n].iter_mut().for_each(|v| *v *= ci);
            }
        }
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;
    use crate::transforms::linalg::random_orthogonal;

    #[test]
    fn kronecker_apply_equals_dense_matmul() {
        let mut rng = Rng::new(1);
        let (n1, n2) = (3, 5);
        let p1 = random_orthogonal(n1, &mut rng);
        let p2 = random_orthogonal(n2, &mut rng);
        let mut t = KroneckerTransform::new(n1, Some(&p1), n2, Some(&p2)).unwrap();
        t.scale = Some(
            Tensor::from_vec(
                (0..15).map(|i| 0.5 + i as f32 / 10.0).collect::<Vec<_>>(),
                15,
                &Device::Cpu,
            )
            .unwrap(),
        );
        let x = Tensor::randn(0f32, 1.0, (2, 4, 15), &Device::Cpu).unwrap();
        let a = t.apply(&x).unwrap();
        let dense = to_tensor(&t.dense().unwrap(), 15).unwrap();
        let b = x
            .reshape((8, 15))
            .unwrap()
            .matmul(&dense)
            .unwrap()
            .reshape((2, 4, 15))
            .unwrap();
        let d = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d < 1e-5, "{d}");
    }
}

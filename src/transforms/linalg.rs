//! Small dense linear algebra in f64 (candle has none): orthogonal matrices for rotations.
//! Matrices are row-major `Vec<f64>` of size `n × n`.

/// SplitMix64: a small, seedable, platform-independent generator (determinism across machines).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in (0, 1).
    pub fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let (u, v) = (self.uniform(), self.uniform());
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }
    pub fn sign(&mut self) -> f64 {
        if self.next_u64() & 1 == 0 {
            1.0
        } else {
            -1.0
        }
    }
}

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
}

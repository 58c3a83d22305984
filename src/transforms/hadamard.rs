//! Hadamard matrices of order `n = 2^m · K` (algorithms.md §4.2): Sylvester for the power of two,
//! Paley I (`K = q + 1`, `q ≡ 3 mod 4` prime) and Paley II (`K = 2(q + 1)`, `q ≡ 1 mod 4` prime) for
//! the odd part, combined by a Kronecker product. Entries are ±1; divide by √n to normalise.

fn is_prime(q: usize) -> bool {
    q >= 2
        && (2..)
            .take_while(|d| d * d <= q)
            .all(|d| !q.is_multiple_of(d))
}

fn legendre(a: i64, q: i64) -> f64 {
    let a = a.rem_euclid(q);
    if a == 0 {
        return 0.0;
    }
    // Euler's criterion: a^((q−1)/2) mod q.
    let (mut r, mut b, mut e) = (1i64, a, (q - 1) / 2);
    while e > 0 {
        if e & 1 == 1 {
            r = r * b % q;
        }
        b = b * b % q;
        e >>= 1;
    }
    if r == 1 {
        1.0
    } else {
        -1.0
    }
}

fn sylvester(n: usize) -> Vec<f64> {
    let mut h = vec![1.0];
    let mut k = 1;
    while k < n {
        let mut nh = vec![0.0; 4 * k * k];
        for i in 0..k {
            for j in 0..k {
                let v = h[i * k + j];
                nh[i * 2 * k + j] = v;
                nh[i * 2 * k + j + k] = v;
                nh[(i + k) * 2 * k + j] = v;
                nh[(i + k) * 2 * k + j + k] = -v;
            }
        }
        h = nh;
        k *= 2;
    }
    h
}

/// Paley construction of order `k`, if one applies.
fn paley(k: usize) -> Option<Vec<f64>> {
    if k >= 4 && is_prime(k - 1) && (k - 1) % 4 == 3 {
        // Paley I: S = [[0, 1ᵀ], [−1, J]], H = S + I, J[i][j] = χ(j − i).
        let q = k - 1;
        let mut h = vec![0.0; k * k];
        for j in 1..k {
            h[j] = 1.0;
            h[j * k] = -1.0;
        }
        for i in 0..q {
            for j in 0..q {
                h[(i + 1) * k + j + 1] = legendre(j as i64 - i as i64, q as i64);
            }
        }
        for i in 0..k {
            h[i * k + i] += 1.0;
        }
        return Some(h);
    }
    if k >= 12 && k.is_multiple_of(2) && is_prime(k / 2 - 1) && (k / 2 - 1) % 4 == 1 {
        // Paley II: C = [[0, 1ᵀ], [1, J]], H = C ⊗ [[1, 1], [1, −1]] + I ⊗ [[1, −1], [−1, −1]].
        let q = k / 2 - 1;
        let m = q + 1;
        let mut c = vec![0.0; m * m];
        for j in 1..m {
            c[j] = 1.0;
            c[j * m] = 1.0;
        }
        for i in 0..q {
            for j in 0..q {
                c[(i + 1) * m + j + 1] = legendre(j as i64 - i as i64, q as i64);
            }
        }
        let a = super::linalg::kron(&c, m, &[1.0, 1.0, 1.0, -1.0], 2);
        let b = super::linalg::kron(&super::linalg::identity(m), m, &[1.0, -1.0, -1.0, -1.0], 2);
        return Some(a.iter().zip(&b).map(|(x, y)| x + y).collect());
    }
    None
}

/// A ±1 Hadamard matrix of order `n` as `(H_K, K, H_{2^m}, 2^m)` with `H_n = H_K ⊗ H_{2^m}`, or
/// `None` when no construction here covers `n`.
pub fn hadamard_factors(n: usize) -> Option<(Vec<f64>, usize, Vec<f64>, usize)> {
    if n == 0 {
        return None;
    }
    let mut p = 1;
    while n.is_multiple_of(p * 2) {
        p *= 2;
    }
    // Try the largest power of two first, moving factors of two into K as needed (e.g. 12 = 3·4).
    let mut pow = p;
    loop {
        let k = n / pow;
        let hk = if k == 1 { Some(vec![1.0]) } else { paley(k) };
        if let Some(hk) = hk {
            return Some((hk, k, sylvester(pow), pow));
        }
        if pow == 1 {
            return None;
        }
        pow /= 2;
    }
}

/// The ±1 Hadamard matrix of order `n`, if constructible.
pub fn hadamard(n: usize) -> Option<Vec<f64>> {
    let (hk, k, hp, p) = hadamard_factors(n)?;
    Some(super::linalg::kron(&hk, k, &hp, p))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(h: &[f64], n: usize) {
        for i in 0..n {
            for j in 0..n {
                let d: f64 = (0..n).map(|k| h[i * n + k] * h[j * n + k]).sum();
                assert_eq!(
                    d,
                    if i == j { n as f64 } else { 0.0 },
                    "order {n} rows {i},{j}"
                );
            }
        }
    }

    #[test]
    fn orders_used_by_test_models_and_common_llms() {
        for n in [1, 2, 8, 12, 20, 28, 36, 64, 576, 1536, 60, 108, 140, 40] {
            let h = hadamard(n).unwrap_or_else(|| panic!("no Hadamard of order {n}"));
            check(&h, n);
        }
        assert!(hadamard(9).is_none());
        assert!(hadamard(172).is_none());
    }
}

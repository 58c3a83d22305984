//! Vectorizable elementwise math, compiled for AVX-512 and AVX2 as well as the baseline and
//! picked at run time.

/// `e^x` for f32 with relative error below 3e-7 over the normal range (Cephes `expf` scheme):
/// `x = n·ln2 + r`, `|r| ≤ ln2/2`, `e^r` by a degree-6 polynomial, `2^n` through exponent bits.
/// Inputs below −87.3 (and −∞) give 0, as masked softmax scores need.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5·2^23: adding and subtracting it rounds to the nearest integer (ties to even) without a
    // libm call, so the loop vectorizes.
    const ROUND: f32 = 12_582_912.0;
    let xc = x.clamp(-87.3, 88.7);
    let n = (xc * LOG2E + ROUND) - ROUND;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_1e-4f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    let bits = ((n as i32 + 127) as u32) << 23;
    let v = e * f32::from_bits(bits);
    if x < -87.3 {
        0.0
    } else {
        v
    }
}

/// Maximum of a slice (−∞ for an empty one), with independent lanes so it vectorizes.
#[inline(always)]
fn max_generic(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 16];
    let mut chunks = xs.chunks_exact(16);
    for c in &mut chunks {
        for i in 0..16 {
            acc[i] = if c[i] > acc[i] { c[i] } else { acc[i] };
        }
    }
    let mut m = f32::NEG_INFINITY;
    for &x in chunks.remainder().iter().chain(acc.iter()) {
        m = if x > m { x } else { m };
    }
    m
}

/// In place `x ← e^(x − max)`; returns the sum of the new values.
#[inline(always)]
fn softmax_unnormalized_generic(xs: &mut [f32]) -> f32 {
    let m = max_generic(xs);
    let mut acc = [0f32; 16];
    let mut chunks = xs.chunks_exact_mut(16);
    for c in &mut chunks {
        for i in 0..16 {
            let e = exp(c[i] - m);
            c[i] = e;
            acc[i] += e;
        }
    }
    let mut s = 0f32;
    for x in chunks.into_remainder() {
        *x = exp(*x - m);
        s += *x;
    }
    s + acc.iter().sum::<f32>()
}

/// `log Σ e^x` with f32 exponentials accumulated in f64 per 16-lane block.
#[inline(always)]
fn logsumexp_generic(xs: &[f32]) -> f64 {
    let m = max_generic(xs);
    let mut total = 0f64;
    for c in xs.chunks(1024) {
        let mut acc = [0f32; 16];
        let mut chunks = c.chunks_exact(16);
        for cc in &mut chunks {
            for i in 0..16 {
                acc[i] += exp(cc[i] - m);
            }
        }
        let mut s: f32 = chunks.remainder().iter().map(|&x| exp(x - m)).sum();
        s += acc.iter().sum::<f32>();
        total += s as f64;
    }
    m as f64 + total.ln()
}

macro_rules! dispatch {
    ($(#[$doc:meta])* $name:ident, $generic:ident, ($($arg:ident: $ty:ty),*) -> $ret:ty) => {
        $crate::fastmath::dispatch!($(#[$doc])* pub $name, $generic, ($($arg: $ty),*) -> $ret);
    };
    ($(#[$doc:meta])* $vis:vis $name:ident, $generic:ident, ($($arg:ident: $ty:ty),*) -> $ret:ty) => {
        $(#[$doc])*
        $vis fn $name($($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                unsafe fn v4($($arg: $ty),*) -> $ret { $generic($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn v3($($arg: $ty),*) -> $ret { $generic($($arg),*) }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU supports the features the function was compiled for.
                    return unsafe { v4($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                    // SAFETY: as above.
                    return unsafe { v3($($arg),*) };
                }
            }
            $generic($($arg),*)
        }
    };
}

pub(crate) use dispatch;

dispatch!(
    /// In place `x ← e^(x − max x)`; returns `Σ` of the results (the softmax denominator).
    softmax_unnormalized, softmax_unnormalized_generic, (xs: &mut [f32]) -> f32
);
dispatch!(
    /// `log Σ_i e^(x_i)`, stable.
    logsumexp, logsumexp_generic, (xs: &[f32]) -> f64
);

/// `Σ a_i b_i` in f32 over 32 FMA lanes; inlined into callers compiled for a wider ISA (a
/// function already under [`dispatch!`] calls this, others call [`dot`]).
#[inline(always)]
pub fn dot_lanes(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 32];
    let (ca, cb) = (a.chunks_exact(32), b.chunks_exact(32));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..32 {
            acc[i] = x[i].mul_add(y[i], acc[i]);
        }
    }
    acc.iter().sum::<f32>() + tail
}

dispatch!(
    /// [`dot_lanes`] compiled for the CPU's widest ISA.
    dot, dot_lanes, (a: &[f32], b: &[f32]) -> f32
);

/// `Σ w_i x_i` for 16-bit `w` widened exactly to f32, bit for bit what [`dot_lanes`] gives on
/// the widened row (each of the 32 lanes runs the same FMAs in the same order; lanes and tail
/// are summed as there), without widening the row into a buffer first: at decode the row is read
/// once from memory and converted in registers (F16C), which is what makes a matrix–vector
/// product over 16-bit weights bound by memory rather than by the conversion (docs/decode.md §6).
pub fn dot_f16(w: &[half::f16], x: &[f32]) -> f32 {
    assert_eq!(w.len(), x.len());
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
        && std::arch::is_x86_feature_detected!("f16c")
    {
        // SAFETY: the CPU has the features the function is compiled for; lengths are equal.
        return unsafe { dot_f16_f16c(w, x) };
    }
    let wide: Vec<f32> = w.iter().map(|v| v.to_f32()).collect();
    dot(&wide, x)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_f16_f16c(w: &[half::f16], x: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = w.len();
    let chunks = n / 32;
    let mut acc = [_mm256_setzero_ps(); 4];
    let (wp, xp) = (w.as_ptr() as *const __m128i, x.as_ptr());
    for c in 0..chunks {
        for (j, a) in acc.iter_mut().enumerate() {
            // SAFETY: c·32 + 8j + 8 ≤ n for both slices.
            let wv = _mm256_cvtph_ps(_mm_loadu_si128(wp.add(4 * c + j)));
            let xv = _mm256_loadu_ps(xp.add(32 * c + 8 * j));
            *a = _mm256_fmadd_ps(wv, xv, *a);
        }
    }
    let mut lanes = [0f32; 32];
    for (j, a) in acc.iter().enumerate() {
        _mm256_storeu_ps(lanes.as_mut_ptr().add(8 * j), *a);
    }
    let tail: f32 = w[chunks * 32..]
        .iter()
        .zip(&x[chunks * 32..])
        .map(|(a, b)| a.to_f32() * b)
        .sum();
    lanes.iter().sum::<f32>() + tail
}

/// Column sums of per-chunk partial vectors (each of length `n`), added in chunk order. The chunks
/// are fixed by the data, not by how rayon splits the work, so the sums are the same on any number
/// of threads; a parallel `reduce` adds in a tree shaped by work stealing, which changes from run
/// to run (even on one thread `reduce` split the work once).
pub fn sum_in_order<I>(parts: I, n: usize) -> Vec<f32>
where
    I: rayon::iter::IndexedParallelIterator<Item = Vec<f32>>,
{
    let parts: Vec<Vec<f32>> = parts.collect();
    let mut sum = vec![0f32; n];
    for p in &parts {
        sum.iter_mut().zip(p).for_each(|(a, b)| *a += b);
    }
    sum
}

#[cfg(test)]
mod tests {
    #[test]
    fn dot_f16_is_dot_lanes_on_the_widened_row() {
        let mut rng = crate::rng::Rng::new(5);
        for n in [0usize, 7, 32, 33, 576, 1000] {
            let w: Vec<half::f16> = (0..n)
                .map(|_| half::f16::from_f32(rng.normal() as f32))
                .collect();
            let x: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
            let wide: Vec<f32> = w.iter().map(|v| v.to_f32()).collect();
            assert_eq!(
                super::dot_f16(&w, &x).to_bits(),
                super::dot_lanes(&wide, &x).to_bits(),
                "n {n}"
            );
        }
    }

    #[test]
    fn exp_matches_std() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let a = super::exp(x) as f64;
            let b = (x as f64).exp();
            worst = worst.max(((a - b) / b).abs());
            x += 0.00731;
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        assert_eq!(super::exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(super::exp(-100.0), 0.0);
    }

    #[test]
    fn logsumexp_matches_f64() {
        let xs: Vec<f32> = (0..49_157)
            .map(|i| ((i * 7919) % 1000) as f32 / 37.0 - 13.0)
            .collect();
        let m = xs.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
        let want = m + xs.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
        let got = super::logsumexp(&xs);
        // f32 exponentials with relative error ≤ 3e-7 each: the log-sum moves by at most that.
        assert!((got - want).abs() < 1e-6, "{got} vs {want}");
    }
}

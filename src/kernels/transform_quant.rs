//! The online Kronecker transform fused with per-token activation quantization: token tiles are
//! transformed in cache (two small GEMMs, f32 or bf16) and quantized straight to the integer
//! GEMM's codes.

use super::int_gemm::{quantize_acts, quantize_row, QuantizedActs};
use super::small_gemm;
use crate::error::Result;
use crate::quant::QuantSpec;
use crate::transforms::KroneckerTransform;
use candle_core::Tensor;

/// Calls `f` with the values of an f32 CPU tensor in row-major order: borrowed when the tensor
/// is contiguous, copied otherwise.
pub fn with_f32_slice<R>(x: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    use candle_core::{CpuStorage, Storage};
    {
        let (storage, layout) = x.storage_and_layout();
        if let (Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) =
            (&*storage, layout.contiguous_offsets())
        {
            return Ok(f(&v[a..b]));
        }
    }
    let v: Vec<f32> = x.flatten_all()?.to_vec1()?;
    Ok(f(&v))
}

/// Per-token quantization of `x` (`[m, k]` row-major) for the integer GEMM, after the online
/// transform `t` when the site has one (fused: the transformed rows never reach memory).
pub fn quantize_rows(
    x: &[f32],
    m: usize,
    k: usize,
    t: Option<&FusedTransform>,
    spec: &QuantSpec,
) -> QuantizedActs {
    match t {
        Some(t) => transform_quantize(x, m, t, spec),
        None => quantize_acts(x, m, k, spec),
    }
}

/// `x·diag(scale)·(P1⊗P2)` as plain arrays.
pub struct Factors<'a> {
    pub n1: usize,
    pub n2: usize,
    pub p1: &'a [f32],
    pub p2: &'a [f32],
    pub scale: Option<&'a [f32]>,
}

/// Dense f32 factors of a Kronecker transform for the fused kernel.
pub struct FusedTransform {
    n1: usize,
    n2: usize,
    p1: Vec<f32>,
    /// `P1ᵀ`, contiguous (the left factor of the second small GEMM).
    p1t: Vec<f32>,
    p2: Vec<f32>,
    scale: Option<Vec<f32>>,
    simd: bool,
    /// The factors in bf16 for [`small_gemm::gemm_bf16`] (`P1ᵀ` as `[n1, n1e]`, `P2` pair-packed),
    /// when the transform runs in bf16.
    bf16: Option<(Vec<u16>, Vec<u16>)>,
}

/// `n` rounded up to even (bf16 operands pair along the inner dimension).
fn even(n: usize) -> usize {
    n + n % 2
}

impl FusedTransform {
    pub fn new(t: &KroneckerTransform) -> Result<Self> {
        let eye = |n: usize| -> Vec<f32> {
            (0..n * n)
                .map(|i| if i % (n + 1) == 0 { 1.0 } else { 0.0 })
                .collect()
        };
        let get = |p: &Option<Tensor>, n: usize| -> Result<Vec<f32>> {
            Ok(match p {
                Some(p) => p.flatten_all()?.to_vec1()?,
                None => eye(n),
            })
        };
        let p1 = get(&t.p1, t.n1)?;
        let n1 = t.n1;
        let p1t = (0..n1 * n1).map(|i| p1[(i % n1) * n1 + i / n1]).collect();
        Ok(FusedTransform {
            n1: t.n1,
            n2: t.n2,
            p1,
            p1t,
            p2: get(&t.p2, t.n2)?,
            simd: small_gemm::available(),
            bf16: None,
            scale: t
                .scale
                .as_ref()
                .map(|s| s.flatten_all()?.to_vec1())
                .transpose()?,
        })
    }

    /// The same transform computed in bf16 (inputs and intermediate rounded to bf16, f32
    /// accumulation: twice the f32 kernel's MACs per instruction) where the CPU has AVX-512 BF16;
    /// otherwise unchanged. Each transformed value is then within ≈ 4·2⁻⁹·Σ|P1||X||P2| of the f32
    /// transform's (four bf16 roundings: X, P2, X·P2, P1).
    pub fn with_bf16(mut self) -> Self {
        if !small_gemm::bf16_available() {
            return self;
        }
        let (n1, n2) = (self.n1, self.n2);
        let mut p1t = vec![0u16; n1 * even(n1)];
        let mut p2 = vec![0u16; even(n2) * n2];
        // SAFETY: availability checked above; buffers sized for these shapes.
        unsafe {
            small_gemm::to_bf16_rows(&self.p1t, &mut p1t, n1, n1, even(n1));
            small_gemm::pack_pairs(&self.p2, &mut p2, n2, n2, even(n2));
        }
        self.bf16 = Some((p1t, p2));
        self
    }

    pub fn is_bf16(&self) -> bool {
        self.bf16.is_some()
    }

    /// The dense factors, row-major (identity factors spelled out).
    pub fn factors(&self) -> Factors<'_> {
        Factors {
            n1: self.n1,
            n2: self.n2,
            p1: &self.p1,
            p2: &self.p2,
            scale: self.scale.as_deref(),
        }
    }

    /// `y = P1ᵀ·X·P2` for `rows` token rows `x` each viewed as `X [n1, n2]` (the row form of
    /// `x·(P1⊗P2)`), after the channel scale. Scratch sized by [`Scratch::new`] for ≥ `rows`.
    fn apply_rows(&self, x: &[f32], y: &mut [f32], s: &mut Scratch, rows: usize) {
        let (n1, n2) = (self.n1, self.n2);
        let n = n1 * n2;
        let (xs, tmp) = (&mut s.xs, &mut s.tmp);
        if !self.simd {
            for r in 0..rows {
                self.apply_row(&x[r * n..(r + 1) * n], &mut y[r * n..(r + 1) * n], tmp);
            }
            return;
        }
        let xin: &[f32] = match &self.scale {
            Some(c) => {
                for (d, (xr, _)) in xs.chunks_mut(n).zip(x.chunks(n).zip(0..rows)) {
                    for ((dv, &xv), &cv) in d.iter_mut().zip(xr).zip(c) {
                        *dv = xv * cv;
                    }
                }
                &xs[..rows * n]
            }
            None => &x[..rows * n],
        };
        if let Some((p1t, p2)) = &self.bf16 {
            let (n1e, n2e) = (even(n1), even(n2));
            // SAFETY: `bf16` is set only where the CPU has the instructions; scratch sized for
            // these shapes by `Scratch::new`.
            unsafe {
                small_gemm::to_bf16_rows(xin, &mut s.a16, rows * n1, n2, n2e);
                small_gemm::gemm_bf16(&s.a16, p2, &mut tmp[..rows * n], rows * n1, n2e, n2);
                for r in 0..rows {
                    small_gemm::pack_pairs(&tmp[r * n..(r + 1) * n], &mut s.b16, n1, n2, n1e);
                    small_gemm::gemm_bf16(p1t, &s.b16, &mut y[r * n..(r + 1) * n], n1, n1e, n2);
                }
            }
            return;
        }
        // SAFETY: `simd` was set from runtime detection; slice sizes match the shapes.
        unsafe {
            // All rows' X·P2 at once: [rows·n1, n2]·[n2, n2].
            small_gemm::gemm(xin, &self.p2, &mut tmp[..rows * n], rows * n1, n2, n2);
            // Per token: P1ᵀ·(X·P2): [n1, n1]·[n1, n2].
            for r in 0..rows {
                small_gemm::gemm(
                    &self.p1t,
                    &tmp[r * n..(r + 1) * n],
                    &mut y[r * n..(r + 1) * n],
                    n1,
                    n1,
                    n2,
                );
            }
        }
    }

    /// Portable form of one row of [`Self::apply_rows`]; `tmp` is scratch of `n1·n2`.
    fn apply_row(&self, x: &[f32], y: &mut [f32], tmp: &mut [f32]) {
        let (n1, n2) = (self.n1, self.n2);
        // tmp = diag(c)·X·P2, row by row of X.
        for i in 0..n1 {
            let t = &mut tmp[i * n2..(i + 1) * n2];
            t.iter_mut().for_each(|v| *v = 0.0);
            for l in 0..n2 {
                let mut xv = x[i * n2 + l];
                if let Some(c) = &self.scale {
                    xv *= c[i * n2 + l];
                }
                let pr = &self.p2[l * n2..(l + 1) * n2];
                for (tv, &p) in t.iter_mut().zip(pr) {
                    *tv += xv * p;
                }
            }
        }
        // y = P1ᵀ·tmp: y[i] = Σ_r P1[r][i]·tmp[r].
        y.iter_mut().for_each(|v| *v = 0.0);
        for r in 0..n1 {
            let tr = &tmp[r * n2..(r + 1) * n2];
            for i in 0..n1 {
                let p = self.p1[r * n1 + i];
                if p != 0.0 {
                    for (yv, &tv) in y[i * n2..(i + 1) * n2].iter_mut().zip(tr) {
                        *yv += p * tv;
                    }
                }
            }
        }
    }
}

/// Tokens transformed together (their X·P2 is one small GEMM).
const TILE: usize = 16;

/// Per-thread buffers of [`FusedTransform::apply_rows`] for up to [`TILE`] tokens.
struct Scratch {
    xs: Vec<f32>,
    tmp: Vec<f32>,
    /// bf16 path: the scaled input tile `[TILE·n1, n2e]` and one token's `X·P2` pair-packed.
    a16: Vec<u16>,
    b16: Vec<u16>,
}

impl Scratch {
    fn new(t: &FusedTransform) -> Self {
        let k = t.n1 * t.n2;
        let bf = t.bf16.is_some();
        Scratch {
            xs: vec![0f32; k * TILE],
            tmp: vec![0f32; k * TILE],
            a16: vec![0u16; if bf { TILE * t.n1 * even(t.n2) } else { 0 }],
            b16: vec![0u16; if bf { even(t.n1) * t.n2 } else { 0 }],
        }
    }
}

/// Fused online transform + per-token quantization: tiles of tokens are transformed in cache
/// (two small GEMMs) and quantized straight to signed codes, never writing the transformed
/// activations to memory.
pub fn transform_quantize(
    x: &[f32],
    m: usize,
    t: &FusedTransform,
    spec: &QuantSpec,
) -> QuantizedActs {
    let k = t.n1 * t.n2;
    QuantizedActs::build(
        m,
        k,
        TILE,
        || (vec![0f32; k * TILE], Scratch::new(t)),
        |(y, s), r0, kp, q, codes| {
            let rows = codes.len();
            t.apply_rows(&x[r0 * k..(r0 + rows) * k], y, s, rows);
            for (r, c) in codes.iter_mut().enumerate() {
                *c = quantize_row(&y[r * k..(r + 1) * k], &mut q[r * kp..r * kp + k], spec);
            }
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;
    use candle_core::Device;

    #[test]
    fn fused_transform_equals_the_kronecker_transform() {
        // Same rows through candle's KroneckerTransform::apply and the fused tile kernel, then
        // the same quantizer: transformed values agree to f32 rounding (checked via the codes of
        // an 8-bit grid, allowing a one-step flip where a value sits on a rounding boundary).
        let mut rng = Rng::new(4);
        for (n1, n2, m) in [
            (3usize, 5usize, 7usize),
            (24, 24, 33),
            (32, 48, 17),
            (1, 20, 5),
            (4, 70, 3),
        ] {
            let n = n1 * n2;
            let mut mk = |k: usize| -> Tensor {
                let v: Vec<f32> = (0..k * k).map(|_| rng.normal() as f32).collect();
                Tensor::from_vec(v, (k, k), &Device::Cpu).unwrap()
            };
            let (p1, p2) = (mk(n1), mk(n2));
            let c: Vec<f32> = (0..n).map(|_| 0.5 + rng.uniform() as f32).collect();
            let kt = KroneckerTransform {
                n1,
                n2,
                p1: Some(p1),
                p2: Some(p2),
                scale: Some(Tensor::from_vec(c, n, &Device::Cpu).unwrap()),
            };
            let x: Vec<f32> = (0..m * n).map(|_| rng.normal() as f32).collect();
            let xt = Tensor::from_vec(x.clone(), (m, n), &Device::Cpu).unwrap();
            let want: Vec<f32> = kt
                .apply(&xt)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let spec = QuantSpec::sym(8);
            let a = super::super::int_gemm::quantize_acts(&want, m, n, &spec);
            for simd in [false, true] {
                let mut ft = FusedTransform::new(&kt).unwrap();
                ft.simd = simd && ft.simd;
                let b = transform_quantize(&x, m, &ft, &spec);
                for r in 0..m {
                    assert!(
                        (a.scale[r] - b.scale[r]).abs() <= 1e-5 * a.scale[r],
                        "scale row {r}"
                    );
                    for j in 0..n {
                        let (u, v) = (a.q[r * a.kp + j], b.q[r * b.kp + j]);
                        assert!(
                            (u as i32 - v as i32).abs() <= 1,
                            "{n1}x{n2} simd {simd} row {r} col {j}: {u} vs {v}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn bf16_transform_is_within_its_rounding_bound() {
        // Four bf16 roundings (X·diag(c), P2, X·P2, P1; unit roundoff u = 2⁻⁹) and f32 sums:
        // |y_bf16 − y| ≤ 5u·Σ_ab |P1[a,i]|·|c·X[a,b]|·|P2[b,j]| for every transformed value.
        if !small_gemm::bf16_available() {
            eprintln!("no AVX-512 BF16 on this CPU: bf16 path not exercised");
            return;
        }
        let mut rng = Rng::new(11);
        for (n1, n2, m) in [
            (3usize, 5usize, 7usize),
            (24, 24, 20),
            (32, 48, 3),
            (1, 20, 5),
            (4, 70, 17),
        ] {
            let n = n1 * n2;
            let mut mk =
                |k: usize| -> Vec<f32> { (0..k * k).map(|_| rng.normal() as f32).collect() };
            let (p1, p2) = (mk(n1), mk(n2));
            let c: Vec<f32> = (0..n).map(|_| 0.5 + rng.uniform() as f32).collect();
            let t = |v: &Vec<f32>, k: usize| {
                Some(Tensor::from_vec(v.clone(), (k, k), &Device::Cpu).unwrap())
            };
            let kt = KroneckerTransform {
                n1,
                n2,
                p1: t(&p1, n1),
                p2: t(&p2, n2),
                scale: Some(Tensor::from_vec(c.clone(), n, &Device::Cpu).unwrap()),
            };
            let ft = FusedTransform::new(&kt).unwrap().with_bf16();
            assert!(ft.is_bf16());
            let x: Vec<f32> = (0..m * n).map(|_| rng.normal() as f32).collect();
            let mut s = Scratch::new(&ft);
            let mut y = vec![0f32; TILE * n];
            for r0 in (0..m).step_by(TILE) {
                let rows = (m - r0).min(TILE);
                ft.apply_rows(&x[r0 * n..(r0 + rows) * n], &mut y, &mut s, rows);
                for r in 0..rows {
                    let xr = &x[(r0 + r) * n..(r0 + r + 1) * n];
                    for i in 0..n1 {
                        for j in 0..n2 {
                            let (mut exact, mut bound) = (0f64, 0f64);
                            for a in 0..n1 {
                                for b in 0..n2 {
                                    let v = p1[a * n1 + i] as f64
                                        * (xr[a * n2 + b] * c[a * n2 + b]) as f64
                                        * p2[b * n2 + j] as f64;
                                    exact += v;
                                    bound += v.abs();
                                }
                            }
                            let got = y[r * n + i * n2 + j] as f64;
                            assert!(
                                (got - exact).abs() <= 5.0 * 2f64.powi(-9) * bound,
                                "{n1}x{n2} token {} ({i}, {j}): {got} vs {exact} (bound {bound})",
                                r0 + r
                            );
                        }
                    }
                }
            }
        }
    }
}

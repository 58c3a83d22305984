//! The online transform `x ↦ x·diag(c)·(P1⊗P2)` (algorithms.md §0, §2.1).
//!
//! With `x` viewed as `X` `[n1, n2]` (feature `k = i·n2 + j`), `x·(P1⊗P2) = vec(P1ᵀ·X·P2)`: two small
//! matmuls, never the `n × n` matrix. Either factor may be absent (identity), which also expresses
//! a full `n × n` matrix (`n1 = 1`) or a head-mixing `P⊗I`.

use crate::error::{Error, Result};
use crate::strided_gemm::{gemm, Parallelism};
use candle_core::{CpuStorage, CustomOp3, Device, Layout, Shape, Tensor};
use rayon::prelude::*;

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
        let tracked = |t: &Option<Tensor>| t.as_ref().is_some_and(Tensor::track_op);
        let f32 = x.dtype() == candle_core::DType::F32;
        if f32 && (x.track_op() || tracked(&self.scale) || tracked(&self.p1) || tracked(&self.p2)) {
            // Calibration: fused ops with their explicit backward. They read any shape as rows
            // of `n`, so the graph holds no reshapes around them.
            let y = match &self.scale {
                Some(c) => x.contiguous()?.apply_op2(&c.contiguous()?, ScaleOp)?,
                None => x.clone(),
            };
            return self.apply_fused(&y);
        }
        let y = match &self.scale {
            Some(c) => x.broadcast_mul(c)?,
            None => x.clone(),
        };
        Ok(self.apply_composed(y, rows)?.reshape(dims)?)
    }

    /// `y` (scale applied, `rows` rows) ↦ `y·(P1⊗P2)` composed of candle ops (evaluation; the
    /// fused op's test oracle).
    fn apply_composed(&self, mut y: Tensor, rows: usize) -> Result<Tensor> {
        if let Some(p2) = &self.p2 {
            y = y.reshape((rows * self.n1, self.n2))?.matmul(p2)?;
        }
        if let Some(p1) = &self.p1 {
            // P1ᵀ·X for each row: (Xᵀ·P1)ᵀ.
            let xt = y.reshape((rows, self.n1, self.n2))?.transpose(1, 2)?;
            y = xt.broadcast_matmul(p1)?.transpose(1, 2)?;
        }
        Ok(y.contiguous()?)
    }

    /// `y` `[rows, n]` (scale applied) ↦ `y·(P1⊗P2)` through [`KronOp`].
    fn apply_fused(&self, y: &Tensor) -> Result<Tensor> {
        let dummy = || Tensor::zeros(1, candle_core::DType::F32, &Device::Cpu);
        let p1 = match &self.p1 {
            Some(p) => p.contiguous()?,
            None => dummy()?,
        };
        let p2 = match &self.p2 {
            Some(p) => p.contiguous()?,
            None => dummy()?,
        };
        Ok(y.contiguous()?.apply_op3(
            &p1,
            &p2,
            KronOp {
                n1: self.n1,
                n2: self.n2,
                p1: self.p1.is_some(),
                p2: self.p2.is_some(),
            },
        )?)
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

/// `X` `[rows, n1·n2]` ↦ rows `P1ᵀ·X_r·P2` (each row `X_r` viewed `[n1, n2]`), differentiable in
/// `X`, `P1` and `P2`. With `Z_r = X_r·P2`, `Y_r = P1ᵀ·Z_r` and upstream gradient `G_r`:
///
/// ```text
/// dZ_r = P1·G_r      dP1 = Σ_r Z_r·G_rᵀ      dX = dZ·P2ᵀ      dP2 = Σ_r X_rᵀ·dZ_r
/// ```
///
/// The `X·P2` and `dZ·P2ᵀ` products run as one GEMM over a chunk of rows (`[chunk·n1, n2]`); the
/// `P1` side is one small GEMM per row. An absent factor is the identity (its argument a dummy).
/// Derivation: algorithms.md §7.2.
struct KronOp {
    n1: usize,
    n2: usize,
    p1: bool,
    p2: bool,
}

/// Rows per task.
const CHUNK: usize = 32;

fn f32s<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s.as_slice::<f32>()?[a..b]),
        None => candle_core::bail!("kronecker transform: inputs must be contiguous"),
    }
}

fn read<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> candle_core::Result<R>) -> candle_core::Result<R> {
    let (s, l) = t.storage_and_layout();
    match &*s {
        candle_core::Storage::Cpu(s) => f(f32s(s, l)?),
        _ => candle_core::bail!("kronecker transform: CPU tensors only"),
    }
}

impl KronOp {
    /// `Z = X·P2` for one chunk of rows (`X` itself without `P2`).
    fn z_chunk(&self, x: &[f32], p2: &[f32], z: &mut [f32]) {
        let n2 = self.n2;
        if !self.p2 {
            z.copy_from_slice(x);
            return;
        }
        let m = x.len() / n2;
        // x and z are [m × n2], p2 is [n2 × n2], all row-major.
        gemm(
            (m, n2, n2),
            z,
            n2,
            false,
            (x, 1, n2),
            (p2, 1, n2),
            1.0,
            Parallelism::None,
        );
    }

    fn forward(&self, x: &[f32], p1: &[f32], p2: &[f32]) -> Vec<f32> {
        let (n1, n2) = (self.n1, self.n2);
        let n = n1 * n2;
        crate::heap::par_filled_with(
            x.len(),
            CHUNK * n,
            || (vec![0f32; CHUNK * n], vec![0f32; CHUNK * n]),
            |(z, t), i, yc: &mut [f32]| {
                let xc = crate::heap::chunk_of(x, i, CHUNK * n);
                if !self.p1 {
                    self.z_chunk(xc, p2, yc);
                    return;
                }
                let (z, t) = (&mut z[..xc.len()], &mut t[..xc.len()]);
                let rows = xc.len() / n;
                self.z_chunk(xc, p2, z);
                to_k_major(z, t, rows, n1, n2);
                // Yᵗ = P1ᵀ·Zᵗ over the whole chunk: [n1 × rows·n2], P1ᵀ read transposed.
                gemm(
                    (n1, rows * n2, n1),
                    z,
                    rows * n2,
                    false,
                    (p1, n1, 1),
                    (t, 1, rows * n2),
                    1.0,
                    Parallelism::None,
                );
                from_k_major(z, yc, rows, n1, n2);
            },
        )
    }

    /// `(dX, dP1, dP2)`, each only where `want` asks for it.
    fn backward(
        &self,
        x: &[f32],
        p1: &[f32],
        p2: &[f32],
        g: &[f32],
        want: [bool; 3],
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let (n1, n2) = (self.n1, self.n2);
        let n = n1 * n2;
        let want_p1 = want[1] && self.p1;
        let want_p2 = want[2] && self.p2;
        let mut dx = crate::heap::zeroed::<f32>(if want[0] { x.len() } else { 0 });
        let chunks = x.len().div_ceil(CHUNK * n);
        // Per chunk: (dP1, dP2) partial sums.
        let mut partials: Vec<(Vec<f32>, Vec<f32>)> = Vec::with_capacity(chunks);
        let scratch = || [0; 4].map(|_| vec![0f32; CHUNK * n]);
        let body = |s: &mut [Vec<f32>; 4], (xc, gc): (&[f32], &[f32]), dxc: Option<&mut [f32]>| {
            let rows = xc.len() / n;
            let len = xc.len();
            let mut dp1 = vec![0f32; if want_p1 { n1 * n1 } else { 0 }];
            let mut dp2 = vec![0f32; if want_p2 { n2 * n2 } else { 0 }];
            let [gt, a, b, zt] = s;
            let (gt, a, b, zt) = (&mut gt[..len], &mut a[..len], &mut b[..len], &mut zt[..len]);
            // dZ = P1·G per row (G itself without P1), and dP1 = Σ_r Z_r·G_rᵀ; both as one GEMM
            // over the chunk in the k-major layout (row r's [n1 × n2] block split by its n1 index).
            let dz: &[f32] = if self.p1 {
                to_k_major(gc, gt, rows, n1, n2);
                // dZᵗ = P1·Gᵗ: [n1 × rows·n2].
                gemm(
                    (n1, rows * n2, n1),
                    a,
                    rows * n2,
                    false,
                    (p1, 1, n1),
                    (gt, 1, rows * n2),
                    1.0,
                    Parallelism::None,
                );
                from_k_major(a, b, rows, n1, n2);
                if want_p1 {
                    self.z_chunk(xc, p2, a);
                    // dP1 = Zᵗ·(Gᵗ)ᵀ: the sum over rows and n2 at once.
                    to_k_major(a, zt, rows, n1, n2);
                    gemm(
                        (n1, n1, rows * n2),
                        &mut dp1,
                        n1,
                        false,
                        (zt, 1, rows * n2),
                        (gt, rows * n2, 1),
                        1.0,
                        Parallelism::None,
                    );
                }
                b
            } else {
                gc
            };
            let m = rows * n1;
            if want_p2 {
                // dP2 = Σ X_rᵀ·dZ_r = (X as [m × n2])ᵀ·(dZ as [m × n2]).
                // xc, dz are [m × n2]; dp2 [n2 × n2].
                gemm(
                    (n2, n2, m),
                    &mut dp2,
                    n2,
                    false,
                    (xc, n2, 1),
                    (dz, 1, n2),
                    1.0,
                    Parallelism::None,
                );
            }
            if let Some(dxc) = dxc {
                if self.p2 {
                    // dX = dZ·P2ᵀ.
                    // dz, dxc are [m × n2]; P2ᵀ read through strides.
                    gemm(
                        (m, n2, n2),
                        dxc,
                        n2,
                        false,
                        (dz, 1, n2),
                        (p2, n2, 1),
                        1.0,
                        Parallelism::None,
                    );
                } else {
                    dxc.copy_from_slice(dz);
                }
            }
            (dp1, dp2)
        };
        if want[0] {
            partials.par_extend(
                dx.par_chunks_mut(CHUNK * n)
                    .zip(x.par_chunks(CHUNK * n).zip(g.par_chunks(CHUNK * n)))
                    .map_init(scratch, |s, (dxc, xg)| body(s, xg, Some(dxc))),
            );
        } else {
            partials.par_extend(
                x.par_chunks(CHUNK * n)
                    .zip(g.par_chunks(CHUNK * n))
                    .map_init(scratch, |s, xg| body(s, xg, None)),
            );
            dx = Vec::new();
        }
        let (mut dp1, mut dp2) = (vec![0f32; n1 * n1], vec![0f32; n2 * n2]);
        for (a, b) in &partials {
            dp1.iter_mut().zip(a).for_each(|(s, v)| *s += v);
            dp2.iter_mut().zip(b).for_each(|(s, v)| *s += v);
        }
        (dx, dp1, dp2)
    }
}

/// `dst[k][r][j] = src[r][k][j]` for `rows` rows of `[n1 × n2]` blocks: each row's `n1` index
/// becomes the outer one, so `P1` acts on all rows of a chunk in one product.
fn to_k_major(src: &[f32], dst: &mut [f32], rows: usize, n1: usize, n2: usize) {
    for (r, row) in src.chunks_exact(n1 * n2).enumerate().take(rows) {
        for (k, run) in row.chunks_exact(n2).enumerate() {
            dst[(k * rows + r) * n2..][..n2].copy_from_slice(run);
        }
    }
}

/// The inverse of [`to_k_major`].
fn from_k_major(src: &[f32], dst: &mut [f32], rows: usize, n1: usize, n2: usize) {
    for (r, row) in dst.chunks_exact_mut(n1 * n2).enumerate().take(rows) {
        for (k, run) in row.chunks_exact_mut(n2).enumerate() {
            run.copy_from_slice(&src[(k * rows + r) * n2..][..n2]);
        }
    }
}

/// `x` `[rows, n]` ↦ `x·diag(c)`, with `dx = g·diag(c)` and `dc = Σ_rows g⊙x` reduced across
/// threads (candle's broadcast backward reduces over rows on one thread).
struct ScaleOp;

impl candle_core::CustomOp2 for ScaleOp {
    fn name(&self) -> &'static str {
        "affq-channel-scale"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sc: &CpuStorage,
        lc: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, c) = (f32s(sx, lx)?, f32s(sc, lc)?);
        let y = crate::heap::par_filled(x.len(), c.len(), |i, y: &mut [f32]| {
            for ((y, x), c) in y
                .iter_mut()
                .zip(crate::heap::chunk_of(x, i, c.len()))
                .zip(c)
            {
                *y = x * c;
            }
        });
        Ok((CpuStorage::F32(y), lx.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        c: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let n = c.elem_count();
        let dx = if x.track_op() {
            let y = read(&grad, |g| {
                read(c, |c| {
                    Ok(crate::heap::par_filled(g.len(), n, |i, y: &mut [f32]| {
                        for ((y, g), c) in y.iter_mut().zip(crate::heap::chunk_of(g, i, n)).zip(c) {
                            *y = g * c;
                        }
                    }))
                })
            })?;
            Some(Tensor::from_vec(y, x.shape(), x.device())?)
        } else {
            None
        };
        let dc = if c.track_op() {
            let v = read(&grad, |g| {
                read(x, |x| {
                    Ok(crate::fastmath::sum_in_order(
                        g.par_chunks(CHUNK * n)
                            .zip(x.par_chunks(CHUNK * n))
                            .map(|(g, x)| {
                                let mut acc = vec![0f32; n];
                                for (g, x) in g.chunks_exact(n).zip(x.chunks_exact(n)) {
                                    for ((a, g), x) in acc.iter_mut().zip(g).zip(x) {
                                        *a += g * x;
                                    }
                                }
                                acc
                            }),
                        n,
                    ))
                })
            })?;
            Some(Tensor::from_vec(v, c.shape(), c.device())?)
        } else {
            None
        };
        Ok((dx, dc))
    }
}

impl CustomOp3 for KronOp {
    fn name(&self) -> &'static str {
        "affq-kronecker"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let y = self.forward(f32s(sx, lx)?, f32s(s1, l1)?, f32s(s2, l2)?);
        Ok((CpuStorage::F32(y), lx.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        p1: &Tensor,
        p2: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let want = [
            x.track_op(),
            self.p1 && p1.track_op(),
            self.p2 && p2.track_op(),
        ];
        let grad = grad.contiguous()?;
        let (dx, dp1, dp2) = read(x, |xs| {
            read(p1, |a| {
                read(p2, |b| {
                    read(&grad, |g| Ok(self.backward(xs, a, b, g, want)))
                })
            })
        })?;
        let dev = x.device();
        let (n1, n2) = (self.n1, self.n2);
        Ok((
            want[0]
                .then(|| Tensor::from_vec(dx, x.shape(), dev))
                .transpose()?,
            want[1]
                .then(|| Tensor::from_vec(dp1, (n1, n1), dev))
                .transpose()?,
            want[2]
                .then(|| Tensor::from_vec(dp2, (n2, n2), dev))
                .transpose()?,
        ))
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

    fn vals(t: &Tensor) -> Vec<f64> {
        t.to_dtype(candle_core::DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    /// The fused ops against the composed ops: values, and gradients of `Σ y⊙r` in x, P1, P2, c
    /// (autograd in f32, central finite differences in f64). Each output is a sum of
    /// `n1 + n2 ≤ 16` products per factor and each gradient of at most `rows·n ≈ 1000`, so f32
    /// rounding stays below `1000·2⁻²⁴ ≈ 6e-5` of the summed magnitudes; tolerance 1e-4 of the
    /// largest gradient (autograd) and 2e-4 (finite differences, step 1e-4: exact to ~1e-8).
    #[test]
    fn fused_kronecker_gradients_match_autograd_and_finite_differences() {
        use candle_core::{DType, Var};
        let dev = Device::Cpu;
        let (n1, n2, rows) = (3, 5, 70); // three row chunks of 32
        for (has1, has2) in [(true, true), (true, false), (false, true)] {
            let x =
                Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, rows / 2, n1 * n2), &dev).unwrap())
                    .unwrap();
            let p1 = Var::from_tensor(&Tensor::randn(0f32, 1.0, (n1, n1), &dev).unwrap()).unwrap();
            let p2 = Var::from_tensor(&Tensor::randn(0f32, 1.0, (n2, n2), &dev).unwrap()).unwrap();
            let c = Var::from_tensor(&Tensor::rand(0.5f32, 1.5, n1 * n2, &dev).unwrap()).unwrap();
            let r = Tensor::randn(0f32, 1.0, (2, rows / 2, n1 * n2), &dev).unwrap();
            let t = |p1: &Tensor, p2: &Tensor, c: &Tensor| KroneckerTransform {
                n1,
                n2,
                p1: has1.then(|| p1.clone()),
                p2: has2.then(|| p2.clone()),
                scale: Some(c.clone()),
            };
            let composed_of = |x: &Tensor, p1: &Tensor, p2: &Tensor, c: &Tensor| {
                t(p1, p2, c)
                    .apply_composed(x.broadcast_mul(c).unwrap(), rows)
                    .unwrap()
                    .reshape(x.dims())
                    .unwrap()
            };
            let fused = t(&p1, &p2, &c).apply(&x).unwrap();
            let composed = composed_of(&x, &p1, &p2, &c);
            let d = (&fused - &composed)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap();
            assert!(d.to_scalar::<f32>().unwrap() < 1e-5, "{has1} {has2} values");
            let gf = (&fused * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let gc = (&composed * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let r64 = r.to_dtype(DType::F64).unwrap();
            for (name, v, on) in [
                ("x", &x, true),
                ("p1", &p1, has1),
                ("p2", &p2, has2),
                ("c", &c, true),
            ] {
                if !on {
                    assert!(gf.get(v).is_none(), "{name}: gradient of an absent factor");
                    continue;
                }
                let a = vals(gf.get(v).unwrap());
                let b = vals(gc.get(v).unwrap());
                let gmax = b.iter().fold(0f64, |m, x| m.max(x.abs()));
                let e = a
                    .iter()
                    .zip(&b)
                    .fold(0f64, |e, (x, y)| e.max((x - y).abs()));
                assert!(e < 1e-4 * gmax, "{has1} {has2} d{name} vs autograd: {e}");
                let loss = |name: &str, vs: &[f64]| -> f64 {
                    let t64 = |w: &Var| w.as_tensor().to_dtype(DType::F64).unwrap();
                    let mut xs = [t64(&x), t64(&p1), t64(&p2), t64(&c)];
                    let k = ["x", "p1", "p2", "c"]
                        .iter()
                        .position(|n| *n == name)
                        .unwrap();
                    xs[k] = Tensor::from_vec(vs.to_vec(), xs[k].dims(), &dev).unwrap();
                    let y = composed_of(&xs[0], &xs[1], &xs[2], &xs[3]);
                    (y.reshape(r64.dims()).unwrap() * &r64)
                        .unwrap()
                        .sum_all()
                        .unwrap()
                        .to_scalar()
                        .unwrap()
                };
                let v64 = vals(v);
                for i in (0..v64.len()).step_by((v64.len() / 11).max(1)) {
                    let (mut p, mut m) = (v64.clone(), v64.clone());
                    p[i] += 1e-4;
                    m[i] -= 1e-4;
                    let fd = (loss(name, &p) - loss(name, &m)) / 2e-4;
                    assert!(
                        (fd - a[i]).abs() < 2e-4 * gmax,
                        "{has1} {has2} d{name}[{i}]: fd {fd} vs {}",
                        a[i]
                    );
                }
            }
        }
    }
}

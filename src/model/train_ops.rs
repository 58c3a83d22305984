//! The decoder's elementwise ops in their training form: one fused forward and an explicit
//! backward each, in place of candle's composed graphs (whose backward accumulates every node's
//! gradient through fresh full-size tensors). `Mode::Train` of [`super::ops`] calls these.
//!
//! RMSNorm, `y = x·r·w` with `r = (mean(x²) + ε)^(−1/2)` over the last dimension of size `n`:
//!
//! ```text
//! dx = r·(g⊙w) − x·r³·Σ(g⊙w⊙x)/n        dw = Σ_rows g⊙x·r
//! ```
//!
//! RoPE (rotate-half), per position with `(x₁, x₂)` the two halves of a head:
//! `y = (x₁·cos − x₂·sin, x₂·cos + x₁·sin)`, a rotation, so `dx = (g₁·cos + g₂·sin, g₂·cos − g₁·sin)`.
//!
//! SwiGLU, `y = silu(a)·u` with `σ` the logistic function:
//! `da = g·u·σ(a)·(1 + a·(1 − σ(a)))`, `du = g·silu(a)`.
//!
//! Linear, `y = x·Wᵀ` over the last dimension (`x` `[…, in]`, `W` `[out, in]`):
//! `dx = g·W`, `dW = gᵀ·x` — three GEMMs whose results are formed contiguous in the operands'
//! own layouts, so the graph holds no reshapes or transposes around them.
//!
//! When both operands of a linear lie on per-row integer grids (a W4A4 step: fake-quantized
//! activations and weights), a backend installed with [`set_grid_products`] may compute the three
//! products in integers instead (algorithms.md §7.6).
//!
//! The block loss, `L = Σ (y − t)²/N` (`t` a constant): `dy = 2·(y − t)·∂L/N` — one node in
//! place of candle's sub, sqr and mean, whose backward forms the difference's gradient, a
//! broadcast of the mean's, and three zero-filled accumulators, each of the block output's size.
//!
//! Gradients are computed only for inputs that carry them (`track_op`). Derivations: algorithms.md §7.3.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::sync::{Arc, RwLock};

/// Integer products for training linears `y = x·Wᵀ` (`x` `[m, k]`, `W` `[out, k]`, row-major),
/// from a kernel backend.
pub trait GridProducts: Send + Sync {
    /// Both operands on their per-row integer grids, or `None` when either is not on a grid the
    /// backend can multiply (the op then runs its f32 GEMMs).
    fn prepare(
        &self,
        x: &[f32],
        w: &[f32],
        m: usize,
        k: usize,
        out: usize,
    ) -> Option<Box<dyn GridLinear>>;
}

/// A linear's operands on their grids, kept from the forward for the backward.
pub trait GridLinear: Send + Sync {
    /// `y = x·Wᵀ` `[m, out]`, exact up to the final scaling.
    fn forward(&self) -> Vec<f32>;
    /// `dx = g·W` `[m, k]` for the upstream gradient `g` `[m, out]` (`None`: `g` not finite;
    /// the f32 GEMM runs instead).
    fn input_grad(&self, g: &[f32]) -> Option<Vec<f32>>;
    /// `dW = gᵀ·x` `[out, k]`.
    fn weight_grad(&self, g: &[f32]) -> Option<Vec<f32>>;
}

static GRID_PRODUCTS: RwLock<Option<Arc<dyn GridProducts>>> = RwLock::new(None);

/// Installs (or with `None` removes) the integer products every [`LinearOp`] tries first.
pub fn set_grid_products(p: Option<Arc<dyn GridProducts>>) {
    *GRID_PRODUCTS.write().unwrap_or_else(|e| e.into_inner()) = p;
}

/// `x·Wᵀ` (`x` `[m, k]`, `W` `[out, k]`, f32 on the CPU) by the installed integer products when
/// both operands are on grids (the calibration engine's forwards through blocks whose weights are
/// already quantized); `None` otherwise.
pub(crate) fn grid_forward(x: &Tensor, w: &Tensor) -> Result<Option<Tensor>> {
    use candle_core::DType::F32;
    let Some(p) = grid_products() else {
        return Ok(None);
    };
    if x.dtype() != F32 || w.dtype() != F32 || !x.device().is_cpu() {
        return Ok(None);
    }
    let ((m, k), (out, k2)) = (x.dims2()?, w.dims2()?);
    if k != k2 {
        return Ok(None);
    }
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    let y = read(&x, "grid-linear", |xs| {
        read(&w, "grid-linear", |ws| {
            Ok(p.prepare(xs, ws, m, k, out).map(|g| g.forward()))
        })
    })?;
    y.map(|y| Tensor::from_vec(y, (m, out), x.device()))
        .transpose()
}

fn grid_products() -> Option<Arc<dyn GridProducts>> {
    GRID_PRODUCTS
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
}

/// Rows per parallel task for row-wise reductions.
const CHUNK: usize = 64;

fn f32s<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s.as_slice::<f32>()?[a..b]),
        None => candle_core::bail!("{op}: inputs must be contiguous"),
    }
}

/// A contiguous CPU f32 tensor's values, read in place.
fn read<R>(t: &Tensor, op: &str, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let (s, l) = t.storage_and_layout();
    match &*s {
        candle_core::Storage::Cpu(s) => f(f32s(s, l, op)?),
        _ => candle_core::bail!("{op}: CPU tensors only"),
    }
}

/// `f(a_i, b_i)` for two equal-length slices, in parallel chunks written in place.
fn zip_map(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32 + Sync) -> Vec<f32> {
    const C: usize = 1 << 14;
    crate::heap::par_filled(a.len(), C, |i, y: &mut [f32]| {
        let (a, b) = (
            crate::heap::chunk_of(a, i, C),
            crate::heap::chunk_of(b, i, C),
        );
        for ((y, &a), &b) in y.iter_mut().zip(a).zip(b) {
            *y = f(a, b);
        }
    })
}

fn inv_rms(x: &[f32], eps: f32) -> f32 {
    let ss: f32 = x.iter().map(|v| v * v).sum();
    1.0 / (ss / x.len() as f32 + eps).sqrt()
}

pub struct RmsNormOp {
    pub eps: f32,
}

impl CustomOp2 for RmsNormOp {
    fn name(&self) -> &'static str {
        "affq-rms-norm"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w) = (f32s(sx, lx, self.name())?, f32s(sw, lw, self.name())?);
        let n = w.len();
        let y = crate::heap::par_filled(x.len(), n, |i, y: &mut [f32]| {
            let x = crate::heap::chunk_of(x, i, n);
            let r = inv_rms(x, self.eps);
            for ((y, x), w) in y.iter_mut().zip(x).zip(w) {
                *y = x * r * w;
            }
        });
        Ok((CpuStorage::F32(y), lx.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let n = w.elem_count();
        let name = self.name();
        let (dx, dw) = read(x, name, |xs| {
            read(w, name, |ws| {
                read(&grad, name, |gs| {
                    let dx = x.track_op().then(|| {
                        crate::heap::par_filled(xs.len(), n, |i, dx: &mut [f32]| {
                            let (x, g) = (
                                crate::heap::chunk_of(xs, i, n),
                                crate::heap::chunk_of(gs, i, n),
                            );
                            let r = inv_rms(x, self.eps);
                            let dot: f32 = g.iter().zip(w_iter(ws, x)).map(|(g, wx)| g * wx).sum();
                            let k = r * r * r * dot / n as f32;
                            for (((d, g), w), x) in dx.iter_mut().zip(g).zip(ws).zip(x) {
                                *d = r * g * w - x * k;
                            }
                        })
                    });
                    let dw = w.track_op().then(|| {
                        crate::fastmath::sum_in_order(
                            xs.par_chunks(CHUNK * n).zip(gs.par_chunks(CHUNK * n)).map(
                                |(xc, gc)| {
                                    let mut acc = vec![0f32; n];
                                    for (x, g) in xc.chunks_exact(n).zip(gc.chunks_exact(n)) {
                                        let r = inv_rms(x, self.eps);
                                        for ((a, x), g) in acc.iter_mut().zip(x).zip(g) {
                                            *a += g * x * r;
                                        }
                                    }
                                    acc
                                },
                            ),
                            n,
                        )
                    });
                    Ok((dx, dw))
                })
            })
        })?;
        Ok((
            dx.map(|v| Tensor::from_vec(v, x.shape(), x.device()))
                .transpose()?,
            dw.map(|v| Tensor::from_vec(v, w.shape(), w.device()))
                .transpose()?,
        ))
    }
}

/// `w_j·x_j` for one row.
fn w_iter<'a>(w: &'a [f32], x: &'a [f32]) -> impl Iterator<Item = f32> + 'a {
    w.iter().zip(x).map(|(w, x)| w * x)
}

/// RoPE over `x` `[B, H, T, D]` with tables `cos`, `sin` `[T, D/2]` (constants: no gradient).
pub struct RopeOp;

impl RopeOp {
    /// Rotates each head row of `x` by the position's angles; `sign = −1` rotates back (the
    /// backward of a rotation is its transpose).
    fn rotate(x: &[f32], cos: &[f32], sin: &[f32], t: usize, d: usize, sign: f32) -> Vec<f32> {
        let half = d / 2;
        crate::heap::par_filled(x.len(), t * d, |head, y: &mut [f32]| {
            let x = crate::heap::chunk_of(x, head, t * d);
            for p in 0..t {
                let (c, s) = (
                    &cos[p * half..(p + 1) * half],
                    &sin[p * half..(p + 1) * half],
                );
                let (x1, x2) = x[p * d..(p + 1) * d].split_at(half);
                let (y1, y2) = y[p * d..(p + 1) * d].split_at_mut(half);
                for i in 0..half {
                    let s = sign * s[i];
                    y1[i] = x1[i] * c[i] - x2[i] * s;
                    y2[i] = x2[i] * c[i] + x1[i] * s;
                }
            }
        })
    }
}

impl CustomOp3 for RopeOp {
    fn name(&self) -> &'static str {
        "affq-rope"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sc: &CpuStorage,
        lc: &Layout,
        ss: &CpuStorage,
        ls: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (_, _, t, d) = lx.shape().dims4()?;
        if lc.shape().dims() != [t, d / 2] || ls.shape() != lc.shape() {
            candle_core::bail!("rope: tables {:?} for x {:?}", lc.shape(), lx.shape());
        }
        let y = Self::rotate(
            f32s(sx, lx, self.name())?,
            f32s(sc, lc, self.name())?,
            f32s(ss, ls, self.name())?,
            t,
            d,
            1.0,
        );
        Ok((CpuStorage::F32(y), lx.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        if !x.track_op() {
            return Ok((None, None, None));
        }
        let (_, _, t, d) = x.dims4()?;
        let grad = grad.contiguous()?;
        let name = self.name();
        let dx = read(&grad, name, |g| {
            read(cos, name, |c| {
                read(sin, name, |s| Ok(Self::rotate(g, c, s, t, d, -1.0)))
            })
        })?;
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), x.device())?),
            None,
            None,
        ))
    }
}

/// Rotates one head row by its position's angles (`sign = −1` rotates back), as [`RopeOp`] does.
#[inline(always)]
fn rotate_row(x: &[f32], y: &mut [f32], cos: &[f32], sin: &[f32], sign: f32) {
    let half = x.len() / 2;
    let (x1, x2) = x.split_at(half);
    let (y1, y2) = y.split_at_mut(half);
    for i in 0..half {
        let s = sign * sin[i];
        y1[i] = x1[i] * cos[i] - x2[i] * s;
        y2[i] = x2[i] * cos[i] + x1[i] * s;
    }
}

/// A projection `x` `[B, T, H·D]` split by head into `[B, H, T, D]`, each head row rotated by
/// RoPE when `rotate` (tables `cos`, `sin` `[T, D/2]`, constants: no gradient). One node in place
/// of reshape, transpose, copy and [`RopeOp`] — whose backward formed three full-size gradients
/// of the projection, one of them through a transposed (strided) add; `dx` is the rows rotated
/// back and written in `x`'s own layout.
pub struct HeadsOp {
    pub heads: usize,
    pub rotate: bool,
}

impl HeadsOp {
    fn dims(&self, x: &[usize], tables: &[usize]) -> Result<(usize, usize, usize)> {
        let [b, t, hd] = x else {
            candle_core::bail!("heads: x {x:?} is not [B, T, H·D]");
        };
        let d = hd / self.heads.max(1);
        if self.heads == 0 || d * self.heads != *hd || !d.is_multiple_of(2) {
            candle_core::bail!("heads: {} heads of x {x:?}", self.heads);
        }
        if self.rotate && tables != [*t, d / 2] {
            candle_core::bail!("heads: tables {tables:?} for x {x:?}");
        }
        Ok((*b, *t, d))
    }
}

impl CustomOp3 for HeadsOp {
    fn name(&self) -> &'static str {
        "affq-heads"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sc: &CpuStorage,
        lc: &Layout,
        ss: &CpuStorage,
        ls: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, t, d) = self.dims(lx.dims(), lc.dims())?;
        let (h, half) = (self.heads, d / 2);
        let x = f32s(sx, lx, self.name())?;
        let (cos, sin) = match self.rotate {
            true => (f32s(sc, lc, self.name())?, f32s(ss, ls, self.name())?),
            false => (&[][..], &[][..]),
        };
        // Task `bh`: head `h` of sequence `b`, all positions.
        let y = crate::heap::par_filled(x.len(), t * d, |bh, y: &mut [f32]| {
            let (bi, hi) = (bh / h, bh % h);
            for (p, y) in y.chunks_exact_mut(d).enumerate() {
                let x = &x[((bi * t + p) * h + hi) * d..][..d];
                match self.rotate {
                    true => rotate_row(x, y, &cos[p * half..], &sin[p * half..], 1.0),
                    false => y.copy_from_slice(x),
                }
            }
        });
        Ok((CpuStorage::F32(y), Shape::from((b, h, t, d))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        if !x.track_op() {
            return Ok((None, None, None));
        }
        let (_, t, d) = self.dims(x.dims(), cos.dims())?;
        let (h, half) = (self.heads, d / 2);
        let grad = grad.contiguous()?;
        let name = self.name();
        // Task `bp`: position `p` of sequence `b`, all heads (one row of `x`).
        let fill = |g: &[f32], cos: &[f32], sin: &[f32]| {
            crate::heap::par_filled(g.len(), h * d, |bp, dx: &mut [f32]| {
                let (bi, p) = (bp / t, bp % t);
                for (hi, dx) in dx.chunks_exact_mut(d).enumerate() {
                    let g = &g[((bi * h + hi) * t + p) * d..][..d];
                    match self.rotate {
                        true => rotate_row(g, dx, &cos[p * half..], &sin[p * half..], -1.0),
                        false => dx.copy_from_slice(g),
                    }
                }
            })
        };
        let dx = read(&grad, name, |g| match self.rotate {
            true => read(cos, name, |c| read(sin, name, |s| Ok(fill(g, c, s)))),
            false => Ok(fill(g, &[], &[])),
        })?;
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), x.device())?),
            None,
            None,
        ))
    }
}

/// `silu(a)·u`.
pub struct SwiGluOp;

fn sigmoid(a: f32) -> f32 {
    1.0 / (1.0 + (-a).exp())
}

impl CustomOp2 for SwiGluOp {
    fn name(&self) -> &'static str {
        "affq-swiglu"
    }

    fn cpu_fwd(
        &self,
        sa: &CpuStorage,
        la: &Layout,
        su: &CpuStorage,
        lu: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if la.shape() != lu.shape() {
            candle_core::bail!("swiglu: shapes {:?} and {:?}", la.shape(), lu.shape());
        }
        let (a, u) = (f32s(sa, la, self.name())?, f32s(su, lu, self.name())?);
        let y = zip_map(a, u, |a, u| a * sigmoid(a) * u);
        Ok((CpuStorage::F32(y), la.shape().clone()))
    }

    fn bwd(
        &self,
        a: &Tensor,
        u: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let (wa, wu) = (a.track_op(), u.track_op());
        const C: usize = 1 << 14;
        let n = a.elem_count();
        let (mut da, mut du) = (crate::heap::zeroed::<f32>(n), crate::heap::zeroed::<f32>(n));
        let name = self.name();
        read(a, name, |av| {
            read(u, name, |uv| {
                read(&grad, name, |g| {
                    da.par_chunks_mut(C)
                        .zip(du.par_chunks_mut(C))
                        .zip(av.par_chunks(C).zip(uv.par_chunks(C)).zip(g.par_chunks(C)))
                        .for_each(|((da, du), ((a, u), g))| {
                            for i in 0..a.len() {
                                let s = sigmoid(a[i]);
                                da[i] = g[i] * u[i] * s * (1.0 + a[i] * (1.0 - s));
                                du[i] = g[i] * a[i] * s;
                            }
                        });
                    Ok(())
                })
            })
        })?;
        Ok((
            wa.then(|| Tensor::from_vec(da, a.shape(), a.device()))
                .transpose()?,
            wu.then(|| Tensor::from_vec(du, u.shape(), u.device()))
                .transpose()?,
        ))
    }
}

/// `mean((y − t)²)` over all elements (`t` a constant), with the value and `y`'s gradient
/// formed by the same f32 operations as candle's `(y − t).sqr().mean_all()` and its backward, so
/// training takes the same steps bit for bit: the sum by candle's own reduction over the squares,
/// then `· (1/N)`; the gradient `((y − t)·(g·(1/N)))·2`.
pub struct MseOp;

impl MseOp {
    /// `1/N` as candle's `mean_all` applies it (an f64 reciprocal taken to f32).
    fn inv_n(n: usize) -> f32 {
        (1.0 / n as f64) as f32
    }
}

impl CustomOp2 for MseOp {
    fn name(&self) -> &'static str {
        "affq-mse"
    }

    fn cpu_fwd(
        &self,
        sy: &CpuStorage,
        ly: &Layout,
        st: &CpuStorage,
        lt: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if ly.shape() != lt.shape() {
            candle_core::bail!("mse: shapes {:?} and {:?}", ly.shape(), lt.shape());
        }
        let (y, t) = (f32s(sy, ly, self.name())?, f32s(st, lt, self.name())?);
        let sq = zip_map(y, t, |y, t| {
            let d = y - t;
            d * d
        });
        let n = sq.len();
        let sum = Tensor::from_vec(sq, ly.shape(), &candle_core::Device::Cpu)?
            .sum_all()?
            .to_scalar::<f32>()?;
        Ok((
            CpuStorage::F32(vec![sum * Self::inv_n(n) + 0.0]),
            Shape::from(()),
        ))
    }

    fn bwd(
        &self,
        y: &Tensor,
        t: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        if !y.track_op() {
            return Ok((None, None));
        }
        let g = grad.to_scalar::<f32>()? * Self::inv_n(y.elem_count()) + 0.0;
        let name = self.name();
        let dy = read(y, name, |yv| {
            read(t, name, |tv| {
                Ok(zip_map(yv, tv, |y, t| (y - t) * g * 2.0 + 0.0))
            })
        })?;
        Ok((Some(Tensor::from_vec(dy, y.shape(), y.device())?), None))
    }
}

/// `y = x·Wᵀ` `[m, out]` by the installed integer products when both operands are on grids (the
/// grids returned, kept for the backward), else by the f32 GEMM.
fn products_forward(
    x: &[f32],
    w: &[f32],
    m: usize,
    k: usize,
    out: usize,
) -> (Vec<f32>, Option<Box<dyn GridLinear>>) {
    if let Some(g) = grid_products().and_then(|p| p.prepare(x, w, m, k, out)) {
        return (g.forward(), Some(g));
    }
    // y = x·Wᵀ: Wᵀ's element (i, j) is W[j·k + i].
    let y = crate::strided_gemm::product(
        (m, out, k),
        (x, 1, k),
        (w, k, 1),
        1.0,
        crate::strided_gemm::candle_parallelism(),
    );
    (y, None)
}

/// `dx = g·W` `[m, k]` (integer products when the forward ran on grids).
fn products_input_grad(
    grid: Option<&dyn GridLinear>,
    g: &[f32],
    w: &[f32],
    m: usize,
    k: usize,
    out: usize,
) -> Vec<f32> {
    if let Some(dx) = grid.and_then(|p| p.input_grad(g)) {
        return dx;
    }
    crate::strided_gemm::product(
        (m, k, out),
        (g, 1, out),
        (w, 1, k),
        1.0,
        crate::strided_gemm::candle_parallelism(),
    )
}

/// `dW = gᵀ·x` `[out, k]`: `gᵀ`'s element (o, t) is `g[t·out + o]`.
fn products_weight_grad(
    grid: Option<&dyn GridLinear>,
    g: &[f32],
    x: &[f32],
    m: usize,
    k: usize,
    out: usize,
) -> Vec<f32> {
    if let Some(dw) = grid.and_then(|p| p.weight_grad(g)) {
        return dw;
    }
    crate::strided_gemm::product(
        (out, k, m),
        (g, out, 1),
        (x, 1, k),
        1.0,
        crate::strided_gemm::candle_parallelism(),
    )
}

/// The shape of `y = x·Wᵀ` and `(m, k, out)`, or an error naming the mismatch.
fn linear_dims(op: &str, lx: &Layout, lw: &Layout) -> Result<(Vec<usize>, usize, usize, usize)> {
    let (out, k) = lw.shape().dims2()?;
    let dims = lx.shape().dims();
    if dims.last() != Some(&k) {
        candle_core::bail!("{op}: input {:?} against weight {:?}", dims, lw.shape());
    }
    let m = lx.shape().elem_count() / k.max(1);
    let mut shape = dims.to_vec();
    *shape.last_mut().unwrap() = out;
    Ok((shape, m, k, out))
}

/// The linear op; holds its operands' grids between forward and backward when the integer
/// products ran.
#[derive(Default)]
pub struct LinearOp {
    grid: std::sync::Mutex<Option<Box<dyn GridLinear>>>,
}

impl CustomOp2 for LinearOp {
    fn name(&self) -> &'static str {
        "affq-linear"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (shape, m, k, out) = linear_dims(self.name(), lx, lw)?;
        let (x, w) = (f32s(sx, lx, self.name())?, f32s(sw, lw, self.name())?);
        let (y, grid) = products_forward(x, w, m, k, out);
        *self.grid.lock().unwrap_or_else(|e| e.into_inner()) = grid;
        Ok((CpuStorage::F32(y), Shape::from(shape)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let (out, k) = w.dims2()?;
        let m = x.elem_count() / k.max(1);
        let name = self.name();
        let grid = self.grid.lock().unwrap_or_else(|e| e.into_inner()).take();
        let grid = grid.as_deref();
        let (dx, dw) = read(x, name, |xs| {
            read(w, name, |ws| {
                read(&grad, name, |g| {
                    let dx = x
                        .track_op()
                        .then(|| products_input_grad(grid, g, ws, m, k, out));
                    let dw = w
                        .track_op()
                        .then(|| products_weight_grad(grid, g, xs, m, k, out));
                    Ok((dx, dw))
                })
            })
        })?;
        Ok((
            dx.map(|v| Tensor::from_vec(v, x.shape(), x.device()))
                .transpose()?,
            dw.map(|v| Tensor::from_vec(v, w.shape(), w.device()))
                .transpose()?,
        ))
    }
}

/// What [`QuantLinearOp`]'s forward keeps for its backward: the quantized input (for `dW` in f32)
/// or the operands' grids (integer products).
enum Kept {
    Values(Vec<f32>),
    Grids(Box<dyn GridLinear>),
}

/// `y = Q(x)·Wᵀ` with `Q` the clip quantizer of a linear's input (LAC: one pair of clip logits
/// `[a_hi, a_lo]`, rows of `k`), as one node: the quantized input is not a graph tensor, so the
/// backward passes `dQ(x) = g·W` straight into the quantizer's straight-through backward
/// (algorithms.md §7.3) instead of through a zero-filled gradient buffer and an add.
pub struct QuantLinearOp {
    pub quant: crate::quant::clipquant::ClipQuant,
    kept: std::sync::Mutex<Option<Kept>>,
}

impl QuantLinearOp {
    pub fn new(spec: crate::quant::QuantSpec, k: usize) -> Self {
        QuantLinearOp {
            quant: crate::quant::clipquant::ClipQuant {
                spec,
                clamp_input: false,
                unit: k,
            },
            kept: std::sync::Mutex::new(None),
        }
    }
}

impl CustomOp3 for QuantLinearOp {
    fn name(&self) -> &'static str {
        "affq-quant-linear"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sc: &CpuStorage,
        lc: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (shape, m, k, out) = linear_dims(self.name(), lx, lw)?;
        let (x, clip, w) = (
            f32s(sx, lx, self.name())?,
            f32s(sc, lc, self.name())?,
            f32s(sw, lw, self.name())?,
        );
        if clip.len() != 2 || k != self.quant.unit {
            candle_core::bail!("{}: clip logits {:?}, rows of {k}", self.name(), lc.shape());
        }
        let xq = self.quant.forward(x, &clip[..1], &clip[1..], m, k);
        let (y, grid) = products_forward(&xq, w, m, k, out);
        *self.kept.lock().unwrap_or_else(|e| e.into_inner()) = Some(match grid {
            Some(g) => Kept::Grids(g),
            None => Kept::Values(xq),
        });
        Ok((CpuStorage::F32(y), Shape::from(shape)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        clip: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let (out, k) = w.dims2()?;
        let m = x.elem_count() / k.max(1);
        let name = self.name();
        let Some(kept) = self.kept.lock().unwrap_or_else(|e| e.into_inner()).take() else {
            candle_core::bail!("{name}: backward without a forward");
        };
        let ab: Vec<f32> = clip.to_vec1()?;
        let (grid, xq) = match &kept {
            Kept::Grids(g) => (Some(&**g), None),
            Kept::Values(v) => (None, Some(v.as_slice())),
        };
        let want_x = x.track_op() || clip.track_op();
        let (dx, dclip, dw) = read(x, name, |xs| {
            read(w, name, |ws| {
                read(&grad, name, |g| {
                    let dw = w.track_op().then(|| match xq {
                        Some(xq) => products_weight_grad(None, g, xq, m, k, out),
                        None => {
                            // The grids hold the quantized input; without them (a gradient
                            // the integer products refuse) it is recomputed.
                            grid.and_then(|p| p.weight_grad(g)).unwrap_or_else(|| {
                                let xq = self.quant.forward(xs, &ab[..1], &ab[1..], m, k);
                                products_weight_grad(None, g, &xq, m, k, out)
                            })
                        }
                    });
                    let (dx, dclip) = if want_x {
                        let dxq = products_input_grad(grid, g, ws, m, k, out);
                        let (dx, da) = self.quant.backward(xs, &dxq, &ab[..1], &ab[1..], m, k);
                        let (dh, dl) = crate::quant::clipquant::scalar_clip_grads(&da);
                        (Some(dx), Some(vec![dh, dl]))
                    } else {
                        (None, None)
                    };
                    Ok((dx, dclip, dw))
                })
            })
        })?;
        let dev = x.device();
        Ok((
            dx.filter(|_| x.track_op())
                .map(|v| Tensor::from_vec(v, x.shape(), dev))
                .transpose()?,
            dclip
                .filter(|_| clip.track_op())
                .map(|v| Tensor::from_vec(v, 2, dev))
                .transpose()?,
            dw.map(|v| Tensor::from_vec(v, w.shape(), dev))
                .transpose()?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    fn vals(t: &Tensor) -> Vec<f64> {
        t.to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    /// `fused` against `composed` (candle's graph of the same function) at `inputs`: values, the
    /// gradients of `Σ y⊙r` by autograd (f32), and central finite differences of `composed` in f64
    /// at a spread of elements. `tol` is relative to the largest gradient; `grads` marks the inputs
    /// whose gradient is compared (the others are constants of the op).
    fn check(
        name: &str,
        inputs: &[Var],
        grads: &[bool],
        fused: &dyn Fn(&[Tensor]) -> Tensor,
        composed: &dyn Fn(&[Tensor]) -> Tensor,
        tol: f64,
    ) {
        let ts: Vec<Tensor> = inputs.iter().map(|v| v.as_tensor().clone()).collect();
        let (yf, yc) = (fused(&ts), composed(&ts));
        let r = Tensor::randn(0f32, 1.0, yf.dims(), &Device::Cpu).unwrap();
        let (a, b) = (vals(&yf), vals(&yc));
        let m = b.iter().fold(0f64, |m, x| m.max(x.abs()));
        let e = a
            .iter()
            .zip(&b)
            .fold(0f64, |e, (x, y)| e.max((x - y).abs()));
        assert!(e < tol * m, "{name}: values differ by {e}");
        let gf = (&yf * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let gc = (&yc * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let r64 = r.to_dtype(DType::F64).unwrap();
        let t64: Vec<Tensor> = ts.iter().map(|t| t.to_dtype(DType::F64).unwrap()).collect();
        for (k, v) in inputs.iter().enumerate() {
            if !grads[k] {
                continue;
            }
            let a = vals(gf.get(v).expect("fused gradient"));
            let b = vals(gc.get(v).expect("autograd gradient"));
            let gmax = b.iter().fold(0f64, |m, x| m.max(x.abs()));
            let e = a
                .iter()
                .zip(&b)
                .fold(0f64, |e, (x, y)| e.max((x - y).abs()));
            assert!(
                e < tol * gmax,
                "{name}: input {k} gradient vs autograd: {e} (max {gmax})"
            );
            let x = vals(v);
            for i in (0..x.len()).step_by((x.len() / 17).max(1)) {
                let loss = |d: f64| {
                    let mut xs = x.clone();
                    xs[i] += d;
                    let mut args = t64.clone();
                    args[k] = Tensor::from_vec(xs, v.dims(), &Device::Cpu).unwrap();
                    (composed(&args) * &r64)
                        .unwrap()
                        .sum_all()
                        .unwrap()
                        .to_scalar::<f64>()
                        .unwrap()
                };
                let fd = (loss(1e-4) - loss(-1e-4)) / 2e-4;
                assert!(
                    (fd - a[i]).abs() < tol * gmax,
                    "{name}: input {k}[{i}] fd {fd} vs {}",
                    a[i]
                );
            }
        }
    }

    fn var(t: Tensor) -> Var {
        Var::from_tensor(&t).unwrap()
    }

    // Tolerances: every output and gradient element is a sum of at most n = 64 products (the
    // normalised dimension) or an elementwise expression; f32 rounding keeps them within
    // n·2⁻²⁴ ≈ 4e-6 of the summed magnitudes; 5e-5 of the largest value leaves a factor 10.
    // Central differences in f64 with step 1e-4 are exact to ~1e-8 on these smooth functions.

    #[test]
    fn weight_gradients_do_not_depend_on_the_thread_count() {
        // The gain's and the channel scale's gradients sum over rows in chunks across threads;
        // with many chunks a work-stealing reduction would add them in a run-dependent order.
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (4 * CHUNK * 8 + 5, 96), &dev).unwrap();
        let w = Var::from_tensor(&Tensor::rand(0.5f32, 1.5, 96, &dev).unwrap()).unwrap();
        let c = Var::from_tensor(&Tensor::rand(0.5f32, 1.5, 96, &dev).unwrap()).unwrap();
        let r = Tensor::randn(0f32, 1.0, x.dims(), &dev).unwrap();
        let grads = |threads: usize| -> (Vec<f32>, Vec<f32>) {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                let y = x.apply_op2(w.as_tensor(), RmsNormOp { eps: 1e-5 }).unwrap();
                let y = crate::transforms::KroneckerTransform {
                    n1: 8,
                    n2: 12,
                    p1: None,
                    p2: None,
                    scale: Some(c.as_tensor().clone()),
                }
                .apply(&y)
                .unwrap();
                let g = (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
                let v = |t: &Var| g.get(t).unwrap().to_vec1::<f32>().unwrap();
                (v(&w), v(&c))
            })
        };
        let one = grads(1);
        for threads in [2, 3, 4] {
            for _ in 0..3 {
                assert_eq!(grads(threads), one, "{threads} threads");
            }
        }
    }

    #[test]
    fn mse_equals_candles_composed_loss_bit_for_bit() {
        // The training loop's loss (`/ L` as FlatQuant's log-MSE scales it, and plain): value and
        // gradient identical to candle's graph of `(y − t)²` mean, so the fused node changes no
        // step; plus finite differences of the composed loss in f64.
        let dev = Device::Cpu;
        let y = var(Tensor::randn(0f32, 1.0, (3, 37, 64), &dev).unwrap());
        let t = Tensor::randn(0f32, 1.0, (3, 37, 64), &dev).unwrap();
        let bits = |x: &Tensor| -> Vec<u32> {
            x.flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect()
        };
        for scaled in [false, true] {
            let run = |loss: Tensor| {
                let lv = loss.to_scalar::<f32>().unwrap() as f64;
                let top = if scaled { (&loss / lv).unwrap() } else { loss };
                let g = top.backward().unwrap();
                (lv, bits(g.get(&y).unwrap()))
            };
            let fused = run(crate::model::mean_squared_error(y.as_tensor(), &t).unwrap());
            let composed = run((y.as_tensor() - &t)
                .unwrap()
                .sqr()
                .unwrap()
                .mean_all()
                .unwrap());
            assert_eq!(fused.0.to_bits(), composed.0.to_bits(), "loss value");
            assert_eq!(fused.1, composed.1, "gradient (scaled {scaled})");
        }
        check(
            "mse",
            &[y],
            &[true],
            &|a| crate::model::mean_squared_error(&a[0], &t).unwrap(),
            &|a| {
                (&a[0] - t.to_dtype(a[0].dtype()).unwrap())
                    .unwrap()
                    .sqr()
                    .unwrap()
                    .mean_all()
                    .unwrap()
            },
            5e-5,
        );
    }

    #[test]
    fn rms_norm_gradients_match_autograd_and_finite_differences() {
        let dev = Device::Cpu;
        let x = var(Tensor::randn(0f32, 1.0, (3, 70, 64), &dev).unwrap());
        let w = var(Tensor::rand(0.5f32, 1.5, 64, &dev).unwrap());
        let eps = 1e-5;
        check(
            "rms_norm",
            &[x, w],
            &[true, true],
            &|t| {
                t[0].apply_op2(&t[1], RmsNormOp { eps: eps as f32 })
                    .unwrap()
            },
            &|t| {
                let r = (t[0].sqr().unwrap().mean_keepdim(2).unwrap() + eps)
                    .unwrap()
                    .sqrt()
                    .unwrap()
                    .recip()
                    .unwrap();
                t[0].broadcast_mul(&r)
                    .unwrap()
                    .broadcast_mul(&t[1])
                    .unwrap()
            },
            5e-5,
        );
    }

    #[test]
    fn rope_gradients_match_autograd_and_finite_differences() {
        let dev = Device::Cpu;
        let (t, d) = (70, 16);
        let ang: Vec<f32> = (0..t * d / 2)
            .map(|i| (i / (d / 2)) as f32 * 0.3f32.powi((i % (d / 2)) as i32))
            .collect();
        let cos = Tensor::from_vec(
            ang.iter().map(|a| a.cos()).collect::<Vec<_>>(),
            (t, d / 2),
            &dev,
        )
        .unwrap();
        let sin = Tensor::from_vec(
            ang.iter().map(|a| a.sin()).collect::<Vec<_>>(),
            (t, d / 2),
            &dev,
        )
        .unwrap();
        let x = var(Tensor::randn(0f32, 1.0, (2, 3, t, d), &dev).unwrap());
        check(
            "rope",
            &[x, var(cos), var(sin)],
            &[true, false, false],
            &|a| a[0].apply_op3(&a[1], &a[2], RopeOp).unwrap(),
            &|a| candle_nn::rotary_emb::rope_slow(&a[0], &a[1].detach(), &a[2].detach()).unwrap(),
            5e-5,
        );
    }

    #[test]
    fn heads_equals_split_then_rope_bit_for_bit() {
        // The one-node split (and rotation) against the nodes it replaces: reshape, transpose,
        // copy and RopeOp (rotate) or the copy alone (values): the same values and input
        // gradient bit for bit, then finite differences of the composed function.
        let dev = Device::Cpu;
        let (b, t, h, d) = (2, 37, 3, 16);
        let ang: Vec<f32> = (0..t * d / 2)
            .map(|i| (i / (d / 2)) as f32 * 0.3f32.powi((i % (d / 2)) as i32))
            .collect();
        let table = |f: fn(f32) -> f32| {
            Tensor::from_vec(
                ang.iter().map(|&a| f(a)).collect::<Vec<_>>(),
                (t, d / 2),
                &dev,
            )
            .unwrap()
        };
        let (cos, sin) = (table(f32::cos), table(f32::sin));
        let x = var(Tensor::randn(0f32, 1.0, (b, t, h * d), &dev).unwrap());
        let bits = |x: &Tensor| -> Vec<u32> {
            let v = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            v.iter().map(|v| v.to_bits()).collect()
        };
        for rotate in [true, false] {
            let fused = |a: &[Tensor]| {
                a[0].apply_op3(&a[1], &a[2], HeadsOp { heads: h, rotate })
                    .unwrap()
            };
            let composed = |a: &[Tensor]| {
                let s = a[0]
                    .reshape((b, t, h, d))
                    .unwrap()
                    .transpose(1, 2)
                    .unwrap()
                    .contiguous()
                    .unwrap();
                match rotate {
                    true => s.apply_op3(&a[1], &a[2], RopeOp).unwrap(),
                    false => s,
                }
            };
            let args = [x.as_tensor().clone(), cos.clone(), sin.clone()];
            let (yf, yc) = (fused(&args), composed(&args));
            assert_eq!(yf.dims(), [b, h, t, d]);
            assert_eq!(bits(&yf), bits(&yc), "values (rotate {rotate})");
            let r = Tensor::randn(0f32, 1.0, yf.dims(), &dev).unwrap();
            let g = |y: Tensor| {
                let g = (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
                bits(g.get(&x).unwrap())
            };
            assert_eq!(g(yf), g(yc), "gradient (rotate {rotate})");
            check(
                "heads",
                &[x.clone(), var(cos.clone()), var(sin.clone())],
                &[true, false, false],
                &|a| fused(a),
                &|a| {
                    let s = a[0]
                        .reshape((b, t, h, d))
                        .unwrap()
                        .transpose(1, 2)
                        .unwrap()
                        .contiguous()
                        .unwrap();
                    match rotate {
                        true => candle_nn::rotary_emb::rope_slow(
                            &s,
                            &a[1].detach().to_dtype(s.dtype()).unwrap(),
                            &a[2].detach().to_dtype(s.dtype()).unwrap(),
                        )
                        .unwrap(),
                        false => s,
                    }
                },
                5e-5,
            );
        }
    }

    #[test]
    fn linear_gradients_match_autograd_and_finite_differences() {
        // Each element sums k = 40 (forward, dW: m = 140) products: f32 rounding within
        // 140·2⁻²⁴ ≈ 1e-5 of the summed magnitudes, which stay within a few times the largest value.
        let dev = Device::Cpu;
        let x = var(Tensor::randn(0f32, 1.0, (2, 70, 40), &dev).unwrap());
        let w = var(Tensor::randn(0f32, 1.0, (24, 40), &dev).unwrap());
        check(
            "linear",
            &[x, w],
            &[true, true],
            &|t| t[0].apply_op2(&t[1], LinearOp::default()).unwrap(),
            &|t| t[0].broadcast_matmul(&t[1].t().unwrap()).unwrap(),
            5e-5,
        );
    }

    #[test]
    fn quant_linear_equals_the_quantizer_then_the_linear() {
        // The fused node runs the same arithmetic as the two nodes (ClipQuant, LinearOp) in the
        // same order; the only difference is the zero-filled buffer the graph adds dQ(x) to, and
        // 0 + v = v exactly, so values and gradients agree to the bit.
        use crate::quant::clipquant::clip_quant_units;
        use crate::quant::QuantSpec;
        let dev = Device::Cpu;
        let spec = QuantSpec::asym(4);
        let x = var(Tensor::randn(0f32, 1.0, (2, 70, 40), &dev).unwrap());
        let w = var(Tensor::randn(0f32, 1.0, (24, 40), &dev).unwrap());
        let hi = var(Tensor::new(&[[1.5f32]], &dev).unwrap());
        let lo = var(Tensor::new(&[[2.0f32]], &dev).unwrap());
        let r = Tensor::randn(0f32, 1.0, (2, 70, 24), &dev).unwrap();
        let clip = Tensor::cat(&[hi.flatten_all().unwrap(), lo.flatten_all().unwrap()], 0).unwrap();
        let fused = x
            .apply_op3(&clip, &w, QuantLinearOp::new(spec, 40))
            .unwrap();
        let xq = clip_quant_units(&x, 40, &hi, &lo, &spec, false).unwrap();
        let composed = xq.apply_op2(&w, LinearOp::default()).unwrap();
        assert_eq!(vals(&fused), vals(&composed));
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
        for v in [&x, &w, &hi, &lo] {
            let (a, b) = (vals(gf.get(v).unwrap()), vals(gc.get(v).unwrap()));
            assert_eq!(a, b, "gradient of {:?}", v.dims());
        }
    }

    #[test]
    fn swiglu_gradients_match_autograd_and_finite_differences() {
        let dev = Device::Cpu;
        let a = var(Tensor::randn(0f32, 2.0, (3, 70, 40), &dev).unwrap());
        let u = var(Tensor::randn(0f32, 1.0, (3, 70, 40), &dev).unwrap());
        check(
            "swiglu",
            &[a, u],
            &[true, true],
            &|t| t[0].apply_op2(&t[1], SwiGluOp).unwrap(),
            &|t| (candle_nn::ops::silu(&t[0]).unwrap() * &t[1]).unwrap(),
            5e-5,
        );
    }
}

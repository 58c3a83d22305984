//! Fused causal self-attention, for evaluation and for calibration (with its backward).
//!
//! For each (batch, query head, block of query rows) one task computes `S = Q·Kᵀ` over the visible
//! keys with gemm, a masked softmax in place (fast exp, row max subtracted), and `O = P·V`,
//! normalising by the row sums at the end. GQA is native: query head `h` reads KV head `h / g`.
//! Compared with composing candle ops, this never materialises a mask or the full score tensor and
//! skips the invisible upper triangle.
//!
//! The backward recomputes `P` block by block (the memory-efficient attention backward of
//! algorithms.md §7.1): with `s` the score scale and `D_i = Σ_d dO_id·O_id`,
//!
//! ```text
//! dV = Pᵀ·dO      dP = dO·Vᵀ      dS = P ⊙ (dP − D)      dQ = s·dS·K      dK = s·dSᵀ·Q
//! ```
//!
//! (`D_i = Σ_j P_ij·dP_ij` because `O = P·V`; the softmax Jacobian is `diag(p) − p·pᵀ`). Each task
//! owns its query head's rows of `dQ` and accumulates its own `dK`, `dV`; the `g` query heads of a
//! KV head are summed at the end. The full score tensor never exists in the backward either.

use crate::fastmath;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

const BLOCK: usize = 64;

/// `q` `[B, H, T, D]`, `k`, `v` `[B, Hkv, T, D]` (contiguous, RoPE applied) → `[B, T, H·D]`.
pub struct CausalAttention {
    pub scale: f32,
    /// Mistral sliding window: a query sees at most this many most recent keys (itself included).
    pub window: Option<usize>,
}

struct SendPtr(*mut f32);
unsafe impl Sync for SendPtr {}
unsafe impl Send for SendPtr {}
impl SendPtr {
    fn get(&self) -> *mut f32 {
        self.0
    }
}

fn slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let data = s.as_slice::<f32>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("causal attention: {what} must be contiguous"),
    }
}

impl CustomOp3 for CausalAttention {
    fn name(&self) -> &'static str {
        "affq-causal-attention"
    }

    fn cpu_fwd(
        &self,
        sq: &CpuStorage,
        lq: &Layout,
        sk: &CpuStorage,
        lk: &Layout,
        sv: &CpuStorage,
        lv: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, h, t, d) = lq.shape().dims4()?;
        let (bk, hkv, tk, dk) = lk.shape().dims4()?;
        if (bk, tk, dk) != (b, t, d) || lv.shape() != lk.shape() || h % hkv != 0 {
            candle_core::bail!(
                "causal attention: shapes q {:?} k {:?} v {:?}",
                lq.shape(),
                lk.shape(),
                lv.shape()
            );
        }
        let (q, k, v) = (
            slice(sq, lq, "q")?,
            slice(sk, lk, "k")?,
            slice(sv, lv, "v")?,
        );
        let g = h / hkv;
        let mut out = crate::heap::zeroed::<f32>(b * t * h * d);
        let out_ptr = SendPtr(out.as_mut_ptr());
        let n_blocks = t.div_ceil(BLOCK);
        let row_stride = h * d; // output is [B, T, H, D]
        (0..b * h * n_blocks).into_par_iter().for_each_init(
            || vec![0f32; BLOCK * t],
            |scores, task| {
                let (bi, rest) = (task / (h * n_blocks), task % (h * n_blocks));
                let (hi, blk) = (rest / n_blocks, rest % n_blocks);
                let kv = hi / g;
                let r0 = blk * BLOCK;
                let rows = BLOCK.min(t - r0);
                // Keys visible to any row of this block.
                let k_end = r0 + rows;
                let k_start = match self.window {
                    Some(w) => (r0 + 1).saturating_sub(w.max(1)),
                    None => 0,
                };
                let nk = k_end - k_start;
                let qb = &q[((bi * h + hi) * t + r0) * d..];
                let kb = &k[((bi * hkv + kv) * t + k_start) * d..];
                let vb = &v[((bi * hkv + kv) * t + k_start) * d..];
                let s = &mut scores[..rows * nk];
                // SAFETY: all pointers address in-bounds row-major blocks: q rows [rows × d],
                // k/v rows [nk × d], s [rows × nk]; gemm reads/writes exactly those extents.
                unsafe {
                    gemm::gemm(
                        rows,
                        nk,
                        d,
                        s.as_mut_ptr(),
                        1,
                        nk as isize,
                        false,
                        qb.as_ptr(),
                        1,
                        d as isize,
                        kb.as_ptr(),
                        d as isize,
                        1,
                        0.0,
                        self.scale,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                }
                let mut sums = [0f32; BLOCK];
                for r in 0..rows {
                    let pos = r0 + r;
                    let lo = match self.window {
                        Some(w) => (pos + 1).saturating_sub(w.max(1)) - k_start,
                        None => 0,
                    };
                    let hi_ = pos + 1 - k_start; // exclusive
                    let row = &mut s[r * nk..(r + 1) * nk];
                    let sum = fastmath::softmax_unnormalized(&mut row[lo..hi_]);
                    row[..lo].fill(0.0);
                    row[hi_..].fill(0.0);
                    sums[r] = sum;
                }
                // SAFETY: this task owns output rows r0..r0+rows of head hi in batch bi:
                // [rows × d] at row stride H·D; no other task writes them.
                let ob = unsafe { out_ptr.get().add((bi * t + r0) * row_stride + hi * d) };
                unsafe {
                    gemm::gemm(
                        rows,
                        d,
                        nk,
                        ob,
                        1,
                        row_stride as isize,
                        false,
                        s.as_ptr(),
                        1,
                        nk as isize,
                        vb.as_ptr(),
                        1,
                        d as isize,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                    for (r, &sum) in sums.iter().enumerate().take(rows) {
                        let o = std::slice::from_raw_parts_mut(ob.add(r * row_stride), d);
                        let inv = 1.0 / sum;
                        o.iter_mut().for_each(|x| *x *= inv);
                    }
                }
            },
        );
        Ok((CpuStorage::F32(out), Shape::from((b, t, h * d))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (b, h, t, d) = q.dims4()?;
        let hkv = k.dim(1)?;
        let grad = grad.contiguous()?;
        let (dq, dk, dv) = with_slice(q, "q", |qs| {
            with_slice(k, "k", |ks| {
                with_slice(v, "v", |vs| {
                    with_slice(res, "output", |os| {
                        with_slice(&grad, "gradient", |gs| {
                            Ok(self.backward((b, h, hkv, t, d), qs, ks, vs, os, gs))
                        })
                    })
                })
            })
        })?;
        let dev = q.device();
        Ok((
            Some(Tensor::from_vec(dq, (b, h, t, d), dev)?),
            Some(Tensor::from_vec(dk, (b, hkv, t, d), dev)?),
            Some(Tensor::from_vec(dv, (b, hkv, t, d), dev)?),
        ))
    }
}

/// A contiguous f32 tensor's values, read in place.
fn with_slice<R>(t: &Tensor, what: &str, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        candle_core::Storage::Cpu(s) => f(slice(s, layout, what)?),
        _ => candle_core::bail!("causal attention: {what} must be on the CPU"),
    }
}

impl CausalAttention {
    /// Keys visible to rows `r0..r0 + rows`: `k_start..r0 + rows`.
    fn key_start(&self, r0: usize) -> usize {
        match self.window {
            Some(w) => (r0 + 1).saturating_sub(w.max(1)),
            None => 0,
        }
    }

    /// `(dq, dk, dv)` given the inputs, the output `o` and its gradient `go` (both `[B, T, H·D]`).
    #[allow(clippy::too_many_arguments)]
    fn backward(
        &self,
        (b, h, hkv, t, d): (usize, usize, usize, usize, usize),
        q: &[f32],
        k: &[f32],
        v: &[f32],
        o: &[f32],
        go: &[f32],
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let g = h / hkv;
        let n_blocks = t.div_ceil(BLOCK);
        let row_stride = h * d;
        let mut dq = crate::heap::zeroed::<f32>(b * h * t * d);
        // Per (batch, query head): that head's contributions to dK and dV of its KV head.
        let partial: Vec<(Vec<f32>, Vec<f32>)> = dq
            .par_chunks_mut(t * d)
            .enumerate()
            .map_init(
                || (vec![0f32; BLOCK * t], vec![0f32; BLOCK * t]),
                |(p, dp), (task, dq_h)| {
                    let (bi, hi) = (task / h, task % h);
                    let kv = hi / g;
                    let mut dk_h = vec![0f32; t * d];
                    let mut dv_h = vec![0f32; t * d];
                    for blk in 0..n_blocks {
                        let r0 = blk * BLOCK;
                        let rows = BLOCK.min(t - r0);
                        let k_start = self.key_start(r0);
                        let nk = r0 + rows - k_start;
                        let qb = &q[((bi * h + hi) * t + r0) * d..];
                        let kb = &k[((bi * hkv + kv) * t + k_start) * d..];
                        let vb = &v[((bi * hkv + kv) * t + k_start) * d..];
                        let ob = &o[(bi * t + r0) * row_stride + hi * d..];
                        let gob = &go[(bi * t + r0) * row_stride + hi * d..];
                        let (p, dp) = (&mut p[..rows * nk], &mut dp[..rows * nk]);
                        // SAFETY (every gemm below): operands are in-bounds row-major blocks:
                        // q rows [rows × d] (stride d), k/v rows [nk × d] (stride d), o/dO rows
                        // [rows × d] (stride H·D), p/dp [rows × nk], dq_h/dk_h/dv_h [t × d].
                        unsafe {
                            // S = s·Q·Kᵀ
                            gemm::gemm(
                                rows,
                                nk,
                                d,
                                p.as_mut_ptr(),
                                1,
                                nk as isize,
                                false,
                                qb.as_ptr(),
                                1,
                                d as isize,
                                kb.as_ptr(),
                                d as isize,
                                1,
                                0.0,
                                self.scale,
                                false,
                                false,
                                false,
                                gemm::Parallelism::None,
                            );
                            // dP = dO·Vᵀ
                            gemm::gemm(
                                rows,
                                nk,
                                d,
                                dp.as_mut_ptr(),
                                1,
                                nk as isize,
                                false,
                                gob.as_ptr(),
                                1,
                                row_stride as isize,
                                vb.as_ptr(),
                                d as isize,
                                1,
                                0.0,
                                1.0,
                                false,
                                false,
                                false,
                                gemm::Parallelism::None,
                            );
                        }
                        for r in 0..rows {
                            let pos = r0 + r;
                            let lo = match self.window {
                                Some(w) => (pos + 1).saturating_sub(w.max(1)) - k_start,
                                None => 0,
                            };
                            let hi_ = pos + 1 - k_start;
                            let row = &mut p[r * nk..(r + 1) * nk];
                            let inv = 1.0 / fastmath::softmax_unnormalized(&mut row[lo..hi_]);
                            row[lo..hi_].iter_mut().for_each(|x| *x *= inv);
                            row[..lo].fill(0.0);
                            row[hi_..].fill(0.0);
                            let dd = fastmath::dot(
                                &gob[r * row_stride..r * row_stride + d],
                                &ob[r * row_stride..r * row_stride + d],
                            );
                            let drow = &mut dp[r * nk..(r + 1) * nk];
                            for (x, &pv) in drow.iter_mut().zip(row.iter()) {
                                *x = pv * (*x - dd);
                            }
                        }
                        unsafe {
                            // dQ = s·dS·K
                            gemm::gemm(
                                rows,
                                d,
                                nk,
                                dq_h.as_mut_ptr().add(r0 * d),
                                1,
                                d as isize,
                                false,
                                dp.as_ptr(),
                                1,
                                nk as isize,
                                kb.as_ptr(),
                                1,
                                d as isize,
                                0.0,
                                self.scale,
                                false,
                                false,
                                false,
                                gemm::Parallelism::None,
                            );
                            // dK += s·dSᵀ·Q
                            gemm::gemm(
                                nk,
                                d,
                                rows,
                                dk_h.as_mut_ptr().add(k_start * d),
                                1,
                                d as isize,
                                true,
                                dp.as_ptr(),
                                nk as isize,
                                1,
                                qb.as_ptr(),
                                1,
                                d as isize,
                                1.0,
                                self.scale,
                                false,
                                false,
                                false,
                                gemm::Parallelism::None,
                            );
                            // dV += Pᵀ·dO
                            gemm::gemm(
                                nk,
                                d,
                                rows,
                                dv_h.as_mut_ptr().add(k_start * d),
                                1,
                                d as isize,
                                true,
                                p.as_ptr(),
                                nk as isize,
                                1,
                                gob.as_ptr(),
                                1,
                                row_stride as isize,
                                1.0,
                                1.0,
                                false,
                                false,
                                false,
                                gemm::Parallelism::None,
                            );
                        }
                    }
                    (dk_h, dv_h)
                },
            )
            .collect();
        // Each KV head's gradient sums its group's query heads in head order; `pick` selects the
        // query head's dK or dV.
        type Pick = dyn Fn(&(Vec<f32>, Vec<f32>)) -> &[f32] + Sync;
        let sum_group = |pick: &Pick| {
            crate::heap::par_filled(b * hkv * t * d, t * d, |kvt, acc: &mut [f32]| {
                let (bi, kv) = (kvt / hkv, kvt % hkv);
                for hi in kv * g..(kv + 1) * g {
                    for (a, x) in acc.iter_mut().zip(pick(&partial[bi * h + hi])) {
                        *a += x;
                    }
                }
            })
        };
        let (dk, dv) = (sum_group(&|p| &p.0), sum_group(&|p| &p.1));
        (dq, dk, dv)
    }
}

/// Causal attention over `q` `[B, H, T, D]`, `k`/`v` `[B, Hkv, T, D]` → `[B, T, H·D]`.
pub fn causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f32,
    window: Option<usize>,
) -> Result<Tensor> {
    q.contiguous()?.apply_op3_no_bwd(
        &k.contiguous()?,
        &v.contiguous()?,
        &CausalAttention { scale, window },
    )
}

/// [`causal_attention`] with its backward (calibration).
pub fn causal_attention_train(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f32,
    window: Option<usize>,
) -> Result<Tensor> {
    q.contiguous()?.apply_op3(
        &k.contiguous()?,
        &v.contiguous()?,
        CausalAttention { scale, window },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var, D};

    /// The attention composed of candle ops in `dtype` (the autograd oracle): scores, additive
    /// causal (and window) mask, softmax, `P·V`, heads repeated for GQA.
    fn composed(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, window: Option<usize>) -> Tensor {
        let (b, h, t, d) = q.dims4().unwrap();
        let g = h / k.dim(1).unwrap();
        let rep = |x: &Tensor| {
            let (b, hk, t, d) = x.dims4().unwrap();
            x.unsqueeze(2)
                .unwrap()
                .broadcast_as((b, hk, g, t, d))
                .unwrap()
                .reshape((b, hk * g, t, d))
                .unwrap()
        };
        let mut m = vec![0f64; t * t];
        for i in 0..t {
            for j in 0..t {
                if j > i || window.is_some_and(|w| i - j >= w) {
                    m[i * t + j] = f64::NEG_INFINITY;
                }
            }
        }
        let mask = Tensor::from_vec(m, (t, t), &Device::Cpu)
            .unwrap()
            .to_dtype(q.dtype())
            .unwrap();
        let s = (q.matmul(&rep(k).t().unwrap()).unwrap() * scale)
            .unwrap()
            .broadcast_add(&mask)
            .unwrap();
        let mx = s.max_keepdim(D::Minus1).unwrap().detach();
        let e = s.broadcast_sub(&mx).unwrap().exp().unwrap();
        let p = e.broadcast_div(&e.sum_keepdim(D::Minus1).unwrap()).unwrap();
        p.matmul(&rep(v))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((b, t, h * d))
            .unwrap()
    }

    fn vals(t: &Tensor) -> Vec<f64> {
        t.to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    /// max |a − b| / max |b|.
    fn rel(a: &[f64], b: &[f64]) -> f64 {
        let m = b.iter().fold(0f64, |m, x| m.max(x.abs()));
        a.iter().zip(b).fold(0f64, |e, (x, y)| e.max((x - y).abs())) / m
    }

    /// The fused op's output and gradients (of `Σ o⊙r`) against the composed graph's in f32 and
    /// against central finite differences of the f64 composed graph. f32 tolerance: each value is
    /// a sum over at most `T + D ≈ 80` products, so its rounding error is below `80·2⁻²⁴ ≈ 5e-6`
    /// of the summed magnitudes (plus the fast exp's 3e-7); 1e-4 of the largest gradient leaves a
    /// factor 20. Finite differences in f64 with step 1e-4 are exact to ~1e-8, so the same bound
    /// holds for them.
    #[test]
    fn fused_attention_gradients_match_autograd_and_finite_differences() {
        let dev = Device::Cpu;
        let (b, h, hkv, t, d) = (2, 4, 2, 70, 8); // two row blocks, GQA g = 2
        for window in [None, Some(5)] {
            let q =
                Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, h, t, d), &dev).unwrap()).unwrap();
            let k =
                Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, hkv, t, d), &dev).unwrap()).unwrap();
            let v =
                Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, hkv, t, d), &dev).unwrap()).unwrap();
            let r = Tensor::randn(0f32, 1.0, (b, t, h * d), &dev).unwrap();
            let scale = 1.0 / (d as f64).sqrt();
            let fused = causal_attention_train(&q, &k, &v, scale as f32, window).unwrap();
            let oracle = composed(&q, &k, &v, scale, window);
            assert!(
                rel(&vals(&fused), &vals(&oracle)) < 1e-5,
                "{window:?} values"
            );
            let gf = (&fused * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let go = (&oracle * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            for (name, x) in [("q", &q), ("k", &k), ("v", &v)] {
                let a = vals(gf.get(x).unwrap());
                let e = rel(&a, &vals(go.get(x).unwrap()));
                assert!(e < 1e-4, "{window:?} d{name} vs autograd: {e}");
                // Finite differences of the f64 graph at a spread of elements.
                let x64 = vals(x);
                let others = |y: &Tensor| y.to_dtype(DType::F64).unwrap();
                let r64 = others(&r);
                let loss = |xs: &[f64]| -> f64 {
                    let xt = Tensor::from_vec(xs.to_vec(), x.dims(), &dev).unwrap();
                    let (qq, kk, vv) = match name {
                        "q" => (xt, others(&k), others(&v)),
                        "k" => (others(&q), xt, others(&v)),
                        _ => (others(&q), others(&k), xt),
                    };
                    let o = composed(&qq, &kk, &vv, scale, window);
                    (o * &r64).unwrap().sum_all().unwrap().to_scalar().unwrap()
                };
                let gmax = a.iter().fold(0f64, |m, x| m.max(x.abs()));
                for i in (0..x64.len()).step_by(x64.len() / 13) {
                    let (mut p, mut m) = (x64.clone(), x64.clone());
                    p[i] += 1e-4;
                    m[i] -= 1e-4;
                    let fd = (loss(&p) - loss(&m)) / 2e-4;
                    assert!(
                        (fd - a[i]).abs() < 1e-4 * gmax,
                        "{window:?} d{name}[{i}]: fd {fd} vs {}",
                        a[i]
                    );
                }
            }
        }
    }
}

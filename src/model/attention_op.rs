//! Fused causal self-attention for evaluation (no gradients).
//!
//! For each (batch, query head, block of query rows) one task computes `S = Q·Kᵀ` over the visible
//! keys with gemm, a masked softmax in place (fast exp, row max subtracted), and `O = P·V`,
//! normalising by the row sums at the end. GQA is native: query head `h` reads KV head `h / g`.
//! Compared with composing candle ops, this never materialises a mask or the full score tensor and
//! skips the invisible upper triangle.

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
        let mut out = vec![0f32; b * t * h * d];
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

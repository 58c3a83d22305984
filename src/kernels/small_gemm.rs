//! Small row-major GEMMs `C[m, n] = A[m, k]·B[k, n]` with `n` up to a few hundred, for the online
//! Kronecker transforms: register blocks of 4 rows × 64 columns (16 zmm accumulators), masked for
//! the ragged edges. In f32 (`vfmadd`, 16 MACs per instruction) and in bf16 (`vdpbf16ps`: pairs
//! of bf16 products summed into f32, 32 MACs per instruction; inputs rounded to bf16, unit
//! roundoff 2⁻⁹, accumulation in f32).
#![allow(clippy::needless_range_loop)] // register arrays indexed in lockstep

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// The f32 kernel can run (AVX-512F).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `C[m, n] = A[m, k]·B[k, n]` in f32, all row-major.
///
/// # Safety
/// [`available`]; `a.len() ≥ m·k`, `b.len() ≥ k·n`, `c.len() ≥ m·n`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub unsafe fn gemm(a: &[f32], b: &[f32], c: &mut [f32], m: usize, k: usize, n: usize) {
    use std::arch::x86_64::*;
    let chunks = n.div_ceil(16);
    let mask = |j: usize| -> __mmask16 {
        let left = n - j * 16;
        if left >= 16 {
            0xFFFF
        } else {
            ((1u32 << left) - 1) as __mmask16
        }
    };
    let (ap, bp, cp) = (a.as_ptr(), b.as_ptr(), c.as_mut_ptr());
    let mut j0 = 0;
    while j0 < chunks {
        let jc = (chunks - j0).min(4);
        let mk = [
            mask(j0),
            mask(j0 + 1.min(jc - 1)),
            mask(j0 + 2.min(jc - 1)),
            mask(j0 + 3.min(jc - 1)),
        ];
        let mut i0 = 0;
        while i0 < m {
            let ir = (m - i0).min(4);
            let mut acc = [[_mm512_setzero_ps(); 4]; 4];
            for l in 0..k {
                let brow = bp.add(l * n + j0 * 16);
                let mut bv = [_mm512_setzero_ps(); 4];
                for j in 0..4 {
                    if j < jc {
                        bv[j] = _mm512_maskz_loadu_ps(mk[j], brow.add(j * 16));
                    }
                }
                for i in 0..4 {
                    if i < ir {
                        let av = _mm512_set1_ps(*ap.add((i0 + i) * k + l));
                        for j in 0..4 {
                            if j < jc {
                                acc[i][j] = _mm512_fmadd_ps(av, bv[j], acc[i][j]);
                            }
                        }
                    }
                }
            }
            for i in 0..ir {
                for j in 0..jc {
                    _mm512_mask_storeu_ps(cp.add((i0 + i) * n + (j0 + j) * 16), mk[j], acc[i][j]);
                }
            }
            i0 += 4;
        }
        j0 += 4;
    }
}

#[cfg(not(target_arch = "x86_64"))]
pub unsafe fn gemm(_: &[f32], _: &[f32], _: &mut [f32], _: usize, _: usize, _: usize) {
    unreachable!("small_gemm::available() is false")
}

/// The bf16 kernels can run (AVX-512 BF16 with BW/VL for the conversions).
pub fn bf16_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[cfg(target_arch = "x86_64")]
#[inline]
fn mask16(left: usize) -> __mmask16 {
    if left >= 16 {
        0xFFFF
    } else {
        ((1u32 << left) - 1) as __mmask16
    }
}

/// `dst [m, ke] = bf16(src [m, k])` (round to nearest even), `ke` = `k` rounded up to even with a
/// zero pad column: the A operand of [`gemm_bf16`].
///
/// # Safety
/// [`bf16_available`]; `src.len() ≥ m·k`, `dst.len() ≥ m·ke`, `ke ∈ {k, k + 1}` even.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
pub unsafe fn to_bf16_rows(src: &[f32], dst: &mut [u16], m: usize, k: usize, ke: usize) {
    debug_assert!(ke.is_multiple_of(2) && ke >= k && src.len() >= m * k && dst.len() >= m * ke);
    for i in 0..m {
        let (s, d) = (src.as_ptr().add(i * k), dst.as_mut_ptr().add(i * ke));
        let mut j = 0;
        while j < k {
            let mk = mask16(k - j);
            let h = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(mk, s.add(j)));
            _mm256_mask_storeu_epi16(
                d.add(j) as *mut i16,
                mk,
                std::mem::transmute::<__m256bh, __m256i>(h),
            );
            j += 16;
        }
        if ke > k {
            *d.add(k) = 0;
        }
    }
}

/// `dst [ke/2, n, 2]`: rows `2p` and `2p + 1` of `src [k, n]` in bf16, interleaved column by
/// column (a zero row pads odd `k`): the B operand of [`gemm_bf16`].
///
/// # Safety
/// [`bf16_available`]; `src.len() ≥ k·n`, `dst.len() ≥ ke·n`, `ke ∈ {k, k + 1}` even.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
pub unsafe fn pack_pairs(src: &[f32], dst: &mut [u16], k: usize, n: usize, ke: usize) {
    debug_assert!(ke.is_multiple_of(2) && ke >= k && src.len() >= k * n && dst.len() >= ke * n);
    // Word 2t of the result takes word t (row 2p), word 2t + 1 takes word 16 + t (row 2p + 1).
    const IDX: [i16; 32] = {
        let mut idx = [0i16; 32];
        let mut t = 0;
        while t < 16 {
            idx[2 * t] = t as i16;
            idx[2 * t + 1] = 16 + t as i16;
            t += 1;
        }
        idx
    };
    let idx = _mm512_loadu_si512(IDX.as_ptr() as *const _);
    for p in 0..ke / 2 {
        let r0 = src.as_ptr().add(2 * p * n);
        let mut j = 0;
        while j < n {
            let w = (n - j).min(16);
            let mk = mask16(w);
            let v0 = _mm512_maskz_loadu_ps(mk, r0.add(j));
            let v1 = if 2 * p + 1 < k {
                _mm512_maskz_loadu_ps(mk, src.as_ptr().add((2 * p + 1) * n + j))
            } else {
                _mm512_setzero_ps()
            };
            // Words 0..16 from v0, 16..32 from v1.
            let h = std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(v1, v0));
            let inter = _mm512_permutexvar_epi16(idx, h);
            let mk32: __mmask32 = if w == 16 {
                u32::MAX
            } else {
                (1u32 << (2 * w)) - 1
            };
            _mm512_mask_storeu_epi16(
                dst.as_mut_ptr().add((p * n + j) * 2) as *mut i16,
                mk32,
                inter,
            );
            j += 16;
        }
    }
}

/// `C[m, n] = A·B` with `A` from [`to_bf16_rows`] (`[m, ke]`) and `B` from [`pack_pairs`]
/// (`[ke/2, n, 2]`): each `vdpbf16ps` adds `a[2p]·b[2p][j] + a[2p+1]·b[2p+1][j]` into f32.
///
/// # Safety
/// [`bf16_available`]; slices as produced by the packers for these shapes, `c.len() ≥ m·n`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
pub unsafe fn gemm_bf16(a: &[u16], b: &[u16], c: &mut [f32], m: usize, ke: usize, n: usize) {
    debug_assert!(a.len() >= m * ke && b.len() >= ke * n && c.len() >= m * n);
    let chunks = n.div_ceil(16);
    let (ap, bp, cp) = (a.as_ptr(), b.as_ptr() as *const i32, c.as_mut_ptr());
    let mut j0 = 0;
    while j0 < chunks {
        let jc = (chunks - j0).min(4);
        let mut mk = [0 as __mmask16; 4];
        for j in 0..jc {
            mk[j] = mask16(n - (j0 + j) * 16);
        }
        let mut i0 = 0;
        while i0 < m {
            let ir = (m - i0).min(4);
            let mut acc = [[_mm512_setzero_ps(); 4]; 4];
            for p in 0..ke / 2 {
                let brow = bp.add(p * n + j0 * 16);
                let mut bv = [_mm512_setzero_si512(); 4];
                for j in 0..4 {
                    if j < jc {
                        bv[j] = _mm512_maskz_loadu_epi32(mk[j], brow.add(j * 16));
                    }
                }
                for i in 0..4 {
                    if i < ir {
                        let pair = (ap.add((i0 + i) * ke + 2 * p) as *const i32).read_unaligned();
                        let av = std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(pair));
                        for j in 0..4 {
                            if j < jc {
                                acc[i][j] = _mm512_dpbf16_ps(
                                    acc[i][j],
                                    av,
                                    std::mem::transmute::<__m512i, __m512bh>(bv[j]),
                                );
                            }
                        }
                    }
                }
            }
            for i in 0..ir {
                for j in 0..jc {
                    _mm512_mask_storeu_ps(cp.add((i0 + i) * n + (j0 + j) * 16), mk[j], acc[i][j]);
                }
            }
            i0 += 4;
        }
        j0 += 4;
    }
}

#[cfg(not(target_arch = "x86_64"))]
pub unsafe fn to_bf16_rows(_: &[f32], _: &mut [u16], _: usize, _: usize, _: usize) {
    unreachable!("bf16_available() is false")
}

#[cfg(not(target_arch = "x86_64"))]
pub unsafe fn pack_pairs(_: &[f32], _: &mut [u16], _: usize, _: usize, _: usize) {
    unreachable!("bf16_available() is false")
}

#[cfg(not(target_arch = "x86_64"))]
pub unsafe fn gemm_bf16(_: &[u16], _: &[u16], _: &mut [f32], _: usize, _: usize, _: usize) {
    unreachable!("bf16_available() is false")
}

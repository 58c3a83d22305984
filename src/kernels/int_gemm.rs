//! Integer GEMM of quantized linears (the real W4A4 / W4A8 / W8A8 inference path).
//!
//! With per-token activation codes `q_a[m, k] = code − zero` (signed, |q| ≤ 127) and per-channel
//! weight codes `c_w[n, k] ∈ [0, 2^b)` with integer zero `z_w[n]`, the simulated layer computes
//!
//!   y[m, n] = Σ_k s_a[m]·q_a[m, k] · s_w[n]·(c_w[n, k] − z_w[n])
//!           = s_a[m]·s_w[n]·( Σ_k c_w[n, k]·q_a[m, k]  −  z_w[n]·Σ_k q_a[m, k] ).
//!
//! The bracket is exact in i32 (|Σ| ≤ k·255·128 < 2³¹ for k < 65 000), so the kernels agree with
//! the simulation up to the float rounding of the simulation's own sums. The inner sum is a
//! u8 × i8 dot product: `vpdpbusd` on AVX-512 VNNI (16 outputs × 4 k per instruction),
//! `vpmaddubsw` + `vpmaddwd` on AVX2 (i16 pair sums: used only where they cannot saturate), and a
//! portable loop otherwise. Weights are repacked once at load into tiles of 16 outputs × 8 k:
//! at ≤ 4 bits one byte holds `c(o, k0+j)` in its low nibble and `c(o, k0+4+j)` in its high nibble
//! (64 bytes per block; the kernels unpack with a mask and a shift), at 5–8 bits one byte per code
//! (128 bytes per block).

use crate::error::{Error, Result};
use crate::quant::quantizer::round_even;
use crate::quant::{AsymZero, QuantSpec, QuantizedWeight};
use rayon::prelude::*;

/// Outputs per weight tile.
pub const NR: usize = 16;
/// k values per packed block.
pub const KB: usize = 8;
/// Activation rows per cache block.
const MB: usize = 128;
/// Activation rows per register tile of the two-tile VNNI kernel (8 rows × 32 outputs: 16
/// accumulators, each weight load and unpack shared by 8 rows).
const RB: usize = 8;
/// Multiply-adds below which the GEMM runs on the calling thread.
const SEQUENTIAL_WORK: usize = 1 << 20;

/// Instruction set of the dot-product kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    Avx512Vnni,
    Avx2,
    Scalar,
}

impl Isa {
    /// The best kernel this CPU runs (`AFFQ_KERNEL_ISA=avx512vnni|avx2|scalar` forces one).
    pub fn detect() -> Isa {
        if let Ok(v) = std::env::var("AFFQ_KERNEL_ISA") {
            let forced = match v.as_str() {
                "avx512vnni" => Some(Isa::Avx512Vnni),
                "avx2" => Some(Isa::Avx2),
                "scalar" => Some(Isa::Scalar),
                _ => None,
            };
            if let Some(i) = forced.filter(|i| i.available()) {
                return i;
            }
        }
        [Isa::Avx512Vnni, Isa::Avx2]
            .into_iter()
            .find(|i| i.available())
            .unwrap_or(Isa::Scalar)
    }

    pub fn available(self) -> bool {
        match self {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Vnni => {
                is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vnni")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => is_x86_feature_detected!("avx2"),
            Isa::Scalar => true,
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Isa::Avx512Vnni => "avx512-vnni",
            Isa::Avx2 => "avx2",
            Isa::Scalar => "scalar",
        }
    }
}

/// Weights repacked for the kernels (per output channel: scale and integer zero).
#[derive(Debug, Clone)]
pub struct PackedWeights {
    pub n: usize,
    pub k: usize,
    /// `k` rounded up to a multiple of [`KB`].
    pub kp: usize,
    pub bits: u8,
    pub scale: Vec<f32>,
    pub zero: Vec<i32>,
    /// Largest code (bounds the AVX2 pair sums).
    max_code: i32,
    data: Vec<u8>,
}

impl PackedWeights {
    fn nibble(&self) -> bool {
        self.bits <= 4
    }

    /// Bytes of one tile's block of `KB` k values.
    fn block_bytes(&self) -> usize {
        if self.nibble() {
            NR * KB / 2
        } else {
            NR * KB
        }
    }

    fn tile_bytes(&self) -> usize {
        self.kp / KB * self.block_bytes()
    }

    fn tiles(&self) -> usize {
        self.n.div_ceil(NR)
    }

    /// Packs per-channel codes `[n, k]` with scales and integer zeros.
    pub fn from_codes(
        codes: &[u8],
        n: usize,
        k: usize,
        bits: u8,
        scale: Vec<f32>,
        zero: Vec<i32>,
    ) -> Self {
        Self::from_fn(n, k, bits, scale, zero, |o, j| codes[o * k + j])
    }

    /// Packs the codes `code(o, j)` of `n` outputs × `k` inputs (each `< 2^bits`), one task per
    /// tile; `code` may read any layout (a transposed matrix, codes with an offset added).
    pub fn from_fn(
        n: usize,
        k: usize,
        bits: u8,
        scale: Vec<f32>,
        zero: Vec<i32>,
        inner: impl Fn(usize, usize) -> u8 + Sync,
    ) -> Self {
        let kp = k.div_ceil(KB) * KB;
        let nib = bits <= 4;
        let block = if nib { NR * KB / 2 } else { NR * KB };
        let tiles = n.div_ceil(NR);
        let mut data = crate::heap::zeroed::<u8>(tiles * kp / KB * block);
        let code = |o: usize, j: usize| -> u8 {
            if o < n && j < k {
                inner(o, j)
            } else {
                0
            }
        };
        let pack_tile = |t: usize, tile: &mut [u8]| -> u8 {
            let mut max = 0u8;
            let full_tile = (t + 1) * NR <= n;
            for b in 0..kp / KB {
                let base = b * block;
                let k0 = b * KB;
                let mut put = |o: usize, j: usize, lo: u8, hi: u8| {
                    max = max.max(lo).max(hi);
                    if nib {
                        tile[base + o * 4 + j] = lo | (hi << 4);
                    } else {
                        tile[base + o * 4 + j] = lo;
                        tile[base + NR * 4 + o * 4 + j] = hi;
                    }
                };
                if full_tile && k0 + KB <= k {
                    // Whole block: no bounds to test per code.
                    for j in 0..4 {
                        for o in 0..NR {
                            let oo = t * NR + o;
                            put(o, j, inner(oo, k0 + j), inner(oo, k0 + 4 + j));
                        }
                    }
                } else {
                    for j in 0..4 {
                        for o in 0..NR {
                            let oo = t * NR + o;
                            put(o, j, code(oo, k0 + j), code(oo, k0 + 4 + j));
                        }
                    }
                }
            }
            max
        };
        let tile_bytes = (kp / KB * block).max(1);
        let max_code = if n * k < SEQUENTIAL_WORK / 16 {
            data.chunks_mut(tile_bytes)
                .enumerate()
                .map(|(t, tile)| pack_tile(t, tile))
                .max()
        } else {
            data.par_chunks_mut(tile_bytes)
                .enumerate()
                .map(|(t, tile)| pack_tile(t, tile))
                .max()
        }
        .unwrap_or(0) as i32;
        PackedWeights {
            n,
            k,
            kp,
            bits,
            scale,
            zero,
            max_code,
            data,
        }
    }

    /// Code of output `o`, input `j` (the inverse of the packing in [`Self::from_codes`]).
    pub fn code(&self, o: usize, j: usize) -> u8 {
        let (t, oo, b, jj) = (o / NR, o % NR, j / KB, j % KB);
        let base = (t * self.kp / KB + b) * self.block_bytes();
        let (half, jj) = (jj / 4, jj % 4);
        if self.nibble() {
            (self.data[base + oo * 4 + jj] >> (4 * half)) & 15
        } else {
            self.data[base + half * NR * 4 + oo * 4 + jj]
        }
    }

    /// From a quantized weight with per-channel integer grids (symmetric, or asymmetric with an
    /// integer zero point). Other layouts (groups, float offsets) have no integer kernel.
    pub fn from_quantized(q: &QuantizedWeight) -> Option<Self> {
        if q.n_groups() != 1
            || q.spec.bits > 8
            || (!q.spec.symmetric && q.spec.asym_zero != AsymZero::Integer)
            || q.params
                .iter()
                .any(|p| p.offset != 0.0 || p.zero.fract() != 0.0)
        {
            return None;
        }
        Some(Self::from_codes(
            &q.codes,
            q.out,
            q.inp,
            q.spec.bits,
            q.params.iter().map(|p| p.scale).collect(),
            q.params.iter().map(|p| p.zero as i32).collect(),
        ))
    }
}

/// Per-token quantized activations: signed codes `[m, kp]` (zero padded), scales, row sums.
#[derive(Debug, Clone)]
pub struct QuantizedActs {
    pub m: usize,
    pub kp: usize,
    pub q: Vec<i8>,
    pub scale: Vec<f32>,
    pub sum: Vec<i32>,
    /// Largest |code| (bounds the AVX2 pair sums).
    max_abs: i32,
}

impl QuantizedActs {
    /// Rows quantized by [`quantize_row`]; `max_abs` is the largest of their `RowCodes::max_abs`.
    pub fn new(
        m: usize,
        kp: usize,
        q: Vec<i8>,
        scale: Vec<f32>,
        sum: Vec<i32>,
        max_abs: i32,
    ) -> Self {
        QuantizedActs {
            m,
            kp,
            q,
            scale,
            sum,
            max_abs,
        }
    }

    /// Zeroed codes for `m` rows of `k` values, to be filled row by row.
    fn zeroed(m: usize, k: usize) -> Self {
        let kp = k.div_ceil(KB) * KB;
        QuantizedActs::new(m, kp, vec![0i8; m * kp], vec![0f32; m], vec![0i32; m], 0)
    }

    /// Fills the rows in parallel, `tile` rows per task: `fill(state, first_row, kp, codes,
    /// row_codes)` writes the tile's codes (rows `kp` apart) and one `RowCodes` per row.
    pub fn build<F, S>(
        m: usize,
        k: usize,
        tile: usize,
        init: impl Fn() -> S + Sync + Send,
        fill: F,
    ) -> Self
    where
        F: Fn(&mut S, usize, usize, &mut [i8], &mut [RowCodes]) + Sync + Send,
    {
        let mut a = QuantizedActs::zeroed(m, k);
        let kp = a.kp;
        let mut rows = vec![RowCodes::default(); m];
        if m <= tile {
            // One tile (decode): no thread hand-off.
            fill(&mut init(), 0, kp, &mut a.q, &mut rows);
        } else {
            a.q.par_chunks_mut(kp * tile)
                .zip(rows.par_chunks_mut(tile))
                .enumerate()
                .for_each_init(init, |s, (i, (q, r))| fill(s, i * tile, kp, q, r));
        }
        for (i, r) in rows.iter().enumerate() {
            (a.scale[i], a.sum[i]) = (r.scale, r.sum);
            a.max_abs = a.max_abs.max(r.max_abs);
        }
        a
    }
}

/// Whether `spec` has an integer activation kernel: an integer zero point and signed codes that
/// fit in i8.
pub fn act_supported(spec: &QuantSpec) -> bool {
    if spec.symmetric {
        spec.bits <= 8
    } else {
        spec.asym_zero == AsymZero::Integer && spec.bits <= 7
    }
}

/// Quantizes rows of `x` (`[m, k]`) per token exactly as the simulated quantizer does
/// (`quant::quantizer`: same scale, same ties-to-even rounding), keeping signed codes.
pub fn quantize_acts(x: &[f32], m: usize, k: usize, spec: &QuantSpec) -> QuantizedActs {
    const TILE: usize = 16;
    QuantizedActs::build(
        m,
        k,
        TILE,
        || (),
        |_, r0, kp, q, rows| {
            for (i, rc) in rows.iter_mut().enumerate() {
                let r = r0 + i;
                *rc = quantize_row(&x[r * k..(r + 1) * k], &mut q[i * kp..i * kp + k], spec);
            }
        },
    )
}

/// One quantized token row: its scale, `Σ q` and `max |q|`.
#[derive(Debug, Clone, Copy, Default)]
pub struct RowCodes {
    pub scale: f32,
    pub sum: i32,
    pub max_abs: i32,
}

/// Lanes of the row loops: wide enough for a zmm, and lane-wise accumulators keep the min/max
/// reductions vectorizable without reassociating anything.
const LANES: usize = 16;

#[inline(always)]
fn quantize_row_generic(x: &[f32], q: &mut [i8], spec: &QuantSpec) -> RowCodes {
    let mut lo = [f32::INFINITY; LANES];
    let mut hi = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for j in 0..LANES {
            lo[j] = lo[j].min(c[j]);
            hi[j] = hi[j].max(c[j]);
        }
    }
    for (j, &v) in tail.iter().enumerate() {
        lo[j] = lo[j].min(v);
        hi[j] = hi[j].max(v);
    }
    let lo = lo.iter().fold(f32::INFINITY, |a, &b| a.min(b));
    let hi = hi.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let p = spec.params(lo, hi);
    let (s, z, qmax) = (p.scale, p.zero, spec.qmax() as f32);
    // Same expression as the simulated quantizer: c = clamp(round(x / s + z), 0, qmax), q = c − z
    // (max/min rather than clamp so a NaN lands on 0 and the conversion below is in range).
    let code = |v: f32| {
        let c = round_even(v / s + z).max(0.0).min(qmax) - z;
        // SAFETY: c is finite and |c| ≤ 255.
        unsafe { c.to_int_unchecked::<i32>() }
    };
    let q = &mut q[..x.len()];
    let mut sum = [0i32; LANES];
    let mut mx = [0i32; LANES];
    let mut qc = q.chunks_exact_mut(LANES);
    let mut xc = x.chunks_exact(LANES);
    for (qd, xs) in (&mut qc).zip(&mut xc) {
        for j in 0..LANES {
            let v = code(xs[j]);
            qd[j] = v as i8;
            sum[j] += v;
            mx[j] = mx[j].max(v.abs());
        }
    }
    for (j, (d, &v)) in qc
        .into_remainder()
        .iter_mut()
        .zip(xc.remainder())
        .enumerate()
    {
        let v = code(v);
        *d = v as i8;
        sum[j] += v;
        mx[j] = mx[j].max(v.abs());
    }
    RowCodes {
        scale: s,
        sum: sum.iter().sum(),
        max_abs: mx.iter().copied().max().unwrap_or(0),
    }
}

crate::fastmath::dispatch!(
    /// One token row to signed codes `q = code − zero` with the simulated quantizer's grid and
    /// rounding (`q` at least as long as `x`; the rest untouched).
    quantize_row, quantize_row_generic, (x: &[f32], q: &mut [i8], spec: &QuantSpec) -> RowCodes
);

/// Raw output pointer shared by tasks that write disjoint columns.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// `out[m, n] = a·wᵀ` (+ bias), dequantized. `isa` is downgraded if it cannot run this case
/// exactly (AVX2 pair sums that could saturate i16).
pub fn gemm(
    a: &QuantizedActs,
    w: &PackedWeights,
    bias: Option<&[f32]>,
    isa: Isa,
    out: &mut [f32],
) -> Result<()> {
    if out.len() != a.m * w.n {
        return Err(Error::Runtime(format!(
            "int gemm: [{}, {}] outputs into {} values",
            a.m,
            w.n,
            out.len()
        )));
    }
    gemm_into(a, w, bias, isa, out, w.n)
}

/// [`gemm`] writing row `i` at `out[i·ldo..i·ldo + n]` (the columns of one linear among several
/// sharing an input).
pub fn gemm_into(
    a: &QuantizedActs,
    w: &PackedWeights,
    bias: Option<&[f32]>,
    isa: Isa,
    out: &mut [f32],
    ldo: usize,
) -> Result<()> {
    gemm_raw(a, w, bias, isa, out.as_mut_ptr(), out.len(), ldo)
}

/// `a·wᵀ` `[m, n]` into a new vector (no zeroing pass: the kernel writes every element).
pub fn gemm_new(a: &QuantizedActs, w: &PackedWeights, isa: Isa) -> Result<Vec<f32>> {
    let len = a.m * w.n;
    let mut out: Vec<f32> = Vec::with_capacity(len);
    gemm_raw(a, w, None, isa, out.as_mut_ptr(), len, w.n)?;
    // SAFETY: `gemm_raw` wrote all `len` elements (row i at i·n, n columns, every row).
    unsafe { out.set_len(len) };
    Ok(out)
}

/// [`gemm_into`] on `len` elements at `out` (possibly uninitialized; only written).
fn gemm_raw(
    a: &QuantizedActs,
    w: &PackedWeights,
    bias: Option<&[f32]>,
    isa: Isa,
    out: *mut f32,
    len: usize,
    ldo: usize,
) -> Result<()> {
    let fits = a.m == 0 || (ldo >= w.n && (a.m - 1) * ldo + w.n <= len);
    if a.kp != w.kp || !fits {
        return Err(Error::Runtime(format!(
            "int gemm: activations [{}, {}] against weights [{}, {}] into {} values at row stride {ldo}",
            a.m,
            a.kp,
            w.n,
            w.kp,
            len
        )));
    }
    let isa = match isa {
        Isa::Avx2 if 2 * w.max_code * a.max_abs > i16::MAX as i32 => Isa::Scalar,
        i if !i.available() => Isa::Scalar,
        i => i,
    };
    let n = w.n;
    let ptr = OutPtr(out);
    let tiles = w.tiles();
    // Per-channel epilogue terms padded to whole tiles, so the epilogue is branch-free.
    let pad = |v: &mut Vec<f32>| v.resize(tiles * NR, 0.0);
    let mut ws = w.scale.clone();
    pad(&mut ws);
    let mut wz = w.zero.clone();
    wz.resize(tiles * NR, 0);
    let mut wb = bias.map_or_else(Vec::new, <[f32]>::to_vec);
    pad(&mut wb);
    // Tasks: blocks of MB rows × `group` tiles (≤ 8 tiles: their weights stay in L2 while the
    // rows stream), one parallel loop over all of them. Groups are even (tile pairs share each
    // activation broadcast) and shrink until every thread has a few tasks, e.g. at decode.
    let m_blocks = a.m.div_ceil(MB);
    let mut group = 8;
    while group > 2 && m_blocks * tiles.div_ceil(group) < 4 * rayon::current_num_threads() {
        group -= 2;
    }
    let groups = tiles.div_ceil(group);
    let run = |task: usize| {
        // Capture the whole Send wrapper, not its raw-pointer field.
        #[allow(clippy::redundant_locals)]
        let ptr = ptr;
        let (mb, g) = (task / groups, task % groups);
        let (m0, m1) = (mb * MB, ((mb + 1) * MB).min(a.m));
        {
            let (t_lo, t_hi) = (g * group, ((g + 1) * group).min(tiles));
            // Pairs of tiles: 32 outputs share each activation broadcast.
            for t in (t_lo..t_hi).step_by(2) {
                let nt = (t_hi - t).min(2);
                let mut r = m0;
                while r < m1 {
                    let rows = (m1 - r).min(RB);
                    let mut acc = [[0i32; 2 * NR]; RB];
                    dot_tiles(a, w, t, nt, r, rows, isa, &mut acc);
                    for tt in 0..nt {
                        let c0 = (t + tt) * NR;
                        let (zs, ss, bs) = (&wz[c0..c0 + NR], &ws[c0..c0 + NR], &wb[c0..c0 + NR]);
                        let width = NR.min(n - c0);
                        for (i, accr) in acc.iter().enumerate().take(rows) {
                            let accr = &accr[tt * NR..(tt + 1) * NR];
                            let row = r + i;
                            let (sa, sum) = (a.scale[row], a.sum[row]);
                            let mut y = [0f32; NR];
                            // Σ c·q − z·Σ q stays in i32 (exact) before the one float scaling.
                            for o in 0..NR {
                                let exact = (accr[o] - zs[o] * sum) as f32;
                                y[o] = sa * ss[o] * exact + bs[o];
                            }
                            // SAFETY: each (row, col) is written by exactly one task: tasks
                            // own disjoint tiles (columns) and rows are visited once per tile.
                            unsafe {
                                let dst = ptr.0.add(row * ldo + c0);
                                if width == NR {
                                    // A fixed-size store (vector moves, not a memcpy call).
                                    (dst as *mut [f32; NR]).write_unaligned(y);
                                } else {
                                    std::ptr::copy_nonoverlapping(y.as_ptr(), dst, width);
                                }
                            };
                        }
                    }
                    r += rows;
                }
            }
        }
    };
    // A decode-sized product (a few µs of work) is faster on one thread than woken workers.
    if a.m * n * a.kp < SEQUENTIAL_WORK {
        (0..m_blocks * groups).for_each(run);
    } else {
        (0..m_blocks * groups).into_par_iter().for_each(run);
    }
    Ok(())
}

/// `acc[i][tt·NR + o] = Σ_k c_w[(t + tt)·NR + o, k]·q_a[r + i, k]` for `nt ≤ 2` tiles and
/// `rows ≤ RB` activation rows.
#[allow(clippy::too_many_arguments)]
fn dot_tiles(
    a: &QuantizedActs,
    w: &PackedWeights,
    t: usize,
    nt: usize,
    r: usize,
    rows: usize,
    isa: Isa,
    acc: &mut [[i32; 2 * NR]; RB],
) {
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512Vnni && nt == 2 {
        let tb = w.tile_bytes();
        let tiles = &w.data[t * tb..(t + 2) * tb];
        let arow = |i: usize| &a.q[(r + i) * a.kp..(r + i + 1) * a.kp];
        let nb = w.nibble();
        // SAFETY: availability checked by `gemm`; slices cover kp/KB blocks of both tiles.
        unsafe {
            match rows {
                8 => x86::vnni2::<8>(tiles, tb, std::array::from_fn(arow), nb, acc),
                7 => x86::vnni2::<7>(tiles, tb, std::array::from_fn(arow), nb, acc),
                6 => x86::vnni2::<6>(tiles, tb, std::array::from_fn(arow), nb, acc),
                5 => x86::vnni2::<5>(tiles, tb, std::array::from_fn(arow), nb, acc),
                4 => x86::vnni2::<4>(tiles, tb, std::array::from_fn(arow), nb, acc),
                3 => x86::vnni2::<3>(tiles, tb, std::array::from_fn(arow), nb, acc),
                2 => x86::vnni2::<2>(tiles, tb, std::array::from_fn(arow), nb, acc),
                _ => x86::vnni2::<1>(tiles, tb, std::array::from_fn(arow), nb, acc),
            }
        }
        return;
    }
    // Four rows at a time on the single-tile kernels.
    for r4 in (0..rows).step_by(4) {
        let n4 = (rows - r4).min(4);
        for tt in 0..nt {
            let mut one = [[0i32; NR]; 4];
            dot_tile(a, w, t + tt, r + r4, n4, isa, &mut one);
            for i in 0..n4 {
                acc[r4 + i][tt * NR..(tt + 1) * NR].copy_from_slice(&one[i]);
            }
        }
    }
}

/// `acc[i][o] = Σ_k c_w[t·NR + o, k]·q_a[r + i, k]` for `rows ≤ 4` activation rows.
fn dot_tile(
    a: &QuantizedActs,
    w: &PackedWeights,
    t: usize,
    r: usize,
    rows: usize,
    isa: Isa,
    acc: &mut [[i32; NR]; 4],
) {
    let tile = &w.data[t * w.tile_bytes()..(t + 1) * w.tile_bytes()];
    let arow = |i: usize| &a.q[(r + i) * a.kp..(r + i + 1) * a.kp];
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Vnni => unsafe {
            // SAFETY: availability checked by `gemm`; slices cover kp/KB blocks.
            match rows {
                4 => x86::vnni::<4>(tile, [arow(0), arow(1), arow(2), arow(3)], w.nibble(), acc),
                3 => x86::vnni::<3>(tile, [arow(0), arow(1), arow(2)], w.nibble(), acc),
                2 => x86::vnni::<2>(tile, [arow(0), arow(1)], w.nibble(), acc),
                _ => x86::vnni::<1>(tile, [arow(0)], w.nibble(), acc),
            }
        },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe {
            // Each k block adds two pair sums (each |·| ≤ 2·max code·max |q|) to an i16 lane.
            let per_block = 4 * w.max_code.max(1) * a.max_abs.max(1);
            let flush = (i16::MAX as i32 / per_block) as usize;
            let nb = w.nibble();
            // SAFETY: as above; pair sums bounded by `gemm`'s check.
            match rows {
                4 => x86::avx2::<4>(tile, [arow(0), arow(1), arow(2), arow(3)], nb, flush, acc),
                3 => x86::avx2::<3>(tile, [arow(0), arow(1), arow(2)], nb, flush, acc),
                2 => x86::avx2::<2>(tile, [arow(0), arow(1)], nb, flush, acc),
                _ => x86::avx2::<1>(tile, [arow(0)], nb, flush, acc),
            }
        },
        _ => {
            let bb = w.block_bytes();
            for b in 0..w.kp / KB {
                let blk = &tile[b * bb..(b + 1) * bb];
                for o in 0..NR {
                    for j in 0..4 {
                        let (lo, hi) = if w.nibble() {
                            let v = blk[o * 4 + j];
                            (v & 15, v >> 4)
                        } else {
                            (blk[o * 4 + j], blk[NR * 4 + o * 4 + j])
                        };
                        for (i, accr) in acc.iter_mut().enumerate().take(rows) {
                            let ar = arow(i);
                            accr[o] += lo as i32 * ar[b * KB + j] as i32
                                + hi as i32 * ar[b * KB + 4 + j] as i32;
                        }
                    }
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)] // register arrays indexed in lockstep
mod x86 {
    use super::{KB, NR};
    use std::arch::x86_64::*;

    #[inline(always)]
    unsafe fn bcast4(row: &[i8], at: usize) -> i32 {
        std::ptr::read_unaligned(row.as_ptr().add(at) as *const i32)
    }

    /// AVX-512 VNNI: one zmm = 16 outputs × 4 k as u8; `vpdpbusd` with 4 broadcast i8
    /// activations per row.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub unsafe fn vnni<const R: usize>(
        tile: &[u8],
        rows: [&[i8]; R],
        nibble: bool,
        acc: &mut [[i32; NR]; 4],
    ) {
        let kb = rows[0].len() / KB;
        let mut s = [_mm512_setzero_si512(); R];
        let mask = _mm512_set1_epi8(0x0F);
        let p = tile.as_ptr();
        for b in 0..kb {
            let (lo, hi) = if nibble {
                let x = _mm512_loadu_si512(p.add(b * 64) as *const _);
                (
                    _mm512_and_si512(x, mask),
                    _mm512_and_si512(_mm512_srli_epi16(x, 4), mask),
                )
            } else {
                (
                    _mm512_loadu_si512(p.add(b * 128) as *const _),
                    _mm512_loadu_si512(p.add(b * 128 + 64) as *const _),
                )
            };
            for i in 0..R {
                let a0 = _mm512_set1_epi32(bcast4(rows[i], b * KB));
                let a1 = _mm512_set1_epi32(bcast4(rows[i], b * KB + 4));
                s[i] = _mm512_dpbusd_epi32(s[i], lo, a0);
                s[i] = _mm512_dpbusd_epi32(s[i], hi, a1);
            }
        }
        for i in 0..R {
            _mm512_storeu_si512(acc[i].as_mut_ptr() as *mut _, s[i]);
        }
    }

    /// As [`vnni`] for two adjacent tiles (`tb` bytes apart): 32 outputs per broadcast.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub unsafe fn vnni2<const R: usize>(
        tiles: &[u8],
        tb: usize,
        rows: [&[i8]; R],
        nibble: bool,
        acc: &mut [[i32; 2 * NR]; super::RB],
    ) {
        let kb = rows[0].len() / KB;
        let mut s = [[_mm512_setzero_si512(); 2]; R];
        let mask = _mm512_set1_epi8(0x0F);
        let p = tiles.as_ptr();
        for b in 0..kb {
            let mut w = [[_mm512_setzero_si512(); 2]; 2]; // [tile][lo/hi]
            for (tt, wt) in w.iter_mut().enumerate() {
                let base = p.add(tt * tb);
                if nibble {
                    let x = _mm512_loadu_si512(base.add(b * 64) as *const _);
                    wt[0] = _mm512_and_si512(x, mask);
                    wt[1] = _mm512_and_si512(_mm512_srli_epi16(x, 4), mask);
                } else {
                    wt[0] = _mm512_loadu_si512(base.add(b * 128) as *const _);
                    wt[1] = _mm512_loadu_si512(base.add(b * 128 + 64) as *const _);
                }
            }
            for i in 0..R {
                let a0 = _mm512_set1_epi32(bcast4(rows[i], b * KB));
                let a1 = _mm512_set1_epi32(bcast4(rows[i], b * KB + 4));
                for tt in 0..2 {
                    s[i][tt] = _mm512_dpbusd_epi32(s[i][tt], w[tt][0], a0);
                    s[i][tt] = _mm512_dpbusd_epi32(s[i][tt], w[tt][1], a1);
                }
            }
        }
        for i in 0..R {
            _mm512_storeu_si512(acc[i].as_mut_ptr() as *mut _, s[i][0]);
            _mm512_storeu_si512(acc[i].as_mut_ptr().add(NR) as *mut _, s[i][1]);
        }
    }

    /// AVX2: two ymm halves of 8 outputs × 4 k; `vpmaddubsw` (u8·i8 pair sums in i16, exact
    /// when the caller has bounded them) then `vpmaddwd` by ones to i32. With `flush > 0` the
    /// pair sums of `flush` k blocks are first added in i16 (the caller guarantees they cannot
    /// overflow: each block adds at most twice the pair bound per lane), then widened once: the
    /// same exact integer sums with half the widening work, which is what a one-row decode step
    /// spends its time on (docs/decode.md §7).
    #[target_feature(enable = "avx2")]
    pub unsafe fn avx2<const R: usize>(
        tile: &[u8],
        rows: [&[i8]; R],
        nibble: bool,
        flush: usize,
        acc: &mut [[i32; NR]; 4],
    ) {
        let kb = rows[0].len() / KB;
        let mut s = [[_mm256_setzero_si256(); 2]; R];
        let mut s16 = [[_mm256_setzero_si256(); 2]; R];
        let mut pending = 0;
        let mask = _mm256_set1_epi8(0x0F);
        let ones = _mm256_set1_epi16(1);
        let p = tile.as_ptr();
        for b in 0..kb {
            let mut w = [[_mm256_setzero_si256(); 2]; 2]; // [lo/hi][half]
            for h in 0..2 {
                if nibble {
                    let x = _mm256_loadu_si256(p.add(b * 64 + h * 32) as *const _);
                    w[0][h] = _mm256_and_si256(x, mask);
                    w[1][h] = _mm256_and_si256(_mm256_srli_epi16(x, 4), mask);
                } else {
                    w[0][h] = _mm256_loadu_si256(p.add(b * 128 + h * 32) as *const _);
                    w[1][h] = _mm256_loadu_si256(p.add(b * 128 + 64 + h * 32) as *const _);
                }
            }
            for i in 0..R {
                let a = [
                    _mm256_set1_epi32(bcast4(rows[i], b * KB)),
                    _mm256_set1_epi32(bcast4(rows[i], b * KB + 4)),
                ];
                for h in 0..2 {
                    let p0 = _mm256_maddubs_epi16(w[0][h], a[0]);
                    let p1 = _mm256_maddubs_epi16(w[1][h], a[1]);
                    if flush == 0 {
                        s[i][h] = _mm256_add_epi32(s[i][h], _mm256_madd_epi16(p0, ones));
                        s[i][h] = _mm256_add_epi32(s[i][h], _mm256_madd_epi16(p1, ones));
                    } else {
                        s16[i][h] = _mm256_add_epi16(s16[i][h], _mm256_add_epi16(p0, p1));
                    }
                }
            }
            if flush > 0 {
                pending += 1;
                if pending == flush || b + 1 == kb {
                    for i in 0..R {
                        for h in 0..2 {
                            s[i][h] = _mm256_add_epi32(s[i][h], _mm256_madd_epi16(s16[i][h], ones));
                            s16[i][h] = _mm256_setzero_si256();
                        }
                    }
                    pending = 0;
                }
            }
        }
        for i in 0..R {
            _mm256_storeu_si256(acc[i].as_mut_ptr() as *mut _, s[i][0]);
            _mm256_storeu_si256(acc[i].as_mut_ptr().add(8) as *mut _, s[i][1]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    /// Plain reference: dequantized values multiplied in f64.
    #[allow(clippy::too_many_arguments)]
    fn reference(
        x: &[f32],
        m: usize,
        k: usize,
        spec: &QuantSpec,
        codes: &[u8],
        n: usize,
        scale: &[f32],
        zero: &[i32],
    ) -> Vec<(f64, f64)> {
        let mut xq = x.to_vec();
        crate::quant::quantizer::fake_quant_units(&mut xq, k, spec);
        let mut y = vec![(0f64, 0f64); m * n];
        for r in 0..m {
            for o in 0..n {
                for j in 0..k {
                    let t = xq[r * k + j] as f64
                        * scale[o] as f64
                        * (codes[o * k + j] as i32 - zero[o]) as f64;
                    y[r * n + o].0 += t;
                    y[r * n + o].1 += t.abs();
                }
            }
        }
        y
    }

    fn case(rng: &mut Rng, m: usize, n: usize, k: usize, wbits: u8, aspec: QuantSpec, isa: Isa) {
        let qmax = (1u32 << wbits) - 1;
        let codes: Vec<u8> = (0..n * k)
            .map(|_| (rng.next_u64() % (qmax as u64 + 1)) as u8)
            .collect();
        let scale: Vec<f32> = (0..n).map(|_| 0.01 + rng.uniform() as f32).collect();
        let zero: Vec<i32> = (0..n)
            .map(|i| {
                if i % 3 == 0 {
                    1 << (wbits - 1)
                } else {
                    (rng.next_u64() % (qmax as u64 + 1)) as i32
                }
            })
            .collect();
        let mut x: Vec<f32> = (0..m * k).map(|_| rng.normal() as f32).collect();
        // An all-zero row and an extreme row.
        if m > 2 {
            x[..k].iter_mut().for_each(|v| *v = 0.0);
            x[k..2 * k]
                .iter_mut()
                .enumerate()
                .for_each(|(j, v)| *v = if j % 2 == 0 { 1e30 } else { -3e29 });
        }
        let w = PackedWeights::from_codes(&codes, n, k, wbits, scale.clone(), zero.clone());
        let a = quantize_acts(&x, m, k, &aspec);
        let mut out = vec![0f32; m * n];
        gemm(&a, &w, None, isa, &mut out).unwrap();
        let want = reference(&x, m, k, &aspec, &codes, n, &scale, &zero);
        for (i, (&g, &(r, mag))) in out.iter().zip(&want).enumerate() {
            // The integer sum is exact. The kernel rounds s_a·s_w·Σ in f32 (≤ 2 ulps of |r|);
            // the reference's dequantized activations carry ½ ulp each (≤ ½ ulp of Σ|terms|).
            let tol = 4.0 * f32::EPSILON as f64 * mag;
            assert!(
                (g as f64 - r).abs() <= tol,
                "{isa:?} m{m} n{n} k{k} W{wbits} A{} at {i}: {g} vs {r}",
                aspec.bits
            );
        }
    }

    #[test]
    fn packing_round_trips() {
        let mut rng = Rng::new(3);
        for bits in [4u8, 8] {
            let (n, k) = (21, 19);
            let codes: Vec<u8> = (0..n * k)
                .map(|_| (rng.next_u64() % (1 << bits)) as u8)
                .collect();
            let w = PackedWeights::from_codes(&codes, n, k, bits, vec![1.0; n], vec![0; n]);
            for o in 0..n {
                for j in 0..k {
                    assert_eq!(w.code(o, j), codes[o * k + j], "bits {bits} ({o}, {j})");
                }
            }
        }
    }

    #[test]
    fn kernels_match_the_reference_on_ragged_shapes() {
        let mut rng = Rng::new(1);
        for isa in [Isa::Scalar, Isa::Avx2, Isa::Avx512Vnni] {
            if !isa.available() {
                eprintln!("skipping {isa:?}: not available on this CPU");
                continue;
            }
            for (m, n, k) in [
                (1, 16, 8),
                (3, 17, 13),
                (5, 33, 40),
                (9, 7, 100),
                (130, 40, 72),
                // 150 k blocks: several i16 flushes of the AVX2 one-row path at 4 bits.
                (2, 16, 1200),
            ] {
                for (wbits, aspec) in [
                    (4, QuantSpec::sym(4)),
                    (4, QuantSpec::sym(8)),
                    (8, QuantSpec::sym(8)),
                    (3, QuantSpec::asym(4)),
                    (6, QuantSpec::sym(4)),
                ] {
                    case(&mut rng, m, n, k, wbits, aspec, isa);
                }
            }
        }
    }
}

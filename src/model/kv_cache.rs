//! The KV cache of incremental decoding, and attention of new queries over it.
//!
//! Keys are cached after RoPE and the Q/K transform, values as projected: exactly the tensors the
//! block's KV quantizers see in the full-sequence forward. With a quantizer the cache *stores*
//! that grid: per (token, KV head) the `head_dim` codes packed at `b` bits
//! ([`crate::quant::pack`]'s layout) and the unit's scale, zero point and offset, so that
//! `x̂ = s·(c − z) + m` is bit for bit the simulation's quantize-dequantize
//! ([`crate::quant::fake_quant_units`]). Attention reads the codes directly (docs/decode.md §2):
//!
//! - score `q·k̂ⱼ = sⱼ·(Σ_d q_d c_jd − zⱼ·Σ_d q_d) + mⱼ·Σ_d q_d`;
//! - output `Σⱼ pⱼ v̂ⱼ = Σⱼ (pⱼ sⱼ)·c_j + Σⱼ pⱼ (mⱼ − sⱼ zⱼ)`,
//!
//! so a decode step touches `b/8` bytes per cached value instead of four.

use crate::quant::quantizer::quantize_units;
use crate::quant::{pack, QuantSpec, UnitParams};
use rayon::prelude::*;

/// One tensor (keys or values) of one layer's cache: `heads` rows of `dim` values per token.
pub struct KvStore {
    heads: usize,
    dim: usize,
    len: usize,
    data: Store,
}

enum Store {
    /// Per head, `len × dim` values.
    F32(Vec<Vec<f32>>),
    /// Per head, `len × words` packed codes and `len` unit parameters.
    Packed {
        spec: QuantSpec,
        words: usize,
        codes: Vec<Vec<u32>>,
        params: Vec<Vec<UnitParams>>,
    },
}

impl KvStore {
    /// An empty store; `spec` below 16 bits stores its grid, else f32 values.
    pub fn new(heads: usize, dim: usize, spec: Option<QuantSpec>) -> Self {
        let data = match spec.filter(|s| s.bits < 16) {
            Some(spec) => Store::Packed {
                spec,
                words: pack::words_per_row(dim, spec.bits),
                codes: vec![Vec::new(); heads],
                params: vec![Vec::new(); heads],
            },
            None => Store::F32(vec![Vec::new(); heads]),
        };
        KvStore {
            heads,
            dim,
            len: 0,
            data,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bits per stored value (32 for an unquantized store).
    pub fn bits(&self) -> u8 {
        match &self.data {
            Store::F32(_) => 32,
            Store::Packed { spec, .. } => spec.bits,
        }
    }

    /// Bytes one token occupies: codes plus three f32 parameters per head, or f32 values.
    pub fn bytes_per_token(&self) -> usize {
        match &self.data {
            Store::F32(_) => self.heads * self.dim * 4,
            Store::Packed { words, .. } => {
                self.heads * (words * 4 + std::mem::size_of::<UnitParams>())
            }
        }
    }

    /// Appends `t` tokens given as `x` laid out `[heads, t, dim]`.
    pub fn append(&mut self, x: &[f32], t: usize) {
        let (h, d) = (self.heads, self.dim);
        assert_eq!(
            x.len(),
            h * t * d,
            "kv append: {} values for {h}×{t}×{d}",
            x.len()
        );
        match &mut self.data {
            Store::F32(rows) => {
                for (hi, r) in rows.iter_mut().enumerate() {
                    r.extend_from_slice(&x[hi * t * d..(hi + 1) * t * d]);
                }
            }
            Store::Packed {
                spec,
                codes,
                params,
                ..
            } => {
                let mut c = vec![0u8; t * d];
                for hi in 0..h {
                    let xs = &x[hi * t * d..(hi + 1) * t * d];
                    params[hi].extend(quantize_units(xs, d, spec, &mut c));
                    codes[hi].extend(pack::pack(&c, d, spec.bits));
                }
            }
        }
        self.len += t;
    }

    /// The stored (dequantized) values `[heads, len, dim]`.
    pub fn values(&self) -> Vec<f32> {
        let d = self.dim;
        let mut out = Vec::with_capacity(self.heads * self.len * d);
        match &self.data {
            Store::F32(rows) => rows.iter().for_each(|r| out.extend_from_slice(r)),
            Store::Packed {
                spec,
                codes,
                params,
                ..
            } => {
                for (c, p) in codes.iter().zip(params) {
                    let unpacked = pack::unpack(c, self.len, d, spec.bits);
                    for (u, p) in unpacked.chunks_exact(d).zip(p) {
                        out.extend(u.iter().map(|&c| p.value(c)));
                    }
                }
            }
        }
        out
    }
}

/// Codes `0..dim` of one packed row as f32.
#[inline(always)]
fn unpack_row(words: &[u32], bits: u8, out: &mut [f32]) {
    match bits {
        4 => {
            for (i, o) in out.iter_mut().enumerate() {
                *o = ((words[i / 8] >> (4 * (i % 8))) & 15) as f32;
            }
        }
        8 => {
            for (i, o) in out.iter_mut().enumerate() {
                *o = ((words[i / 4] >> (8 * (i % 4))) & 255) as f32;
            }
        }
        b => {
            let (b, mask) = (b as usize, (1u32 << b) - 1);
            for (i, o) in out.iter_mut().enumerate() {
                let (w, s) = (i * b / 32, i * b % 32);
                let mut v = words[w] >> s;
                if s + b > 32 {
                    v |= words[w + 1] << (32 - s);
                }
                *o = (v & mask) as f32;
            }
        }
    }
}

/// The two tensors of one layer's cache.
pub struct LayerCache {
    pub k: KvStore,
    pub v: KvStore,
}

impl LayerCache {
    pub fn len(&self) -> usize {
        self.k.len()
    }

    pub fn is_empty(&self) -> bool {
        self.k.is_empty()
    }

    /// Appends keys and values of `t` tokens, each `[kv_heads, t, head_dim]`.
    pub fn append(&mut self, k: &[f32], v: &[f32], t: usize) {
        self.k.append(k, t);
        self.v.append(v, t);
    }

    /// Attention of `t` new queries `q` `[heads, t, dim]` at positions `len − t .. len` over the
    /// cache (which already holds their own keys): the o_proj input `[t, heads·dim]`. Query
    /// head `h` reads KV head `h / (heads / kv_heads)`; `window` limits each query to that many
    /// most recent keys (itself included).
    pub fn attend(
        &self,
        q: &[f32],
        heads: usize,
        t: usize,
        scale: f32,
        window: Option<usize>,
    ) -> Vec<f32> {
        let (d, len, kvh) = (self.k.dim, self.len(), self.k.heads);
        assert!(t <= len && q.len() == heads * t * d && heads.is_multiple_of(kvh));
        let g = heads / kvh;
        let mut out = vec![0f32; t * heads * d];
        // One task per (head, query row); each writes its own `d` outputs.
        let rows: Vec<(usize, Vec<f32>)> = (0..heads * t)
            .into_par_iter()
            .with_min_len(4)
            .map(|task| {
                let (h, r) = (task / t, task % t);
                let pos = len - t + r;
                let lo = window.map_or(0, |w| (pos + 1).saturating_sub(w.max(1)));
                let qr = &q[(h * t + r) * d..(h * t + r + 1) * d];
                (
                    task,
                    attend_row(&self.k, &self.v, h / g, qr, lo, pos + 1, scale),
                )
            })
            .collect();
        for (task, o) in rows {
            let (h, r) = (task / t, task % t);
            out[r * heads * d + h * d..][..d].copy_from_slice(&o);
        }
        out
    }
}

crate::fastmath::dispatch!(
    /// One query row against keys `lo..hi` of KV head `kv`: softmax(scale·q·Kᵀ)·V.
    attend_row, attend_row_generic,
    (k: &KvStore, v: &KvStore, kv: usize, q: &[f32], lo: usize, hi: usize, scale: f32) -> Vec<f32>
);

/// f32 values stand for themselves: `x = 1·(x − 0) + 0` exactly, so one loop serves both stores.
const IDENTITY: UnitParams = UnitParams {
    scale: 1.0,
    zero: 0.0,
    offset: 0.0,
};

impl KvStore {
    /// Token `j` of KV head `kv` as f32 codes (or values) and the parameters that map them to
    /// values; `buf` (`dim` long) receives unpacked codes.
    #[inline(always)]
    fn row<'a>(&'a self, kv: usize, j: usize, buf: &'a mut [f32]) -> (&'a [f32], UnitParams) {
        let d = self.dim;
        match &self.data {
            Store::F32(rows) => (&rows[kv][j * d..(j + 1) * d], IDENTITY),
            Store::Packed {
                spec,
                words,
                codes,
                params,
            } => {
                unpack_row(&codes[kv][j * words..(j + 1) * words], spec.bits, buf);
                (buf, params[kv][j])
            }
        }
    }
}

#[inline(always)]
fn attend_row_generic(
    k: &KvStore,
    v: &KvStore,
    kv: usize,
    q: &[f32],
    lo: usize,
    hi: usize,
    scale: f32,
) -> Vec<f32> {
    let d = k.dim;
    let mut buf = vec![0f32; d];
    let qsum: f32 = q.iter().sum();
    // A plain loop, not a closure: a closure would not inherit the ISA this function is
    // compiled for, and its FMAs would become calls.
    let mut s: Vec<f32> = Vec::with_capacity(hi - lo);
    for j in lo..hi {
        let (c, u) = k.row(kv, j, &mut buf);
        s.push(
            scale
                * (u.scale * (crate::fastmath::dot_lanes(q, c) - u.zero * qsum) + u.offset * qsum),
        );
    }
    let inv = 1.0 / crate::fastmath::softmax_unnormalized(&mut s);
    let mut o = vec![0f32; d];
    let mut konst = 0f32;
    for (j, &p) in (lo..hi).zip(&s) {
        let (c, u) = v.row(kv, j, &mut buf);
        let ps = p * u.scale;
        for (o, x) in o.iter_mut().zip(c) {
            *o += ps * x;
        }
        konst += p * (u.offset - u.scale * u.zero);
    }
    o.iter_mut().for_each(|x| *x = (*x + konst) * inv);
    o
}

/// The cache of a whole model: one [`LayerCache`] per block.
pub struct KvCache {
    pub layers: Vec<LayerCache>,
}

impl KvCache {
    /// Tokens cached.
    pub fn len(&self) -> usize {
        self.layers.first().map_or(0, LayerCache::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes one token occupies across all layers.
    pub fn bytes_per_token(&self) -> usize {
        self.layers
            .iter()
            .map(|l| l.k.bytes_per_token() + l.v.bytes_per_token())
            .sum()
    }

    /// Bits per stored key and value (of the first layer), e.g. `(4, 4)` or `(32, 32)`.
    pub fn bits(&self) -> (u8, u8) {
        self.layers
            .first()
            .map_or((32, 32), |l| (l.k.bits(), l.v.bits()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::quantizer::fake_quant_units;
    use crate::rng::Rng;

    fn reference(
        q: &[f32],
        keys: &[f32],
        vals: &[f32],
        d: usize,
        n: usize,
        scale: f32,
    ) -> Vec<f32> {
        let s: Vec<f64> = (0..n)
            .map(|j| {
                (0..d)
                    .map(|i| q[i] as f64 * keys[j * d + i] as f64)
                    .sum::<f64>()
                    * scale as f64
            })
            .collect();
        let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
        let z: f64 = e.iter().sum();
        (0..d)
            .map(|i| (0..n).map(|j| e[j] * vals[j * d + i] as f64).sum::<f64>() / z)
            .map(|x| x as f32)
            .collect()
    }

    #[test]
    fn packed_store_holds_the_simulation_values_and_attends_like_them() {
        // For every width and grid the store's dequantized rows equal fake_quant_units bit for
        // bit, and attention over the codes equals f64 attention over those values within f32
        // accumulation error (scores of size ≈ 10 with d = 24 terms: ~1e-5 relative).
        let mut rng = Rng::new(3);
        let (h, d, t) = (2usize, 24usize, 37usize);
        let x: Vec<f32> = (0..h * t * d).map(|_| rng.normal() as f32 * 2.0).collect();
        let specs = [
            QuantSpec::asym(4),
            QuantSpec::sym(4),
            QuantSpec::asym(3),
            QuantSpec::sym(8),
            QuantSpec {
                asym_zero: crate::quant::AsymZero::FloatOffset,
                ..QuantSpec::asym(2)
            },
        ];
        for spec in specs {
            let mut st = KvStore::new(h, d, Some(spec));
            // In two appends, as a prefill and a decode step would.
            let first: Vec<f32> = (0..h)
                .flat_map(|hi| x[hi * t * d..][..(t - 1) * d].to_vec())
                .collect();
            st.append(&first, t - 1);
            let last: Vec<f32> = (0..h)
                .flat_map(|hi| x[(hi * t + t - 1) * d..][..d].to_vec())
                .collect();
            st.append(&last, 1);
            let mut sim = x.clone();
            fake_quant_units(&mut sim, d, &spec);
            assert_eq!(st.values(), sim, "{spec:?}");
            let vs = {
                let mut v = KvStore::new(h, d, Some(spec));
                v.append(&x, t);
                v
            };
            let c = LayerCache { k: st, v: vs };
            let q: Vec<f32> = (0..2 * h * d).map(|_| rng.normal() as f32).collect();
            let out = c.attend(&q, 2 * h, 1, 0.3, None);
            for hq in 0..2 * h {
                let kv = hq / 2;
                let want = reference(
                    &q[hq * d..(hq + 1) * d],
                    &sim[kv * t * d..(kv + 1) * t * d],
                    &sim[kv * t * d..(kv + 1) * t * d],
                    d,
                    t,
                    0.3,
                );
                for (a, b) in out[hq * d..(hq + 1) * d].iter().zip(&want) {
                    assert!(
                        (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                        "{spec:?} head {hq}: {a} vs {b}"
                    );
                }
            }
        }
    }

    #[test]
    fn window_and_causal_rows() {
        // Row r of a t-row attend sees keys 0..=len−t+r, or only the last `w` of them.
        let mut rng = Rng::new(5);
        let (d, t) = (8usize, 6usize);
        let x: Vec<f32> = (0..t * d).map(|_| rng.normal() as f32).collect();
        let mut c = LayerCache {
            k: KvStore::new(1, d, None),
            v: KvStore::new(1, d, None),
        };
        c.append(&x, &x, t);
        let q: Vec<f32> = (0..3 * d).map(|_| rng.normal() as f32).collect();
        for w in [None, Some(2)] {
            let out = c.attend(&q, 1, 3, 0.5, w);
            for r in 0..3 {
                let pos = t - 3 + r;
                let lo = w.map_or(0, |w| pos + 1 - w);
                let want = reference(
                    &q[r * d..(r + 1) * d],
                    &x[lo * d..],
                    &x[lo * d..],
                    d,
                    pos + 1 - lo,
                    0.5,
                );
                for (a, b) in out[r * d..(r + 1) * d].iter().zip(&want) {
                    assert!((a - b).abs() < 1e-5, "{w:?} row {r}: {a} vs {b}");
                }
            }
        }
    }
}

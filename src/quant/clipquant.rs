//! Fused fake quantization with learnable clipping (FlatQuant's LWC for weights, LAC for
//! activations) and its straight-through backward, as one candle op.
//!
//! Per row `r` of `x` `[rows, n]`, with clip logits `a_hi`, `a_lo` (one per row, or one scalar):
//!
//! ```text
//! hi = σ(a_hi)·max(max_j x, 0)       lo = σ(a_lo)·min(min_j x, 0)
//! xc = clamp(x, lo, hi) (weights, LWC) or x (activations, LAC)
//! symmetric:  s = max(hi, −lo)/D,  q = clamp(round(xc/s), −2^(b−1), 2^(b−1)−1),  out = s·q
//! asymmetric: s = (hi − lo)/(2^b−1),  z = round(−lo/s) (constant),  out = s·(clamp(round(xc/s)+z, 0, 2^b−1) − z)
//! ```
//!
//! Backward: `round` has gradient 1 (STE); clamps pass gradient only where not saturated; `s`
//! receives `Σ g·(q − [unsat]·xc/s)`; the extremes `max/min_j x` route their gradient to every
//! element equal to them (as candle's `max_keepdim` does). It replaces ~25 graph nodes per
//! quantizer, whose backward dominated calibration time; `act::fake_quant_graph` is its test oracle.

use super::quantizer::{round_even, QuantSpec, SymScale};
use crate::error::Result;
use candle_core::{CpuStorage, CustomOp3, Device, Layout, Shape, Tensor};
use rayon::prelude::*;

const MIN_SCALE: f32 = 1e-8;

pub struct ClipQuant {
    pub spec: QuantSpec,
    /// Clamp `x` to `[lo, hi]` before rounding (LWC) rather than only saturating codes (LAC).
    pub clamp_input: bool,
    /// Elements per quantization unit (row): the input, of any shape, is read as rows of it.
    pub unit: usize,
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// Everything the forward decides for one row.
struct Row {
    hi: f32,
    lo: f32,
    s: f32,
    z: f32,
    scale_clamped: bool,
    max: f32,
    min: f32,
}

impl ClipQuant {
    fn row(&self, x: &[f32], a_hi: f32, a_lo: f32) -> Row {
        let (min, max) = min_max(x);
        let hi = sigmoid(a_hi) * max.max(0.0);
        let lo = sigmoid(a_lo) * min.min(0.0);
        let raw = if self.spec.symmetric {
            hi.max(-lo) / self.sym_div()
        } else {
            (hi - lo) / self.spec.qmax() as f32
        };
        let s = raw.max(MIN_SCALE);
        let z = if self.spec.symmetric {
            0.0
        } else {
            round_even(-lo / s)
        };
        Row {
            hi,
            lo,
            s,
            z,
            scale_clamped: raw < MIN_SCALE,
            max,
            min,
        }
    }

    /// `(dx, per-row (d a_hi, d a_lo))` for inputs `xv` `[rows, n]` and upstream gradient `gv`.
    pub(crate) fn backward(
        &self,
        xv: &[f32],
        gv: &[f32],
        ah: &[f32],
        al: &[f32],
        rows: usize,
        n: usize,
    ) -> (Vec<f32>, Vec<(f32, f32)>) {
        let per_row = ah.len() == rows;
        let (qlo, qhi) = self.bounds();
        let qmax = self.spec.qmax() as f32;
        let div = self.sym_div();
        let mut dx = crate::heap::zeroed::<f32>(rows * n);
        // Per row: (d a_hi, d a_lo).
        let da: Vec<(f32, f32)> = dx
            .par_chunks_mut(n)
            .enumerate()
            .map(|(r, dxr)| {
                let xr = &xv[r * n..(r + 1) * n];
                let gr = &gv[r * n..(r + 1) * n];
                let k = if per_row { r } else { 0 };
                let p = self.row(xr, ah[k], al[k]);
                let grid = self.grid(&p, qlo, qhi);
                let (ds, mut dhi, mut dlo) = backward_row(xr, gr, dxr, &grid);
                if !p.scale_clamped {
                    if self.spec.symmetric {
                        if p.hi >= -p.lo {
                            dhi += ds / div;
                        } else {
                            dlo -= ds / div;
                        }
                    } else {
                        dhi += ds / qmax;
                        dlo -= ds / qmax;
                    }
                }
                let (sh, sl) = (sigmoid(ah[k]), sigmoid(al[k]));
                // hi = σ(a_hi)·max(M, 0): gradient to a_hi, and to the maximal elements of x.
                if p.max > 0.0 {
                    for j in 0..n {
                        if xr[j] == p.max {
                            dxr[j] += dhi * sh;
                        }
                    }
                }
                if p.min < 0.0 {
                    for j in 0..n {
                        if xr[j] == p.min {
                            dxr[j] += dlo * sl;
                        }
                    }
                }
                (
                    dhi * sh * (1.0 - sh) * p.max.max(0.0),
                    dlo * sl * (1.0 - sl) * p.min.min(0.0),
                )
            })
            .collect();
        (dx, da)
    }

    /// The fake-quantized rows of `x` `[rows, n]` (clip logits per row, or one scalar each).
    pub(crate) fn forward(
        &self,
        x: &[f32],
        ah: &[f32],
        al: &[f32],
        rows: usize,
        n: usize,
    ) -> Vec<f32> {
        let per_row = ah.len() == rows;
        let (qlo, qhi) = self.bounds();
        crate::heap::par_filled(rows * n, n, |r, o: &mut [f32]| {
            let xr = crate::heap::chunk_of(x, r, n);
            let k = if per_row { r } else { 0 };
            let p = self.row(xr, ah[k], al[k]);
            forward_row(xr, o, &self.grid(&p, qlo, qhi));
        })
    }

    /// The symmetric grid's divisor: `scale = max(hi, −lo) / div`.
    fn sym_div(&self) -> f32 {
        match self.spec.sym_scale {
            SymScale::MaxPos => ((1u32 << (self.spec.bits - 1)) - 1) as f32,
            SymScale::HalfRange => self.spec.qmax() as f32 / 2.0,
            SymScale::SignedMax => (1u32 << (self.spec.bits - 1)) as f32,
        }
    }

    /// Row `p`'s grid for the row kernels, with the code range `[qlo, qhi]` of [`Self::bounds`].
    fn grid(&self, p: &Row, qlo: f32, qhi: f32) -> Grid {
        Grid {
            lo: p.lo,
            hi: p.hi,
            s: p.s,
            z: p.z,
            qlo,
            qhi,
            clamp_input: self.clamp_input,
        }
    }

    /// (code range) for the rounded value `r` (symmetric: r itself; asymmetric: r + z).
    fn bounds(&self) -> (f32, f32) {
        if self.spec.symmetric {
            let half = (1u32 << (self.spec.bits - 1)) as f32;
            (-half, half - 1.0)
        } else {
            (0.0, self.spec.qmax() as f32)
        }
    }
}

/// One row's grid as the forward decided it.
pub(crate) struct Grid {
    lo: f32,
    hi: f32,
    s: f32,
    z: f32,
    qlo: f32,
    qhi: f32,
    clamp_input: bool,
}

/// `v` clamped to `[lo, hi]` (`f32::clamp` without its assertion, so loops vectorize).
#[inline(always)]
fn clamp(v: f32, lo: f32, hi: f32) -> f32 {
    if v < lo {
        lo
    } else if v > hi {
        hi
    } else {
        v
    }
}

/// `(min, max)` of a row over 16 lanes (exact: order does not change a minimum).
#[inline(always)]
fn min_max_generic(x: &[f32]) -> (f32, f32) {
    let (mut lo, mut hi) = ([f32::INFINITY; 16], [f32::NEG_INFINITY; 16]);
    let chunks = x.chunks_exact(16);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..16 {
            lo[i] = if c[i] < lo[i] { c[i] } else { lo[i] };
            hi[i] = if c[i] > hi[i] { c[i] } else { hi[i] };
        }
    }
    let (mut mn, mut mx) = (f32::INFINITY, f32::NEG_INFINITY);
    for (&a, &b) in lo.iter().zip(&hi) {
        mn = mn.min(a);
        mx = mx.max(b);
    }
    for &v in rest {
        mn = mn.min(v);
        mx = mx.max(v);
    }
    (mn, mx)
}

/// Fake quantization of one row, element by element as the module doc states.
#[inline(always)]
fn forward_row_generic(x: &[f32], o: &mut [f32], g: &Grid) {
    let step = |v: f32| {
        let xc = if g.clamp_input {
            clamp(v, g.lo, g.hi)
        } else {
            v
        };
        let c = clamp(round_even(xc / g.s) + g.z, g.qlo, g.qhi);
        (c - g.z) * g.s
    };
    for (o, &v) in o.iter_mut().zip(x) {
        *o = step(v);
    }
}

/// The straight-through backward of one row: writes `dx` for the elements inside the clip range
/// and returns `(Σ ∂/∂s, Σ over elements clipped at hi, Σ over elements clipped at lo)`, summed
/// over 8 lanes.
#[inline(always)]
fn backward_row_generic(x: &[f32], gr: &[f32], dx: &mut [f32], g: &Grid) -> (f32, f32, f32) {
    if g.clamp_input {
        backward_row_lanes::<true>(x, gr, dx, g)
    } else {
        backward_row_lanes::<false>(x, gr, dx, g)
    }
}

/// [`backward_row_generic`] with the input clamp fixed, every decision a select (vectorizes).
#[inline(always)]
fn backward_row_lanes<const CLAMP: bool>(
    x: &[f32],
    gr: &[f32],
    dx: &mut [f32],
    g: &Grid,
) -> (f32, f32, f32) {
    let elem = |v: f32, gv: f32| -> (f32, f32, f32, f32) {
        let xc = if CLAMP { clamp(v, g.lo, g.hi) } else { v };
        let t = xc / g.s;
        let c_raw = round_even(t) + g.z;
        // Pass-through weight of the code clamp: 1 inside, 0 outside, ½ exactly on a bound
        // (candle's clamp splits ties; LWC puts the clipped maxima there).
        let inside = (c_raw > g.qlo) & (c_raw < g.qhi);
        let on = (c_raw == g.qlo) | (c_raw == g.qhi);
        let unsat = if inside {
            1.0
        } else if on {
            0.5
        } else {
            0.0
        };
        let c = clamp(c_raw, g.qlo, g.qhi);
        let dxc = gv * unsat;
        // unsat ∈ {0, ½, 1}: unsat·(xc/s) is the same number as (unsat·xc)/s.
        let ds = gv * ((c - g.z) - unsat * t);
        let at_hi = CLAMP & (v > g.hi);
        let at_lo = CLAMP & !at_hi & (v < g.lo);
        let pass = if at_hi | at_lo { 0.0 } else { dxc };
        (
            pass,
            ds,
            if at_hi { dxc } else { 0.0 },
            if at_lo { dxc } else { 0.0 },
        )
    };
    const W: usize = 8;
    let (mut ds, mut dh, mut dl) = ([0f32; W], [0f32; W], [0f32; W]);
    let main = x.len() / W * W;
    for ((xb, gb), db) in x[..main]
        .chunks_exact(W)
        .zip(gr[..main].chunks_exact(W))
        .zip(dx[..main].chunks_exact_mut(W))
    {
        for i in 0..W {
            let (p, s, h, l) = elem(xb[i], gb[i]);
            db[i] = p;
            ds[i] += s;
            dh[i] += h;
            dl[i] += l;
        }
    }
    for j in main..x.len() {
        let (p, s, h, l) = elem(x[j], gr[j]);
        dx[j] = p;
        ds[0] += s;
        dh[0] += h;
        dl[0] += l;
    }
    (ds.iter().sum(), dh.iter().sum(), dl.iter().sum())
}

crate::fastmath::dispatch!(pub(crate) min_max, min_max_generic, (x: &[f32]) -> (f32, f32));
crate::fastmath::dispatch!(pub(crate) forward_row, forward_row_generic, (x: &[f32], o: &mut [f32], g: &Grid) -> ());
crate::fastmath::dispatch!(
    pub(crate) backward_row, backward_row_generic,
    (x: &[f32], gr: &[f32], dx: &mut [f32], g: &Grid) -> (f32, f32, f32)
);

/// A contiguous CPU f32 tensor's values, read in place.
fn read<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> candle_core::Result<R>) -> candle_core::Result<R> {
    let (s, l) = t.storage_and_layout();
    match &*s {
        candle_core::Storage::Cpu(s) => f(contiguous(s, l)?),
        _ => candle_core::bail!("clip quant: CPU tensors only"),
    }
}

fn contiguous<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("clip quant: inputs must be contiguous".into()))?;
    Ok(&s.as_slice::<f32>()?[a..b])
}

impl CustomOp3 for ClipQuant {
    fn name(&self) -> &'static str {
        "affq-clip-quant"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let n = self.unit;
        let rows = l1.shape().elem_count() / n;
        let (x, ah, al) = (
            contiguous(s1, l1)?,
            contiguous(s2, l2)?,
            contiguous(s3, l3)?,
        );
        let out = self.forward(x, ah, al, rows, n);
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a_hi: &Tensor,
        a_lo: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let n = self.unit;
        let rows = x.elem_count() / n;
        let grad = grad.contiguous()?;
        let ah: Vec<f32> = a_hi.flatten_all()?.to_vec1()?;
        let al: Vec<f32> = a_lo.flatten_all()?.to_vec1()?;
        let (dx, da) = read(x, |xv| {
            read(&grad, |gv| Ok(self.backward(xv, gv, &ah, &al, rows, n)))
        })?;
        let per_row = ah.len() == rows;
        let shape = a_hi.dims().to_vec();
        let (gh, gl): (Vec<f32>, Vec<f32>) = if per_row {
            da.into_iter().unzip()
        } else {
            let (a, b) = scalar_clip_grads(&da);
            (vec![a], vec![b])
        };
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), &Device::Cpu)?),
            Some(Tensor::from_vec(gh, shape.clone(), &Device::Cpu)?),
            Some(Tensor::from_vec(gl, shape, &Device::Cpu)?),
        ))
    }
}

/// The gradients of one scalar pair of clip logits: the per-row `(d a_hi, d a_lo)` summed in row
/// order.
pub(crate) fn scalar_clip_grads(da: &[(f32, f32)]) -> (f32, f32) {
    da.iter()
        .fold((0f32, 0f32), |(a, b), (x, y)| (a + x, b + y))
}

/// Fake-quantizes the rows of `x` `[rows, n]` with learnable clip logits `a_hi`, `a_lo`
/// (`[rows, 1]` or `[1, 1]`).
pub fn clip_quant(
    x: &Tensor,
    a_hi: &Tensor,
    a_lo: &Tensor,
    spec: &QuantSpec,
    clamp_input: bool,
) -> Result<Tensor> {
    let (_, n) = x.dims2()?;
    clip_quant_units(x, n, a_hi, a_lo, spec, clamp_input)
}

/// [`clip_quant`] of `x` of any shape read as rows of `unit` elements; the result has `x`'s
/// shape (no reshape nodes in the graph).
pub fn clip_quant_units(
    x: &Tensor,
    unit: usize,
    a_hi: &Tensor,
    a_lo: &Tensor,
    spec: &QuantSpec,
    clamp_input: bool,
) -> Result<Tensor> {
    if unit == 0 || !x.elem_count().is_multiple_of(unit) {
        return Err(crate::error::Error::Runtime(format!(
            "clip quant: {:?} is not made of rows of {unit}",
            x.dims()
        )));
    }
    Ok(x.contiguous()?.apply_op3(
        &a_hi.contiguous()?,
        &a_lo.contiguous()?,
        ClipQuant {
            spec: *spec,
            clamp_input,
            unit,
        },
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::act::{fake_quant_graph, sigmoid as sig};
    use candle_core::{Var, D};

    /// The same function composed of candle ops (the oracle).
    fn graph(x: &Tensor, ah: &Tensor, al: &Tensor, spec: &QuantSpec, clamp_input: bool) -> Tensor {
        let hi = x
            .max_keepdim(D::Minus1)
            .unwrap()
            .relu()
            .unwrap()
            .broadcast_mul(&sig(ah).unwrap())
            .unwrap();
        let lo = x
            .min_keepdim(D::Minus1)
            .unwrap()
            .neg()
            .unwrap()
            .relu()
            .unwrap()
            .neg()
            .unwrap()
            .broadcast_mul(&sig(al).unwrap())
            .unwrap();
        let xc = if clamp_input {
            x.broadcast_minimum(&hi)
                .unwrap()
                .broadcast_maximum(&lo)
                .unwrap()
        } else {
            x.clone()
        };
        fake_quant_graph(&xc, &lo, &hi, spec).unwrap()
    }

    #[test]
    fn fused_op_matches_graph_values_and_gradients() {
        let mut rng = crate::rng::Rng::new(11);
        for (spec, clamp_input, per_row) in [
            (QuantSpec::sym(4), true, true),
            (QuantSpec::sym(4), false, false),
            (QuantSpec::asym(4), false, false),
            (QuantSpec::sym(3), true, false),
            (QuantSpec::asym(8), true, true),
        ] {
            let (rows, n) = (6, 40);
            let xv: Vec<f32> = (0..rows * n)
                .map(|i| rng.normal() as f32 * if i % 17 == 0 { 4.0 } else { 1.0 })
                .collect();
            let k = if per_row { rows } else { 1 };
            let ahv: Vec<f32> = (0..k).map(|i| 1.0 + i as f32 * 0.3).collect();
            let alv: Vec<f32> = (0..k).map(|i| 2.0 - i as f32 * 0.2).collect();
            let w: Vec<f32> = (0..rows * n).map(|_| rng.normal() as f32).collect();
            let wt = Tensor::from_vec(w, (rows, n), &Device::Cpu).unwrap();
            let run = |fused: bool| {
                let x = Var::from_tensor(
                    &Tensor::from_vec(xv.clone(), (rows, n), &Device::Cpu).unwrap(),
                )
                .unwrap();
                let ah =
                    Var::from_tensor(&Tensor::from_vec(ahv.clone(), (k, 1), &Device::Cpu).unwrap())
                        .unwrap();
                let al =
                    Var::from_tensor(&Tensor::from_vec(alv.clone(), (k, 1), &Device::Cpu).unwrap())
                        .unwrap();
                let out = if fused {
                    clip_quant(
                        x.as_tensor(),
                        ah.as_tensor(),
                        al.as_tensor(),
                        &spec,
                        clamp_input,
                    )
                    .unwrap()
                } else {
                    graph(
                        x.as_tensor(),
                        ah.as_tensor(),
                        al.as_tensor(),
                        &spec,
                        clamp_input,
                    )
                };
                let loss = (&out * &wt).unwrap().sum_all().unwrap();
                let g = loss.backward().unwrap();
                let v = |t: &Tensor| -> Vec<f32> {
                    g.get(t).unwrap().flatten_all().unwrap().to_vec1().unwrap()
                };
                (
                    out.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                    v(x.as_tensor()),
                    v(ah.as_tensor()),
                    v(al.as_tensor()),
                )
            };
            let (a, b) = (run(true), run(false));
            let close = |p: &[f32], q: &[f32], what: &str| {
                for (i, (u, v)) in p.iter().zip(q).enumerate() {
                    assert!(
                        (u - v).abs() <= 1e-4 * (1.0 + v.abs()),
                        "{spec:?} {what}[{i}]: fused {u} vs graph {v}"
                    );
                }
            };
            close(&a.0, &b.0, "out");
            close(&a.1, &b.1, "dx");
            close(&a.2, &b.2, "da_hi");
            close(&a.3, &b.3, "da_lo");
        }
    }
}

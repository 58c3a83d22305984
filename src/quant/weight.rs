//! Weight quantization: a `[out, in]` matrix on a grid per tensor, per output channel or per group
//! of consecutive input columns, with optional MSE clip search (algorithms.md §1.3).

use super::quantizer::{QuantSpec, UnitParams};
use crate::error::{Error, Result};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Granularity {
    Tensor,
    Channel,
    Group(usize),
}

/// A quantized weight matrix: codes `[out, in]` and the parameters of each unit `[out, n_groups]`.
#[derive(Debug, Clone)]
pub struct QuantizedWeight {
    pub out: usize,
    pub inp: usize,
    pub spec: QuantSpec,
    pub granularity: Granularity,
    pub codes: Vec<u8>,
    pub params: Vec<UnitParams>,
}

/// Extremes for the MSE clip search: shrink `[xmin, xmax]` by `p = 1 − i/100`, `i < 80`, and keep
/// the candidate with the least `Σ |x̂ − x|^2.4` (the GPTQ repository's `mse=True` rule).
fn search_clip(xs: &[f32], spec: &QuantSpec, lo: f32, hi: f32) -> UnitParams {
    let qmax = spec.qmax() as f32;
    let mut best = (f32::INFINITY, spec.params(lo, hi));
    for i in 0..80 {
        let p = 1.0 - i as f32 / 100.0;
        let cand = spec.params(p * lo, p * hi);
        let err: f32 = xs
            .iter()
            .map(|&x| (cand.value(cand.code(x, qmax)) - x).abs().powf(2.4))
            .sum();
        if err < best.0 {
            best = (err, cand);
        }
    }
    best.1
}

/// The grid of one unit (row, group or tensor) from its values: min/max, or the clip search.
pub(crate) fn unit_params(xs: &[f32], spec: &QuantSpec, clip_search: bool) -> UnitParams {
    let (lo, hi) = min_max(xs);
    if clip_search {
        search_clip(xs, spec, lo, hi)
    } else {
        spec.params(lo, hi)
    }
}

/// Checks that `g` (if grouped) divides `inp`; returns the unit length along a row.
pub fn unit_len(name: &str, inp: usize, granularity: Granularity) -> Result<usize> {
    match granularity {
        Granularity::Group(g) if g == 0 || !inp.is_multiple_of(g) => Err(Error::Usage(format!(
            "group size {g} does not divide the input size {inp} of {name}"
        ))),
        Granularity::Group(g) => Ok(g),
        _ => Ok(inp),
    }
}

/// Refuses a weight with a NaN or infinity, naming where.
pub(crate) fn check_finite(name: &str, w: &[f32], inp: usize) -> Result<()> {
    match w.iter().position(|x| !x.is_finite()) {
        Some(i) => Err(Error::Runtime(format!(
            "{name}: weight has a non-finite value ({}) at row {}, column {}",
            w[i],
            i / inp,
            i % inp
        ))),
        None => Ok(()),
    }
}

fn min_max(xs: &[f32]) -> (f32, f32) {
    xs.iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &x| {
            (lo.min(x), hi.max(x))
        })
}

impl QuantizedWeight {
    pub fn group_size(&self) -> usize {
        match self.granularity {
            Granularity::Group(g) => g,
            _ => self.inp,
        }
    }

    pub fn n_groups(&self) -> usize {
        self.inp / self.group_size()
    }

    /// Quantizes `w` (`out × inp`, row-major). `name` labels errors.
    pub fn quantize(
        name: &str,
        w: &[f32],
        out: usize,
        inp: usize,
        spec: QuantSpec,
        granularity: Granularity,
        clip_search: bool,
    ) -> Result<Self> {
        check_finite(name, w, inp)?;
        let g = unit_len(name, inp, granularity)?;
        let qmax = spec.qmax() as f32;
        let tensor_params =
            (granularity == Granularity::Tensor).then(|| unit_params(w, &spec, clip_search));
        let mut codes = vec![0u8; out * inp];
        let params: Vec<UnitParams> = codes
            .par_chunks_mut(inp)
            .zip(w.par_chunks(inp))
            .flat_map_iter(|(c_row, w_row)| {
                let mut ps = Vec::with_capacity(inp / g);
                for (c, x) in c_row.chunks_mut(g).zip(w_row.chunks(g)) {
                    let p = tensor_params.unwrap_or_else(|| unit_params(x, &spec, clip_search));
                    for (ci, &xi) in c.iter_mut().zip(x) {
                        *ci = p.code(xi, qmax);
                    }
                    ps.push(p);
                }
                ps
            })
            .collect();
        Ok(QuantizedWeight {
            out,
            inp,
            spec,
            granularity,
            codes,
            params,
        })
    }

    /// `x̂ = s·(code − z) + m`, row-major `out × inp`.
    pub fn dequantize(&self) -> Vec<f32> {
        let g = self.group_size();
        let ng = self.n_groups();
        let mut w = vec![0f32; self.out * self.inp];
        w.par_chunks_mut(self.inp).enumerate().for_each(|(r, row)| {
            for (k, chunk) in row.chunks_mut(g).enumerate() {
                let p = self.params[r * ng + k];
                for (j, v) in chunk.iter_mut().enumerate() {
                    *v = p.value(self.codes[r * self.inp + k * g + j]);
                }
            }
        });
        w
    }
}

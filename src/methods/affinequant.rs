//! AffineQuant (algorithms.md §3): learned invertible matrices `A` with `Y = (X·A⁻¹)·(W·Aᵀ)ᵀ`,
//! kept near-diagonal early by the gradual mask, trained block by block on the output MSE.
//!
//! Placement (§3.2, LLaMA family, GQA-aware per §3.8):
//! - norm → q/k/v and norm → up/gate: a per-channel scale `s` (weight-activation recipes:
//!   `γ ← γ/s`, `W ← W·diag(s)`), or with `ln_matrix` (weight-only recipes) a dense masked `Ã`
//!   whose inverse stays online on the norm output (`x ↦ x·Ã⁻¹`, a d×d GEMM) and `W ← W·Ãᵀ`;
//! - v → o: one `hd×hd` matrix `Ã_g` per KV head, fully merged: `W_v[g] ← Ã_g⁻ᵀ·W_v[g]`,
//!   `b_v[g] ← b_v[g]·Ã_g⁻¹`, and `W_o[:, h] ← W_o[:, h]·Ã_gᵀ` for every query head `h` of group `g`;
//! - q ↔ k (with a quantized KV cache): per KV head `Ã_g` applied **after RoPE** (`k ↦ k·Ã_g`,
//!   `q ↦ q·Ã_g⁻ᵀ`), an exact equivalence (upstream's pre-RoPE merge is not, §3.8). In the
//!   weight-only recipe upstream uses a q/k vector here, which per-row weight grids cannot see
//!   (scaling a row scales its grid), so affq omits it.
//! - LWC on every linear (per row, or per (row, group) with groups).
//!
//! Each matrix entry is `Ã = A⊙M`: `M` is the gradual mask of the epoch (§3.3) with off-diagonals
//! scaled by the stability factor; before every step entries with `0 < |a| < 0.01` are moved to
//! `±0.01` (the truncation of §3.4). Inverses use the differentiable f64 op (`transforms::inverse`:
//! Gauss–Jordan, blocked LU above 128 (algorithms.md §9); backward checked against finite
//! differences); at every epoch's end the pivot ratio of each masked matrix is checked in f64 and
//! a near-singular one stops that block's training at the last good epoch, with a note.
//!
//! Deviation: training uses the block's full-precision inputs (as FlatQuant), not the quantized
//! model's (OmniQuant/AffineQuant propagate quantized inputs); the engine's shared loop does this
//! for every method.

use super::lwc::{clamp_rows, lwc_bounds, lwc_units, Clip};
use super::plan::{attach_kv, fixed_quantizer, Grids};
use super::train::{train, var, Group, Loss, Schedule, TrainConfig, Trainee};
use super::{
    BlockData, BlockTrainer, EpochLog, Method, MethodInput, MethodReport, MethodSpec, Retrained,
    SiteStats,
};
use crate::backend::simulated::QuantLinear;
use crate::error::{Error, Result};
use crate::model::{Block, LinearKind, QkTransform, Rope, Site};
use crate::quant::clipquant::clip_quant;
use crate::quant::ActQuantizer;
use crate::transforms::inverse::{inverse, inverse_f64};
use crate::transforms::KroneckerTransform;
use candle_core::{DType, Device, Tensor, Var};
use std::sync::Arc;

/// Hyper-parameters (recipes calib/affinequant-*.toml; defaults §3.9).
#[derive(Debug, Clone)]
pub struct AffineQuantConfig {
    pub grids: Grids,
    pub epochs: usize,
    /// Learning rate of the scales and matrices (`let_lr`).
    pub lr: f64,
    /// Learning rate of the LWC parameters.
    pub lwc_lr: f64,
    /// Scale init strength α (§3.5).
    pub alpha: f64,
    /// Off-diagonal factor of the gradual mask (§3.3).
    pub stability_factor: f64,
    /// Dense norm→linear matrices (weight-only recipes) instead of vectors.
    pub ln_matrix: bool,
    /// Only transforms that merge into the weights (no online inverse, no query/key matrix).
    pub merged_only: bool,
}

pub const SPEC: MethodSpec = MethodSpec {
    name: "affinequant",
    about:
        "Learned affine matrices with the gradual mask (AffineQuant), calibrated block by block.",
    trained: true,
    preset: Some("affinequant-cpu"),
    // Weight-only and weight-activation settings differ in kind (§3.3): dense norm matrices and
    // a small stability factor without activation quantization, scales and 0.1 with it.
    scheme_recipe: |f, _| match (f.bits.unwrap_or(4), f.a_bits.unwrap_or(16)) {
        (16, _) => None,
        (3, 16) => Some("affinequant-w3a16-g64"),
        (_, 16) => Some("affinequant-w4a16"),
        _ => Some("affinequant-w4a4"),
    },
    own_keys: &["stability_factor", "ln_matrix"],
    asym_activations: true,
    merged_mode: true,
    build: |m: &MethodInput| {
        Ok(Box::new(AffineQuant {
            cfg: AffineQuantConfig::new(m),
        }))
    },
};

impl AffineQuantConfig {
    /// The configuration of a resolved recipe and plan (defaults §3.9).
    pub fn new(m: &MethodInput) -> Self {
        let (r, plan) = (m.recipe, m.plan);
        AffineQuantConfig {
            grids: plan.grids(),
            epochs: r.epochs.unwrap_or(4),
            lr: r.lr.unwrap_or(5e-3),
            lwc_lr: 1e-2,
            alpha: r.alpha.unwrap_or(0.5),
            // §3.3: 0.1 for W4A4, 1e-2 for LLaMA-family weight-only.
            stability_factor: r.stability_factor.unwrap_or(if plan.activations.is_some() {
                0.1
            } else {
                1e-2
            }),
            // Merged only: norm-side scales (folded into the gains) instead of matrices whose
            // inverses run online, and no query/key matrix (applied after RoPE, online).
            ln_matrix: r.ln_matrix.unwrap_or(false) && r.merged_only != Some(true),
            merged_only: r.merged_only == Some(true),
        }
    }
}

/// Band width `t_e` of the gradual mask at epoch `e` of `epochs` for an `n × n` matrix (§3.3):
/// `⌊(n−1)/(E−1)·e⌋ + 1`. With one epoch (upstream divides by zero) the band is full: the last
/// epoch always trains the whole matrix.
pub fn mask_band(n: usize, e: usize, epochs: usize) -> usize {
    if epochs < 2 {
        return n;
    }
    ((n - 1) as f64 / (epochs - 1) as f64 * e as f64).floor() as usize + 1
}

/// The gradual mask: 1 on the diagonal, `sf` on off-diagonals `1 ≤ |i−j| ≤ t−1`, else 0.
pub fn gradual_mask(n: usize, t: usize, sf: f64) -> Vec<f32> {
    let mut m = vec![0f32; n * n];
    for i in 0..n {
        for j in 0..n {
            let d = i.abs_diff(j);
            m[i * n + j] = if d == 0 {
                1.0
            } else if d < t {
                sf as f32
            } else {
                0.0
            };
        }
    }
    m
}

/// The truncation projection (§3.4): `0 < |a| < 0.01` becomes `sign(a)·0.01`; zeros stay.
pub fn truncate(v: &mut [f32]) {
    for a in v.iter_mut() {
        if *a != 0.0 && a.abs() < 0.01 {
            *a = 0.01f32.copysign(*a);
        }
    }
}

/// A norm→linears smoothing: a per-channel vector or a dense matrix.
enum Smooth {
    Vector(Var),
    Matrix(Var),
}

impl Smooth {
    fn var(&self) -> &Var {
        match self {
            Smooth::Vector(v) | Smooth::Matrix(v) => v,
        }
    }
}

struct Params {
    qkv: Smooth,
    fc1: Smooth,
    /// `[kv_heads, hd, hd]`.
    out: Var,
    /// `[kv_heads, hd, hd]` with a quantized KV cache.
    qkt: Option<Var>,
    lwc: Vec<Clip>,
}

impl Params {
    fn smooth_vars(&self) -> Vec<Var> {
        let mut v = vec![
            self.qkv.var().clone(),
            self.fc1.var().clone(),
            self.out.clone(),
        ];
        v.extend(self.qkt.clone());
        v
    }
    fn lwc_vars(&self) -> Vec<Var> {
        self.lwc.iter().flat_map(Clip::vars).collect()
    }
    fn all_vars(&self) -> Vec<Var> {
        [self.smooth_vars(), self.lwc_vars()].concat()
    }
    fn truncate(&self) -> Result<()> {
        for v in self.smooth_vars() {
            let t = v.as_tensor();
            let mut x: Vec<f32> = t.flatten_all()?.to_vec1()?;
            truncate(&mut x);
            v.set(&Tensor::from_vec(x, t.shape(), &Device::Cpu)?)?;
        }
        Ok(())
    }
}

/// The masked matrices of one epoch (or the full band), with their inverses.
struct Masked {
    qkv: (Tensor, Option<Tensor>),
    fc1: (Tensor, Option<Tensor>),
    out: Tensor,
    out_inv: Tensor,
    qkt: Option<(Tensor, Tensor)>,
}

/// A linear's merged weight and bias.
type WeightBias = (Tensor, Option<Tensor>);

pub struct AffineQuant {
    pub cfg: AffineQuantConfig,
}

/// Stacks `f` over the leading dimension of `[g, n, n]`.
fn per_head(a: &Tensor, f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
    let g = a.dim(0)?;
    let v = (0..g).map(|i| f(&a.get(i)?)).collect::<Result<Vec<_>>>()?;
    Ok(Tensor::stack(&v, 0)?)
}

impl AffineQuant {
    /// `s_j = clamp(max_t|x_j|^α / clamp(max_o W[o, j], 1e-5)^(1−α), 1e-5)`, `W` the first linear
    /// of the pair, its **signed** column max as upstream (§3.5).
    fn init_scale(&self, w: &Tensor, xmax: Option<&Tensor>) -> Result<Vec<f32>> {
        let n = w.dim(1)?;
        let wmax: Vec<f32> = w.max(0)?.to_vec1()?;
        let xmax: Vec<f32> = match xmax {
            Some(x) => x.to_vec1()?,
            None => vec![1.0; n],
        };
        let a = self.cfg.alpha as f32;
        Ok(xmax
            .iter()
            .zip(&wmax)
            .map(|(x, w)| (x.powf(a) / w.max(1e-5).powf(1.0 - a)).max(1e-5))
            .collect())
    }

    /// The paper's start (§3.5), or with `identity` every transform at `I` (LWC as usual).
    fn init_params(&self, block: &Block, stats: &SiteStats, identity: bool) -> Result<Params> {
        let c = &**block.config();
        let (nh, nkv, hd) = (c.num_heads, c.num_kv_heads, c.head_dim);
        let smooth = |s: Vec<f32>| -> Result<Smooth> {
            let n = s.len();
            Ok(if self.cfg.ln_matrix {
                let mut m = vec![0f32; n * n];
                for (i, v) in s.iter().enumerate() {
                    m[i * n + i] = *v;
                }
                Smooth::Matrix(var(&m, &[n, n])?)
            } else {
                Smooth::Vector(var(&s, &[n])?)
            })
        };
        let q = block.linear(LinearKind::Q).weight()?;
        let up = block.linear(LinearKind::Up).weight()?;
        let o = block.linear(LinearKind::O).weight()?;
        let scale = |w: &Tensor, xmax: Option<&Tensor>| -> Result<Vec<f32>> {
            if identity {
                Ok(vec![1.0; w.dim(1)?])
            } else {
                self.init_scale(w, xmax)
            }
        };
        let s_qkv = scale(&q, stats.attn_in.as_ref())?;
        let s_fc1 = scale(&up, stats.mlp_in.as_ref())?;
        // V→O: o_proj's statistics; a KV head's matrix serves its query heads: take their max.
        let s_o = scale(&o, stats.o_in.as_ref())?;
        let g = nh / nkv;
        let mut out = vec![0f32; nkv * hd * hd];
        for kv in 0..nkv {
            for j in 0..hd {
                let s = (0..g)
                    .map(|k| s_o[(kv * g + k) * hd + j])
                    .fold(f32::MIN, f32::max);
                out[kv * hd * hd + j * hd + j] = s;
            }
        }
        let eye: Vec<f32> = (0..nkv * hd * hd)
            .map(|i| {
                if (i % (hd * hd)) % (hd + 1) == 0 {
                    1.0
                } else {
                    0.0
                }
            })
            .collect();
        Ok(Params {
            qkv: smooth(s_qkv)?,
            fc1: smooth(s_fc1)?,
            out: var(&out, &[nkv, hd, hd])?,
            qkt: match self.cfg.grids.kv_cache {
                Some(_) if !self.cfg.merged_only => Some(var(&eye, &[nkv, hd, hd])?),
                _ => None,
            },
            lwc: LinearKind::ALL
                .iter()
                .map(|k| {
                    let (o, i) = k.shape(c);
                    Clip::new(&[o * i / self.cfg.grids.group_for(*k).unwrap_or(i), 1])
                })
                .collect::<Result<_>>()?,
        })
    }

    /// `A⊙M` for every matrix at band `t` of the mask (full band: `None`), with inverses by `inv`.
    fn masked(
        &self,
        p: &Params,
        epoch: Option<usize>,
        inv: &dyn Fn(&Tensor) -> Result<Tensor>,
    ) -> Result<Masked> {
        let sf = self.cfg.stability_factor;
        let mask = |n: usize| -> Result<Tensor> {
            let t = match epoch {
                Some(e) => mask_band(n, e, self.cfg.epochs),
                None => n,
            };
            Ok(Tensor::from_vec(
                gradual_mask(n, t, sf),
                (n, n),
                &Device::Cpu,
            )?)
        };
        let smooth = |s: &Smooth| -> Result<(Tensor, Option<Tensor>)> {
            Ok(match s {
                Smooth::Vector(v) => (v.as_tensor().clone(), None),
                Smooth::Matrix(a) => {
                    let n = a.dim(0)?;
                    let m = (a.as_tensor() * mask(n)?.to_dtype(a.dtype())?)?;
                    let i = inv(&m)?;
                    (m, Some(i))
                }
            })
        };
        let hd = p.out.dim(1)?;
        let fc_mask = mask(hd)?.to_dtype(p.out.dtype())?;
        let out = p.out.as_tensor().broadcast_mul(&fc_mask)?;
        let out_inv = per_head(&out, inv)?;
        let qkt = match &p.qkt {
            Some(a) => {
                let m = a.as_tensor().broadcast_mul(&fc_mask)?;
                let i = per_head(&m, inv)?;
                Some((m, i))
            }
            None => None,
        };
        Ok(Masked {
            qkv: smooth(&p.qkv)?,
            fc1: smooth(&p.fc1)?,
            out,
            out_inv,
            qkt,
        })
    }

    /// The block with every merge of §3.2 applied for the matrices `m`, weights still in full
    /// precision (dtype of `m`). Norm scales and the online inverses are set; linears are dense.
    fn merged(&self, block: &Block, m: &Masked) -> Result<(Block, Vec<WeightBias>)> {
        let c = &**block.config();
        let (nh, nkv, hd) = (c.num_heads, c.num_kv_heads, c.head_dim);
        let dt = m.out.dtype();
        let mut b = block.clone();
        let mut ws = Vec::with_capacity(7);
        // Norm side: a vector divides the norm gain; a matrix's inverse runs online.
        let norm_side = |s: &(Tensor, Option<Tensor>),
                         gain: &Tensor|
         -> Result<(Tensor, Option<KroneckerTransform>)> {
            Ok(match s {
                (v, None) => ((gain.to_dtype(dt)? / v)?.to_dtype(DType::F32)?, None),
                (_, Some(inv)) => (
                    gain.clone(),
                    Some(KroneckerTransform {
                        n1: 1,
                        n2: inv.dim(0)?,
                        p1: None,
                        p2: Some(inv.to_dtype(DType::F32)?),
                        scale: None,
                    }),
                ),
            })
        };
        let (g_in, t_in) = norm_side(&m.qkv, block.input_norm())?;
        let (g_post, t_post) = norm_side(&m.fc1, block.post_norm())?;
        b.set_norms(g_in, g_post);
        b.set_site(Site::AttnIn, t_in);
        b.set_site(Site::MlpIn, t_post);
        // W·diag(s) or W·Ãᵀ.
        let weight_side = |w: &Tensor, s: &(Tensor, Option<Tensor>)| -> Result<Tensor> {
            Ok(match s {
                (v, None) => w.broadcast_mul(v)?,
                (a, Some(_)) => w.matmul(&a.t()?)?,
            })
        };
        // Query head h reads KV head h / g.
        let g = nh / nkv;
        let idx: Vec<u32> = (0..nh).map(|h| (h / g) as u32).collect();
        let idx = Tensor::from_vec(idx, nh, &Device::Cpu)?;
        for kind in LinearKind::ALL {
            let layer = block.linear(kind);
            let w = layer.weight()?.to_dtype(dt)?;
            let bias = layer.bias().map(|b| b.to_dtype(dt)).transpose()?;
            let (w, bias) = match kind {
                LinearKind::Q | LinearKind::K => (weight_side(&w, &m.qkv)?, bias),
                LinearKind::V => {
                    let w = weight_side(&w, &m.qkv)?;
                    let inp = w.dim(1)?;
                    // Rows of KV head g: Ã_g⁻ᵀ·W_v[g].
                    let w = m
                        .out_inv
                        .transpose(1, 2)?
                        .matmul(&w.reshape((nkv, hd, inp))?)?
                        .reshape((nkv * hd, inp))?;
                    let bias = bias
                        .map(|b| -> Result<Tensor> {
                            Ok(b.reshape((nkv, 1, hd))?
                                .matmul(&m.out_inv)?
                                .reshape(nkv * hd)?)
                        })
                        .transpose()?;
                    (w, bias)
                }
                LinearKind::O => {
                    let out = w.dim(0)?;
                    // Column block of query head h: W_o[:, h]·Ã_{h/g}ᵀ.
                    let at = m.out.index_select(&idx, 0)?.transpose(1, 2)?;
                    let w = w
                        .reshape((out, nh, hd))?
                        .transpose(0, 1)?
                        .contiguous()?
                        .matmul(&at.contiguous()?)?
                        .transpose(0, 1)?
                        .contiguous()?
                        .reshape((out, nh * hd))?;
                    (w, bias)
                }
                LinearKind::Gate | LinearKind::Up => (weight_side(&w, &m.fc1)?, bias),
                LinearKind::Down => (w, bias),
            };
            ws.push((w, bias));
        }
        b.set_qk_transform(match &m.qkt {
            Some((a, inv)) => Some(QkTransform {
                q: inv
                    .index_select(&idx, 0)?
                    .transpose(1, 2)?
                    .contiguous()?
                    .to_dtype(DType::F32)?,
                k: a.to_dtype(DType::F32)?,
            }),
            None => None,
        });
        Ok((b, ws))
    }

    /// `kind`'s weight `[out, in]` viewed as LWC units `[out·groups, g]`.
    fn units(&self, w: &Tensor, kind: LinearKind) -> Result<Tensor> {
        lwc_units(w, self.cfg.grids.group_for(kind))
    }

    fn act(&self) -> Option<Arc<dyn ActQuantizer>> {
        fixed_quantizer(self.cfg.grids.activations)
    }

    /// The differentiable quantized block for the parameters at `epoch`'s mask.
    fn train_block(&self, block: &Block, p: &Params, epoch: usize) -> Result<Block> {
        let m = self.masked(p, Some(epoch), &|a| inverse(a))?;
        let (mut b, ws) = self.merged(block, &m)?;
        for (i, (kind, (w, bias))) in LinearKind::ALL.into_iter().zip(ws).enumerate() {
            let w = match &self.cfg.grids.weights_for(kind) {
                Some(spec) => clip_quant(
                    &self.units(&w, kind)?,
                    p.lwc[i].max.as_tensor(),
                    p.lwc[i].min.as_tensor(),
                    spec,
                    true,
                )?
                .reshape(w.shape())?,
                None => w,
            };
            b.set_linear(
                kind,
                Box::new(QuantLinear::with_quantizer(None, w, bias, self.act())?),
            )?;
        }
        attach_kv(&mut b, self.cfg.grids.kv_cache);
        Ok(b)
    }

    /// Trains the block's parameters from `p` and returns the deployed block.
    fn train_from(
        &self,
        d: &BlockData,
        p: &Params,
        on_epoch: &mut dyn FnMut(&EpochLog),
    ) -> Result<(Block, MethodReport)> {
        let BlockData {
            block, rope, x, y, ..
        } = *d;
        let groups = [
            Group {
                vars: p.smooth_vars(),
                lr: self.cfg.lr,
                weight_decay: 0.0,
                schedule: Schedule::Constant,
            },
            Group {
                vars: p.lwc_vars(),
                lr: self.cfg.lwc_lr,
                weight_decay: 0.0,
                schedule: Schedule::Constant,
            },
        ];
        let cfg = TrainConfig {
            epochs: self.cfg.epochs,
            batch: 1,
            loss: Loss::Mse,
        };
        let t = Training {
            method: self,
            block,
            rope,
            p,
        };
        let rep = train(&t, &groups, &cfg, block.index(), x, y, on_epoch)?;
        Ok((self.deploy(block, p, true)?, rep))
    }

    /// Smallest pivot ratio over the masked matrices at `epoch` (f64, the pivots of
    /// `inverse_f64`), or `None` if one is singular.
    fn conditioning(&self, p: &Params, epoch: Option<usize>) -> Result<Option<f64>> {
        let m = self.masked(p, epoch, &|a| Ok(a.clone()))?;
        let mut mats = vec![m.out.clone()];
        mats.extend(m.qkt.map(|(a, _)| a));
        for s in [m.qkv, m.fc1] {
            if s.1.is_some() {
                mats.push(s.0.unsqueeze(0)?);
            }
        }
        let mut worst = f64::INFINITY;
        for t in mats {
            for h in 0..t.dim(0)? {
                let a = t.get(h)?;
                let n = a.dim(0)?;
                let v: Vec<f64> = a.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
                match inverse_f64(&v, n) {
                    Some((_, r)) => worst = worst.min(r),
                    None => return Ok(None),
                }
            }
        }
        Ok(Some(worst))
    }

    /// Deployment: full-band mask, merges in f64, LWC applied to the weights (left in full
    /// precision for the engine's weight quantizer).
    fn deploy(&self, block: &Block, p: &Params, quantize: bool) -> Result<Block> {
        let to64 = |v: &Var| v.as_tensor().to_dtype(DType::F64);
        // f64 copies of the parameters, masked at the full band.
        let p64 = Params {
            qkv: match &p.qkv {
                Smooth::Vector(v) => Smooth::Vector(Var::from_tensor(&to64(v)?)?),
                Smooth::Matrix(v) => Smooth::Matrix(Var::from_tensor(&to64(v)?)?),
            },
            fc1: match &p.fc1 {
                Smooth::Vector(v) => Smooth::Vector(Var::from_tensor(&to64(v)?)?),
                Smooth::Matrix(v) => Smooth::Matrix(Var::from_tensor(&to64(v)?)?),
            },
            out: Var::from_tensor(&to64(&p.out)?)?,
            qkt: p
                .qkt
                .as_ref()
                .map(|v| Var::from_tensor(&to64(v)?))
                .transpose()?,
            lwc: Vec::new(),
        };
        let inv64 = |a: &Tensor| -> Result<Tensor> {
            let n = a.dim(0)?;
            let v: Vec<f64> = a.flatten_all()?.to_vec1()?;
            let (i, _) = inverse_f64(&v, n).ok_or_else(|| {
                Error::Runtime(format!(
                    "block {}: an AffineQuant matrix is singular",
                    block.index()
                ))
            })?;
            Ok(Tensor::from_vec(i, (n, n), &Device::Cpu)?)
        };
        let m = self.masked(&p64, None, &inv64)?;
        let (mut b, ws) = self.merged(block, &m)?;
        for (i, (kind, (w, bias))) in LinearKind::ALL.into_iter().zip(ws).enumerate() {
            let w = if quantize && self.cfg.grids.weights_for(kind).is_some() {
                let u = self.units(&w, kind)?;
                let (lo, hi) = lwc_bounds(&u.to_dtype(DType::F32)?, &p.lwc[i])?;
                clamp_rows(&u, &lo.to_dtype(DType::F64)?, &hi.to_dtype(DType::F64)?)?
                    .reshape(w.shape())?
            } else {
                w
            };
            let w = w.to_dtype(DType::F32)?;
            let bias = bias.map(|b| b.to_dtype(DType::F32)).transpose()?;
            let act = if quantize { self.act() } else { None };
            b.set_linear(
                kind,
                Box::new(QuantLinear::with_quantizer(None, w, bias, act)?),
            )?;
        }
        attach_kv(&mut b, self.cfg.grids.kv_cache.filter(|_| quantize));
        Ok(b)
    }

    /// Deploys freshly initialised (untrained, random-perturbed if `perturb`) parameters without
    /// quantization: for tests of the reparameterisation.
    pub fn deploy_initial_unquantized(
        &self,
        block: &Block,
        stats: &SiteStats,
        perturb: Option<u64>,
    ) -> Result<Block> {
        let p = self.init_params(block, stats, false)?;
        if let Some(seed) = perturb {
            let mut rng = crate::rng::Rng::new(seed);
            for v in p.smooth_vars() {
                let t = v.as_tensor();
                let x: Vec<f32> = t
                    .flatten_all()?
                    .to_vec1::<f32>()?
                    .into_iter()
                    .map(|x| x + 0.05 * rng.normal() as f32 * x.abs().max(0.2))
                    .collect();
                v.set(&Tensor::from_vec(x, t.shape(), &Device::Cpu)?)?;
            }
        }
        self.deploy(block, &p, false)
    }
}

/// One block's training: the parameters and what the loss runs through.
struct Training<'a> {
    method: &'a AffineQuant,
    block: &'a Block,
    rope: &'a Rope,
    p: &'a Params,
}

impl Trainee for Training<'_> {
    fn vars(&self) -> Vec<Var> {
        self.p.all_vars()
    }
    fn before_step(&self) -> Result<()> {
        self.p.truncate()
    }
    fn quantized_block(&self, epoch: usize) -> Result<Block> {
        self.method.train_block(self.block, self.p, epoch)
    }
    fn rope(&self) -> &Rope {
        self.rope
    }
    fn block(&self) -> &Block {
        self.block
    }
    /// Truncation, then the condition check of the matrices as the next epoch (or deployment)
    /// will use them.
    fn end_of_epoch(&self, e: usize) -> Result<Option<String>> {
        self.p.truncate()?;
        let epochs = self.method.cfg.epochs;
        let next = (e + 1 < epochs).then_some(e + 1);
        Ok(match self.method.conditioning(self.p, next)? {
            Some(r) if r >= 1e-7 => None,
            r => Some(format!(
                "block {}: an AffineQuant matrix became near-singular after epoch {e} (pivot ratio {}); restored the last well-conditioned parameters and stopped",
                self.block.index(),
                r.map_or("0".into(), |r| format!("{r:.1e}"))
            )),
        })
    }
}

impl Method for AffineQuant {
    fn label(&self) -> &'static str {
        "affinequant"
    }
    fn training_summary(&self) -> Option<String> {
        let c = &self.cfg;
        Some(format!(
            "{} epochs, lr {}, stability factor {}, {} at the norms",
            c.epochs,
            c.lr,
            c.stability_factor,
            if c.ln_matrix {
                "dense matrices"
            } else {
                "per-channel scales"
            }
        ))
    }
    fn trainer(&mut self) -> Option<&mut dyn BlockTrainer> {
        Some(self)
    }
}

impl BlockTrainer for AffineQuant {
    fn calibrate(
        &mut self,
        d: &BlockData,
        on_epoch: &mut dyn FnMut(&EpochLog),
    ) -> Result<(Block, MethodReport)> {
        let p = self.init_params(d.block, d.stats, false)?;
        self.train_from(d, &p, on_epoch)
    }

    /// §3.10: the smoothing start can be worse than no transform at all (weight grids under large
    /// activation outliers, Qwen2.5), and 32 steps do not undo it; such a block trains again
    /// with every transform at the identity.
    fn recalibrate(
        &mut self,
        d: &BlockData,
        on_epoch: &mut dyn FnMut(&EpochLog),
    ) -> Result<Option<Retrained>> {
        let p = self.init_params(d.block, d.stats, true)?;
        let (block, report) = self.train_from(d, &p, on_epoch)?;
        Ok(Some(Retrained {
            start: "every transform at the identity",
            block,
            report,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_band_schedule() {
        // n = 64, 5 epochs: t_e = ⌊63/4·e⌋ + 1 = 1, 16, 32, 48, 64.
        let t: Vec<usize> = (0..5).map(|e| mask_band(64, e, 5)).collect();
        assert_eq!(t, [1, 16, 32, 48, 64]);
        // The last epoch always covers the full matrix; one epoch trains it whole.
        for (n, e) in [(576, 20), (64, 2), (9, 7)] {
            assert_eq!(mask_band(n, e - 1, e), n);
        }
        assert_eq!(mask_band(64, 0, 1), 64);
    }

    #[test]
    fn gradual_mask_values() {
        let m = gradual_mask(4, 2, 0.1);
        #[rustfmt::skip]
        let want = [
            1.0, 0.1, 0.0, 0.0,
            0.1, 1.0, 0.1, 0.0,
            0.0, 0.1, 1.0, 0.1,
            0.0, 0.0, 0.1, 1.0,
        ];
        assert_eq!(m, want);
        assert_eq!(
            gradual_mask(3, 1, 0.5),
            [1., 0., 0., 0., 1., 0., 0., 0., 1.]
        );
        assert!(gradual_mask(5, 5, 0.3)
            .iter()
            .all(|&x| x == 1.0 || x == 0.3));
    }

    #[test]
    fn truncation_projection() {
        let mut v = [0.0, 0.005, -0.002, 0.01, -0.5, 1e-9];
        truncate(&mut v);
        assert_eq!(v, [0.0, 0.01, -0.01, 0.01, -0.5, 0.01]);
    }

    #[test]
    fn masked_random_start_stays_invertible() {
        // A diagonal start (the init) plus in-band entries at the truncation floor, masked at
        // every epoch's band: diagonally dominant for these sizes, so invertible with a sane
        // pivot ratio.
        let mut rng = crate::rng::Rng::new(11);
        for (n, sf, epochs) in [(64usize, 0.1, 5usize), (64, 1.0, 3), (128, 1e-2, 4)] {
            let mut a = vec![0f32; n * n];
            for i in 0..n {
                for j in 0..n {
                    a[i * n + j] = if i == j {
                        0.5 + rng.uniform() as f32
                    } else {
                        (0.01 * rng.sign()) as f32
                    };
                }
            }
            for e in 0..epochs {
                let m = gradual_mask(n, mask_band(n, e, epochs), sf);
                let am: Vec<f64> = a.iter().zip(&m).map(|(x, y)| (x * y) as f64).collect();
                let (_, ratio) = inverse_f64(&am, n).expect("invertible");
                assert!(ratio > 1e-3, "n {n} sf {sf} epoch {e}: pivot ratio {ratio}");
            }
        }
    }
}

//! FlatQuant (algorithms.md §2): per linear input a learned affine transform
//! `T = diag(c)·(P1⊗P2)`, a head mixer `P_h` on the o_proj input, per-head `P_v` (values) and `P_k`
//! (queries/keys after RoPE) when the KV cache is quantized, learnable weight clipping (LWC) per
//! output row and learnable activation clipping (LAC) per quantizer, trained block by block to
//! minimise the quantized block's output MSE.
//!
//! Factor parameterisation: each `P` is a plain matrix started at a random orthogonal matrix, with
//! `P⁻ᵀ` from a differentiable f64 Gauss–Jordan inverse (FlatQuant's `--direct_inv` mode). One
//! inverse per factor per step is cheaper than the SVD form's two Cayley solves, has the same
//! expressive power, and an orthogonal start is perfectly conditioned; the small learning rate
//! keeps it away from singularity, and the deployment step checks the pivot ratio in f64 and
//! reports a near-singular factor instead of writing garbage.
//!
//! Merged only (recipe key `merged_only`; implied by `quantize --format`): only what folds into
//! the stored weights trains — the channel scales `c` (into the norm gains and up_proj's rows), a
//! per-head `P_v` on the values (into v_proj's rows and o_proj's columns: attention mixes tokens,
//! not features, so `softmax(QKᵀ)·(V·P_v)·P_v⁻¹ = softmax(QKᵀ)·V`), and LWC. No Kronecker factor,
//! head mixer or `P_k` runs online, so the checkpoint holds plain weights that every format
//! expresses.

use super::lwc::{clamp_rows, lwc_bounds, lwc_unit, lwc_units, Clip};
use super::plan::Grids;
use super::train::{train, var, Group, Loss, Schedule, TrainConfig, Trainee};
use super::{
    BlockData, BlockTrainer, EpochLog, Method, MethodInput, MethodReport, MethodSpec, SiteStats,
};
use crate::backend::simulated::QuantLinear;
use crate::error::{Error, Result};
use crate::model::{Block, DenseLinear, LinearKind, QkTransform, Rope, Site};
use crate::quant::act::sigmoid;
use crate::quant::clipquant::{clip_quant, clip_quant_units};
use crate::quant::ActQuantizer;
use crate::rng::Rng;
use crate::transforms::inverse::{inverse, inverse_f64};
use crate::transforms::linalg::random_orthogonal;
use crate::transforms::{per_head_output, KroneckerTransform};
use candle_core::{DType, Device, Tensor, Var, D};
use std::sync::Arc;

/// Hyper-parameters (recipes in calib/*.toml).
#[derive(Debug, Clone)]
pub struct FlatQuantConfig {
    pub grids: Grids,
    pub epochs: usize,
    pub batch: usize,
    /// Learning rate of the transforms; the clip parameters use `clip_lr_mult ×` this.
    pub lr: f64,
    /// Learning rate of the channel scales `s = ln c` ([`Kron`]).
    pub scale_lr: f64,
    pub clip_lr_mult: f64,
    pub weight_decay: f64,
    /// SmoothQuant-style migration strength of the channel-scale init (§2.5).
    pub alpha: f64,
    pub seed: u64,
    /// Only transforms that merge into the weights (module docs).
    pub merged_only: bool,
}

/// Learning rate of the per-head K/V transforms when the KV cache is quantized (the paper's).
const KV_HEAD_LR: f64 = 5e-3;

pub const SPEC: MethodSpec = MethodSpec {
    name: "flatquant",
    about:
        "Learned Kronecker affine transforms with learnable clipping, calibrated block by block.",
    trained: true,
    preset: Some("cpu"),
    // The presets measured per scheme (README, "FlatQuant CPU preset"): GPTQ v2 weights at
    // W4A16, W4A4 and W4A4KV4 on the per-channel grid; RTN weights asked for explicitly, another
    // grid (a group size, a `--format` target) or another scheme keep the `cpu` preset alone.
    scheme_recipe: |f, format| {
        let gptq = f.weight_quantizer.as_deref().is_none_or(|w| w == "gptq");
        if !gptq || format || f.bits.unwrap_or(4) != 4 || f.group_size.is_some() {
            return None;
        }
        match (f.a_bits.unwrap_or(16), f.kv_bits.unwrap_or(16)) {
            (16, 16) => Some("flatquant-w4a16-gptq"),
            (4, 16) => Some("flatquant-w4a4-gptq"),
            (4, 4) => Some("flatquant-w4a4kv4-gptq"),
            _ => None,
        }
    },
    own_keys: &["scale_lr"],
    asym_activations: false,
    merged_mode: true,
    build: |m: &MethodInput| Ok(Box::new(FlatQuant::new(FlatQuantConfig::new(m))?)),
};

impl FlatQuantConfig {
    /// The configuration of a resolved recipe and plan (defaults: the paper's, §2.12).
    pub fn new(m: &MethodInput) -> Self {
        let (r, plan) = (m.recipe, m.plan);
        FlatQuantConfig {
            grids: plan.grids(),
            epochs: r.epochs.unwrap_or(3),
            batch: r.batch.unwrap_or(1),
            lr: r.lr.unwrap_or(5e-3),
            scale_lr: r.scale_lr.or(r.lr).unwrap_or(5e-3),
            clip_lr_mult: 10.0,
            weight_decay: 0.01,
            alpha: r.alpha.unwrap_or(0.3),
            seed: m.seed,
            merged_only: r.merged_only == Some(true),
        }
    }
}

/// `n1` = the largest divisor of `n` not above √n (algorithms.md §2.2, affq's rule).
pub fn kron_dims(n: usize) -> (usize, usize) {
    let mut n1 = 1;
    let mut d = 1;
    while d * d <= n {
        if n.is_multiple_of(d) {
            n1 = d;
        }
        d += 1;
    }
    (n1, n / n1)
}

fn orthogonal_var(n: usize, rng: &mut Rng) -> Result<Var> {
    let m: Vec<f32> = random_orthogonal(n, rng)
        .iter()
        .map(|&x| x as f32)
        .collect();
    var(&m, &[n, n])
}

/// `diag(c)·(P1⊗P2)` with trainable factors (none in the merged-only mode). The channel scale is
/// trained as `c = exp(s)`: its init spans orders of magnitude across channels (outlier channels
/// get `c ≪ 1`, §2.5), and AdamW moves every parameter by about the learning rate per step, which
/// is a relative step in `s` — the same learning rate suits every channel and every model. Over
/// `T` steps at rate `η` a scale changes by at most a factor `e^(ηT)`, a budget unrelated to the
/// factors' (entries of order 1/√n1): at the reference's 5e-3 and 40 steps `e^0.2` = 1.22, too
/// little to move an outlier channel, so the scales have a rate of their own (`scale_lr`;
/// SmolLM2 W4A4 at that budget, 2048 × 16: 43.68 at 5e-3, 36.20 at 4e-2, 37.14 at 8e-2; README).
struct Kron {
    n1: usize,
    n2: usize,
    p1: Option<Var>,
    p2: Option<Var>,
    /// `s = ln c`.
    s: Var,
}

impl Kron {
    /// `factors = false`: the channel scale alone.
    fn new(n: usize, c: &[f32], factors: bool, rng: &mut Rng) -> Result<Self> {
        let (n1, n2) = kron_dims(n);
        let s: Vec<f32> = c.iter().map(|c| c.ln()).collect();
        let mut factor = |k| factors.then(|| orthogonal_var(k, rng)).transpose();
        Ok(Kron {
            n1,
            n2,
            p1: factor(n1)?,
            p2: factor(n2)?,
            s: var(&s, &[n])?,
        })
    }

    /// The Kronecker factors (the channel scale is `s`).
    fn factor_vars(&self) -> Vec<Var> {
        self.p1.iter().chain(&self.p2).cloned().collect()
    }

    /// The channel scale `c` (differentiable in the parameters).
    fn c(&self) -> Result<Tensor> {
        Ok(self.s.as_tensor().exp()?)
    }

    /// Activation side `x ↦ x·diag(c)·(P1⊗P2)` (training form, `c` online).
    fn online(&self) -> Result<KroneckerTransform> {
        Ok(KroneckerTransform {
            n1: self.n1,
            n2: self.n2,
            p1: self.p1.as_ref().map(|p| p.as_tensor().clone()),
            p2: self.p2.as_ref().map(|p| p.as_tensor().clone()),
            scale: Some(self.c()?),
        })
    }

    /// Weight side: rows `w ↦ w·diag(1/c)·(P1⁻ᵀ⊗P2⁻ᵀ)`.
    fn weight_side(&self) -> Result<KroneckerTransform> {
        Ok(KroneckerTransform {
            n1: self.n1,
            n2: self.n2,
            p1: self.p1.as_ref().map(inverse_t).transpose()?,
            p2: self.p2.as_ref().map(inverse_t).transpose()?,
            scale: Some(self.c()?.recip()?),
        })
    }
}

/// `P⁻ᵀ` (differentiable).
fn inverse_t(p: &Var) -> Result<Tensor> {
    Ok(inverse(p.as_tensor())?.t()?)
}

/// All trainable parameters of one block.
struct Params {
    attn: Kron,
    mlp: Kron,
    down: Kron,
    /// Online head mixer on the o_proj input (not in the merged-only mode).
    head_mix: Option<Var>,
    /// Per-head value transform: when the KV cache is quantized, or merged only.
    pv: Option<Var>,
    /// Query/key transform after RoPE: when the KV cache is quantized (not merged only).
    pk: Option<Var>,
    /// LWC per linear, `[out, 1]`.
    lwc: Vec<Clip>,
    /// LAC per linear input.
    lac: Vec<Clip>,
    /// LAC of keys and values.
    kv_lac: Option<(Clip, Clip)>,
}

impl Params {
    /// The three online Kronecker transforms.
    fn krons(&self) -> [&Kron; 3] {
        [&self.attn, &self.mlp, &self.down]
    }
    /// The Kronecker factors and the head mixer.
    fn transform_vars(&self) -> Vec<Var> {
        let mut v: Vec<Var> = self.krons().iter().flat_map(|k| k.factor_vars()).collect();
        v.extend(self.head_mix.iter().cloned());
        v
    }
    /// The channel scales `s = ln c`.
    fn scale_vars(&self) -> Vec<Var> {
        self.krons().iter().map(|k| k.s.clone()).collect()
    }
    /// The per-head value and query/key transforms.
    fn head_vars(&self) -> Vec<Var> {
        [&self.pv, &self.pk]
            .into_iter()
            .flatten()
            .cloned()
            .collect()
    }
    fn clip_vars(&self) -> Vec<Var> {
        let kv = self.kv_lac.iter().flat_map(|(k, v)| [k, v]);
        self.lwc
            .iter()
            .chain(&self.lac)
            .chain(kv)
            .flat_map(Clip::vars)
            .collect()
    }
    fn all_vars(&self) -> Vec<Var> {
        [
            self.transform_vars(),
            self.scale_vars(),
            self.head_vars(),
            self.clip_vars(),
        ]
        .concat()
    }
}

pub struct FlatQuant {
    pub cfg: FlatQuantConfig,
    /// Clip logit whose sigmoid is 1 in f32: quantization without clipping.
    no_clip: Tensor,
}

const LINEAR_SITE: [Site; 7] = [
    Site::AttnIn,
    Site::AttnIn,
    Site::AttnIn,
    Site::OIn,
    Site::MlpIn,
    Site::MlpIn,
    Site::DownIn,
];

impl FlatQuant {
    pub fn new(cfg: FlatQuantConfig) -> Result<Self> {
        Ok(FlatQuant {
            cfg,
            no_clip: Tensor::new(&[[30f32]], &Device::Cpu)?,
        })
    }

    /// Channel-scale init `c_j = max_o|W[o,j]|^(1−α) / max_t|x[t,j]|^α` (§2.5).
    fn init_scale(
        &self,
        block: &Block,
        kinds: &[LinearKind],
        act_max: Option<&Tensor>,
    ) -> Result<Vec<f32>> {
        let ws = kinds
            .iter()
            .map(|&k| block.linear(k).weight())
            .collect::<Result<Vec<_>>>()?;
        let wmax: Vec<f32> = Tensor::cat(&ws, 0)?.abs()?.max(0)?.to_vec1()?;
        let xmax: Vec<f32> = match act_max {
            Some(t) => t.to_vec1()?,
            None => vec![1.0; wmax.len()],
        };
        let a = self.cfg.alpha as f32;
        Ok(wmax
            .iter()
            .zip(&xmax)
            .map(|(w, x)| (w.powf(1.0 - a) / x.max(1e-5).powf(a)).max(1e-5))
            .collect())
    }

    fn init_params(&self, block: &Block, stats: &SiteStats) -> Result<Params> {
        let c = &**block.config();
        let mut rng = Rng::new(
            self.cfg
                .seed
                .wrapping_mul(1000)
                .wrapping_add(block.index() as u64),
        );
        use LinearKind::*;
        let attn_c = self.init_scale(block, &[Q, K, V], stats.attn_in.as_ref())?;
        let mlp_c = self.init_scale(block, &[Up, Gate], stats.mlp_in.as_ref())?;
        let down_c = self.init_scale(block, &[Down], stats.down_in.as_ref())?;
        let full = !self.cfg.merged_only;
        let kv = self.cfg.grids.kv_cache.is_some();
        let attn = Kron::new(c.hidden_size, &attn_c, full, &mut rng)?;
        let mlp = Kron::new(c.hidden_size, &mlp_c, full, &mut rng)?;
        let down = Kron::new(c.intermediate_size, &down_c, full, &mut rng)?;
        let head_mix = full
            .then(|| orthogonal_var(c.num_heads, &mut rng))
            .transpose()?;
        let pv = (kv || !full)
            .then(|| orthogonal_var(c.head_dim, &mut rng))
            .transpose()?;
        let pk = (kv && full)
            .then(|| orthogonal_var(c.head_dim, &mut rng))
            .transpose()?;
        Ok(Params {
            attn,
            mlp,
            down,
            head_mix,
            pv,
            pk,
            lwc: LinearKind::ALL
                .iter()
                .map(|k| {
                    let (out, inp) = k.shape(c);
                    let g = self.cfg.grids.group_for(*k).unwrap_or(inp);
                    Clip::new(&[out * inp / g.max(1), 1])
                })
                .collect::<Result<_>>()?,
            lac: LinearKind::ALL
                .iter()
                .map(|_| Clip::new(&[1, 1]))
                .collect::<Result<_>>()?,
            kv_lac: match self.cfg.grids.kv_cache {
                Some(_) => Some((Clip::new(&[1, 1])?, Clip::new(&[1, 1])?)),
                None => None,
            },
        })
    }

    /// The differentiable quantized block for the current parameters.
    fn train_block(&self, block: &Block, p: &Params) -> Result<Block> {
        let c = &**block.config();
        let (nh, hd) = (c.num_heads, c.head_dim);
        let mut b = block.clone();
        let pv = p.pv.as_ref().map(|pv| pv.as_tensor());
        let o_online = p.head_mix.as_ref().map(|h| KroneckerTransform {
            n1: nh,
            n2: hd,
            p1: Some(h.as_tensor().clone()),
            p2: None,
            scale: None,
        });
        let o_weight = KroneckerTransform {
            n1: nh,
            n2: hd,
            p1: p.head_mix.as_ref().map(inverse_t).transpose()?,
            p2: p.pv.as_ref().map(inverse_t).transpose()?,
            scale: None,
        };
        let weight_side = [
            p.attn.weight_side()?,
            o_weight,
            p.mlp.weight_side()?,
            p.down.weight_side()?,
        ];
        for (i, kind) in LinearKind::ALL.into_iter().enumerate() {
            let layer = block.linear(kind);
            let w = weight_side[LINEAR_SITE[i] as usize].apply(&layer.weight()?)?;
            let mut bias = layer.bias().cloned();
            let (lwc_hi, lwc_lo) = (p.lwc[i].max.as_tensor(), p.lwc[i].min.as_tensor());
            let gs = self.cfg.grids.group_for(kind);
            let w = match (kind, pv, &self.cfg.grids.weights_for(kind)) {
                (LinearKind::V, Some(pv), spec) => {
                    // Output side of v_proj: each head's values times P_v, after the clip (§2.6).
                    let clipped = if self.cfg.grids.dense[i] {
                        w
                    } else {
                        let u = lwc_units(&w, gs)?;
                        let (lo, hi) = lwc_bounds(&u, &p.lwc[i])?;
                        clamp_rows(&u, &lo, &hi)?.reshape(w.shape())?
                    };
                    let (w, b) = per_head_output(&clipped, bias.as_ref(), pv, hd)?;
                    bias = b;
                    match spec {
                        Some(spec) => clip_quant(
                            &lwc_units(&w, gs)?,
                            &self.no_clip,
                            &self.no_clip,
                            spec,
                            false,
                        )?
                        .reshape(w.shape())?,
                        None => w,
                    }
                }
                (_, _, Some(spec)) => {
                    clip_quant_units(&w, lwc_unit(&w, gs)?, lwc_hi, lwc_lo, spec, true)?
                }
                (_, _, None) => w,
            };
            let act = self
                .cfg
                .grids
                .activations
                .map(|spec| p.lac[i].learned(spec));
            let act = act.map(|a| Arc::new(a) as Arc<dyn ActQuantizer>);
            // The weight is a graph tensor already on the grid: a full-precision-weight layer.
            b.set_linear(
                kind,
                Box::new(QuantLinear::with_quantizer(None, w, bias, act)?),
            )?;
        }
        b.set_site(Site::AttnIn, Some(p.attn.online()?));
        b.set_site(Site::OIn, o_online);
        b.set_site(Site::MlpIn, Some(p.mlp.online()?));
        b.set_site(Site::DownIn, Some(p.down.online()?));
        if let Some(pk) = &p.pk {
            b.set_qk_transform(Some(QkTransform {
                q: inverse_t(pk)?,
                k: pk.as_tensor().clone(),
            }));
        }
        if let (Some(spec), Some((kc, vc))) = (self.cfg.grids.kv_cache, &p.kv_lac) {
            b.set_kv_quantizers(
                Some(Arc::new(kc.learned(spec))),
                Some(Arc::new(vc.learned(spec))),
            );
        }
        Ok(b)
    }

    /// The deployed block: `c` merged into the norms and up_proj, transforms merged into the
    /// weights in f64, learned clips applied, weights on the grid. With `quantize = false` the
    /// result computes the original function (the equivalence test).
    fn deploy(
        &self,
        block: &Block,
        p: &Params,
        quantize: bool,
        notes: &mut Vec<String>,
    ) -> Result<Block> {
        let c = &**block.config();
        let (nh, hd) = (c.num_heads, c.head_dim);
        let f64v = |v: &Var| -> Result<Vec<f64>> {
            Ok(v.as_tensor()
                .flatten_all()?
                .to_vec1::<f32>()?
                .into_iter()
                .map(f64::from)
                .collect())
        };
        let t64 = |m: &[f64], n: usize| -> Result<Tensor> {
            Ok(Tensor::from_slice(m, (n, n), &Device::Cpu)?)
        };
        let mut inv_t = |v: &Var, n: usize, what: &str| -> Result<Tensor> {
            let (inv, ratio) = inverse_f64(&f64v(v)?, n).ok_or_else(|| {
                Error::Runtime(format!("block {}: {what} became singular", block.index()))
            })?;
            if ratio < 1e-6 {
                notes.push(format!(
                    "block {}: {what} is ill-conditioned (pivot ratio {ratio:.1e})",
                    block.index()
                ));
            }
            Ok(t64(&inv, n)?.t()?)
        };
        // `c` as the norms receive it (f32), widened exactly to f64 for the weight side.
        let c64 = |k: &Kron| -> Result<Vec<f64>> {
            Ok(k.c()?
                .to_vec1::<f32>()?
                .into_iter()
                .map(f64::from)
                .collect())
        };
        let kron64 = |k: &Kron,
                      inv_t: &mut dyn FnMut(&Var, usize, &str) -> Result<Tensor>,
                      what: &str|
         -> Result<KroneckerTransform> {
            let cinv: Vec<f64> = c64(k)?.iter().map(|x| 1.0 / x).collect();
            Ok(KroneckerTransform {
                n1: k.n1,
                n2: k.n2,
                p1: k.p1.as_ref().map(|p| inv_t(p, k.n1, what)).transpose()?,
                p2: k.p2.as_ref().map(|p| inv_t(p, k.n2, what)).transpose()?,
                scale: Some(Tensor::from_vec(cinv, k.n1 * k.n2, &Device::Cpu)?),
            })
        };
        let pv64 = p.pv.as_ref().map(|pv| t64(&f64v(pv)?, hd)).transpose()?;
        let o_weight = KroneckerTransform {
            n1: nh,
            n2: hd,
            p1: p
                .head_mix
                .as_ref()
                .map(|h| inv_t(h, nh, "head mixer"))
                .transpose()?,
            p2: p.pv.as_ref().map(|pv| inv_t(pv, hd, "P_v")).transpose()?,
            scale: None,
        };
        let weight_side = [
            kron64(&p.attn, &mut inv_t, "attn_in factor")?,
            o_weight,
            kron64(&p.mlp, &mut inv_t, "mlp_in factor")?,
            kron64(&p.down, &mut inv_t, "down_in factor")?,
        ];
        let c_down = c64(&p.down)?;
        let c_down_t = Tensor::from_slice(&c_down, (c_down.len(), 1), &Device::Cpu)?;
        let sig = |v: &Var| -> Result<Tensor> { sigmoid(&v.as_tensor().to_dtype(DType::F64)?) };

        let mut b = block.clone();
        for (i, kind) in LinearKind::ALL.into_iter().enumerate() {
            let layer = block.linear(kind);
            let mut w = layer.weight()?.to_dtype(DType::F64)?;
            let mut bias = layer.bias().map(|b| b.to_dtype(DType::F64)).transpose()?;
            if kind == LinearKind::Up {
                // c_d moves into up_proj's rows: silu(g)·(u⊙c) = (silu(g)·u)⊙c.
                w = w.broadcast_mul(&c_down_t)?;
                bias = bias.map(|b| b.mul(&c_down_t.flatten_all()?)).transpose()?;
            }
            let mut w = weight_side[LINEAR_SITE[i] as usize].apply(&w)?;
            if quantize && !self.cfg.grids.dense[i] {
                let u = lwc_units(&w, self.cfg.grids.group_size)?;
                let hi = u
                    .max_keepdim(D::Minus1)?
                    .broadcast_mul(&sig(&p.lwc[i].max)?)?;
                let lo = u
                    .min_keepdim(D::Minus1)?
                    .broadcast_mul(&sig(&p.lwc[i].min)?)?;
                w = clamp_rows(&u, &lo, &hi)?.reshape(w.shape())?;
            }
            if let (LinearKind::V, Some(pv)) = (kind, &pv64) {
                (w, bias) = per_head_output(&w, bias.as_ref(), pv, hd)?;
            }
            let w = w.to_dtype(DType::F32)?;
            let bias = bias.map(|b| b.to_dtype(DType::F32)).transpose()?;
            if !quantize {
                b.set_linear(kind, Box::new(DenseLinear { weight: w, bias }))?;
                continue;
            }
            // Weights stay in full precision (clipped): the engine's weight quantizer rounds them.
            let act = self
                .cfg
                .grids
                .activations
                .map(|spec| p.lac[i].learned(spec).spec())
                .transpose()?;
            b.set_linear(kind, Box::new(QuantLinear::new(None, w, bias, act)?))?;
        }
        let f32t = |v: &Var| v.as_tensor().clone();
        b.set_norms(
            (block.input_norm() * p.attn.c()?)?,
            (block.post_norm() * p.mlp.c()?)?,
        );
        // `c` is in the norms and up_proj: what is left online is the factors, if any.
        let online = |k: &Kron| {
            (k.p1.is_some() || k.p2.is_some()).then(|| KroneckerTransform {
                n1: k.n1,
                n2: k.n2,
                p1: k.p1.as_ref().map(f32t),
                p2: k.p2.as_ref().map(f32t),
                scale: None,
            })
        };
        b.set_site(Site::AttnIn, online(&p.attn));
        b.set_site(
            Site::OIn,
            p.head_mix.as_ref().map(|h| KroneckerTransform {
                n1: nh,
                n2: hd,
                p1: Some(f32t(h)),
                p2: None,
                scale: None,
            }),
        );
        b.set_site(Site::MlpIn, online(&p.mlp));
        b.set_site(Site::DownIn, online(&p.down));
        b.set_qk_transform(match &p.pk {
            Some(pk) => Some(QkTransform {
                q: inv_t(pk, hd, "P_k")?.to_dtype(DType::F32)?,
                k: f32t(pk),
            }),
            None => None,
        });
        b.set_kv_quantizers(None, None);
        if let (true, Some(spec), Some((kc, vc))) = (quantize, self.cfg.grids.kv_cache, &p.kv_lac) {
            let k: Arc<dyn ActQuantizer> = Arc::new(kc.learned(spec).spec()?);
            let v: Arc<dyn ActQuantizer> = Arc::new(vc.learned(spec).spec()?);
            b.set_kv_quantizers(Some(k), Some(v));
        }
        Ok(b)
    }

    /// Deploys freshly initialised (untrained) parameters without quantization: for tests of the
    /// reparameterisation.
    pub fn deploy_initial_unquantized(&self, block: &Block, stats: &SiteStats) -> Result<Block> {
        let p = self.init_params(block, stats)?;
        self.deploy(block, &p, false, &mut Vec::new())
    }
}

/// One block's training: the parameters and what the loss runs through.
struct Training<'a> {
    method: &'a FlatQuant,
    block: &'a Block,
    rope: &'a Rope,
    p: &'a Params,
}

impl Trainee for Training<'_> {
    fn vars(&self) -> Vec<Var> {
        self.p.all_vars()
    }
    fn quantized_block(&self, _epoch: usize) -> Result<Block> {
        self.method.train_block(self.block, self.p)
    }
    fn rope(&self) -> &Rope {
        self.rope
    }
    fn block(&self) -> &Block {
        self.block
    }
}

impl Method for FlatQuant {
    fn label(&self) -> &'static str {
        "flatquant"
    }
    fn training_summary(&self) -> Option<String> {
        let c = &self.cfg;
        Some(format!(
            "{} epochs, batch {}, lr {}{}{}",
            c.epochs,
            c.batch,
            c.lr,
            match c.scale_lr == c.lr {
                true => String::new(),
                false => format!(", channel scales lr {}", c.scale_lr),
            },
            if c.merged_only {
                ", merged only (channel scales, per-head P_v, LWC)"
            } else {
                ""
            }
        ))
    }
    fn trainer(&mut self) -> Option<&mut dyn BlockTrainer> {
        Some(self)
    }
}

impl BlockTrainer for FlatQuant {
    fn calibrate(
        &mut self,
        d: &BlockData,
        on_epoch: &mut dyn FnMut(&EpochLog),
    ) -> Result<(Block, MethodReport)> {
        let BlockData {
            block,
            rope,
            x,
            y,
            stats,
        } = *d;
        let p = self.init_params(block, stats)?;
        let (lr, wd) = (self.cfg.lr, self.cfg.weight_decay);
        // Every group decays to a thousandth of the transforms' rate.
        let schedule = Schedule::Cosine { min: lr * 1e-3 };
        // With a quantized KV cache, P_k and P_v sit right before a 4-bit per-head quantizer:
        // unconstrained 64×64 matrices at the CPU preset's rate drift to condition numbers of
        // 5–13, and `κ` amplifies the K/V rounding noise that attention sees. They train at the
        // paper's rate (5e-3) or the transforms' if lower (SmolLM2 W4A4KV4, 2048 × 16: 38.88 at
        // 4e-2, 33.77 frozen, 32.71 at 5e-3).
        let head_lr = match self.cfg.grids.kv_cache {
            Some(_) => lr.min(KV_HEAD_LR),
            None => lr,
        };
        let group = |vars, lr| Group {
            vars,
            lr,
            weight_decay: wd,
            schedule,
        };
        let groups = [
            group(p.transform_vars(), lr),
            group(p.scale_vars(), self.cfg.scale_lr),
            group(p.head_vars(), head_lr),
            group(p.clip_vars(), lr * self.cfg.clip_lr_mult),
        ];
        let cfg = TrainConfig {
            epochs: self.cfg.epochs,
            batch: self.cfg.batch,
            loss: Loss::LogMse,
        };
        let t = Training {
            method: self,
            block,
            rope,
            p: &p,
        };
        let mut rep = train(&t, &groups, &cfg, block.index(), x, y, on_epoch)?;
        let deployed = self.deploy(block, &p, true, &mut rep.notes)?;
        Ok((deployed, rep))
    }
}

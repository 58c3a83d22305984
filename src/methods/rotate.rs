//! The QuaRot-style rotation baseline (algorithms.md §4.2): an exact reparameterisation of the
//! full-precision model that spreads outliers before quantization.
//!
//! 1. Untie the head; fold every RMSNorm gain into the linears that read it (norms become 1).
//! 2. Rotate the residual stream by `Q = D·H/√d` (random signs `D`, Hadamard `H`; a random
//!    orthogonal matrix where no Hadamard of that order is constructible).
//! 3. An online rotation in front of down_proj (merged into its weight).
//! 4. Values rotated per head (merged into v_proj), an online head mixer on the o_proj input
//!    (merged into o_proj), and queries/keys rotated per head after RoPE.
//!
//! With `merged_only` (recipe key; implied by `quantize --format gguf`) steps 3 and 4 keep only
//! what merges: no down_proj rotation, values rotated per head with the inverse merged into
//! o_proj (`W_o ← Qᵀ·W_o·(I ⊗ H)`), no head mixer and no query/key rotation — a checkpoint of
//! plain weights.
//!
//! All merges are computed in f64. With quantization off, logits equal the original's up to f32
//! rounding (tests/rotate.rs).

use super::{Method, MethodInput, MethodSpec};
use crate::error::Result;
use crate::model::{
    Block, DenseLinear, LinearKind, LinearLayer, Model, ModelConfig, QkTransform, Site,
};
use crate::rng::Rng;
use crate::transforms::hadamard::hadamard_factors;
use crate::transforms::linalg::{kron, random_orthogonal};
use crate::transforms::{per_head_output, KroneckerTransform};
use candle_core::{DType, Device, Tensor};

/// An orthogonal `n × n` matrix with a description: a normalised Hadamard `H_K ⊗ H_2^m` where one
/// exists, else Haar-random. Returned as Kronecker factors (n1, p1, n2, p2).
struct Rotation {
    n1: usize,
    p1: Vec<f64>,
    n2: usize,
    p2: Vec<f64>,
    what: String,
}

impl Rotation {
    fn new(n: usize, rng: &mut Rng) -> Self {
        match hadamard_factors(n) {
            Some((hk, k, hp, p)) => {
                let (sk, sp) = (1.0 / (k as f64).sqrt(), 1.0 / (p as f64).sqrt());
                Rotation {
                    n1: k,
                    p1: hk.iter().map(|x| x * sk).collect(),
                    n2: p,
                    p2: hp.iter().map(|x| x * sp).collect(),
                    what: if k == 1 {
                        format!("Hadamard {n}")
                    } else {
                        format!("Hadamard {n} = H{k} ⊗ H{p}")
                    },
                }
            }
            None => Rotation {
                n1: 1,
                p1: vec![1.0],
                n2: n,
                p2: random_orthogonal(n, rng),
                what: format!("random orthogonal {n} (no Hadamard of order {n})"),
            },
        }
    }

    fn dense(&self) -> Vec<f64> {
        kron(&self.p1, self.n1, &self.p2, self.n2)
    }

    fn online(&self) -> Result<KroneckerTransform> {
        let p1 = (self.n1 > 1).then_some(self.p1.as_slice());
        KroneckerTransform::new(self.n1, p1, self.n2, Some(&self.p2))
    }
}

fn f64_tensor(m: &[f64], rows: usize, cols: usize) -> Result<Tensor> {
    Ok(Tensor::from_slice(m, (rows, cols), &Device::Cpu)?)
}

fn to_f64(t: &Tensor) -> Result<Tensor> {
    Ok(t.to_dtype(DType::F64)?)
}

fn to_f32(t: &Tensor) -> Result<Tensor> {
    Ok(t.to_dtype(DType::F32)?.contiguous()?)
}

fn scale_columns(w: &Tensor, g: &Tensor) -> Result<Tensor> {
    Ok(w.broadcast_mul(&to_f64(g)?.unsqueeze(0)?)?)
}

/// `f` (on f64) of `w`'s rows, 8 192 at a time, back in f32.
fn by_rows(w: &Tensor, f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
    const ROWS: usize = 8192;
    let n = w.dim(0)?;
    let mut parts = Vec::with_capacity(n.div_ceil(ROWS));
    let mut r = 0;
    while r < n {
        let k = ROWS.min(n - r);
        parts.push(to_f32(&f(&to_f64(&w.narrow(0, r, k)?)?)?)?);
        r += k;
    }
    Ok(Tensor::cat(&parts, 0)?)
}

/// Replaces a dense layer by `W' = f(W)` (f64), bias `b' = g(b)`.
fn rewrite(
    layer: &dyn LinearLayer,
    f: impl Fn(&Tensor) -> Result<Tensor>,
    g: impl Fn(&Tensor) -> Result<Tensor>,
) -> Result<DenseLinear> {
    let w = to_f32(&f(&to_f64(&layer.weight()?)?)?)?;
    let bias = layer
        .bias()
        .map(|b| g(&to_f64(b)?).and_then(|x| to_f32(&x)))
        .transpose()?;
    Ok(DenseLinear { weight: w, bias })
}

/// Applies the rotation baseline to a full-precision model; returns what was done, one line each.
pub fn rotate(model: &mut Model, seed: u64) -> Result<Vec<String>> {
    let (r, log) = Rotations::new(&model.config, seed)?;
    r.rotate_ends(model)?;
    for block in &mut model.blocks {
        r.rotate_block(block)?;
    }
    Ok(log)
}

/// The rotations of one model (drawn once from the seed), applied to its ends and then to each
/// block on its own, so a model can be rotated one block at a time.
pub struct Rotations {
    /// Residual rotation `Q = D·H` (f64, `[d, d]`).
    q: Tensor,
    ffn: Rotation,
    head_mix: Rotation,
    /// Per-head rotation `H` of values, queries and keys (f64, `[hd, hd]`).
    h_hd: Tensor,
    /// `H_heads ⊗ H` on the o_proj input (f64).
    o_mix: Tensor,
    /// The down_proj input rotation (f64).
    t_ffn: Tensor,
    num_heads: usize,
    head_dim: usize,
    /// Only the merged rotations (no online transform).
    merged_only: bool,
}

impl Rotations {
    /// Draws the rotations for `c`; also returns what they are, one line each.
    pub fn new(c: &ModelConfig, seed: u64) -> Result<(Self, Vec<String>)> {
        Self::with_mode(c, seed, false)
    }

    /// As [`Self::new`]; `merged_only` keeps only the rotations that merge into the weights (the
    /// same draws, so the residual rotation is the full mode's).
    pub fn with_mode(c: &ModelConfig, seed: u64, merged_only: bool) -> Result<(Self, Vec<String>)> {
        let (d, hd, nh) = (c.hidden_size, c.head_dim, c.num_heads);
        let mut rng = Rng::new(seed);
        let mut log = Vec::new();

        // Residual rotation Q = D·H, with random signs D on the rows.
        let res = Rotation::new(d, &mut rng);
        let signs: Vec<f64> = (0..d).map(|_| rng.sign()).collect();
        let mut q = res.dense();
        for (i, s) in signs.iter().enumerate() {
            q[i * d..(i + 1) * d].iter_mut().for_each(|x| *x *= s);
        }
        let q = f64_tensor(&q, d, d)?;
        log.push(format!("residual stream: random signs × {}", res.what));
        let ffn = Rotation::new(c.intermediate_size, &mut rng);
        let head_mix = Rotation::new(nh, &mut rng);
        let hdrot = Rotation::new(hd, &mut rng);
        let h_hd = f64_tensor(&hdrot.dense(), hd, hd)?;
        let f = c.intermediate_size;
        let (o_mix, t_ffn) = if merged_only {
            log.push(format!(
                "values: {} per head, merged into v_proj and o_proj (merged only: no online transform)",
                hdrot.what
            ));
            let eye = |n: usize| -> Vec<f64> {
                (0..n * n)
                    .map(|i| if i / n == i % n { 1.0 } else { 0.0 })
                    .collect()
            };
            (
                f64_tensor(&kron(&eye(nh), nh, &hdrot.dense(), hd), nh * hd, nh * hd)?,
                f64_tensor(&eye(f), f, f)?,
            )
        } else {
            log.push(format!("down_proj input: online {}", ffn.what));
            log.push(format!(
                "o_proj input: online {} across heads; values: {} per head, merged",
                head_mix.what, hdrot.what
            ));
            log.push(format!(
                "queries and keys: {} per head after RoPE",
                hdrot.what
            ));
            (
                f64_tensor(
                    &kron(&head_mix.dense(), nh, &hdrot.dense(), hd),
                    nh * hd,
                    nh * hd,
                )?,
                f64_tensor(&ffn.dense(), f, f)?,
            )
        };
        Ok((
            Rotations {
                q,
                ffn,
                head_mix,
                h_hd,
                o_mix,
                t_ffn,
                num_heads: nh,
                head_dim: hd,
                merged_only,
            },
            log,
        ))
    }

    /// Unties the head, folds the final norm into it, rotates embedding and head. Both are
    /// vocabulary-sized: computed a slice of rows at a time (rows are independent), so no f64
    /// copy of a whole matrix exists.
    pub fn rotate_ends(&self, model: &mut Model) -> Result<()> {
        let q = &self.q;
        let head = model.head.as_ref();
        let weight = by_rows(&head.weight()?, |w| {
            Ok(scale_columns(w, &model.norm)?.matmul(q)?)
        })?;
        let bias = head.bias().cloned();
        model.head = Box::new(DenseLinear { weight, bias });
        model.tied_head = false;
        model.embed = by_rows(&model.embed, |e| Ok(e.matmul(q)?))?;
        model.norm = model.norm.ones_like()?;
        Ok(())
    }

    /// Folds the block's norms into its linears and merges the rotations; attaches the online ones.
    pub fn rotate_block(&self, block: &mut Block) -> Result<()> {
        let (q, h_hd, o_mix, t_ffn) = (&self.q, &self.h_hd, &self.o_mix, &self.t_ffn);
        let (nh, hd) = (self.num_heads, self.head_dim);
        let g_in = block.input_norm().clone();
        let g_post = block.post_norm().clone();
        for kind in LinearKind::ALL {
            let layer = block.linear(kind);
            let new = match kind {
                LinearKind::Q | LinearKind::K => rewrite(
                    layer,
                    |w| Ok(scale_columns(w, &g_in)?.matmul(q)?),
                    |b| Ok(b.clone()),
                )?,
                LinearKind::V => {
                    // Values rotated per head by H: W_v ← (I ⊗ Hᵀ)·W_v·diag(γ)·Q, b ← b·H.
                    let w = scale_columns(&to_f64(&layer.weight()?)?, &g_in)?.matmul(q)?;
                    let bias = layer.bias().map(to_f64).transpose()?;
                    let (w, bias) = per_head_output(&w, bias.as_ref(), h_hd, hd)?;
                    DenseLinear {
                        weight: to_f32(&w)?,
                        bias: bias.as_ref().map(to_f32).transpose()?,
                    }
                }
                LinearKind::O => rewrite(
                    layer,
                    |w| Ok(q.t()?.matmul(&w.matmul(o_mix)?)?),
                    |b| Ok(b.unsqueeze(0)?.matmul(q)?.squeeze(0)?),
                )?,
                LinearKind::Gate | LinearKind::Up => rewrite(
                    layer,
                    |w| Ok(scale_columns(w, &g_post)?.matmul(q)?),
                    |b| Ok(b.clone()),
                )?,
                LinearKind::Down => rewrite(
                    layer,
                    |w| Ok(q.t()?.matmul(&w.matmul(t_ffn)?)?),
                    |b| Ok(b.unsqueeze(0)?.matmul(q)?.squeeze(0)?),
                )?,
            };
            block.set_linear(kind, Box::new(new))?;
        }
        block.set_norms(g_in.ones_like()?, g_post.ones_like()?);
        if self.merged_only {
            return Ok(());
        }
        block.set_site(Site::DownIn, Some(self.ffn.online()?));
        let p1 = (nh > 1).then_some(self.head_mix.dense());
        block.set_site(
            Site::OIn,
            Some(KroneckerTransform::new(nh, p1.as_deref(), hd, None)?),
        );
        let hq = to_f32(h_hd)?;
        block.set_qk_transform(Some(QkTransform {
            q: hq.clone(),
            k: hq,
        }));
        Ok(())
    }
}

pub const SPEC: MethodSpec = MethodSpec {
    name: "rotate",
    about: "QuaRot-style rotations (Hadamard / random orthogonal), then round to nearest.",
    trained: false,
    preset: None,
    scheme_recipe: |_, _| None,
    own_keys: &[],
    asym_activations: false,
    merged_mode: true,
    build: |m: &MethodInput| {
        Ok(Box::new(Rotate {
            seed: m.seed,
            merged_only: m.recipe.merged_only.unwrap_or(false),
            rotations: None,
        }))
    },
};

pub struct Rotate {
    seed: u64,
    merged_only: bool,
    rotations: Option<Rotations>,
}

impl Method for Rotate {
    fn label(&self) -> &'static str {
        "gptq"
    }
    fn prepare(&mut self, model: &mut Model) -> Result<Vec<String>> {
        let (r, log) = Rotations::with_mode(&model.config, self.seed, self.merged_only)?;
        r.rotate_ends(model)?;
        self.rotations = Some(r);
        Ok(log)
    }
    fn prepare_block(&mut self, block: &mut Block) -> Result<()> {
        let r = self.rotations.as_ref().ok_or_else(|| {
            crate::error::Error::Runtime("rotate: prepare_block before prepare".into())
        })?;
        r.rotate_block(block)
    }
}

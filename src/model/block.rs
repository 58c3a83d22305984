//! One decoder layer, written so that calibration can (a) run it on a batch of hidden states,
//! (b) observe every linear layer's input, and (c) swap any linear layer, online transform or
//! KV quantizer through the methods below. Llama, Mistral, Qwen2 and Qwen3 share this block; their
//! differences are configuration flags (biases, q/k norm, sliding window, RoPE scaling).

use super::config::ModelConfig;
use super::kv_cache::{KvStore, LayerCache};
use super::linear::{LinearKind, LinearLayer, Site, SiteKernel};
use super::ops::{rms_norm, swiglu, Mode, Rope};
use crate::error::{Error, Result};
use crate::quant::ActQuantizer;
use crate::transforms::KroneckerTransform;
use candle_core::{Tensor, D};
use std::sync::Arc;

/// Per-head transforms of queries and keys after RoPE, `q ← q·Q`, `k ← k·K` with `Q·Kᵀ = I` so
/// that `q·kᵀ` is unchanged; they shape the key distribution for KV-cache quantization.
#[derive(Clone)]
pub struct QkTransform {
    /// `[hd, hd]` shared by all query heads, or `[heads, hd, hd]`.
    pub q: Tensor,
    /// `[hd, hd]` shared by all KV heads, or `[kv_heads, hd, hd]`.
    pub k: Tensor,
}

/// Observes the input of every linear layer during a block forward (calibration capture).
pub trait BlockHook {
    fn linear_input(&mut self, _kind: LinearKind, _x: &Tensor) -> Result<()> {
        Ok(())
    }
    /// The last linear whose input the hook wants: [`Block::observe`] stops the forward once it
    /// has shown that linear's input (`None`: the whole block).
    fn last_wanted(&self) -> Option<LinearKind> {
        None
    }
}

/// The hook that does nothing.
pub struct NoHook;
impl BlockHook for NoHook {}

/// The parts of a block, for [`Block::new`] (loaders build blocks from them).
pub struct BlockParts {
    pub input_norm: Tensor,
    pub post_norm: Tensor,
    /// Per-head RMSNorm weights on q and k (Qwen3), both or neither.
    pub qk_norms: Option<(Tensor, Tensor)>,
    /// Indexed like [`LinearKind::ALL`].
    pub linears: Vec<Box<dyn LinearLayer>>,
    /// Online transforms at the four input sites, indexed like [`Site::ALL`].
    pub online: [Option<KroneckerTransform>; 4],
    pub qk_transform: Option<QkTransform>,
    pub k_quant: Option<Arc<dyn ActQuantizer>>,
    pub v_quant: Option<Arc<dyn ActQuantizer>>,
}

/// One decoder layer. Cloning is cheap: tensors and layers are shared.
#[derive(Clone)]
pub struct Block {
    index: usize,
    config: Arc<ModelConfig>,
    input_norm: Tensor,
    post_norm: Tensor,
    q_norm: Option<Tensor>,
    k_norm: Option<Tensor>,
    linears: Vec<Arc<dyn LinearLayer>>,
    online: [Option<KroneckerTransform>; 4],
    /// A backend's fused kernel per site (eval only); cleared when the site's transform or one of
    /// its linears changes.
    kernels: [Option<Arc<dyn SiteKernel>>; 4],
    qk_transform: Option<QkTransform>,
    /// `[kv_heads, 1, hd]` subtracted from every key after RoPE, before the Q/K transform: each
    /// query's scores all move by `q·c`, which softmax ignores, so attention is unchanged while
    /// the KV quantizer sees centred keys (algorithms.md §10).
    k_center: Option<Tensor>,
    /// Per-(token, head) quantization of keys (after RoPE and the Q/K transform) and values.
    k_quant: Option<Arc<dyn ActQuantizer>>,
    v_quant: Option<Arc<dyn ActQuantizer>>,
}

/// A site's input as the linears receive it: transformed dense activations, or a backend kernel's
/// outputs of all the site's linears side by side.
enum SiteInput {
    Dense(Tensor),
    Fused(Tensor),
}

/// The forward of a block stopped where a site's linears read their input ([`Block::enter`]).
pub struct SiteState {
    site: Site,
    /// The residual stream so far.
    residual: Tensor,
    at: SiteAt,
}

/// A site's input before its online transform, or as its linears receive it.
enum SiteAt {
    Pre(Tensor),
    Input(SiteInput),
}

impl SiteState {
    pub fn site(&self) -> Site {
        self.site
    }
}

/// Where [`Block::advance`] stops: at the next site, or with the block's output.
pub enum Stage {
    At(SiteState),
    Out(Tensor),
}

impl Block {
    /// Layer `index` of a model of configuration `config`; the linears' shapes are checked.
    pub fn new(index: usize, config: Arc<ModelConfig>, parts: BlockParts) -> Result<Self> {
        if parts.linears.len() != LinearKind::ALL.len() {
            return Err(Error::Runtime(format!(
                "layer {index}: {} linear layers, expected {}",
                parts.linears.len(),
                LinearKind::ALL.len()
            )));
        }
        let (q_norm, k_norm) = parts.qk_norms.unzip();
        let mut b = Block {
            index,
            config,
            input_norm: parts.input_norm,
            post_norm: parts.post_norm,
            q_norm,
            k_norm,
            linears: Vec::with_capacity(7),
            online: parts.online,
            kernels: Default::default(),
            qk_transform: parts.qk_transform,
            k_center: None,
            k_quant: parts.k_quant,
            v_quant: parts.v_quant,
        };
        for (kind, l) in LinearKind::ALL.into_iter().zip(parts.linears) {
            b.check_shape(kind, l.as_ref())?;
            b.linears.push(Arc::from(l));
        }
        Ok(b)
    }

    pub fn index(&self) -> usize {
        self.index
    }
    pub fn config(&self) -> &Arc<ModelConfig> {
        &self.config
    }
    pub fn input_norm(&self) -> &Tensor {
        &self.input_norm
    }
    pub fn post_norm(&self) -> &Tensor {
        &self.post_norm
    }
    /// `(q_norm, k_norm)` when the architecture has them (Qwen3).
    pub fn qk_norms(&self) -> Option<(&Tensor, &Tensor)> {
        self.q_norm.as_ref().zip(self.k_norm.as_ref())
    }
    pub fn qk_transform(&self) -> Option<&QkTransform> {
        self.qk_transform.as_ref()
    }
    /// The key offset `[kv_heads, 1, hd]`, if any.
    pub fn k_center(&self) -> Option<&Tensor> {
        self.k_center.as_ref()
    }
    pub fn set_k_center(&mut self, c: Option<Tensor>) {
        self.k_center = c;
    }
    pub fn k_quant(&self) -> Option<&Arc<dyn ActQuantizer>> {
        self.k_quant.as_ref()
    }
    pub fn v_quant(&self) -> Option<&Arc<dyn ActQuantizer>> {
        self.v_quant.as_ref()
    }

    /// New RMSNorm gains in front of attention and MLP (e.g. with channel scales folded in).
    pub fn set_norms(&mut self, input_norm: Tensor, post_norm: Tensor) {
        self.input_norm = input_norm;
        self.post_norm = post_norm;
    }

    /// New per-head q/k RMSNorm gains (architectures with them).
    pub fn set_qk_norms(&mut self, q_norm: Tensor, k_norm: Tensor) {
        self.q_norm = Some(q_norm);
        self.k_norm = Some(k_norm);
    }

    pub fn set_qk_transform(&mut self, t: Option<QkTransform>) {
        self.qk_transform = t;
    }

    /// The quantizers of keys and values (per token and head).
    pub fn set_kv_quantizers(
        &mut self,
        k: Option<Arc<dyn ActQuantizer>>,
        v: Option<Arc<dyn ActQuantizer>>,
    ) {
        self.k_quant = k;
        self.v_quant = v;
    }

    pub fn site(&self, site: Site) -> Option<&KroneckerTransform> {
        self.online[site as usize].as_ref()
    }

    pub fn set_site(&mut self, site: Site, t: Option<KroneckerTransform>) {
        self.online[site as usize] = t;
        self.kernels[site as usize] = None;
    }

    /// Installs (or removes) a backend's fused kernel for `site`: in eval mode it replaces the
    /// site's online transform and linears (it must compute what they compute).
    pub fn set_site_kernel(&mut self, site: Site, k: Option<Arc<dyn SiteKernel>>) {
        self.kernels[site as usize] = k;
    }

    fn apply_site(&self, site: Site, x: &Tensor) -> Result<Tensor> {
        match self.site(site) {
            Some(t) => t.apply(x),
            None => Ok(x.clone()),
        }
    }

    pub fn linear(&self, kind: LinearKind) -> &dyn LinearLayer {
        self.linears[kind.index()].as_ref()
    }

    fn check_shape(&self, kind: LinearKind, layer: &dyn LinearLayer) -> Result<()> {
        let (o, n) = kind.shape(&self.config);
        if layer.out_features() != o || layer.in_features() != n {
            return Err(Error::Runtime(format!(
                "layer {} {}: replacement is {}x{}, expected {o}x{n}",
                self.index,
                kind.short(),
                layer.out_features(),
                layer.in_features()
            )));
        }
        Ok(())
    }

    /// Replaces one linear layer (e.g. by a quantized one); shapes must agree. Clears the fused
    /// kernel of the layer's site.
    pub fn set_linear(&mut self, kind: LinearKind, layer: Box<dyn LinearLayer>) -> Result<()> {
        self.set_linear_shared(kind, Arc::from(layer))
    }

    /// [`Self::set_linear`] for a layer that a backend also holds (e.g. in a site kernel).
    pub fn set_linear_shared(
        &mut self,
        kind: LinearKind,
        layer: Arc<dyn LinearLayer>,
    ) -> Result<()> {
        self.check_shape(kind, layer.as_ref())?;
        self.linears[kind.index()] = layer;
        self.kernels[kind.site() as usize] = None;
        Ok(())
    }

    /// Cuts every tensor of the block from the autograd graph of its calibration: a deployed
    /// block built from trained variables would otherwise record (and keep alive) the graph of
    /// every forward pass run through it.
    pub fn detach(&mut self) {
        self.input_norm = self.input_norm.detach();
        self.post_norm = self.post_norm.detach();
        self.q_norm = self.q_norm.as_ref().map(Tensor::detach);
        self.k_norm = self.k_norm.as_ref().map(Tensor::detach);
        for t in self.online.iter_mut().flatten() {
            t.p1 = t.p1.as_ref().map(Tensor::detach);
            t.p2 = t.p2.as_ref().map(Tensor::detach);
            t.scale = t.scale.as_ref().map(Tensor::detach);
        }
        if let Some(qk) = &mut self.qk_transform {
            qk.q = qk.q.detach();
            qk.k = qk.k.detach();
        }
        self.k_center = self.k_center.as_ref().map(Tensor::detach);
        for l in self.linears.iter_mut() {
            *l = Arc::from(l.detached());
        }
    }

    /// Shows the hook the input of `site`'s linears (when they read it densely); true when the
    /// hook wants nothing past this site.
    fn show_site(&self, input: &SiteInput, site: Site, hook: &mut dyn BlockHook) -> Result<bool> {
        if let SiteInput::Dense(x) = input {
            for &kind in site.linears() {
                hook.linear_input(kind, x)?;
            }
        }
        Ok(hook.last_wanted().is_some_and(|k| k.site() == site))
    }

    /// The input of `site`'s linears: through the backend's fused kernel in eval mode when one is
    /// installed, else the online transform applied to `x`.
    fn site_input(&self, site: Site, x: &Tensor, mode: Mode) -> Result<SiteInput> {
        if mode == Mode::Eval {
            if let Some(k) = &self.kernels[site as usize] {
                return Ok(SiteInput::Fused(k.forward(x)?));
            }
        }
        Ok(SiteInput::Dense(self.apply_site(site, x)?))
    }

    /// The output of linear `kind` (of `site`) given the site's input.
    fn project(&self, input: &SiteInput, site: Site, kind: LinearKind) -> Result<Tensor> {
        match input {
            SiteInput::Dense(x) => self.linears[kind.index()].forward(x),
            SiteInput::Fused(y) => {
                let kinds = site.linears();
                if kinds.len() == 1 {
                    return Ok(y.clone());
                }
                let col: usize = kinds
                    .iter()
                    .take_while(|&&k| k != kind)
                    .map(|&k| self.linear(k).out_features())
                    .sum();
                let n = self.linear(kind).out_features();
                Ok(y.narrow(D::Minus1, col, n)?)
            }
        }
    }

    /// `x`: `[B, T, hidden]` → `[B, T, hidden]`.
    pub fn forward(
        &self,
        x: &Tensor,
        rope: &Rope,
        mode: Mode,
        hook: &mut dyn BlockHook,
    ) -> Result<Tensor> {
        self.forward_inner(x, rope, mode, hook, None)?
            .ok_or_else(|| {
                Error::Runtime(format!(
                    "layer {}: a hook that stops the forward needs Block::observe",
                    self.index
                ))
            })
    }

    /// Runs `x` through the block only as far as `hook` wants to see ([`BlockHook::last_wanted`]),
    /// in eval mode, for the inputs of its linears; the output is not formed.
    pub fn observe(&self, x: &Tensor, rope: &Rope, hook: &mut dyn BlockHook) -> Result<()> {
        self.forward_inner(x, rope, Mode::Eval, hook, None)?;
        Ok(())
    }

    /// [`Self::forward`] of `x` `[1, T, hidden]`, the tokens following the `cache.len()` cached
    /// ones (inference): their keys and values are appended to `cache` and their queries attend
    /// over all of it.
    pub fn forward_cached(
        &self,
        x: &Tensor,
        rope: &Rope,
        cache: &mut LayerCache,
    ) -> Result<Tensor> {
        Ok(self
            .forward_inner(x, rope, Mode::Eval, &mut NoHook, Some(cache))?
            .expect("NoHook sees the whole block"))
    }

    /// An empty cache for this block, storing keys and values in its KV quantizers' grids.
    pub fn new_cache(&self) -> Result<LayerCache> {
        let c = &*self.config;
        let spec = |q: &Option<Arc<dyn ActQuantizer>>| q.as_ref().map(|q| q.spec()).transpose();
        Ok(LayerCache {
            k: KvStore::new(c.num_kv_heads, c.head_dim, spec(&self.k_quant)?),
            v: KvStore::new(c.num_kv_heads, c.head_dim, spec(&self.v_quant)?),
        })
    }

    fn forward_inner(
        &self,
        x: &Tensor,
        rope: &Rope,
        mode: Mode,
        hook: &mut dyn BlockHook,
        mut cache: Option<&mut LayerCache>,
    ) -> Result<Option<Tensor>> {
        let mut state = self.enter_mode(x, mode)?;
        loop {
            let (site, residual, input) = self.open(state, mode, true)?;
            if self.show_site(&input, site, hook)? {
                return Ok(None);
            }
            match self.past_site(site, residual, &input, rope, mode, cache.as_deref_mut())? {
                Stage::At(next) => state = next,
                Stage::Out(y) => return Ok(Some(y)),
            }
        }
    }

    /// The forward of `x` `[B, T, hidden]` (eval) stopped at its first site, the input norm
    /// applied: with [`Self::show`] and [`Self::advance`] the block runs one site at a time, and
    /// its linears may change in between (GPTQ's groups, each observed with the earlier ones
    /// already quantized). Site by site it computes what [`Self::forward`] computes.
    pub fn enter(&self, x: &Tensor) -> Result<SiteState> {
        self.enter_mode(x, Mode::Eval)
    }

    fn enter_mode(&self, x: &Tensor, mode: Mode) -> Result<SiteState> {
        Ok(SiteState {
            site: Site::AttnIn,
            residual: x.clone(),
            at: SiteAt::Pre(rms_norm(
                x,
                &self.input_norm,
                self.config.rms_norm_eps,
                mode,
            )?),
        })
    }

    /// Shows `hook` the inputs of the linears at `state`'s site (the site's online transform is
    /// applied once and kept in `state`: it does not depend on the linears). The staged forward
    /// takes no backend kernel.
    pub fn show(&self, state: SiteState, hook: &mut dyn BlockHook) -> Result<SiteState> {
        let (site, residual, input) = self.open(state, Mode::Eval, false)?;
        self.show_site(&input, site, hook)?;
        Ok(SiteState {
            site,
            residual,
            at: SiteAt::Input(input),
        })
    }

    /// Runs `state` past its site with the block's linears as they are now.
    pub fn advance(&self, state: SiteState, rope: &Rope) -> Result<Stage> {
        let (site, residual, input) = self.open(state, Mode::Eval, false)?;
        self.past_site(site, residual, &input, rope, Mode::Eval, None)
    }

    /// `state`'s site, residual and the input of its linears, formed from the site's
    /// pre-transform input if not yet: through the site's backend kernel where `kernels` allows
    /// one, else dense (the staged forward keeps the input while the linears change, so it never
    /// takes a kernel's outputs).
    fn open(
        &self,
        state: SiteState,
        mode: Mode,
        kernels: bool,
    ) -> Result<(Site, Tensor, SiteInput)> {
        let SiteState { site, residual, at } = state;
        let input = match at {
            SiteAt::Input(i) => i,
            SiteAt::Pre(pre) if kernels => self.site_input(site, &pre, mode)?,
            SiteAt::Pre(pre) => SiteInput::Dense(self.apply_site(site, &pre)?),
        };
        Ok((site, residual, input))
    }

    /// The linears of `site` on their `input` and what follows up to the next site.
    fn past_site(
        &self,
        site: Site,
        residual: Tensor,
        input: &SiteInput,
        rope: &Rope,
        mode: Mode,
        cache: Option<&mut LayerCache>,
    ) -> Result<Stage> {
        use LinearKind::*;
        let next = |site, residual, pre| {
            Stage::At(SiteState {
                site,
                residual,
                at: SiteAt::Pre(pre),
            })
        };
        Ok(match site {
            Site::AttnIn => {
                let attn = self.attention(rope, mode, cache, &mut |k| {
                    self.project(input, Site::AttnIn, k)
                })?;
                next(Site::OIn, residual, attn)
            }
            Site::OIn => {
                let x = (&residual + self.project(input, Site::OIn, O)?)?;
                let h = rms_norm(&x, &self.post_norm, self.config.rms_norm_eps, mode)?;
                next(Site::MlpIn, x, h)
            }
            Site::MlpIn => {
                let gate = self.project(input, Site::MlpIn, Gate)?;
                let up = self.project(input, Site::MlpIn, Up)?;
                next(Site::DownIn, residual, swiglu(&gate, &up, mode)?)
            }
            Site::DownIn => Stage::Out((residual + self.project(input, Site::DownIn, Down)?)?),
        })
    }

    /// Queries, keys and values by head, `[B, heads, T, D]`, at positions `pos0..pos0 + T`:
    /// q/k norms, RoPE and the Q/K transform applied, keys and values not yet quantized.
    fn heads(
        &self,
        rope: &Rope,
        mode: Mode,
        pos0: usize,
        proj: &mut dyn FnMut(LinearKind) -> Result<Tensor>,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let c = &*self.config;
        let (nh, nkv) = (c.num_heads, c.num_kv_heads);
        let q = proj(LinearKind::Q)?;
        let q = self.rope_heads(&q, nh, self.q_norm.as_ref(), rope, mode, pos0)?; // [B, H, T, D]
        let k = proj(LinearKind::K)?;
        let k = self.rope_heads(&k, nkv, self.k_norm.as_ref(), rope, mode, pos0)?; // [B, Hkv, T, D]
        let v = rope.heads_at(&proj(LinearKind::V)?, nkv, false, mode, pos0)?; // [B, Hkv, T, D]
        let k = match &self.k_center {
            Some(c) => k.broadcast_sub(c)?,
            None => k,
        };
        Ok(match &self.qk_transform {
            Some(t) => (q.broadcast_matmul(&t.q)?, k.broadcast_matmul(&t.k)?, v),
            None => (q, k, v),
        })
    }

    /// The keys of block input `x` `[B, T, hidden]` after the k norm and RoPE, before the key
    /// offset and the Q/K transform: `[B, kv_heads, T, hd]` (what key conditioning measures).
    pub fn rope_keys(&self, x: &Tensor, rope: &Rope) -> Result<Tensor> {
        let c = &*self.config;
        let h = rms_norm(x, &self.input_norm, c.rms_norm_eps, Mode::Eval)?;
        let qkv = self.site_input(Site::AttnIn, &h, Mode::Eval)?;
        let k = self.project(&qkv, Site::AttnIn, LinearKind::K)?;
        self.rope_heads(
            &k,
            c.num_kv_heads,
            self.k_norm.as_ref(),
            rope,
            Mode::Eval,
            0,
        )
    }

    /// A projection `[B, T, heads·D]` split by head, per-head RMSNorm'd (Qwen3's q/k norm, when
    /// present) and rotated by RoPE at positions `pos0..`: `[B, heads, T, D]`.
    fn rope_heads(
        &self,
        x: &Tensor,
        heads: usize,
        norm: Option<&Tensor>,
        rope: &Rope,
        mode: Mode,
        pos0: usize,
    ) -> Result<Tensor> {
        let c = &*self.config;
        let Some(g) = norm else {
            return rope.heads_at(x, heads, true, mode, pos0);
        };
        let (b, t, _) = x.dims3()?;
        let x = rms_norm(
            &x.reshape((b, t, heads, c.head_dim))?,
            g,
            c.rms_norm_eps,
            mode,
        )?;
        rope.apply_at(&x.transpose(1, 2)?.contiguous()?, mode, pos0)
    }

    /// The keys and values of block input `x` `[B, T, hidden]` as the full-sequence forward
    /// attends over them: after its KV quantizers (inference; what a KV cache must store).
    pub fn simulated_kv(&self, x: &Tensor, rope: &Rope) -> Result<(Tensor, Tensor)> {
        let h = rms_norm(x, &self.input_norm, self.config.rms_norm_eps, Mode::Eval)?;
        let qkv = self.site_input(Site::AttnIn, &h, Mode::Eval)?;
        let (_, k, v) = self.heads(rope, Mode::Eval, 0, &mut |k| {
            self.project(&qkv, Site::AttnIn, k)
        })?;
        let hd = self.config.head_dim;
        let quant = |t: Tensor, q: &Option<Arc<dyn ActQuantizer>>| match q {
            Some(q) => q.apply(&t, hd),
            None => Ok(t),
        };
        Ok((quant(k, &self.k_quant)?, quant(v, &self.v_quant)?))
    }

    /// Self-attention given the q/k/v projections of the normed input (`proj`, each
    /// `[B, T, heads·D]`); returns the o_proj input `[B, T, H·D]`. With a cache, the tokens
    /// follow the cached ones, and their keys and values are appended to it.
    fn attention(
        &self,
        rope: &Rope,
        mode: Mode,
        cache: Option<&mut LayerCache>,
        proj: &mut dyn FnMut(LinearKind) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let c = &*self.config;
        let (nh, hd) = (c.num_heads, c.head_dim);
        let pos0 = cache.as_ref().map_or(0, |c| c.len());
        let (q, k, v) = self.heads(rope, mode, pos0, proj)?;
        let (b, _, t, _) = q.dims4()?;
        let scale = 1.0 / (hd as f64).sqrt();
        if let Some(cache) = cache {
            if b != 1 {
                return Err(Error::Runtime(format!(
                    "layer {}: a KV cache holds one sequence, got a batch of {b}",
                    self.index
                )));
            }
            let flat = |t: &Tensor| -> Result<Vec<f32>> {
                Ok(t.contiguous()?.flatten_all()?.to_vec1::<f32>()?)
            };
            cache.append(&flat(&k)?, &flat(&v)?, t);
            // A first chunk of several tokens (a prompt) attends through the fused causal
            // kernel on the simulation's quantized K/V, which equal the cache's stored values;
            // later tokens read the cache.
            if pos0 > 0 || t == 1 {
                let out = cache.attend(&flat(&q)?, nh, t, scale as f32, c.sliding_window);
                return Ok(Tensor::from_vec(out, (1, t, nh * hd), q.device())?);
            }
        }
        let k = match &self.k_quant {
            Some(qz) => qz.apply(&k, hd)?,
            None => k,
        };
        let v = match &self.v_quant {
            Some(qz) => qz.apply(&v, hd)?,
            None => v,
        };
        let attend = match mode {
            Mode::Eval => super::attention_op::causal_attention,
            Mode::Train => super::attention_op::causal_attention_train,
        };
        Ok(attend(&q, &k, &v, scale as f32, c.sliding_window)?)
    }
}

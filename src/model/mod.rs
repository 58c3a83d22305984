//! The model floor: the decoder (embedding, blocks, final norm, head), written block by block.
//! It knows nothing of kernels, devices or file formats: linear layers and fused site kernels are
//! the traits of [`linear`], which the backends (`crate::backend`) implement; loading and writing
//! live in `crate::formats`.

pub mod attention_op;
pub mod block;
pub mod config;
pub mod kv_cache;
pub mod linear;
pub mod ops;
mod train_ops;
pub use train_ops::{set_grid_products, GridLinear, GridProducts};

pub use block::{Block, BlockHook, BlockParts, NoHook, QkTransform, SiteState, Stage};
pub use config::ModelConfig;
pub use kv_cache::{KvCache, KvStore, LayerCache};
pub use linear::{linear_forward, DenseLinear, LinearKind, LinearLayer, Site, SiteKernel};
pub use ops::{mean_squared_error, rms_norm, Mode, Rope};

use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;
use std::sync::Arc;

/// A whole causal LM: embedding, blocks, final norm and head.
pub struct Model {
    pub config: Arc<ModelConfig>,
    /// `[vocab, hidden]`, f32 or the checkpoint's 16-bit dtype (rows are widened when gathered).
    pub embed: Tensor,
    pub blocks: Vec<Block>,
    pub norm: Tensor,
    pub head: Box<dyn LinearLayer>,
    /// The head is the embedding matrix (not stored separately).
    pub tied_head: bool,
    pub rope: Rope,
}

impl Model {
    pub fn head_weight(&self) -> Tensor {
        self.head.weight().expect("head weight")
    }

    /// Hidden states entering block 0: `[B, T, hidden]`.
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let flat = ids.flatten_all()?;
        Ok(self
            .embed
            .index_select(&flat, 0)?
            .to_dtype(DType::F32)?
            .reshape((b, t, self.config.hidden_size))?)
    }

    /// Final-normed hidden states `[B, T, hidden]` for token ids `[B, T]`.
    pub fn hidden_states(&self, ids: &Tensor, mode: Mode) -> Result<Tensor> {
        let mut h = self.embed(ids)?;
        for block in &self.blocks {
            h = block.forward(&h, &self.rope, mode, &mut NoHook)?;
        }
        rms_norm(&h, &self.norm, self.config.rms_norm_eps, mode)
    }

    /// An empty KV cache, each layer storing keys and values in its quantizers' grids.
    pub fn new_cache(&self) -> Result<KvCache> {
        Ok(KvCache {
            layers: self
                .blocks
                .iter()
                .map(Block::new_cache)
                .collect::<Result<_>>()?,
        })
    }

    /// Runs `ids`, the tokens following the cached ones, through the model, appending their keys
    /// and values to `cache`; returns the next-token logits after the last of them, `[vocab]`.
    pub fn forward_cached(&self, ids: &[u32], cache: &mut KvCache) -> Result<Vec<f32>> {
        if ids.is_empty() {
            return Err(Error::Runtime("no tokens to run".into()));
        }
        if cache.layers.len() != self.blocks.len() {
            return Err(Error::Runtime(format!(
                "a cache of {} layers for a model of {}",
                cache.layers.len(),
                self.blocks.len()
            )));
        }
        let t = ids.len();
        let ids_t = Tensor::from_slice(ids, (1, t), &Device::Cpu)?;
        let mut h = self.embed(&ids_t)?;
        for (block, layer) in self.blocks.iter().zip(cache.layers.iter_mut()) {
            h = block.forward_cached(&h, &self.rope, layer)?;
        }
        let last = h.narrow(1, t - 1, 1)?;
        let last = rms_norm(&last, &self.norm, self.config.rms_norm_eps, Mode::Eval)?;
        Ok(self
            .head
            .forward(&last)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1()?)
    }

    pub fn logits(&self, ids: &Tensor, mode: Mode) -> Result<Tensor> {
        let h = self.hidden_states(ids, mode)?;
        self.head.forward(&h)
    }

    /// Negative log-likelihood of `ids[t+1]` given `ids[..=t]` for one sequence, for the
    /// predicting positions `t = first..T−1` (so `T − 1 − first` values). The head runs in row
    /// chunks so the `[T, vocab]` logits never exist at once.
    pub fn nll(&self, ids: &[u32], first: usize) -> Result<Vec<f64>> {
        let t = ids.len();
        if t < 2 || first >= t - 1 {
            return Ok(Vec::new());
        }
        let ids_t = Tensor::from_slice(ids, (1, t), &Device::Cpu)?;
        let h = self.hidden_states(&ids_t, Mode::Eval)?.squeeze(0)?;
        nll_from_hidden(
            &h.narrow(0, first, t - 1 - first)?,
            self.head.as_ref(),
            &ids[first + 1..],
        )
    }
}

/// NLL of `targets[r]` under logits `h[r]·Wᵀ`, log-softmax accumulated in f64.
pub fn nll_from_hidden(h: &Tensor, head: &dyn LinearLayer, targets: &[u32]) -> Result<Vec<f64>> {
    const ROWS: usize = 256;
    let n = h.dim(0)?;
    let vocab = head.out_features();
    let mut out = Vec::with_capacity(n);
    let mut s = 0;
    while s < n {
        let r = ROWS.min(n - s);
        let logits = head.forward(&h.narrow(0, s, r)?)?.to_dtype(DType::F32)?;
        let flat: Vec<f32> = logits.flatten_all()?.to_vec1()?;
        let rows: Vec<&[f32]> = flat.chunks_exact(vocab).collect();
        let lse: Vec<f64> = rows
            .par_iter()
            .map(|row| crate::fastmath::logsumexp(row))
            .collect();
        for (i, row) in rows.iter().enumerate() {
            let target = targets[s + i] as usize;
            if target >= vocab {
                return Err(Error::Runtime(format!(
                    "token id {target} outside the vocabulary ({vocab})"
                )));
            }
            out.push(lse[i] - row[target] as f64);
        }
        s += r;
    }
    Ok(out)
}

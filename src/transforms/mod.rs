//! Invertible transforms applied to linear-layer inputs: orthogonal rotations (Hadamard, random),
//! Kronecker-factored online transforms, and the small f64 linear algebra they need.

pub mod hadamard;
pub mod inverse;
pub mod kronecker;
pub mod linalg;

pub use kronecker::KroneckerTransform;

use crate::error::Result;
use candle_core::Tensor;

/// Merges a per-head transform of a linear layer's *output* into its weight and bias: with the
/// output viewed as heads of `hd` values, `y_h ← y_h·P` for every head. That is
/// `W ← (I ⊗ Pᵀ)·W` (each head's block of rows left-multiplied by `Pᵀ`) and `b_h ← b_h·P`.
/// Used for the value transform of v_proj (rotation baseline, FlatQuant's `P_v`).
pub fn per_head_output(
    w: &Tensor,
    bias: Option<&Tensor>,
    p: &Tensor,
    hd: usize,
) -> Result<(Tensor, Option<Tensor>)> {
    let (out, n) = w.dims2()?;
    let w = p
        .t()?
        .unsqueeze(0)?
        .broadcast_matmul(&w.reshape((out / hd, hd, n))?)?
        .reshape((out, n))?;
    let bias = bias
        .map(|b| -> Result<Tensor> { Ok(b.reshape((out / hd, hd))?.matmul(p)?.flatten_all()?) })
        .transpose()?;
    Ok((w, bias))
}

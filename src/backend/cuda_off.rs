//! The CUDA backend in a build without the `cuda` feature: every entry point reports how to get
//! one, so callers need no `cfg`.

use crate::error::{Error, Result};
use crate::model::Model;
use std::sync::Arc;

/// Stands for a GPU; never constructed in this build.
pub struct Cuda {
    pub name: String,
}

fn not_built() -> Error {
    Error::Usage(
        "--device cuda: this affq was built without the cuda feature (scripts/build-cuda.sh builds it)"
            .into(),
    )
}

impl Cuda {
    pub fn new() -> Result<Arc<Cuda>> {
        Err(not_built())
    }
}

/// See the feature-on module: moves the integer sites to the GPU.
pub fn use_cuda(_model: &mut Model, _cuda: &Arc<Cuda>) -> Result<usize> {
    Err(not_built())
}

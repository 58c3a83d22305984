//! Invertible transforms applied to linear-layer inputs: orthogonal rotations (Hadamard, random),
//! Kronecker-factored online transforms, and the small f64 linear algebra they need.

pub mod hadamard;
pub mod inverse;
pub mod kronecker;
pub mod linalg;

pub use kronecker::KroneckerTransform;

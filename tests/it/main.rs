//! affq's integration tests: one test crate (one link of the release build), one module per area.
//! Most run the real binary (`common::affq`); the rest drive the library on real models.

mod common;

mod affinequant;
mod architectures;
mod bad_input;
mod decode;
mod export;
mod flatquant;
mod gptq;
mod kernels;
mod quantize;
mod reference;
mod resume;
mod shard;

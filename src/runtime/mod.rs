//! Running a checkpoint: loading it onto the requested kernels (shared by `eval`), and the
//! inference path of docs/decode.md — incremental decoding over the KV cache
//! ([`crate::model::KvCache`]), sampling, chat templates, `generate` and `bench`.

pub mod bench;
pub mod chat;
pub mod generate;
pub mod sampler;

use crate::error::{Error, Result};
use crate::formats::checkpoint::Precision;
use crate::formats::Checkpoint;
use crate::model::Model;

/// How quantized linears compute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernels {
    /// Integer kernels where the scheme has one (f32 online transforms).
    Int,
    /// As `Int`, with the online transforms in bf16 where the CPU can.
    IntBf16,
    /// The float simulation everywhere.
    Simulate,
}

/// Where the integer kernels run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda,
}

/// The backend combinations that exist: the GPU runs the integer kernels with f32 transforms.
pub fn check_backend(kernels: Kernels, device: Device) -> Result<()> {
    if device == Device::Cuda && kernels != Kernels::Int {
        return Err(Error::Usage(
            "--device cuda runs the integer kernels with f32 transforms: use --kernels int".into(),
        ));
    }
    Ok(())
}

/// What a model is loaded for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// Scoring whole windows: full-precision block weights as stored (16-bit widened per
    /// product), the head in f32 (it multiplies every position).
    Eval,
    /// Generation: every full-precision weight as stored, on the matrix–vector kernel for the
    /// decode steps (`backend::dense_cpu`).
    Decode,
}

/// A checkpoint loaded on the requested kernels with RoPE tables for `max_len` positions, block
/// by block, each converted as it is read: on the integer kernels quantized layers keep only
/// codes and packed weights (simulated ones hold their dense f32 weights), so the model is never
/// held twice. Returns the model and its kernels in words.
pub fn load(
    ckpt: &Checkpoint,
    max_len: usize,
    kernels: Kernels,
    device: Device,
    purpose: Purpose,
) -> Result<(Model, String)> {
    use crate::backend::{cuda, dense_cpu, int_cpu};
    let head = match purpose {
        Purpose::Eval => Precision::F32,
        Purpose::Decode => Precision::Stored,
    };
    let mut model = ckpt.load_ends(max_len, head)?;
    let isa = crate::kernels::int_gemm::Isa::detect();
    let bf16 = kernels == Kernels::IntBf16;
    let int = matches!(kernels, Kernels::Int | Kernels::IntBf16);
    let (mut int_layers, mut bf16_sites) = (0, 0);
    for i in 0..model.config.num_layers {
        let mut block = ckpt.load_block(model.config.clone(), i, Precision::Stored)?;
        if int {
            let (n, b) = int_cpu::use_int_kernels_block(&mut block, isa, bf16)?;
            int_layers += n;
            bf16_sites += b;
        }
        model.blocks.push(block);
    }
    if int {
        int_layers += int_cpu::use_int_kernels_head(&mut model, isa)? as usize;
    }
    let mut desc = if int_layers > 0 {
        let xf = match (bf16, bf16_sites) {
            (false, _) => String::new(),
            (true, 0) => ", f32 transforms: no AVX-512 BF16 or no transforms".into(),
            (true, n) => format!(", {n} transforms in bf16"),
        };
        format!("int ({}, {int_layers} layers{xf})", isa.name())
    } else {
        "simulate".to_string()
    };
    if purpose == Purpose::Decode {
        dense_cpu::use_gemv(&mut model)?;
    }
    if device == Device::Cuda {
        let gpu = cuda::Cuda::new()?;
        let n = cuda::use_cuda(&mut model, &gpu)?;
        desc = format!("int (cuda {}, {n} layers)", gpu.name);
    }
    Ok((model, desc))
}

/// Peak resident memory of this process so far, in MiB (Linux `ru_maxrss`).
pub fn peak_rss_mib() -> f64 {
    #[cfg(unix)]
    {
        // SAFETY: getrusage writes one plain struct we own.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } == 0 {
            return ru.ru_maxrss as f64 / 1024.0;
        }
    }
    0.0
}

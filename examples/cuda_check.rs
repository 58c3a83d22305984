//! GPU check (run on a machine with an NVIDIA GPU; `scripts/gpu-check.sh`): the CUDA kernels
//! against the CPU kernels on random and ragged shapes, then their throughput.
//!
//! Correctness criteria, from the math:
//! - transform + quantize: the GPU sums the transform in another order, so a code may differ by
//!   one step where `y/s + z` lies within float rounding of a rounding boundary (rare), never by
//!   more; scales agree to a few ulps of the row maximum.
//! - GEMM: integer accumulation is exact on both sides, so on the same codes the outputs agree
//!   to float rounding of the epilogue (one multiply, one add).
//!
//! Exit status 1 if any check fails.

use affq::kernels::cuda::{self, Cuda, CudaTransform, CudaWeights};
use affq::kernels::int_gemm::{gemm, Isa, PackedWeights};
use affq::kernels::transform_quant::{transform_quantize, FusedTransform};
use affq::quant::QuantSpec;
use affq::rng::Rng;
use affq::transforms::KroneckerTransform;
use candle_core::{Device, Tensor};
use std::time::Instant;

fn random_transform(rng: &mut Rng, n1: usize, n2: usize, scaled: bool) -> KroneckerTransform {
    let mut mat = |n: usize| {
        let v: Vec<f32> = (0..n * n)
            .map(|i| if i % (n + 1) == 0 { 1.0 } else { 0.0 } + 0.3 * rng.normal() as f32)
            .collect();
        Tensor::from_vec(v, (n, n), &Device::Cpu).unwrap()
    };
    let (p1, p2) = (mat(n1), mat(n2));
    let scale = scaled.then(|| {
        let v: Vec<f32> = (0..n1 * n2).map(|_| 0.5 + rng.uniform() as f32).collect();
        Tensor::from_vec(v, n1 * n2, &Device::Cpu).unwrap()
    });
    KroneckerTransform {
        n1,
        n2,
        p1: Some(p1),
        p2: Some(p2),
        scale,
    }
}

fn weights(rng: &mut Rng, n: usize, k: usize, bits: u8) -> PackedWeights {
    let codes: Vec<u8> = (0..n * k)
        .map(|_| (rng.next_u64() % (1 << bits)) as u8)
        .collect();
    let scale = (0..n).map(|_| 0.01 + 0.01 * rng.uniform() as f32).collect();
    PackedWeights::from_codes(&codes, n, k, bits, scale, vec![1 << (bits - 1); n])
}

/// Returns the number of failed checks.
fn check_case(
    cu: &std::sync::Arc<Cuda>,
    rng: &mut Rng,
    m: usize,
    (n1, n2): (usize, usize),
    n_out: usize,
    wbits: u8,
    abits: u8,
) -> anyhow::Result<usize> {
    let k = n1 * n2;
    let spec = QuantSpec::sym(abits);
    let kt = random_transform(rng, n1, n2, m % 2 == 1);
    let ft = FusedTransform::new(&kt)?;
    let ct = CudaTransform::new(cu, &ft)?;
    let mut x: Vec<f32> = (0..m * k).map(|_| rng.normal() as f32).collect();
    // An all-zero row and a row with one extreme value.
    if m > 2 {
        x[k..2 * k].iter_mut().for_each(|v| *v = 0.0);
        x[2 * k] = 1e6;
    }
    let cpu = transform_quantize(&x, m, &ft, &spec);
    let xd = cu.upload(&x)?;
    let gpu_acts = cuda::transform_quantize(cu, &xd, m, k, Some(&ct), &spec)?;
    let gpu = gpu_acts.to_host(cu, k)?;
    let mut fails = 0;
    let mut code_diffs = 0;
    for r in 0..m {
        let rel = (gpu.scale[r] - cpu.scale[r]).abs() / cpu.scale[r].abs().max(f32::MIN_POSITIVE);
        if rel > 1e-5 {
            println!(
                "  row {r}: scale {} (GPU) vs {} (CPU)",
                gpu.scale[r], cpu.scale[r]
            );
            fails += 1;
        }
        for j in 0..k {
            let d = (gpu.q[r * gpu.kp + j] as i32 - cpu.q[r * cpu.kp + j] as i32).abs();
            if d > 1 {
                fails += 1;
            }
            code_diffs += (d == 1) as usize;
        }
    }
    let pw = weights(rng, n_out, k, wbits);
    let bias: Vec<f32> = (0..n_out).map(|_| rng.normal() as f32).collect();
    let cw = CudaWeights::new(cu, &pw, Some(&bias))?;
    let yd = cuda::gemm(cu, &gpu_acts, &cw)?;
    let mut y_gpu = vec![0f32; m * n_out];
    cu.download(&yd, &mut y_gpu)?;
    let mut y_cpu = vec![0f32; m * n_out];
    gemm(&gpu, &pw, Some(&bias), Isa::detect(), &mut y_cpu)?;
    let ymax = y_cpu.iter().fold(0f32, |a, &b| a.max(b.abs())).max(1e-30);
    let err = y_gpu
        .iter()
        .zip(&y_cpu)
        .fold(0f32, |a, (&g, &c)| a.max((g - c).abs()));
    if err / ymax > 1e-5 {
        fails += 1;
    }
    println!(
        "m {m:>4} k {k:>5} ({n1}×{n2}) -> {n_out:>4}  W{wbits}A{abits}: codes off by one {code_diffs}/{}; GEMM max |Δ|/max|y| {:.1e}  {}",
        m * k,
        err / ymax,
        if fails == 0 { "ok" } else { "FAIL" }
    );
    Ok(fails)
}

fn bench(cu: &std::sync::Arc<Cuda>, rng: &mut Rng) -> anyhow::Result<()> {
    println!(
        "\n{:>5} {:>6} -> {:<6} | {:>10} {:>10} | {:>7}",
        "m", "n", "k", "fused GOP/s", "GEMM GOP/s", "xform%"
    );
    for (n, k) in [(576, 1536), (1536, 576), (4096, 4096), (4096, 14336)] {
        let (n1, n2) = affq::methods::flatquant::kron_dims(n);
        let kt = random_transform(rng, n1, n2, true);
        let ct = CudaTransform::new(cu, &FusedTransform::new(&kt)?)?;
        let cw = CudaWeights::new(cu, &weights(rng, k, n, 4), None)?;
        let spec = QuantSpec::sym(4);
        for m in [1usize, 16, 512, 2048] {
            let x: Vec<f32> = (0..m * n).map(|_| rng.normal() as f32).collect();
            let xd = cu.upload(&x)?;
            let time = |f: &mut dyn FnMut() -> anyhow::Result<()>| -> anyhow::Result<f64> {
                f()?;
                cu.synchronize()?;
                let iters = 20;
                let t0 = Instant::now();
                for _ in 0..iters {
                    f()?;
                }
                cu.synchronize()?;
                Ok(t0.elapsed().as_secs_f64() / iters as f64)
            };
            let t_fused = time(&mut || {
                let a = cuda::transform_quantize(cu, &xd, m, n, Some(&ct), &spec)?;
                cuda::gemm(cu, &a, &cw)?;
                Ok(())
            })?;
            let a = cuda::transform_quantize(cu, &xd, m, n, Some(&ct), &spec)?;
            let t_gemm = time(&mut || {
                cuda::gemm(cu, &a, &cw)?;
                Ok(())
            })?;
            let ops = 2.0 * (m * n * k) as f64;
            println!(
                "{m:>5} {n:>6} -> {k:<6} | {:>10.1} {:>10.1} | {:>6.1}%",
                ops / t_fused / 1e9,
                ops / t_gemm / 1e9,
                100.0 * (t_fused - t_gemm).max(0.0) / t_fused
            );
        }
    }
    println!("times include the allocation of each output (cuMemAlloc/cuMemFree per call)");
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cu = Cuda::new()?;
    println!("GPU: {}", cu.name);
    let mut rng = Rng::new(7);
    let mut fails = 0;
    for &(m, dims, n_out) in &[
        (1, (1, 19), 17),
        (5, (3, 7), 64),
        (67, (24, 24), 130),
        (130, (32, 48), 576),
        (64, (64, 64), 64),
        (3, (112, 128), 33),
    ] {
        for (wb, ab) in [(4u8, 4u8), (4, 8), (8, 8)] {
            fails += check_case(&cu, &mut rng, m, dims, n_out, wb, ab)?;
        }
    }
    bench(&cu, &mut rng)?;
    if fails > 0 {
        println!("{fails} checks failed");
        std::process::exit(1);
    }
    println!("all checks passed");
    Ok(())
}

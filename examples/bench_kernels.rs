//! Kernel benchmark (not a test): GOP/s of the fused W4A4 kernel (online Kronecker transform +
//! per-token quantization + integer GEMM), of the kernel without the transform, of candle's f32
//! matmul, and of the simulated path, over the shapes of issue #6. Run through
//! `scripts/bench-kernels.sh` (or `cargo run --release --example bench_kernels`).

use affq::kernels::int_gemm::{gemm, quantize_acts, Isa, PackedWeights};
use affq::kernels::transform_quant::{transform_quantize, FusedTransform};
use affq::quant::{ops::fake_quant, QuantSpec};
use affq::rng::Rng;
use affq::transforms::linalg::random_orthogonal;
use affq::transforms::KroneckerTransform;
use candle_core::{Device, Tensor};
use std::time::Instant;

fn time<F: FnMut()>(mut f: F) -> f64 {
    f();
    let mut best = f64::INFINITY;
    let t_all = Instant::now();
    let mut reps = 0;
    while reps < 3 || (t_all.elapsed().as_secs_f64() < 1.0 && reps < 50) {
        let t0 = Instant::now();
        f();
        best = best.min(t0.elapsed().as_secs_f64());
        reps += 1;
    }
    best
}

fn main() -> anyhow::Result<()> {
    let isa = Isa::detect();
    println!(
        "int kernel ISA: {} (AFFQ_KERNEL_ISA forces scalar|avx2|avx512vnni)",
        isa.name()
    );
    println!(
        "{:>5} {:>12} | {:>9} {:>9} {:>9} {:>9} {:>9} | {:>7} {:>7} {:>7} {:>7} {:>9}",
        "m",
        "n -> k",
        "fused",
        "fusedbf16",
        "no-xform",
        "f32 mm",
        "simulate",
        "fused×",
        "bf16×",
        "xform%",
        "xf%bf16",
        "W4A8"
    );
    let mut rng = Rng::new(1);
    for (n, k) in [(576, 1536), (1536, 576), (4096, 4096), (4096, 14336)] {
        let (n1, n2) = affq::methods::flatquant::kron_dims(n);
        let f = |v: Vec<f64>| v.into_iter().map(|x| x as f32).collect::<Vec<f32>>();
        let p1 = Tensor::from_vec(f(random_orthogonal(n1, &mut rng)), (n1, n1), &Device::Cpu)?;
        let p2 = Tensor::from_vec(f(random_orthogonal(n2, &mut rng)), (n2, n2), &Device::Cpu)?;
        let kt = KroneckerTransform {
            n1,
            n2,
            p1: Some(p1),
            p2: Some(p2),
            scale: None,
        };
        let ft = FusedTransform::new(&kt)?;
        let fb = FusedTransform::new(&kt)?.with_bf16();
        let codes: Vec<u8> = (0..k * n).map(|_| (rng.next_u64() % 16) as u8).collect();
        let w = PackedWeights::from_codes(&codes, k, n, 4, vec![0.01; k], vec![8; k]);
        let wf: Vec<f32> = codes.iter().map(|&c| (c as f32 - 8.0) * 0.01).collect();
        let wt = Tensor::from_vec(wf, (k, n), &Device::Cpu)?;
        let a4 = QuantSpec::sym(4);
        let a8 = QuantSpec::sym(8);
        for m in [1usize, 16, 512, 2048] {
            let x: Vec<f32> = (0..m * n).map(|_| rng.normal() as f32).collect();
            let xt = Tensor::from_vec(x.clone(), (m, n), &Device::Cpu)?;
            let mut out = vec![0f32; m * k];
            let ops = 2.0 * (m * n * k) as f64;
            let t_fused = time(|| {
                let a = transform_quantize(&x, m, &ft, &a4);
                gemm(&a, &w, None, isa, &mut out).unwrap();
            });
            let t_bf = time(|| {
                let a = transform_quantize(&x, m, &fb, &a4);
                gemm(&a, &w, None, isa, &mut out).unwrap();
            });
            // The transform alone: fused transform+quantization minus quantization alone.
            let t_q = time(|| {
                let _ = quantize_acts(&x, m, n, &a4);
            });
            let t_xq = time(|| {
                let _ = transform_quantize(&x, m, &ft, &a4);
            });
            let t_xqb = time(|| {
                let _ = transform_quantize(&x, m, &fb, &a4);
            });
            let t_plain = time(|| {
                let a = quantize_acts(&x, m, n, &a4);
                gemm(&a, &w, None, isa, &mut out).unwrap();
            });
            let t_a8 = time(|| {
                let a = quantize_acts(&x, m, n, &a8);
                gemm(&a, &w, None, isa, &mut out).unwrap();
            });
            let t_f32 = time(|| {
                let _ = xt.matmul(&wt.t().unwrap()).unwrap();
            });
            let t_sim = time(|| {
                let xr = kt.apply(&xt).unwrap();
                let xq = fake_quant(&xr, &a4, n).unwrap();
                let _ = xq.matmul(&wt.t().unwrap()).unwrap();
            });
            let g = |t: f64| ops / t / 1e9;
            println!(
                "{:>5} {:>5} -> {:<5} | {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1} | {:>6.2}x {:>6.2}x {:>6.1}% {:>6.1}% {:>9.1}",
                m,
                n,
                k,
                g(t_fused),
                g(t_bf),
                g(t_plain),
                g(t_f32),
                g(t_sim),
                t_f32 / t_fused,
                t_f32 / t_bf,
                100.0 * (t_xq - t_q).max(0.0) / t_fused,
                100.0 * (t_xqb - t_q).max(0.0) / t_bf,
                g(t_a8)
            );
        }
    }
    println!("GOP/s = 2·m·n·k / time (best of ≥3 runs); fused× = f32 matmul time / fused time;");
    println!("fusedbf16 / bf16×: the same with the transform in bf16 (AVX-512 BF16, if present);");
    println!("xform% = share of the fused kernel's time spent in the transform alone (fused");
    println!("transform+quantization minus quantization alone); xf%bf16 likewise for bf16.");
    Ok(())
}

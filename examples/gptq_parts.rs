//! Times GPTQ's parts at a model's linear shapes: the Hessian accumulation, the factor of H⁻¹ and
//! the column sweep. Not a test; prints a table and a checksum of the codes (so two builds can be
//! compared for identical output).
//!   cargo run --release --example gptq_parts -- [OUT IN]...   (default: Qwen2.5-0.5B's shapes)
use affq::quant::gptq::{gptq, GptqConfig, Hessian};
use affq::quant::{Granularity, QuantSpec};
use affq::rng::Rng;
use affq::transforms::linalg::upper_cholesky_of_inverse;
use candle_core::{Device, Tensor};
use std::time::Instant;

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("shape numbers"))
        .collect();
    let shapes: Vec<(usize, usize)> = if args.is_empty() {
        vec![(896, 896), (4864, 896), (896, 4864)]
    } else {
        args.chunks(2).map(|c| (c[0], c[1])).collect()
    };
    let tokens = 4096;
    println!(
        "{:>6} {:>6} {:>10} {:>10} {:>10} {:>10}  codes checksum",
        "out", "in", "H (ms)", "factor", "gptq", "gptq g64"
    );
    for (out, inp) in shapes {
        let mut rng = Rng::new(11);
        // Correlated inputs: X = Z·M + a few outlier channels.
        let m: Vec<f32> = (0..inp * inp)
            .map(|k| rng.normal() as f32 * if k % (inp + 1) == 0 { 4.0 } else { 0.1 })
            .collect();
        let z: Vec<f32> = (0..tokens * inp).map(|_| rng.normal() as f32).collect();
        let x = Tensor::from_vec(z, (tokens, inp), &Device::Cpu)
            .unwrap()
            .matmul(&Tensor::from_vec(m, (inp, inp), &Device::Cpu).unwrap())
            .unwrap();
        let t0 = Instant::now();
        let mut hs = Hessian::new(inp);
        hs.add(&x).unwrap();
        let h = hs.matrix();
        let th = t0.elapsed().as_secs_f64() * 1e3;
        let mut hd = h.clone();
        let mean = (0..inp).map(|i| hd[i * inp + i]).sum::<f64>() / inp as f64;
        for i in 0..inp {
            hd[i * inp + i] += 0.01 * mean;
        }
        let t0 = Instant::now();
        let _ = upper_cholesky_of_inverse(&hd, inp).unwrap();
        let tf = t0.elapsed().as_secs_f64() * 1e3;
        let w: Vec<f32> = (0..out * inp).map(|_| rng.normal() as f32).collect();
        let cfg = GptqConfig::default();
        let mut sum = 0u64;
        let mut times = Vec::new();
        for gran in [Granularity::Channel, Granularity::Group(64)] {
            let t0 = Instant::now();
            let r = gptq("w", &w, out, inp, &h, QuantSpec::sym(4), gran, false, &cfg).unwrap();
            times.push(t0.elapsed().as_secs_f64() * 1e3);
            for (i, &c) in r.weight.codes.iter().enumerate() {
                sum = sum.wrapping_mul(31).wrapping_add(c as u64 ^ i as u64);
            }
        }
        println!(
            "{out:>6} {inp:>6} {th:>10.1} {tf:>10.1} {:>10.1} {:>10.1}  {sum:016x}",
            times[0], times[1]
        );
    }
}

//! The machine's f32 GEMM rate through candle (the calibration engine's matmul), at the shapes of
//! a calibration step's linears: `[T, in] · [in, out]` for a model's hidden and intermediate
//! sizes. Prints one line per shape and the best as `peak_gflops`: the denominator of the
//! training step's "% of f32 GEMM peak" in `scripts/bench-calib.sh`. Not a test.
//!
//!   cargo run --release --example gemm_peak -- TOKENS HIDDEN INTERMEDIATE

use candle_core::{Device, Tensor};
use std::time::Instant;

fn main() -> candle_core::Result<()> {
    let a: Vec<usize> = std::env::args()
        .skip(1)
        .map(|s| s.parse().expect("TOKENS HIDDEN INTERMEDIATE"))
        .collect();
    let (t, d, i) = match a[..] {
        [t, d, i] => (t, d, i),
        _ => (2048, 576, 1536),
    };
    let dev = Device::Cpu;
    let mut peak = 0f64;
    for (k, n) in [(d, d), (d, i), (i, d)] {
        let x = Tensor::randn(0f32, 1.0, (t, k), &dev)?;
        // A linear's weight as stored, `[out, in]`, used transposed (candle's linear layout).
        let w = Tensor::randn(0f32, 1.0, (n, k), &dev)?;
        let wt = w.t()?;
        x.matmul(&wt)?;
        let mut best = f64::INFINITY;
        let start = Instant::now();
        let mut reps = 0;
        while reps < 3 || (start.elapsed().as_secs_f64() < 2.0 && reps < 100) {
            let t0 = Instant::now();
            let y = x.matmul(&wt)?;
            drop(y);
            best = best.min(t0.elapsed().as_secs_f64());
            reps += 1;
        }
        let gflops = 2.0 * (t * k * n) as f64 / best / 1e9;
        println!("[{t}, {k}] x [{k}, {n}]: {gflops:.1} GFLOP/s ({reps} runs, best {best:.4} s)");
        peak = peak.max(gflops);
    }
    println!("peak_gflops {peak:.1}");
    Ok(())
}

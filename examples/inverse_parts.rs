//! Times the f64 matrix inverse at AffineQuant's dense norm-matrix sizes (SmolLM2 576, Qwen2.5
//! 0.5B 896, Llama 8B 4096): Gauss–Jordan against the blocked LU that `inverse_f64` uses above
//! one panel. Not a test; prints a table (median of 5).
use affq::transforms::inverse::gauss_jordan;
use affq::transforms::linalg::lu_inverse;
use std::time::Instant;

fn median(f: &dyn Fn()) -> f64 {
    let mut t: Vec<f64> = (0..5)
        .map(|_| {
            let t0 = Instant::now();
            f();
            t0.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[2]
}

fn main() {
    let mut rng = affq::rng::Rng::new(3);
    let sizes: Vec<usize> = std::env::args()
        .skip(1)
        .map(|s| s.parse().expect("sizes"))
        .collect();
    for n in if sizes.is_empty() {
        vec![576, 896]
    } else {
        sizes
    } {
        let a: Vec<f64> = (0..n * n)
            .map(|i| rng.normal() * 0.05 + if i % (n + 1) == 0 { 1.0 } else { 0.0 })
            .collect();
        let gj = median(&|| drop(gauss_jordan(&a, n)));
        let lu = median(&|| drop(lu_inverse(&a, n)));
        println!(
            "n = {n:5}: Gauss–Jordan {gj:8.1} ms, blocked LU {lu:7.1} ms ({:.1}×)",
            gj / lu
        );
    }
}

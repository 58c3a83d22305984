//! Next-token choice from logits: greedy at temperature 0, otherwise Hugging Face's order
//! (docs/decode.md §3): logits divided by the temperature, the `top_k` largest kept, then the
//! smallest set of most likely tokens whose probability reaches `top_p`, and one token drawn from
//! the renormalised rest with the seeded generator (the same seed gives the same text).

use crate::rng::Rng;

/// Sampling settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplerConfig {
    /// 0 = greedy.
    pub temperature: f32,
    /// 0 = no top-k cut.
    pub top_k: usize,
    /// 1 = no nucleus cut.
    pub top_p: f32,
    pub seed: u64,
}

pub struct Sampler {
    cfg: SamplerConfig,
    rng: Rng,
}

/// Index of the largest logit (the first of equal ones).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in logits.iter().enumerate() {
        if x > logits[best] {
            best = i;
        }
    }
    best as u32
}

impl Sampler {
    pub fn new(cfg: SamplerConfig) -> Self {
        Sampler {
            cfg,
            rng: Rng::new(cfg.seed),
        }
    }

    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let c = self.cfg;
        if c.temperature <= 0.0 || c.top_k == 1 {
            return argmax(logits);
        }
        let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
        let by_logit = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]);
        if c.top_k > 0 && c.top_k < idx.len() {
            idx.select_nth_unstable_by(c.top_k - 1, by_logit);
            idx.truncate(c.top_k);
        }
        idx.sort_unstable_by(by_logit);
        let m = logits[idx[0] as usize];
        let mut p: Vec<f64> = idx
            .iter()
            .map(|&i| (((logits[i as usize] - m) / c.temperature) as f64).exp())
            .collect();
        let z: f64 = p.iter().sum();
        p.iter_mut().for_each(|x| *x /= z);
        if c.top_p < 1.0 {
            let mut acc = 0.0;
            let keep = p
                .iter()
                .position(|&x| {
                    acc += x;
                    acc >= c.top_p as f64
                })
                .map_or(p.len(), |i| i + 1);
            p.truncate(keep);
        }
        let total: f64 = p.iter().sum();
        let mut u = self.rng.uniform() * total;
        for (i, &x) in p.iter().enumerate() {
            u -= x;
            if u <= 0.0 {
                return idx[i];
            }
        }
        idx[p.len() - 1]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(temperature: f32, top_k: usize, top_p: f32, seed: u64) -> SamplerConfig {
        SamplerConfig {
            temperature,
            top_k,
            top_p,
            seed,
        }
    }

    #[test]
    fn greedy_and_cuts() {
        let logits = [0.0f32, 3.0, 1.0, 2.9, -1.0];
        assert_eq!(Sampler::new(cfg(0.0, 0, 1.0, 1)).sample(&logits), 1);
        // top_k 2 leaves tokens 1 and 3 only.
        let mut s = Sampler::new(cfg(1.0, 2, 1.0, 7));
        for _ in 0..200 {
            assert!(matches!(s.sample(&logits), 1 | 3));
        }
        // top_p small enough keeps only the most likely token.
        let mut s = Sampler::new(cfg(1.0, 0, 0.3, 7));
        for _ in 0..50 {
            assert_eq!(s.sample(&logits), 1);
        }
    }

    #[test]
    fn same_seed_same_draws_and_frequencies_follow_softmax() {
        let logits = [0.0f32, 1.0, 2.0];
        let draws = |seed| {
            let mut s = Sampler::new(cfg(1.0, 0, 1.0, seed));
            (0..20_000).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        let a = draws(42);
        assert_eq!(a, draws(42));
        assert_ne!(a, draws(43));
        // Token 2 has probability e²/(1+e+e²) = 0.6652; 20 000 draws: σ ≈ 0.0033.
        let f = a.iter().filter(|&&t| t == 2).count() as f64 / a.len() as f64;
        assert!((f - 0.6652).abs() < 0.015, "{f}");
    }
}

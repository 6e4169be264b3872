//! Picking the next token from a step's logits: the most likely one, or a seeded draw at a
//! temperature, from the whole vocabulary or from its nucleus (top-p).
//!
//! It works on the logits as a slice, in one buffer reused from step to step. candle's
//! `LogitsProcessor` copied the vocabulary into tensors and back on every step and sorted all of
//! it for top-p: 49,152 entries for SmolLM2, 151,936 for Qwen2.5, which cost milliseconds a token
//! next to a forward pass of a few. Here the nucleus is found among the most likely tokens first
//! (a selection, linear in the vocabulary), and the whole vocabulary is sorted only when they do
//! not reach `top_p`.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// How the next token is chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Sampling {
    /// The most likely token (the first of equals).
    Greedy,
    /// A draw from the softmax of `logits / temperature`, restricted to the smallest set of most
    /// likely tokens whose probability reaches `top_p` (1.0: the whole vocabulary).
    Draw { temperature: f32, top_p: f32 },
}

/// Candidates tried first for the nucleus; four times as many each time they fall short.
const FIRST_NUCLEUS: usize = 64;

pub(crate) struct Sampler {
    sampling: Sampling,
    rng: StdRng,
    /// Weights `exp((logit - max) / temperature)`, one per token.
    weights: Vec<f32>,
    /// Token ids, most likely first as far as the nucleus search ordered them.
    order: Vec<u32>,
}

impl Sampler {
    pub fn new(sampling: Sampling, seed: u64) -> Self {
        Self {
            sampling,
            rng: StdRng::seed_from_u64(seed),
            weights: Vec::new(),
            order: Vec::new(),
        }
    }

    /// The next token. Logits that cannot be weighed (no finite maximum, or weights that do not
    /// sum to a positive finite number) give the most likely token rather than an error.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let Sampling::Draw { temperature, top_p } = self.sampling else {
            return argmax(logits);
        };
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        if !max.is_finite() {
            return argmax(logits);
        }
        // Subtracting the maximum first keeps every weight within [0, 1], whatever the
        // temperature: dividing the logits themselves by a tiny one overflows them.
        self.weights.clear();
        self.weights
            .extend(logits.iter().map(|&l| ((l - max) / temperature).exp()));
        let total: f64 = self.weights.iter().map(|&w| f64::from(w)).sum();
        if !(total.is_finite() && total > 0.0) {
            return argmax(logits);
        }
        if top_p >= 1.0 {
            let target = self.rng.random::<f64>() * total;
            return walk(&self.weights, 0..logits.len() as u32, target);
        }
        let (nucleus, mass) = self.nucleus(f64::from(top_p) * total);
        let target = self.rng.random::<f64>() * mass;
        walk(&self.weights, self.order[..nucleus].iter().copied(), target)
    }

    /// Orders the most likely tokens first in `order` and returns how many of them form the
    /// nucleus and their summed weight. The nucleus is the shortest run of most likely tokens
    /// whose weight reaches `threshold` (the token that crosses it is in). Equal weights are
    /// ordered by token id, so the nucleus does not depend on how it was found.
    fn nucleus(&mut self, threshold: f64) -> (usize, f64) {
        // The tokens within a factor of TAIL of the most likely one (weight 1) are gathered in one
        // pass: every other token weighs less than each of them, so when they reach the threshold
        // the nucleus is among them. Only a flat tail sends the search to the whole vocabulary.
        const TAIL: f32 = 1e-4;
        let len = self.weights.len();
        self.order.clear();
        self.order
            .extend((0..len as u32).filter(|&t| self.weights[t as usize] >= TAIL));
        let found = self.nucleus_among_order(threshold);
        if found.1 >= threshold || self.order.len() == len {
            return found;
        }
        self.order.clear();
        self.order.extend(0..len as u32);
        self.nucleus_among_order(threshold)
    }

    /// [`Self::nucleus`] among the tokens in `order`, the most likely 64, 256, ... first.
    fn nucleus_among_order(&mut self, threshold: f64) -> (usize, f64) {
        let weights = &self.weights;
        let more_likely = |a: &u32, b: &u32| {
            weights[*b as usize]
                .total_cmp(&weights[*a as usize])
                .then(a.cmp(b))
        };
        let len = self.order.len();
        let mut candidates = FIRST_NUCLEUS.min(len);
        loop {
            if candidates < len {
                self.order
                    .select_nth_unstable_by(candidates - 1, more_likely);
            }
            self.order[..candidates].sort_unstable_by(more_likely);
            let mut mass = 0.0;
            for (i, &token) in self.order[..candidates].iter().enumerate() {
                // The most likely token is always in, however small `top_p` is.
                if i > 0 && mass >= threshold {
                    return (i, mass);
                }
                mass += f64::from(weights[token as usize]);
            }
            if mass >= threshold || candidates == len {
                return (candidates, mass);
            }
            candidates = (candidates * 4).min(len);
        }
    }
}

/// The first token whose cumulative weight passes `target`, walking `tokens` in order; the last
/// one if rounding leaves the target unreached.
fn walk(weights: &[f32], tokens: impl Iterator<Item = u32>, target: f64) -> u32 {
    let mut cumulative = 0.0;
    let mut last = 0;
    for token in tokens {
        let w = f64::from(weights[token as usize]);
        if w == 0.0 {
            continue;
        }
        cumulative += w;
        last = token;
        if cumulative > target {
            break;
        }
    }
    last
}

/// The index of the largest logit, the first of equals (0 if none is a number).
pub(crate) fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] || (logits[best].is_nan() && !l.is_nan()) {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn draw(temperature: f32, top_p: f32) -> Sampling {
        Sampling::Draw { temperature, top_p }
    }

    fn draws(sampling: Sampling, logits: &[f32], n: usize, seed: u64) -> Vec<usize> {
        let mut sampler = Sampler::new(sampling, seed);
        let mut counts = vec![0; logits.len()];
        for _ in 0..n {
            counts[sampler.sample(logits) as usize] += 1;
        }
        counts
    }

    /// The nucleus the way candle found it: the whole vocabulary sorted, tokens taken while the
    /// probability before them is below `top_p`.
    fn nucleus_by_sorting(logits: &[f32], temperature: f32, top_p: f32) -> Vec<u32> {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let w: Vec<f64> = logits
            .iter()
            .map(|&l| f64::from(((l - max) / temperature).exp()))
            .collect();
        let total: f64 = w.iter().sum();
        let mut order: Vec<u32> = (0..logits.len() as u32).collect();
        order.sort_by(|&a, &b| w[b as usize].total_cmp(&w[a as usize]).then(a.cmp(&b)));
        let mut mass = 0.0;
        order
            .into_iter()
            .take_while(|&t| {
                let inside = mass < f64::from(top_p) * total;
                mass += w[t as usize];
                inside
            })
            .collect()
    }

    #[test]
    fn greedy_takes_the_most_likely_token_and_the_first_of_equals() {
        let mut sampler = Sampler::new(Sampling::Greedy, 1);
        assert_eq!(sampler.sample(&[0.1, 3.0, -2.0, 2.9]), 1);
        assert_eq!(sampler.sample(&[1.0, 5.0, 5.0]), 1);
        assert_eq!(argmax(&[f32::NAN, -1.0, 2.0]), 2);
        assert_eq!(argmax(&[f32::NAN; 3]), 0);
    }

    #[test]
    fn draws_follow_the_softmax_at_the_temperature() {
        let logits = [0.0, (2.0f32).ln(), (3.0f32).ln(), f32::NEG_INFINITY];
        let n = 60_000;
        let counts = draws(draw(1.0, 1.0), &logits, n, 7);
        for (token, share) in [(0, 1.0 / 6.0), (1, 2.0 / 6.0), (2, 3.0 / 6.0)] {
            let got = counts[token] as f64 / n as f64;
            assert!(
                (got - share).abs() < 0.01,
                "token {token}: {got} vs {share}"
            );
        }
        assert_eq!(counts[3], 0, "a token of probability zero was drawn");
        // Temperature 0.5 squares the odds: 1 : 4 : 9.
        let counts = draws(draw(0.5, 1.0), &logits, n, 7);
        let got = counts[2] as f64 / n as f64;
        assert!((got - 9.0 / 14.0).abs() < 0.01, "{got}");
    }

    #[test]
    fn the_nucleus_is_the_one_a_full_sort_gives() {
        // A vocabulary the size of SmolLM2's, with ties, drawn from a fixed generator: logits
        // spread evenly over a range, and (the last case) a few likely tokens over a tail of
        // unlikely ones that together outweigh them, so the nucleus reaches into the tail.
        let mut rng = StdRng::seed_from_u64(3);
        for (spread, temperature, top_p, head) in [
            (8.0, 1.0, 0.9, 0),
            (2.0, 0.7, 0.95, 0),
            (0.5, 1.0, 0.5, 0),
            (30.0, 0.8, 0.99, 0),
            (0.5, 1.0, 0.9, 1),
        ] {
            let logits: Vec<f32> = (0..49_152)
                .map(|i| {
                    let l = (rng.random::<f32>() * spread * 8.0).round() / 8.0;
                    if i < head { l + 10.0 } else { l }
                })
                .collect();
            let expected = nucleus_by_sorting(&logits, temperature, top_p);
            let mut sampler = Sampler::new(draw(temperature, top_p), 1);
            sampler.sample(&logits);
            let (n, _) = sampler.nucleus(
                f64::from(top_p) * sampler.weights.iter().map(|&w| f64::from(w)).sum::<f64>(),
            );
            assert_eq!(
                sampler.order[..n],
                expected[..],
                "spread {spread}, top_p {top_p}: {} vs {} tokens",
                n,
                expected.len()
            );
        }
    }

    #[test]
    fn draws_stay_inside_the_nucleus_in_proportion() {
        // Probabilities 0.4, 0.3, 0.2, 0.1: top_p 0.65 keeps the first two (0.4 < 0.65 ≤ 0.7).
        let logits = [0.4f32.ln(), 0.3f32.ln(), 0.2f32.ln(), 0.1f32.ln()];
        let n = 40_000;
        let counts = draws(draw(1.0, 0.65), &logits, n, 11);
        assert_eq!(counts[2] + counts[3], 0, "{counts:?}");
        let got = counts[0] as f64 / n as f64;
        assert!((got - 4.0 / 7.0).abs() < 0.01, "{got}");
    }

    #[test]
    fn the_same_seed_gives_the_same_tokens() {
        let logits: Vec<f32> = (0..1000).map(|i| ((i * 37) % 101) as f32 / 10.0).collect();
        let sampling = draw(0.9, 0.9);
        let run = |seed| {
            let mut sampler = Sampler::new(sampling, seed);
            (0..50).map(|_| sampler.sample(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(run(5), run(5));
        assert_ne!(run(5), run(6));
    }

    #[test]
    fn logits_that_cannot_be_weighed_give_the_most_likely_token() {
        let sampling = draw(1e-5, 0.5);
        let mut sampler = Sampler::new(sampling, 1);
        assert_eq!(sampler.sample(&[f32::NEG_INFINITY; 4]), 0);
        assert_eq!(sampler.sample(&[1.0, f32::NAN, 3.0]), 2);
        // A tiny temperature leaves only the maximum with any weight: no overflow.
        assert_eq!(sampler.sample(&[1.0, 1.5, -3.0]), 1);
        // A top_p of zero (a tiny one rounded to f32) keeps the most likely token.
        let mut sampler = Sampler::new(draw(1.0, 0.0), 1);
        assert_eq!(sampler.sample(&[1.0, 1.5, 1.4]), 1);
    }
}

//! Beam search over Whisper's decoder, as OpenAI's and faster-whisper's decoders do it: keep
//! the `width` most likely unfinished transcripts; each step, extend every one by its
//! `width + 1` likeliest next tokens and keep the best `width` again; a transcript that picks
//! the end token is finished. It stops when `width` transcripts are finished (or at the length
//! cap) and picks the one with the best log-probability per token. Width 1 is greedy decoding.

/// One transcript being decoded: its tokens after the prompt and their summed log-probability.
#[derive(Clone, Debug, PartialEq)]
pub struct Hypothesis {
    pub tokens: Vec<u32>,
    pub logprob: f32,
}

impl Hypothesis {
    /// Mean log-probability per token (the end token counts): how the winner is chosen.
    pub fn score(&self) -> f32 {
        self.logprob / (self.tokens.len() + 1) as f32
    }
}

/// The search's state between decoder steps.
pub struct Beams {
    width: usize,
    eot: u32,
    pub live: Vec<Hypothesis>,
    finished: Vec<Hypothesis>,
}

impl Beams {
    /// Starts with one empty transcript, repeated so every step has `width` rows to decode.
    pub fn new(width: usize, eot: u32) -> Self {
        let empty = Hypothesis {
            tokens: Vec::new(),
            logprob: 0.0,
        };
        Self {
            width: width.max(1),
            eot,
            live: vec![empty; width.max(1)],
            finished: Vec::new(),
        }
    }

    /// Extends the live transcripts by one token. `logprobs[b]` are row `b`'s next-token
    /// log-probabilities; on the first step only row 0 counts (all rows are the same prompt).
    /// True when the search is done.
    pub fn step(&mut self, logprobs: &[Vec<f32>], first: bool) -> bool {
        let rows = if first { 1 } else { self.live.len() };
        let mut candidates: Vec<(f32, usize, u32)> = Vec::new();
        for (b, lp) in logprobs.iter().take(rows).enumerate() {
            for t in top(lp, self.width + 1) {
                candidates.push((self.live[b].logprob + lp[t], b, t as u32));
            }
        }
        candidates.sort_by(|a, b| b.0.total_cmp(&a.0));
        let mut next = Vec::with_capacity(self.width);
        for (logprob, b, t) in candidates {
            if !logprob.is_finite() {
                continue; // a suppressed token
            }
            let mut tokens = self.live[b].tokens.clone();
            if t == self.eot {
                if self.finished.len() < self.width {
                    self.finished.push(Hypothesis { tokens, logprob });
                }
                continue;
            }
            tokens.push(t);
            next.push(Hypothesis { tokens, logprob });
            if next.len() == self.width {
                break;
            }
        }
        if next.is_empty() {
            return true;
        }
        // Keep `width` rows for the decoder's batch, even if fewer survived.
        while next.len() < self.width {
            next.push(next[0].clone());
        }
        self.live = next;
        self.finished.len() >= self.width
    }

    /// The best transcript: finished ones, or the live ones when none finished.
    pub fn best(self) -> Hypothesis {
        let pool = if self.finished.is_empty() {
            self.live
        } else {
            self.finished
        };
        pool.into_iter()
            .max_by(|a, b| a.score().total_cmp(&b.score()))
            .expect("there is always a hypothesis")
    }
}

/// Indices of the `n` largest values.
fn top(v: &[f32], n: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    let n = n.min(v.len());
    if n == 0 {
        return idx;
    }
    idx.select_nth_unstable_by(n - 1, |&a, &b| v[b].total_cmp(&v[a]));
    idx.truncate(n);
    idx
}

/// `ln softmax(v)`, computed stably.
pub fn log_softmax(v: &[f32]) -> Vec<f32> {
    let max = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = v.iter().map(|x| (x - max).exp()).sum();
    let norm = max + sum.ln();
    v.iter().map(|x| x - norm).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const EOT: u32 = 3;

    fn lp(p: [f32; 4]) -> Vec<f32> {
        p.iter().map(|x| x.ln()).collect()
    }

    #[test]
    fn a_wider_beam_finds_what_greedy_misses() {
        // Step 1: token 0 (0.6) beats token 1 (0.4). After 0 the end is unlikely and the
        // text wanders (0.3 each); after 1 the end is nearly certain (0.9).
        let first = lp([0.6, 0.4, 0.0, 0.0]);
        let after = |row: &Hypothesis| match row.tokens.first() {
            Some(0) => lp([0.0, 0.35, 0.35, 0.3]),
            _ => lp([0.05, 0.0, 0.05, 0.9]),
        };
        let run = |width: usize| {
            let mut beams = Beams::new(width, EOT);
            let mut done = beams.step(&vec![first.clone(); width], true);
            for _ in 0..3 {
                if done {
                    break;
                }
                let rows: Vec<_> = beams.live.iter().map(after).collect();
                done = beams.step(&rows, false);
            }
            beams.best()
        };
        assert_eq!(run(1).tokens[0], 0, "greedy takes the likelier first token");
        let wide = run(2);
        assert_eq!(
            wide.tokens,
            [1],
            "the beam finds the likelier whole transcript"
        );
    }

    #[test]
    fn log_softmax_sums_to_one() {
        let v = log_softmax(&[1.0, 2.0, 3.0, f32::NEG_INFINITY]);
        let total: f32 = v.iter().map(|x| x.exp()).sum();
        assert!((total - 1.0).abs() < 1e-6);
        assert_eq!(top(&v, 2), [2, 1]);
    }
}

//! The one retry loop for outbound requests (webhooks, JSON webhooks, speech-to-text) and the
//! one backoff: exponential, its ceiling doubling per attempt up to a maximum, with the jitter
//! each caller needs (full for requests, equal for bus redeliveries, none for publishes to
//! the bus and reconnects, where one gateway alone retries its own messages).

use std::future::Future;
use std::time::Duration;

use rand::Rng;

/// How many times and how patiently to retry.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Retries after the first attempt.
    pub max_retries: u32,
    /// Ceiling of the first retry delay; it doubles each retry up to `backoff_max`.
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
}

impl RetryPolicy {
    pub fn from_ms(max_retries: u32, initial_ms: u64, max_ms: u64) -> Self {
        Self {
            max_retries,
            backoff_initial: Duration::from_millis(initial_ms),
            backoff_max: Duration::from_millis(max_ms),
        }
    }
}

/// Where in `[0, ceiling]` a delay falls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Jitter {
    /// Anywhere in `[0, ceiling]`: spreads many clients of one endpoint apart.
    Full,
    /// In `[ceiling / 2, ceiling]`: spread, but never much shorter than planned.
    Equal,
    /// Exactly the ceiling.
    None,
}

/// Exponential backoff: the ceiling of attempt `n` (from 0) is `initial × 2ⁿ`, at most `max`.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    jitter: Jitter,
    /// Delays handed out by `delay` so far.
    attempt: u32,
}

impl Backoff {
    /// The request retry backoff: full jitter within the policy's bounds.
    pub fn new(policy: &RetryPolicy) -> Self {
        Self::with(policy.backoff_initial, policy.backoff_max, Jitter::Full)
    }

    pub fn with(initial: Duration, max: Duration, jitter: Jitter) -> Self {
        Self {
            initial,
            max,
            jitter,
            attempt: 0,
        }
    }

    /// The ceiling of attempt `n`.
    pub fn ceiling(&self, n: u32) -> Duration {
        let factor = 1u32.checked_shl(n).unwrap_or(u32::MAX);
        self.initial.saturating_mul(factor).min(self.max)
    }

    /// The delay before attempt `n` (jittered), for callers that count attempts themselves.
    pub fn delay_for(&self, n: u32) -> Duration {
        let ceiling = self.ceiling(n).as_millis() as u64;
        let ms = match self.jitter {
            Jitter::Full => rand::rng().random_range(0..=ceiling),
            Jitter::Equal => rand::rng().random_range(ceiling / 2..=ceiling.max(1)),
            Jitter::None => ceiling,
        };
        Duration::from_millis(ms)
    }

    /// The delay before the next attempt; each call doubles the ceiling.
    pub fn delay(&mut self) -> Duration {
        let d = self.delay_for(self.attempt);
        self.attempt = self.attempt.saturating_add(1);
        d
    }
}

/// What one attempt of a retried operation came to.
pub enum Attempt<T, E> {
    Done(T),
    /// Worth retrying (5xx, 408, 429, timeouts, transport errors).
    Retry(E),
    /// Not worth retrying (other 4xx, bad answers, an open circuit breaker).
    Fatal(E),
}

/// Runs `attempt` up to `1 + max_retries` times with backoff; the error is the last one.
pub async fn with_retries<T, E, F, Fut>(policy: &RetryPolicy, mut attempt: F) -> Result<T, E>
where
    F: FnMut(u32) -> Fut,
    Fut: Future<Output = Attempt<T, E>>,
{
    let mut backoff = Backoff::new(policy);
    let mut n = 0;
    loop {
        match attempt(n).await {
            Attempt::Done(v) => return Ok(v),
            Attempt::Fatal(e) => return Err(e),
            Attempt::Retry(e) if n >= policy.max_retries => return Err(e),
            Attempt::Retry(_) => {}
        }
        n += 1;
        tokio::time::sleep(backoff.delay()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn retries_until_done_and_stops_at_fatal_or_the_limit() {
        let policy = RetryPolicy::from_ms(3, 10, 40);
        let mut calls = 0;
        let r: Result<u32, String> = with_retries(&policy, |n| {
            calls += 1;
            async move {
                if n < 2 {
                    Attempt::Retry(format!("try {n}"))
                } else {
                    Attempt::Done(n)
                }
            }
        })
        .await;
        assert_eq!(r, Ok(2));
        assert_eq!(calls, 3);
        let r: Result<(), &str> = with_retries(&policy, |_| async { Attempt::Fatal("no") }).await;
        assert_eq!(r, Err("no"));
        let mut calls = 0;
        let r: Result<(), String> = with_retries(&policy, |n| {
            calls += 1;
            async move { Attempt::Retry(format!("try {n}")) }
        })
        .await;
        assert_eq!(r, Err("try 3".into()), "the last error");
        assert_eq!(calls, 4, "1 + max_retries attempts");
    }

    #[tokio::test(start_paused = true)]
    async fn the_retry_loop_waits_at_most_the_ceilings() {
        let policy = RetryPolicy::from_ms(3, 100, 250);
        let t0 = tokio::time::Instant::now();
        let _: Result<(), ()> = with_retries(&policy, |_| async { Attempt::Retry(()) }).await;
        assert!(t0.elapsed() <= Duration::from_millis(100 + 200 + 250));
    }

    #[test]
    fn backoff_ceiling_doubles_up_to_the_max() {
        let mut b = Backoff::new(&RetryPolicy::from_ms(5, 100, 300));
        for ceiling in [100, 200, 300, 300] {
            assert!(b.delay() <= Duration::from_millis(ceiling));
        }
        let b = Backoff::with(Duration::from_millis(1), Duration::MAX, Jitter::None);
        assert_eq!(b.ceiling(40), Duration::from_millis(u64::from(u32::MAX)));
    }

    #[test]
    fn jitter_kinds_stay_in_their_ranges() {
        let (initial, max) = (Duration::from_millis(50), Duration::from_secs(1));
        let mut exact = Backoff::with(initial, max, Jitter::None);
        let delays: Vec<u64> = (0..7).map(|_| exact.delay().as_millis() as u64).collect();
        assert_eq!(delays, [50, 100, 200, 400, 800, 1000, 1000]);
        let equal = Backoff::with(
            Duration::from_millis(500),
            Duration::from_secs(30),
            Jitter::Equal,
        );
        for n in 0..12 {
            let ceiling = equal.ceiling(n);
            let d = equal.delay_for(n);
            assert!(
                d >= ceiling / 2 && d <= ceiling,
                "attempt {n}: {d:?} of {ceiling:?}"
            );
        }
        assert_eq!(equal.ceiling(10), Duration::from_secs(30));
    }
}

//! The one retry loop for outbound requests (webhooks, JSON webhooks, speech-to-text):
//! exponential backoff with full jitter, and what counts as worth retrying.

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

/// Exponential backoff with full jitter.
pub struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    pub fn new(policy: &RetryPolicy) -> Self {
        Self {
            next: policy.backoff_initial,
            max: policy.backoff_max,
        }
    }
    /// The delay before the next attempt (full jitter), doubling the ceiling.
    pub fn delay(&mut self) -> Duration {
        let ceiling = self.next;
        self.next = (self.next * 2).min(self.max);
        Duration::from_millis(rand::rng().random_range(0..=ceiling.as_millis() as u64))
    }
}

/// What one attempt of a retried operation came to.
pub enum Attempt<T> {
    Done(T),
    /// Worth retrying (5xx, 408, 429, timeouts, transport errors).
    Retry(String),
    /// Not worth retrying (other 4xx, bad answers, an open circuit breaker).
    Fatal(String),
}

/// Runs `attempt` up to `1 + max_retries` times with backoff; the error is the last one.
pub async fn with_retries<T, F, Fut>(policy: &RetryPolicy, mut attempt: F) -> Result<T, String>
where
    F: FnMut(u32) -> Fut,
    Fut: Future<Output = Attempt<T>>,
{
    let mut backoff = Backoff::new(policy);
    let mut last = String::new();
    for n in 0..=policy.max_retries {
        if n > 0 {
            tokio::time::sleep(backoff.delay()).await;
        }
        match attempt(n).await {
            Attempt::Done(v) => return Ok(v),
            Attempt::Retry(e) => last = e,
            Attempt::Fatal(e) => return Err(e),
        }
    }
    Err(last)
}

/// Statuses worth another attempt.
pub fn retryable(status: reqwest::StatusCode) -> bool {
    status.is_server_error()
        || status == reqwest::StatusCode::TOO_MANY_REQUESTS
        || status == reqwest::StatusCode::REQUEST_TIMEOUT
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
        let r: Result<(), String> =
            with_retries(&policy, |_| async { Attempt::Fatal("no".into()) }).await;
        assert_eq!(r, Err("no".into()));
        let mut calls = 0;
        let r: Result<(), String> = with_retries(&policy, |n| {
            calls += 1;
            async move { Attempt::Retry(format!("try {n}")) }
        })
        .await;
        assert_eq!(r, Err("try 3".into()), "the last error");
        assert_eq!(calls, 4, "1 + max_retries attempts");
    }

    #[test]
    fn backoff_ceiling_doubles_up_to_the_max() {
        let mut b = Backoff::new(&RetryPolicy::from_ms(5, 100, 300));
        for ceiling in [100, 200, 300, 300] {
            assert!(b.delay() <= Duration::from_millis(ceiling));
        }
        assert!(retryable(reqwest::StatusCode::TOO_MANY_REQUESTS));
        assert!(retryable(reqwest::StatusCode::BAD_GATEWAY));
        assert!(!retryable(reqwest::StatusCode::BAD_REQUEST));
    }
}

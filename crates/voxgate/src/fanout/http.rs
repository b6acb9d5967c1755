//! How an outbound HTTP attempt went, decided in one place for every caller (audio webhooks,
//! JSON webhooks, the transcript poster, OpenAI-style transcription, `voxgate deliver`), and
//! the per-endpoint circuit breakers they share.
//!
//! 2xx is delivered. 408, 429, 5xx, timeouts and transport errors are worth another attempt
//! and count against the endpoint's breaker. Any other status is a rejection: the endpoint is
//! up and refused this request, so it is not retried and does not count against the breaker.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use metrics::counter;
use reqwest::StatusCode;
use tokio::time::Instant;

use super::labels::DropReason;
use super::retry::Attempt;
use crate::config::WebhookConfig;
use crate::metrics::WEBHOOK_REQUESTS;

/// What one HTTP attempt came to.
#[derive(Debug)]
pub enum HttpOutcome {
    /// 2xx.
    Delivered,
    /// A status not worth retrying (other 4xx, 1xx, 3xx).
    Rejected(StatusCode),
    /// Worth another attempt.
    Retry(RetryReason),
    /// Not attempted: the endpoint's breaker is open.
    CircuitOpen,
}

/// Why an attempt is worth repeating.
#[derive(Debug, thiserror::Error)]
pub enum RetryReason {
    /// 408, 429 or 5xx.
    #[error("{0}")]
    Status(StatusCode),
    #[error(transparent)]
    NoAnswer(#[from] NoAnswer),
}

/// The request got no status at all.
#[derive(Debug, thiserror::Error)]
pub enum NoAnswer {
    #[error("{0}")]
    Timeout(reqwest::Error),
    /// Connect, TLS, protocol or body errors.
    #[error("{0}")]
    Transport(reqwest::Error),
}

impl NoAnswer {
    pub fn label(&self) -> &'static str {
        match self {
            Self::Timeout(_) => "timeout",
            Self::Transport(_) => "transport_error",
        }
    }
}

/// Statuses worth another attempt.
pub fn retryable(status: StatusCode) -> bool {
    status.is_server_error()
        || status == StatusCode::TOO_MANY_REQUESTS
        || status == StatusCode::REQUEST_TIMEOUT
}

/// Classifies an answer by its status.
pub fn classify_status(status: StatusCode) -> HttpOutcome {
    if status.is_success() {
        HttpOutcome::Delivered
    } else if retryable(status) {
        HttpOutcome::Retry(RetryReason::Status(status))
    } else {
        HttpOutcome::Rejected(status)
    }
}

/// Classifies the error that kept a request from getting a status.
pub fn no_answer(e: reqwest::Error) -> NoAnswer {
    if e.is_timeout() {
        NoAnswer::Timeout(e)
    } else {
        NoAnswer::Transport(e)
    }
}

/// Classifies an attempt by its status, or by the error that kept it from having one.
pub fn classify(result: Result<StatusCode, reqwest::Error>) -> HttpOutcome {
    match result {
        Ok(status) => classify_status(status),
        Err(e) => HttpOutcome::Retry(no_answer(e).into()),
    }
}

impl HttpOutcome {
    /// The `outcome` label of `voxgate_webhook_requests_total`.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Delivered => "success",
            Self::Rejected(_) => "rejected",
            Self::Retry(RetryReason::Status(_)) => "http_error",
            Self::Retry(RetryReason::NoAnswer(n)) => n.label(),
            Self::CircuitOpen => "circuit_open",
        }
    }
}

impl std::fmt::Display for HttpOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Delivered => f.write_str("delivered"),
            Self::Rejected(status) => write!(f, "rejected: {status}"),
            Self::Retry(why) => write!(f, "{why}"),
            Self::CircuitOpen => f.write_str("circuit_open"),
        }
    }
}

/// Why a request was given up (after its retries).
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("circuit_open")]
    CircuitOpen,
    #[error("{0}")]
    Rejected(StatusCode),
    /// The last of the retryable failures.
    #[error(transparent)]
    Unavailable(#[from] RetryReason),
}

impl HttpError {
    /// What the bytes it carried count as when they are dropped.
    pub fn drop_reason(&self) -> DropReason {
        match self {
            Self::CircuitOpen => DropReason::CircuitOpen,
            Self::Rejected(_) => DropReason::Rejected,
            Self::Unavailable(_) => DropReason::GaveUp,
        }
    }
}

impl From<HttpOutcome> for Attempt<(), HttpError> {
    fn from(outcome: HttpOutcome) -> Self {
        match outcome {
            HttpOutcome::Delivered => Attempt::Done(()),
            HttpOutcome::Retry(why) => Attempt::Retry(why.into()),
            HttpOutcome::Rejected(s) => Attempt::Fatal(HttpError::Rejected(s)),
            HttpOutcome::CircuitOpen => Attempt::Fatal(HttpError::CircuitOpen),
        }
    }
}

/// One webhook attempt through the endpoint's breaker, counted in
/// `voxgate_webhook_requests_total{outcome}`. `request` is only built when the breaker lets it
/// through.
pub async fn webhook_attempt(
    breaker: &Breaker,
    policy: BreakerPolicy,
    request: impl FnOnce() -> reqwest::RequestBuilder,
) -> Attempt<(), HttpError> {
    let outcome = breaker.send(policy, request).await;
    counter!(WEBHOOK_REQUESTS, "outcome" => outcome.label()).increment(1);
    outcome.into()
}

/// When an endpoint's breaker opens and for how long.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BreakerPolicy {
    /// Consecutive retryable failures that open it. Default 5.
    pub failures: u32,
    /// How long it stays open. Default 10 s.
    pub cooldown: Duration,
}

impl Default for BreakerPolicy {
    fn default() -> Self {
        Self {
            failures: 5,
            cooldown: Duration::from_secs(10),
        }
    }
}

impl From<&WebhookConfig> for BreakerPolicy {
    fn from(cfg: &WebhookConfig) -> Self {
        Self {
            failures: cfg.breaker_failures,
            cooldown: Duration::from_secs_f64(cfg.breaker_cooldown_seconds),
        }
    }
}

/// Per-endpoint circuit breakers, shared by every session (and by every consumer posting to
/// the same URL, each with its own policy). Hook-supplied URLs would grow the map without end,
/// so it holds at most `webhook_policy.max_tracked_endpoints`: when full, breakers no session
/// uses and that remember no failure are pruned; if none can go, the new endpoint gets a
/// breaker of its own that is not shared (counted in `voxgate_webhook_breakers_untracked_total`).
pub struct Breakers {
    max: usize,
    map: Mutex<HashMap<String, Arc<Breaker>>>,
}

impl Breakers {
    pub fn new(max: usize) -> Self {
        Self {
            max: max.max(1),
            map: Mutex::new(HashMap::new()),
        }
    }

    pub fn get(&self, url: &str) -> Arc<Breaker> {
        let mut map = self.map.lock().expect("breaker map lock is never poisoned");
        if let Some(b) = map.get(url) {
            return b.clone();
        }
        if map.len() >= self.max {
            map.retain(|_, b| Arc::strong_count(b) > 1 || b.failures.load(Ordering::Relaxed) > 0);
        }
        if map.len() >= self.max {
            counter!(crate::metrics::BREAKERS_UNTRACKED).increment(1);
            return Arc::default();
        }
        map.entry(url.to_owned()).or_default().clone()
    }

    /// Endpoints tracked now.
    pub fn len(&self) -> usize {
        self.map
            .lock()
            .expect("breaker map lock is never poisoned")
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Consecutive failures open the breaker for a cooldown; after it, attempts go through again
/// and the next success closes it.
#[derive(Default)]
pub struct Breaker {
    failures: AtomicU32,
    open_until: Mutex<Option<Instant>>,
}

impl Breaker {
    pub fn allow(&self) -> bool {
        let guard = self
            .open_until
            .lock()
            .expect("breaker lock is never poisoned");
        guard.is_none_or(|t| Instant::now() >= t)
    }

    fn set_open_until(&self, until: Option<Instant>) {
        *self
            .open_until
            .lock()
            .expect("breaker lock is never poisoned") = until;
    }

    pub fn success(&self) {
        self.failures.store(0, Ordering::Relaxed);
        self.set_open_until(None);
    }

    pub fn failure(&self, policy: BreakerPolicy) {
        let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if n >= policy.failures {
            self.set_open_until(Some(Instant::now() + policy.cooldown));
        }
    }

    /// Tells the breaker how an attempt went: a rejection shows the endpoint is up.
    pub fn record(&self, outcome: &HttpOutcome, policy: BreakerPolicy) {
        match outcome {
            HttpOutcome::Delivered | HttpOutcome::Rejected(_) => self.success(),
            HttpOutcome::Retry(_) => self.failure(policy),
            HttpOutcome::CircuitOpen => {}
        }
    }

    /// Sends the request unless the breaker is open, classifies the answer and records it.
    pub async fn send(
        &self,
        policy: BreakerPolicy,
        request: impl FnOnce() -> reqwest::RequestBuilder,
    ) -> HttpOutcome {
        if !self.allow() {
            return HttpOutcome::CircuitOpen;
        }
        let outcome = classify(request().send().await.map(|r| r.status()));
        self.record(&outcome, policy);
        outcome
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_breaker_map_is_bounded_and_keeps_what_matters() {
        let breakers = Breakers::new(2);
        let held = breakers.get("http://a/");
        let failing = breakers.get("http://b/");
        failing.failure(BreakerPolicy::default());
        drop(failing);
        // Full: "a" is in use and "b" remembers a failure, so "c" is not tracked.
        let c = breakers.get("http://c/");
        assert_eq!(breakers.len(), 2);
        assert!(!Arc::ptr_eq(&c, &breakers.get("http://c/")), "untracked");
        breakers.get("http://b/").success();
        // Now "b" can go: "d" takes its place and is shared.
        let d = breakers.get("http://d/");
        assert!(Arc::ptr_eq(&d, &breakers.get("http://d/")));
        assert!(Arc::ptr_eq(&held, &breakers.get("http://a/")));
        assert_eq!(breakers.len(), 2);
    }

    fn status(code: u16) -> HttpOutcome {
        classify(Ok(StatusCode::from_u16(code).expect("a valid status")))
    }

    /// A transport error without a network: the URL cannot even be requested.
    async fn transport_error() -> reqwest::Error {
        reqwest::Client::new()
            .get("http://")
            .send()
            .await
            .expect_err("no host")
    }

    #[test]
    fn two_hundreds_deliver_and_retryable_statuses_retry() {
        for code in [200, 201, 204, 299] {
            assert!(matches!(status(code), HttpOutcome::Delivered), "{code}");
        }
        for code in [408, 429, 500, 502, 503, 599] {
            let outcome = status(code);
            assert!(
                matches!(outcome, HttpOutcome::Retry(RetryReason::Status(_))),
                "{code}"
            );
            assert_eq!(outcome.label(), "http_error");
        }
    }

    #[test]
    fn other_statuses_are_rejected_without_retry() {
        for code in [400, 401, 403, 404, 409, 410, 413, 422, 301, 100] {
            let outcome = status(code);
            assert!(matches!(outcome, HttpOutcome::Rejected(s) if s.as_u16() == code));
            assert_eq!(outcome.label(), "rejected");
            let attempt: Attempt<(), HttpError> = outcome.into();
            assert!(
                matches!(attempt, Attempt::Fatal(ref e) if e.drop_reason() == DropReason::Rejected)
            );
        }
    }

    #[tokio::test]
    async fn transport_errors_retry_and_count_against_the_breaker() {
        let outcome = classify(Err(transport_error().await));
        assert!(matches!(
            outcome,
            HttpOutcome::Retry(RetryReason::NoAnswer(NoAnswer::Transport(_)))
        ));
        assert_eq!(outcome.label(), "transport_error");
        let attempt: Attempt<(), HttpError> = outcome.into();
        assert!(matches!(attempt, Attempt::Retry(ref e) if e.drop_reason() == DropReason::GaveUp));
    }

    #[tokio::test(start_paused = true)]
    async fn the_breaker_opens_after_its_failures_and_closes_after_the_cooldown() {
        let policy = BreakerPolicy {
            failures: 2,
            cooldown: Duration::from_secs(10),
        };
        let breaker = Breaker::default();
        let outcome = breaker
            .send(policy, || reqwest::Client::new().get("http://"))
            .await;
        assert!(matches!(outcome, HttpOutcome::Retry(_)));
        assert!(breaker.allow(), "one failure of two");
        breaker.record(&status(503), policy);
        assert!(!breaker.allow(), "open after two");
        let mut built = false;
        let outcome = breaker
            .send(policy, || {
                built = true;
                reqwest::Client::new().get("http://")
            })
            .await;
        assert!(matches!(outcome, HttpOutcome::CircuitOpen));
        assert!(!built, "no request is built while open");
        assert_eq!(outcome.label(), "circuit_open");
        let attempt: Attempt<(), HttpError> = outcome.into();
        assert!(
            matches!(attempt, Attempt::Fatal(ref e) if e.drop_reason() == DropReason::CircuitOpen)
        );
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(breaker.allow(), "the cooldown is over");
        breaker.record(&status(404), policy);
        breaker.record(&status(500), policy);
        assert!(breaker.allow(), "a rejection reset the count");
    }

    #[test]
    fn the_default_policy_is_five_failures_and_ten_seconds() {
        let p = BreakerPolicy::default();
        assert_eq!((p.failures, p.cooldown), (5, Duration::from_secs(10)));
    }
}

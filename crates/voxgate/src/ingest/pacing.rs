//! Read-side pacing: a connection's budget of messages and bytes per second (token buckets,
//! burst twice the rate). While a budget is spent the driver does not read the socket, so TCP
//! pushes back on the sender and its work per second stays within the budget; a fast but honest
//! sender (an upload, a catch-up after a reconnect) is slowed, not closed. Only a flood of tiny
//! messages is closed: one held back by the message budget whose messages averaged fewer than
//! `server.flood_min_message_bytes` bytes over the last burst.

use std::time::{Duration, Instant};

use crate::config::ServerConfig;

/// A token bucket that may go into debt (a message larger than the balance is read, and the
/// next read waits until the debt is repaid).
#[derive(Debug, Clone, Copy)]
struct Bucket {
    rate: f64,
    level: f64,
    last: Instant,
}

impl Bucket {
    fn new(rate: f64, now: Instant) -> Self {
        Self {
            rate,
            level: rate * 2.0,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.level = (self.level + dt * self.rate).min(self.rate * 2.0);
        self.last = now;
    }

    /// How long until the balance reaches `need`; `None` when it has.
    fn wait_for(&self, need: f64) -> Option<Duration> {
        (self.level < need).then(|| Duration::from_secs_f64((need - self.level) / self.rate))
    }
}

/// Which budget held a connection back (the `budget` label of `voxgate_paced_seconds_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Budget {
    Messages,
    Bytes,
}

impl Budget {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Messages => "messages",
            Self::Bytes => "bytes",
        }
    }
}

/// The connection sent a sustained flood of tiny messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flood {
    pub average_bytes: u64,
}

/// One connection's read budget.
#[derive(Debug)]
pub struct Pacer {
    messages: Bucket,
    bytes: Bucket,
    min_average: u64,
    /// Messages and bytes since the message budget last ran out.
    window_messages: u64,
    window_bytes: u64,
}

impl Pacer {
    pub fn new(cfg: &ServerConfig, now: Instant) -> Self {
        Self {
            messages: Bucket::new(cfg.max_messages_per_second, now),
            bytes: Bucket::new(cfg.max_bytes_per_second, now),
            min_average: cfg.flood_min_message_bytes as u64,
            window_messages: 0,
            window_bytes: 0,
        }
    }

    /// When the socket may be read again, and which budget holds it; `None`: now.
    pub fn ready_at(&mut self, now: Instant) -> Option<(Instant, Budget)> {
        self.messages.refill(now);
        self.bytes.refill(now);
        let by_messages = self.messages.wait_for(1.0).map(|d| (d, Budget::Messages));
        let by_bytes = self.bytes.wait_for(0.0).map(|d| (d, Budget::Bytes));
        let (wait, budget) = match (by_messages, by_bytes) {
            (Some(m), Some(b)) => {
                if m.0 >= b.0 {
                    m
                } else {
                    b
                }
            }
            (one, other) => one.or(other)?,
        };
        Some((now + wait, budget))
    }

    /// Charges one message (or Ping/Pong frame) of `len` bytes. `Err` when it ends a burst of
    /// messages that were, on average, too small to be anything but a flood.
    pub fn charge(&mut self, len: usize, now: Instant) -> Result<(), Flood> {
        self.messages.refill(now);
        self.bytes.refill(now);
        self.messages.level -= 1.0;
        self.bytes.level -= len as f64;
        self.window_messages += 1;
        self.window_bytes += len as u64;
        let burst = (self.messages.rate * 2.0) as u64;
        if self.messages.level >= 1.0 || self.window_messages < burst.max(1) {
            return Ok(());
        }
        let average = self.window_bytes / self.window_messages;
        self.window_messages = 0;
        self.window_bytes = 0;
        if average < self.min_average {
            return Err(Flood {
                average_bytes: average,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(msgs: f64, bytes: f64) -> ServerConfig {
        ServerConfig {
            max_messages_per_second: msgs,
            max_bytes_per_second: bytes,
            ..ServerConfig::default()
        }
    }

    #[test]
    fn a_fast_sender_waits_for_whichever_budget_is_spent() {
        let t = Instant::now();
        let mut p = Pacer::new(&cfg(10.0, 1000.0), t);
        assert!(p.ready_at(t).is_none());
        p.charge(2500, t).unwrap(); // 2000 bytes of burst: 500 bytes of debt
        let (at, budget) = p.ready_at(t).unwrap();
        assert_eq!(budget, Budget::Bytes);
        assert!((at - t).as_secs_f64() > 0.49 && (at - t).as_secs_f64() < 0.51);
        assert!(p.ready_at(t + Duration::from_millis(510)).is_none());
    }

    #[test]
    fn tiny_messages_that_exhaust_the_message_budget_are_a_flood() {
        let t = Instant::now();
        let mut p = Pacer::new(&cfg(10.0, 1e6), t);
        let mut result = Ok(());
        for _ in 0..20 {
            result = p.charge(1, t);
            if result.is_err() {
                break;
            }
        }
        assert_eq!(result, Err(Flood { average_bytes: 1 }));
        assert_eq!(p.ready_at(t).unwrap().1, Budget::Messages);
        // Big messages at the same rate are only paced.
        let mut p = Pacer::new(&cfg(10.0, 1e9), t);
        for _ in 0..100 {
            p.charge(640, t).unwrap();
        }
    }
}

//! Per-connection log budget for client-caused warnings: the first few in each interval are
//! logged at warn, the rest at debug (counted in `voxgate_log_lines_suppressed_total`), and the
//! next warn line says how many were lowered. Client-supplied text is always logged with `?`
//! (Debug-escaped), so a newline in it cannot forge a log line. The events themselves are counted
//! by `metrics::observe_event` whether or not they are logged.

use std::time::{Duration, Instant};

use metrics::counter;
use tracing::{debug, info, warn};
use voxgate_session::ServerEvent;

use crate::metrics as m;

/// Warn lines per connection per interval.
const PER_INTERVAL: u32 = 5;
const INTERVAL: Duration = Duration::from_secs(10);

/// One connection's budget.
#[derive(Debug)]
pub struct LogBudget {
    since: Instant,
    logged: u32,
    suppressed: u64,
}

impl LogBudget {
    pub fn new(now: Instant) -> Self {
        Self {
            since: now,
            logged: 0,
            suppressed: 0,
        }
    }

    /// `Some(lowered since the last warn line)` when this line may be logged at warn.
    fn admit(&mut self, now: Instant) -> Option<u64> {
        if now.saturating_duration_since(self.since) >= INTERVAL {
            self.since = now;
            self.logged = 0;
        }
        if self.logged < PER_INTERVAL {
            self.logged += 1;
            return Some(std::mem::take(&mut self.suppressed));
        }
        self.suppressed += 1;
        counter!(m::LOG_LINES_SUPPRESSED).increment(1);
        None
    }

    /// A client-caused warning: `what` is the log message, `detail` the (escaped) text.
    pub fn warn(
        &mut self,
        now: Instant,
        session: &str,
        what: &'static str,
        code: &str,
        detail: &str,
    ) {
        match self.admit(now) {
            Some(0) => warn!(session = %session, code, detail = ?detail, "{what}"),
            Some(lowered) => {
                warn!(session = %session, code, detail = ?detail, lowered, "{what} (earlier warnings of this connection were logged at debug)")
            }
            None => debug!(session = %session, code, detail = ?detail, "{what}"),
        }
    }

    /// Logs what an event sent to a client means to operators.
    pub fn event(&mut self, now: Instant, session: &str, event: &ServerEvent) {
        match event {
            ServerEvent::Warning { code, message } => match code.as_str() {
                "decode_error" => self.warn(now, session, "decode error", code, message),
                "decode_resynced" => self.warn(now, session, "demuxer resynced", code, message),
                "stream_truncated" => {
                    info!(session = %session, message = ?message, "stream ended inside an element");
                }
                _ => {}
            },
            ServerEvent::Error { code, message } => {
                self.warn(now, session, "error sent to client", code, message);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_few_lines_per_interval_then_debug() {
        let t = Instant::now();
        let mut b = LogBudget::new(t);
        let admitted = (0..20).filter(|_| b.admit(t).is_some()).count();
        assert_eq!(admitted, PER_INTERVAL as usize);
        assert_eq!(b.admit(t + INTERVAL), Some(20 - u64::from(PER_INTERVAL)));
    }
}

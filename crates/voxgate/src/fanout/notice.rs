//! What consumers tell their session: events (transcripts, backend warnings, Omi replies) and
//! requests to close (the bus buffer overflowed). The queue is bounded; a notice that does not
//! fit is dropped, counted in `voxgate_notices_dropped_total` and logged.

use std::time::Duration;

use metrics::counter;
use tokio::sync::mpsc;
use tracing::warn;
use voxgate_session::{CloseCode, ServerEvent};

use crate::metrics::NOTICES_DROPPED;

/// One message from a consumer to its session.
#[derive(Debug, Clone, PartialEq)]
pub enum Notice {
    /// An event for the client, the subscribers and the consumers after this one.
    Event(ServerEvent),
    /// Close the session: tell the client (`error`, `message`), flush, close with `code`.
    Close {
        code: CloseCode,
        error: &'static str,
        message: String,
    },
}

impl Notice {
    /// What the client reads of it.
    pub fn into_event(self) -> ServerEvent {
        match self {
            Self::Event(event) => event,
            Self::Close { error, message, .. } => ServerEvent::error(error, message),
        }
    }
}

/// The sending side, one clone per consumer that talks back.
#[derive(Clone)]
pub struct Notifier {
    tx: mpsc::Sender<Notice>,
}

/// The session's receiving side.
pub type NoticeRx = mpsc::Receiver<Notice>;

impl Notifier {
    /// A queue of `capacity` notices.
    pub fn channel(capacity: usize) -> (Self, NoticeRx) {
        let (tx, rx) = mpsc::channel(capacity);
        (Self { tx }, rx)
    }

    /// Queues an event without waiting; `false` when the queue was full (or the session gone):
    /// then it is counted and logged as dropped.
    pub fn offer(&self, event: ServerEvent) -> bool {
        self.queue(Notice::Event(event))
    }

    /// Asks the session to close; `false` when the request could not be queued (counted; the
    /// caller asks again later).
    pub fn close(&self, code: CloseCode, error: &'static str, message: impl Into<String>) -> bool {
        self.queue(Notice::Close {
            code,
            error,
            message: message.into(),
        })
    }

    /// Queues an event, waiting up to `wait` for room (for tasks, never for the ingest path).
    pub async fn send_within(&self, event: ServerEvent, wait: Duration) -> bool {
        match tokio::time::timeout(wait, self.tx.send(Notice::Event(event))).await {
            Ok(Ok(())) => true,
            Ok(Err(_)) => false, // the session has ended: nobody left to tell
            Err(_) => {
                dropped("queue_full");
                false
            }
        }
    }

    fn queue(&self, notice: Notice) -> bool {
        match self.tx.try_send(notice) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                dropped("queue_full");
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false, // the session has ended
        }
    }
}

fn dropped(reason: &'static str) {
    counter!(NOTICES_DROPPED, "reason" => reason).increment(1);
    warn!(reason, "session notice queue full; notice dropped");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_full_queue_drops_and_says_so() {
        let (n, mut rx) = Notifier::channel(1);
        assert!(n.offer(ServerEvent::warning("a", "1")));
        assert!(!n.offer(ServerEvent::warning("b", "2")), "full");
        assert!(
            !n.send_within(ServerEvent::warning("c", "3"), Duration::from_millis(10))
                .await
        );
        assert_eq!(
            rx.recv().await,
            Some(Notice::Event(ServerEvent::warning("a", "1")))
        );
        assert!(n.close(CloseCode::TryAgainLater, "bus_unavailable", "m"));
        let close = rx.recv().await.unwrap();
        assert_eq!(
            close.into_event(),
            ServerEvent::error("bus_unavailable", "m")
        );
        drop(rx);
        assert!(!n.offer(ServerEvent::warning("d", "4")), "session gone");
    }
}

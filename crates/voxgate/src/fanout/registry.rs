//! `Consumers`: one session's consumers in their fixed order, and its subscriber hub. The order
//! is data: consumers finish in the order they were added, and the `last` one (the bus
//! publisher) always finishes after every other, so it still sees their last events (the final
//! transcripts of speech-to-text) and publishes them.

use std::collections::VecDeque;
use std::sync::Arc;

use tokio::time::Instant;
use voxgate_session::{AudioChunk, CloseCode, ConsumerSummary, ServerEvent};

use super::subscribers::Hub;
use super::webhook::{Breakers, Target};
use super::{Consumer, NoticeRx, Notifier, Offer};
use crate::config::Config;

/// What building a consumer may need.
#[derive(Clone, Copy)]
pub struct BuildCtx<'a> {
    pub cfg: &'a Config,
    /// Whose audio this is.
    pub target: &'a Target,
    /// Where consumers send events back to the session.
    pub notifier: &'a Notifier,
    /// The HTTP client for the session's webhooks (guarded when the hook chose them).
    pub client: &'a reqwest::Client,
    pub breakers: &'a Breakers,
}

/// One session's consumers and subscribers.
pub struct Consumers {
    ordered: Vec<Box<dyn Consumer>>,
    /// Finished after all the others (the bus publisher).
    last: Option<Box<dyn Consumer>>,
    hub: Arc<Hub>,
}

/// What finishing the consumers left: their summaries, and the events they sent back while
/// finishing (for the subscribers and the client).
pub struct Finished {
    pub summaries: Vec<ConsumerSummary>,
    pub last_words: Vec<ServerEvent>,
}

impl Consumers {
    pub fn new(hub: Arc<Hub>) -> Self {
        Self {
            ordered: Vec::new(),
            last: None,
            hub,
        }
    }

    /// Adds a consumer after the ones already added.
    pub fn push(&mut self, consumer: Box<dyn Consumer>) {
        self.ordered.push(consumer);
    }

    /// Sets the consumer that finishes after every other.
    pub fn set_last(&mut self, consumer: Box<dyn Consumer>) {
        self.last = Some(consumer);
    }

    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    pub fn len(&self) -> usize {
        self.ordered.len() + usize::from(self.last.is_some())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn all(&mut self) -> impl Iterator<Item = &mut Box<dyn Consumer>> {
        self.ordered.iter_mut().chain(self.last.as_mut())
    }

    /// Whether anyone takes audio (a consumer or an audio subscriber).
    pub fn wants_audio(&self) -> bool {
        self.ordered
            .iter()
            .chain(&self.last)
            .any(|c| c.wants_audio())
            || self.hub.wants_audio()
    }

    /// Every consumer sees every event, except utterance boundaries (they drive per-utterance
    /// consumers): a consumer sees only its own party's (the mix's by default).
    pub fn on_event(&mut self, event: &ServerEvent) {
        let boundary = event.boundary_party();
        for c in self.all() {
            if boundary.is_none_or(|p| p == c.party()) {
                c.on_event(event);
            }
        }
    }

    /// Offers audio to the consumers that take it and to audio subscribers; calls `dropping`
    /// with the name of each consumer that starts dropping (once per episode).
    pub fn on_audio(&mut self, chunk: &AudioChunk, mut dropping: impl FnMut(&str)) {
        // A party's audio goes only to the consumers of that party; the rest take the mix.
        let wanted = |c: &&mut Box<dyn Consumer>| c.wants_audio() && c.party() == chunk.party;
        for c in self.all().filter(wanted) {
            if let Offer::Dropped { first: true } = c.on_audio(chunk) {
                dropping(c.name());
            }
        }
        if chunk.party.is_none() {
            self.hub.publish_audio(&chunk.pcm);
        }
    }

    /// Closes every consumer in order, each flushing until `deadline`; the events each one sends
    /// back while finishing reach the consumers after it.
    pub async fn finish_in_order(
        self,
        code: CloseCode,
        deadline: Instant,
        notices: &mut NoticeRx,
    ) -> Finished {
        let mut pending: VecDeque<Box<dyn Consumer>> = self.ordered.into();
        pending.extend(self.last);
        let mut finished = Finished {
            summaries: Vec::new(),
            last_words: Vec::new(),
        };
        while let Some(mut c) = pending.pop_front() {
            c.on_close(code);
            finished.summaries.push(c.finish(deadline).await);
            while let Ok(notice) = notices.try_recv() {
                // The session is already closing: a close request is only news now.
                let event = notice.into_event();
                for rest in pending.iter_mut() {
                    rest.on_event(&event);
                }
                finished.last_words.push(event);
            }
        }
        finished
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use std::pin::Pin;
    use std::sync::Mutex;

    /// Records what it saw into a shared log; on finish, optionally sends an event back.
    struct Probe {
        name: &'static str,
        log: Arc<Mutex<Vec<String>>>,
        says: Option<(Notifier, ServerEvent)>,
    }

    impl Consumer for Probe {
        fn name(&self) -> &str {
            self.name
        }
        fn wants_audio(&self) -> bool {
            false
        }
        fn on_audio(&mut self, _chunk: &AudioChunk) -> Offer {
            Offer::Accepted
        }
        fn on_event(&mut self, event: &ServerEvent) {
            self.log
                .lock()
                .unwrap()
                .push(format!("{} saw {}", self.name, event.to_json()));
        }
        fn finish(
            self: Box<Self>,
            _deadline: Instant,
        ) -> Pin<Box<dyn Future<Output = ConsumerSummary> + Send>> {
            self.log
                .lock()
                .unwrap()
                .push(format!("{} finished", self.name));
            if let Some((tx, event)) = &self.says {
                assert!(tx.offer(event.clone()));
            }
            let name = self.name.to_owned();
            Box::pin(async move {
                ConsumerSummary {
                    name,
                    kind: "probe".into(),
                    delivered_bytes: 0,
                    dropped_bytes: 0,
                    requests: 0,
                    next_seq: 0,
                }
            })
        }
    }

    #[tokio::test]
    async fn the_last_consumer_finishes_last_and_hears_the_others_last_words() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, mut rx) = Notifier::channel(4);
        let probe = |name, says| {
            Box::new(Probe {
                name,
                log: log.clone(),
                says,
            })
        };
        let mut consumers = Consumers::new(Arc::new(Hub::new(1, 1, String::new())));
        consumers.set_last(probe("bus", None));
        consumers.push(probe(
            "stt",
            Some((tx.clone(), ServerEvent::warning("w", "final"))),
        ));
        consumers.push(probe("webhook", None));
        assert_eq!(consumers.len(), 3);
        let done = consumers
            .finish_in_order(CloseCode::Normal, Instant::now(), &mut rx)
            .await;
        let names: Vec<_> = done.summaries.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["stt", "webhook", "bus"]);
        assert_eq!(done.last_words.len(), 1);
        let log = log.lock().unwrap();
        assert_eq!(log[0], "stt finished");
        assert!(log[1].starts_with("webhook saw"), "{log:?}");
        assert!(log[2].starts_with("bus saw"), "{log:?}");
        assert_eq!(log[3], "webhook finished");
        assert_eq!(log[4], "bus finished");
    }
}

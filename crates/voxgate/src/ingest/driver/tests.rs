//! The connection loop driven through a fake socket (channels), a real session and a probe
//! consumer: what the client reads and how the connection closes.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use futures_util::{sink, stream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::error::{CapacityError, Error as WsError};
use tokio_util::sync::CancellationToken;
use voxgate_media::SourceFormat;
use voxgate_session::{AudioChunk, ConsumerSummary, SessionConfig};

use super::*;
use crate::config::Config;
use crate::fanout::{Consumer, Notifier, Offer};
use crate::ingest::frontends::listen::Listen;

type Inbox = mpsc::Sender<Result<Message, axum::Error>>;

/// Counts the audio samples it is offered; with `closer`, asks to close at the first chunk.
struct Probe {
    samples: Arc<Mutex<u64>>,
    closer: Option<Notifier>,
}

impl Consumer for Probe {
    fn name(&self) -> &str {
        "probe"
    }
    fn on_audio(&mut self, chunk: &AudioChunk) -> Offer {
        *self.samples.lock().unwrap() += chunk.pcm.len() as u64;
        if let Some(n) = self.closer.take() {
            n.close(CloseCode::TryAgainLater, "bus_unavailable", "buffer full");
        }
        Offer::Accepted
    }
    fn finish(
        self: Box<Self>,
        _deadline: Instant,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ConsumerSummary> + Send>> {
        Box::pin(async {
            ConsumerSummary {
                name: "probe".into(),
                kind: "probe".into(),
                delivered_bytes: 0,
                dropped_bytes: 0,
                requests: 0,
                next_seq: 0,
            }
        })
    }
}

struct Run {
    inbox: Inbox,
    outbox: mpsc::Receiver<Message>,
    samples: Arc<Mutex<u64>>,
    task: tokio::task::JoinHandle<()>,
}

/// A linear16 session on a fake socket whose writer holds `outbox` messages.
fn start(cfg: Config, client_queue: usize, outbox: usize, closer: bool) -> Run {
    let shared = Shared::new(cfg, CancellationToken::new(), None).unwrap();
    let (inbox, in_rx) = mpsc::channel(256);
    let reader = stream::unfold(
        in_rx,
        |mut rx| async move { rx.recv().await.map(|m| (m, rx)) },
    );
    let (out_tx, out_rx) = mpsc::channel(outbox);
    let writer = sink::unfold(out_tx, |tx, msg: Message| async move {
        tx.send(msg)
            .await
            .map_err(|_| axum::Error::new("test reader gone"))?;
        Ok::<_, axum::Error>(tx)
    });
    let client = ClientIo::start(Box::pin(writer), Box::pin(reader), client_queue);
    let source = SourceFormat::Linear16 {
        sample_rate: 16_000,
        channels: 1,
    };
    let session = Session::new(SessionConfig::new("t", source)).unwrap();
    let hub = Arc::new(Hub::new(1, 1, String::new()));
    let (notifier, notices) = Notifier::channel(8);
    let samples = Arc::new(Mutex::new(0));
    let mut consumers = Consumers::new(hub.clone());
    consumers.push(Box::new(Probe {
        samples: samples.clone(),
        closer: closer.then_some(notifier),
    }));
    let parts = Parts {
        session,
        consumers,
        notices,
        resume: None,
        guards: Guards {
            session: shared.sessions.register("", "t", hub).unwrap(),
            resumable: None,
            user_slot: None,
            permit: shared.permits.clone().try_acquire_owned().unwrap(),
        },
    };
    let frontend = Box::new(Listen::new(&HashMap::new()));
    let conn = Connection::new(shared.clone(), Endpoint::Listen, client, parts, frontend);
    Run {
        inbox,
        outbox: out_rx,
        samples,
        task: tokio::spawn(conn.run()),
    }
}

fn audio(seconds: u64) -> Message {
    Message::Binary(vec![0u8; (seconds * 32_000) as usize].into())
}

fn text(s: &str) -> Message {
    Message::Text(s.into())
}

/// Reads what the client got until the close frame: (event types, error codes, close code).
async fn read_all(run: &mut Run) -> (Vec<String>, Vec<String>, u16) {
    let (mut types, mut errors) = (Vec::new(), Vec::new());
    while let Some(msg) = run.outbox.recv().await {
        match msg {
            Message::Text(t) => {
                let v: serde_json::Value = serde_json::from_str(t.as_str()).unwrap();
                types.push(v["type"].as_str().unwrap().to_owned());
                if v["type"] == "Error" {
                    errors.push(v["code"].as_str().unwrap().to_owned());
                }
            }
            Message::Close(frame) => {
                let code = frame.map_or(0, |f| f.code);
                // The driver waits for the peer's close (or the socket's end).
                drop(run.inbox.send(Ok(Message::Close(None))).await);
                return (types, errors, code);
            }
            _ => {}
        }
    }
    (types, errors, 0)
}

#[tokio::test]
async fn audio_reaches_the_consumer_and_close_stream_closes_normally() {
    let mut run = start(Config::default(), 64, 64, false);
    run.inbox.send(Ok(audio(2))).await.unwrap();
    run.inbox
        .send(Ok(text(r#"{"type":"CloseStream"}"#)))
        .await
        .unwrap();
    let (types, errors, code) = read_all(&mut run).await;
    run.task.await.unwrap();
    assert_eq!(code, 1000);
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(types.first().map(String::as_str), Some("Started"));
    assert_eq!(types.last().map(String::as_str), Some("Closed"));
    assert_eq!(*run.samples.lock().unwrap(), 32_000);
}

#[tokio::test]
async fn a_flood_of_tiny_messages_closes_with_1008() {
    let mut cfg = Config::default();
    cfg.server.max_messages_per_second = 2.0; // a burst of 4
    let mut run = start(cfg, 64, 64, false);
    for _ in 0..10 {
        run.inbox
            .send(Ok(Message::Binary(Vec::new().into())))
            .await
            .unwrap();
    }
    let (_, errors, code) = read_all(&mut run).await;
    run.task.await.unwrap();
    assert_eq!((errors, code), (vec!["message_flood".to_owned()], 1008));
}

#[tokio::test]
async fn an_oversized_message_is_told_and_closed_with_1009() {
    let mut run = start(Config::default(), 64, 64, false);
    let too_long = WsError::Capacity(CapacityError::MessageTooLong {
        size: 2,
        max_size: 1,
    });
    run.inbox
        .send(Err(axum::Error::new(too_long)))
        .await
        .unwrap();
    let (_, errors, code) = read_all(&mut run).await;
    run.task.await.unwrap();
    assert_eq!((errors, code), (vec!["message_too_large".to_owned()], 1009));
}

#[tokio::test]
async fn a_consumers_close_request_closes_with_its_code() {
    let mut run = start(Config::default(), 64, 64, true);
    run.inbox.send(Ok(audio(1))).await.unwrap();
    let (_, errors, code) = read_all(&mut run).await;
    run.task.await.unwrap();
    assert_eq!((errors, code), (vec!["bus_unavailable".to_owned()], 1013));
}

#[tokio::test]
async fn a_client_that_does_not_read_is_closed() {
    // The writer holds 1 message and the queue 2: ten Progress events cannot fit.
    let run = start(Config::default(), 2, 1, false);
    for _ in 0..10 {
        run.inbox.send(Ok(audio(1))).await.unwrap();
    }
    tokio::time::timeout(Duration::from_secs(10), run.task)
        .await
        .expect("the connection closes by itself")
        .unwrap();
    let samples = *run.samples.lock().unwrap();
    // Closed after a few messages: what was received by then reached the consumer.
    assert!((16_000..160_000).contains(&samples), "{samples}");
}

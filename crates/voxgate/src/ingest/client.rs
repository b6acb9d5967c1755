//! The client side of a connection: the socket's read half, and a writer task behind a bounded
//! queue. A client that does not read its events fills the queue and is marked slow (the driver
//! closes it); a client that went away is marked gone (nothing more is written to it). A resumed
//! session hands the writer the new socket's sink. Every write has a deadline, and the writer is
//! aborted when its session ends, so a client that never reads cannot keep its socket.

use std::pin::Pin;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use metrics::counter;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::warn;

use crate::metrics as m;

/// The write half of a client socket (a WebSocket's, or a test's channel).
pub type WsSink = Pin<Box<dyn Sink<Message, Error = axum::Error> + Send>>;
/// The read half of a client socket.
pub type WsStream = Pin<Box<dyn Stream<Item = Result<Message, axum::Error>> + Send>>;

/// Splits an upgraded socket into its halves.
pub fn split(socket: WebSocket) -> (WsSink, WsStream) {
    let (sink, stream) = socket.split();
    (Box::pin(sink), Box::pin(stream))
}

/// How long the close waits for the writer to send what is queued; then it is aborted.
const WRITER_JOIN: Duration = Duration::from_secs(5);
/// How long one write (or close) to a client socket may take; a client that does not read for
/// this long is treated as gone.
pub const SEND_DEADLINE: Duration = Duration::from_secs(5);

/// Sends `msg` within `SEND_DEADLINE`; `false` when the socket failed or the deadline passed.
pub async fn send_within(sink: &mut WsSink, msg: Message) -> bool {
    matches!(
        tokio::time::timeout(SEND_DEADLINE, sink.send(msg)).await,
        Ok(Ok(()))
    )
}

/// Closes `sink` within `SEND_DEADLINE`.
async fn close_within(sink: &mut WsSink) {
    let _ = tokio::time::timeout(SEND_DEADLINE, sink.close()).await;
}

/// One client's I/O: read half, writer task, bounded out queue, and the slow/gone flags.
pub struct ClientIo {
    pub stream: WsStream,
    out_tx: mpsc::Sender<Message>,
    sink_tx: mpsc::Sender<WsSink>,
    writer: JoinHandle<()>,
    /// The socket closed or broke: nothing more is written to it.
    pub gone: bool,
    /// The out queue was full: the client does not read its events.
    pub slow: bool,
}

impl ClientIo {
    /// Starts the writer with a queue of `queue` messages.
    pub fn start(sink: WsSink, stream: WsStream, queue: usize) -> Self {
        let (out_tx, out_rx) = mpsc::channel::<Message>(queue);
        let (sink_tx, sink_rx) = mpsc::channel::<WsSink>(1);
        let writer = tokio::spawn(write_loop(sink, out_rx, sink_rx));
        Self {
            stream,
            out_tx,
            sink_tx,
            writer,
            gone: false,
            slow: false,
        }
    }

    /// Queues a message without waiting; a full queue marks the client slow.
    pub fn send(&mut self, msg: Message) {
        if !self.gone && self.out_tx.try_send(msg).is_err() {
            self.slow = true;
        }
    }

    /// Takes a reconnected client's socket: reads from it, and the writer writes to it.
    pub async fn reattach(&mut self, socket: WebSocket) -> bool {
        let (sink, stream) = split(socket);
        self.stream = stream;
        self.gone = false;
        self.sink_tx.send(sink).await.is_ok()
    }

    /// Sends the last events (the protocol's form of `Closed`) and the close frame (unless the client is gone), waits for the
    /// writer, and reads until the peer's close so the frame is not lost to a TCP reset.
    pub async fn goodbye(mut self, last: Vec<Message>, code: u16, reason: &str, session: &str) {
        if !self.gone {
            for msg in last {
                if self.out_tx.try_send(msg).is_err() {
                    counter!(m::CLIENT_ERRORS, "code" => "closed_undelivered").increment(1);
                    warn!(
                        session = %session,
                        "client event queue full; Closed not delivered to the client"
                    );
                }
            }
            // A full queue was counted just above; the writer still closes the socket when
            // `out_tx` drops, only without this code and reason.
            let _ = self.out_tx.try_send(Message::Close(Some(CloseFrame {
                code,
                reason: truncate_reason(reason).into(),
            })));
        }
        drop(self.out_tx);
        // A writer stuck on a client that does not read is aborted, not detached: its socket
        // half is dropped with it.
        if tokio::time::timeout(WRITER_JOIN, &mut self.writer)
            .await
            .is_err()
        {
            self.writer.abort();
            counter!(m::CLIENT_ERRORS, "code" => "writer_aborted").increment(1);
        }
        if !self.gone {
            await_peer_close(&mut self.stream).await;
        }
    }
}

/// Writes queued messages to the current sink until a close frame or the queue ends.
async fn write_loop(
    sink: WsSink,
    mut out_rx: mpsc::Receiver<Message>,
    mut sink_rx: mpsc::Receiver<WsSink>,
) {
    let mut sink = Some(sink);
    loop {
        tokio::select! {
            biased;
            Some(new) = sink_rx.recv() => {
                if let Some(mut old) = sink.replace(new) {
                    close_within(&mut old).await;
                }
            }
            msg = out_rx.recv() => {
                let Some(msg) = msg else { break };
                let is_close = matches!(msg, Message::Close(_));
                if let Some(s) = sink.as_mut() {
                    if !send_within(s, msg).await {
                        sink = None; // gone; events wait for nobody until a resume
                    }
                }
                if is_close {
                    break;
                }
            }
        }
    }
    if let Some(mut s) = sink {
        close_within(&mut s).await;
    }
}

/// After our Close frame, reads until the peer's Close (or a short timeout), so that closing the
/// TCP connection with unread client data does not reset it and lose the Close frame.
pub async fn await_peer_close(stream: &mut WsStream) {
    let _ = tokio::time::timeout(Duration::from_secs(3), async {
        loop {
            match stream.next().await {
                Some(Ok(Message::Close(_))) | None => break,
                Some(Ok(_)) => {}
                Some(Err(_)) => {
                    // The read side is unusable (e.g. an oversized message); linger briefly so
                    // the peer reads our Close before the connection is torn down.
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    break;
                }
            }
        }
    })
    .await;
}

/// A close reason must fit in a control frame (123 bytes).
pub fn truncate_reason(reason: &str) -> String {
    let mut end = reason.len().min(120);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    reason[..end].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_reasons_fit_a_control_frame_on_a_char_boundary() {
        assert_eq!(truncate_reason("short"), "short");
        let long = "é".repeat(100); // 200 bytes
        let t = truncate_reason(&long);
        assert!(t.len() <= 120 && long.starts_with(&t));
    }
}

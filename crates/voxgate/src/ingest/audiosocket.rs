//! The Asterisk AudioSocket listener (`carriers.audiosocket_listen`): plain TCP, one call per
//! connection. Each connection is adapted to the socket halves the ingest pipeline reads (every
//! frame a binary message, its length capped by `carriers.audiosocket_max_frame_bytes`; what
//! the session writes: binary as is, text dropped, the close as a hangup frame), then runs
//! through the same accept → prepare → driver path as a WebSocket.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::ws::Message;
use metrics::counter;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tracing::{info, warn};

use super::client::{WsSink, WsStream};
use super::frontends::carrier::audiosocket::{self, KIND_HANGUP, KIND_TOO_LARGE};
use super::request::{Carrier, ConnectRequest, Endpoint};
use crate::metrics as m;
use crate::shared::Shared;

/// Accepts AudioSocket calls until shutdown.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "AudioSocket listening");
    }
    loop {
        let accepted = tokio::select! {
            () = shared.shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((tcp, peer)) => {
                let shared2 = shared.clone();
                shared.tracker.spawn(call(shared2, tcp, peer));
            }
            Err(e) => {
                counter!(m::CONNECTIONS_REFUSED, "reason" => "accept_error").increment(1);
                warn!(error = %e, "AudioSocket accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

/// One call: the TCP halves as socket halves, then the ingest path.
async fn call(shared: Arc<Shared>, tcp: TcpStream, peer: SocketAddr) {
    let _ = tcp.set_nodelay(true);
    let (read, write) = tcp.into_split();
    let max = shared.cfg.carriers.audiosocket_max_frame_bytes;
    let (mut sink, mut stream) = (writer(write), reader(read, max));
    let endpoint = Endpoint::Carrier(Carrier::AudioSocket);
    let req = ConnectRequest::parse(endpoint, peer, None, Default::default());
    let accepted = audiosocket::accept(&shared, &mut sink, &mut stream, req).await;
    super::run_accepted(shared, sink, stream, accepted).await;
}

/// Frames as binary messages (kind, length and payload); a length over `max` becomes one
/// `KIND_TOO_LARGE` note and the end of the stream.
fn reader(read: OwnedReadHalf, max: usize) -> WsStream {
    let state = (read, max, false);
    Box::pin(futures_util::stream::unfold(
        state,
        |(mut read, max, done)| async move {
            if done {
                return None;
            }
            let mut head = [0u8; 3];
            read.read_exact(&mut head).await.ok()?;
            let len = usize::from(u16::from_be_bytes([head[1], head[2]]));
            if len > max {
                let mut note = vec![KIND_TOO_LARGE, 0, 4];
                note.extend_from_slice(&(len as u32).to_be_bytes());
                return Some((Ok(Message::Binary(note.into())), (read, max, true)));
            }
            let mut frame = vec![0u8; 3 + len];
            frame[..3].copy_from_slice(&head);
            read.read_exact(&mut frame[3..]).await.ok()?;
            Some((Ok(Message::Binary(frame.into())), (read, max, false)))
        },
    ))
}

/// Writes binary messages as they are, drops text (AudioSocket has none) and answers the
/// close with a hangup frame.
fn writer(write: OwnedWriteHalf) -> WsSink {
    let sink = futures_util::sink::unfold(write, |mut write, msg: Message| async move {
        let result = match msg {
            Message::Binary(data) => write.write_all(&data).await,
            Message::Close(_) => match write.write_all(&[KIND_HANGUP, 0, 0]).await {
                Ok(()) => write.shutdown().await,
                Err(e) => Err(e),
            },
            _ => Ok(()),
        };
        result.map(|()| write).map_err(axum::Error::new)
    });
    Box::pin(sink)
}

/// Binds the listener when `carriers.audiosocket_listen` is set.
pub async fn bind(shared: &Shared) -> anyhow::Result<Option<TcpListener>> {
    let Some(addr) = &shared.cfg.carriers.audiosocket_listen else {
        return Ok(None);
    };
    Ok(Some(TcpListener::bind(addr).await.map_err(|e| {
        anyhow::anyhow!("carriers.audiosocket_listen {addr}: {e}")
    })?))
}

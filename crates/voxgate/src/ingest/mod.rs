//! Ingest: everything between an HTTP upgrade and a running `Connection`.
//!
//! The data path, one file per step:
//! socket → `frontends/*` (`accept`: the wire protocol becomes a `ConnectRequest` and a
//! `Frontend`) → `prepare` (admission, identity, consumer plan, session config, registration,
//! consumers) → `driver` (`Connection::run`: frontend actions in, session outputs out) →
//! `fanout::registry` (`Consumers`) → each consumer's own bounded queue and worker.

pub mod admission;
pub mod audiosocket;
pub mod client;
pub mod driver;
pub mod frontends;
pub mod handoff;
pub mod hook;
pub mod identity;
pub mod log_budget;
pub mod pacing;
pub mod plan;
pub mod prepare;
pub mod refusal;
pub mod request;
pub mod resume;
pub mod session_config;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::ws::{WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, Query, State};
use axum::http::{HeaderMap, HeaderValue};
use axum::response::Response;
use axum::routing::get;
use axum::Router;

use self::client::ClientIo;
use self::driver::Connection;
use self::frontends::{deepgram, listen::Listen, realtime, Accept, Frontend};
use self::refusal::refuse;
use self::request::{Carrier, ConnectRequest, Endpoint};
use crate::auth::bearer;
use crate::shared::Shared;

/// Bytes read from a socket at a time (tungstenite's default is 128 KiB per connection).
pub const WS_READ_BUFFER: usize = 4096;

/// The ingest routes.
pub fn routes() -> Router<Arc<Shared>> {
    let mut router = Router::new();
    for carrier in Carrier::WEBSOCKET {
        router = router.route(
            &format!("/v1/{}", carrier.as_str()),
            get(move |r: IngestRequest| async move { upgrade(Endpoint::Carrier(carrier), r) }),
        );
    }
    router
        .route(
            "/v1/listen",
            get(|r: IngestRequest| async { upgrade(Endpoint::Listen, r) }),
        )
        .route(
            "/v1/realtime",
            get(|r: IngestRequest| async { upgrade(Endpoint::Realtime, r) }),
        )
        .route(
            "/v1/twilio",
            get(|r: IngestRequest| async { upgrade(Endpoint::Twilio, r) }),
        )
        .route(
            "/v1/trigger/listen",
            get(|r: IngestRequest| async { upgrade(Endpoint::Omi, r) }),
        )
}

/// The extractors every ingest endpoint takes (one tuple extractor).
type IngestRequest = (
    State<Arc<Shared>>,
    ConnectInfo<SocketAddr>,
    Query<HashMap<String, String>>,
    HeaderMap,
    WebSocketUpgrade,
);

/// Upgrades an ingest connection with the size and buffer limits, tracked for shutdown.
/// `/v1/listen` speaks Deepgram's protocol to Deepgram clients (`frontends::deepgram::chosen`),
/// admitted before the upgrade.
fn upgrade(endpoint: Endpoint, request: IngestRequest) -> Response {
    let (State(shared), ConnectInfo(peer), Query(query), headers, ws) = request;
    let max = shared.cfg.server.max_message_bytes;
    let ws = ws
        .max_message_size(max)
        .max_frame_size(max)
        // tungstenite's default 128 KiB read buffer per socket dominated idle memory.
        .read_buffer_size(WS_READ_BUFFER)
        .write_buffer_size(0);
    let dialect = shared.cfg.deepgram.dialect;
    if endpoint == Endpoint::Listen && deepgram::chosen(dialect, &headers, &query) {
        let (req, frontend) = match deepgram::handshake(&shared, peer, &headers, query) {
            Ok(accepted) => accepted,
            Err(response) => return *response,
        };
        let id = HeaderValue::from_str(frontend.request_id()).ok();
        let mut response = ws
            .protocols(deepgram::SUBPROTOCOLS)
            .on_upgrade(move |socket| {
                let tracker = shared.tracker.clone();
                tracker.track_future(serve_connection(
                    shared,
                    socket,
                    req,
                    Built::Ready(Box::new(frontend)),
                ))
            });
        if let Some(id) = id {
            response.headers_mut().insert("dg-request-id", id);
        }
        return response;
    }
    if endpoint == Endpoint::Realtime {
        let (req, frontend) = match realtime::handshake(&shared, peer, &headers, query) {
            Ok(accepted) => accepted,
            Err(response) => return *response,
        };
        let built = Built::Realtime(Box::new(frontend));
        return ws
            .protocols([realtime::SUBPROTOCOL])
            .on_upgrade(move |socket| {
                let tracker = shared.tracker.clone();
                tracker.track_future(serve_connection(shared, socket, req, built))
            });
    }
    let token = bearer(&headers).or_else(|| query.get("token").cloned());
    let req = ConnectRequest::parse(endpoint, peer, token, query);
    // jambonz and mod_audio_fork offer their own subprotocol and expect it echoed.
    let ws = match endpoint {
        Endpoint::Carrier(c) => match frontends::carrier::l16::subprotocol(c) {
            Some(protocol) => ws.protocols([protocol]),
            None => ws,
        },
        _ => ws,
    };
    ws.on_upgrade(move |socket| {
        let tracker = shared.tracker.clone();
        tracker.track_future(serve_connection(shared, socket, req, Built::None))
    })
}

/// What the handshake already built for a connection.
enum Built {
    None,
    /// A frontend ready for its session.
    Ready(Box<dyn Frontend>),
    /// A Realtime frontend whose `accept` still reads the first `session.update`.
    Realtime(Box<realtime::frontend::Realtime>),
}

/// One upgraded socket: its frontend accepts it (or was built at the handshake), `prepare`
/// builds the session, the driver runs.
async fn serve_connection(
    shared: Arc<Shared>,
    socket: WebSocket,
    mut req: ConnectRequest,
    built: Built,
) {
    if req.endpoint == Endpoint::Listen {
        if let Some(ask) = req.reattach.take() {
            return resume::reattach(&shared, socket, &req, ask).await;
        }
    }
    let (mut sink, mut stream) = client::split(socket);
    let accepted = match (built, req.endpoint) {
        (Built::Ready(frontend), _) => Accept::Session(req, frontend),
        (Built::Realtime(rt), _) => {
            realtime::accept(&shared, &mut sink, &mut stream, req, *rt).await
        }
        (Built::None, Endpoint::Listen | Endpoint::Deepgram | Endpoint::Realtime) => {
            let frontend = Box::new(Listen::new(&req.raw_query));
            Accept::Session(req, frontend)
        }
        (Built::None, Endpoint::Twilio) => {
            frontends::twilio::accept(&shared, &mut sink, &mut stream, req).await
        }
        (Built::None, Endpoint::Omi) => {
            let draining = shared.shutdown.is_cancelled();
            frontends::omi::accept(&shared.cfg, draining, Some(&shared.omi_timelines), req)
        }
        (Built::None, Endpoint::Carrier(carrier)) => {
            frontends::carrier::accept(&shared, &mut sink, &mut stream, req, carrier).await
        }
    };
    run_accepted(shared, sink, stream, accepted).await;
}

/// What a frontend accepted: refused, or prepared and driven to its end.
async fn run_accepted(
    shared: Arc<Shared>,
    sink: client::WsSink,
    stream: client::WsStream,
    accepted: Accept,
) {
    let (req, mut frontend) = match accepted {
        Accept::Session(req, frontend) => (req, frontend),
        Accept::Refuse(req, refusal) => return refuse(sink, stream, req.peer, refusal, None).await,
        Accept::Done => return,
    };
    match prepare::prepare(&shared, &req, &mut *frontend).await {
        Ok(parts) => {
            let queue = shared.cfg.server.client_queue_messages;
            let client = ClientIo::start(sink, stream, queue);
            Connection::new(shared.clone(), req.endpoint, client, parts, frontend)
                .run()
                .await
        }
        Err(refusal) => {
            let first = frontend.render_refusal(&refusal.event());
            refuse(sink, stream, req.peer, refusal, Some(first)).await
        }
    }
}

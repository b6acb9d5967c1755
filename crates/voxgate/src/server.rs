//! The listener: routes, shared state, admission, graceful shutdown.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use metrics::{counter, gauge};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::config::Config;
use crate::connection::{self, ListenParams};
use crate::fanout::subscribers::{Hub, SubMessage};
use crate::fanout::webhook::Breakers;
use crate::metrics::{self as m, SESSIONS_REJECTED, SUBSCRIBERS_ACTIVE};

/// Bytes read from a socket at a time (tungstenite's default is 128 KiB per connection).
const WS_READ_BUFFER: usize = 4096;

/// State shared by every connection.
pub struct AppState {
    pub cfg: Config,
    pub metrics: PrometheusHandle,
    pub http: reqwest::Client,
    pub breakers: Breakers,
    /// Speech-to-text backends: concurrency limits and health, shared by all sessions.
    pub stt: crate::fanout::stt::Registry,
    pub sessions: Mutex<HashMap<String, Arc<Hub>>>,
    pub permits: Arc<Semaphore>,
    pub shutdown: CancellationToken,
    pub tracker: TaskTracker,
    pub ready: AtomicBool,
    /// For webhooks from the `on_connect` hook: guarded DNS, no redirects.
    pub http_guarded: reqwest::Client,
    pub auth: crate::auth::Authenticator,
    pub rate: crate::auth::RateLimiter,
    pub users: crate::auth::UserSessions,
    /// Live resumable sessions: resume token and the channel that hands them a new socket.
    pub resumable:
        Mutex<HashMap<String, (String, tokio::sync::mpsc::Sender<connection::Reattach>)>>,
    /// The delivery bus, when `[bus] url` is set.
    pub bus: Option<crate::bus::Bus>,
}

impl AppState {
    pub fn new(
        cfg: Config,
        shutdown: CancellationToken,
        bus: Option<crate::bus::Bus>,
    ) -> anyhow::Result<Arc<Self>> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .pool_idle_timeout(Duration::from_secs(30))
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        let http_guarded = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .pool_idle_timeout(Duration::from_secs(30))
            .redirect(reqwest::redirect::Policy::none())
            .dns_resolver(Arc::new(crate::policy::GuardedResolver {
                policy: Arc::new(cfg.webhook_policy.clone()),
            }))
            .build()?;
        let auth = crate::auth::Authenticator::new(&cfg.auth, &cfg.server.listen);
        let rate = crate::auth::RateLimiter::new(cfg.auth.connections_per_ip_per_second);
        let stt = crate::fanout::stt::Registry::new(&cfg.stt);
        Ok(Arc::new(Self {
            permits: Arc::new(Semaphore::new(cfg.server.max_sessions)),
            cfg,
            metrics: m::install(),
            http,
            breakers: Breakers::default(),
            stt,
            sessions: Mutex::new(HashMap::new()),
            shutdown,
            tracker: TaskTracker::new(),
            ready: AtomicBool::new(true),
            http_guarded,
            auth,
            rate,
            users: crate::auth::UserSessions::default(),
            resumable: Mutex::new(HashMap::new()),
            bus,
        }))
    }

    pub fn hub(&self, id: &str) -> Option<Arc<Hub>> {
        self.sessions
            .lock()
            .expect("session map lock is never poisoned")
            .get(id)
            .cloned()
    }
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/", get(index))
        .route(
            "/v1/listen",
            get(|r: IngestRequest| async { ingest("listen", r) }),
        )
        .route(
            "/v1/twilio",
            get(|r: IngestRequest| async { ingest("twilio", r) }),
        )
        .route(
            "/v1/trigger/listen",
            get(|r: IngestRequest| async { ingest("omi", r) }),
        )
        .route("/v1/sessions/{id}/subscribe", get(subscribe))
        .route("/metrics", get(metrics_page))
        .route("/livez", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(state)
}

/// Serves until `shutdown` is cancelled, then drains sessions within the grace period.
pub async fn run(
    cfg: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let grace = Duration::from_secs_f64(cfg.server.shutdown_grace_seconds);
    let bus = match &cfg.bus.url {
        None => None,
        Some(url) => {
            info!(%url, "connecting to the delivery bus");
            Some(crate::bus::Bus::connect(&cfg.bus, "voxgate-gateway").await?)
        }
    };
    let state = AppState::new(cfg, shutdown.clone(), bus)?;
    let app = router(state.clone()).into_make_service_with_connect_info::<SocketAddr>();
    info!(addr = %listener.local_addr()?, "voxgate listening");
    let stop = shutdown.clone();
    let drain_state = state.clone();
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            stop.cancelled().await;
            drain_state.ready.store(false, Ordering::SeqCst);
            info!("shutdown: no longer accepting; flushing sessions");
        })
        .await?;
    state.tracker.close();
    if tokio::time::timeout(grace, state.tracker.wait())
        .await
        .is_err()
    {
        warn!(
            remaining = state.tracker.len(),
            "shutdown grace period over; exiting with sessions still flushing"
        );
    }
    info!("voxgate stopped");
    Ok(())
}

async fn index() -> Html<&'static str> {
    Html(include_str!("../assets/index.html"))
}

async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    // With a bus, a gateway that cannot reach it takes no new sessions (their audio could only
    // fill bounded buffers): the load balancer sends them to one that can.
    let bus_up = state.bus.as_ref().is_none_or(|b| b.is_connected());
    if let Some(bus) = &state.bus {
        gauge!(m::BUS_CONNECTED).set(if bus.is_connected() { 1.0 } else { 0.0 });
    }
    if !bus_up {
        return (StatusCode::SERVICE_UNAVAILABLE, "bus disconnected").into_response();
    }
    if state.ready.load(Ordering::SeqCst) && !state.shutdown.is_cancelled() {
        // Detail lines (speech-to-text backend health) follow; a failing backend degrades
        // transcripts, not ingest, so it does not make the instance unready.
        let mut body = String::from("ready");
        for line in state.stt.health_lines() {
            body.push('\n');
            body.push_str(&line);
        }
        (StatusCode::OK, body).into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down").into_response()
    }
}

async fn metrics_page(State(state): State<Arc<AppState>>) -> Response {
    (
        [("content-type", "text/plain; version=0.0.4")],
        m::render(&state.metrics),
    )
        .into_response()
}

/// The extractors every ingest endpoint takes (one tuple extractor).
type IngestRequest = (
    State<Arc<AppState>>,
    ConnectInfo<SocketAddr>,
    Query<HashMap<String, String>>,
    HeaderMap,
    WebSocketUpgrade,
);

/// Upgrades an ingest connection with the size and buffer limits, tracked for shutdown.
fn ingest(endpoint: &'static str, request: IngestRequest) -> Response {
    let (State(state), ConnectInfo(peer), Query(query), headers, ws) = request;
    let token = bearer(&headers).or_else(|| query.get("token").cloned());
    let params = ListenParams {
        endpoint,
        query,
        token,
        peer,
    };
    let max = state.cfg.server.max_message_bytes;
    ws.max_message_size(max)
        .max_frame_size(max)
        // tungstenite's default 128 KiB read buffer per socket dominated idle memory.
        .read_buffer_size(WS_READ_BUFFER)
        .write_buffer_size(0)
        .on_upgrade(move |socket| {
            let tracker = state.tracker.clone();
            tracker.track_future(async move {
                match endpoint {
                    "twilio" => crate::twilio::run(state, socket, params).await,
                    "omi" => crate::omi::run(state, socket, params).await,
                    _ if params.query.contains_key("resume") => {
                        connection::resume(state, socket, params).await
                    }
                    _ => connection::run(state, socket, params).await,
                }
            })
        })
}

fn bearer(headers: &HeaderMap) -> Option<String> {
    let value = headers.get("authorization")?.to_str().ok()?;
    value.strip_prefix("Bearer ").map(str::to_owned)
}

async fn subscribe(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    let token = bearer(&headers).or_else(|| query.get("token").cloned());
    let principal = match state.auth.verify(token.as_deref()) {
        Ok(p) => p,
        Err(why) => {
            counter!(SESSIONS_REJECTED, "reason" => "unauthorized").increment(1);
            return (StatusCode::UNAUTHORIZED, why).into_response();
        }
    };
    let Some(hub) = state.hub(&id) else {
        counter!(SESSIONS_REJECTED, "reason" => "unknown_session").increment(1);
        return (StatusCode::NOT_FOUND, format!("no live session {id:?}")).into_response();
    };
    if let Some(p) = &principal {
        if !p.may_watch(&id, hub.owner()) {
            counter!(SESSIONS_REJECTED, "reason" => "forbidden").increment(1);
            return (
                StatusCode::FORBIDDEN,
                format!("this token may not watch session {id:?}"),
            )
                .into_response();
        }
    }
    let audio = matches!(query.get("audio").map(String::as_str), Some("true" | "1"));
    let sub = match hub.subscribe(audio) {
        Ok(sub) => sub,
        Err(full) => {
            counter!(SESSIONS_REJECTED, "reason" => "subscribers_full").increment(1);
            return (StatusCode::SERVICE_UNAVAILABLE, full.to_string()).into_response();
        }
    };
    drop(hub);
    let queue = state.cfg.subscribers.queue_messages;
    ws.read_buffer_size(WS_READ_BUFFER)
        .write_buffer_size(0)
        .on_upgrade(move |socket| {
            let tracker = state.tracker.clone();
            tracker.track_future(run_subscriber(socket, sub, queue))
        })
}

async fn run_subscriber(
    mut socket: WebSocket,
    mut sub: crate::fanout::subscribers::Subscription,
    queue: usize,
) {
    gauge!(SUBSCRIBERS_ACTIVE).increment(1.0);
    let (code, reason) = loop {
        tokio::select! {
            msg = sub.rx.recv() => match msg {
                Some(msg) => {
                    sub.taken(&msg);
                    let ws_msg = match msg {
                        SubMessage::Event(s) => Message::Text(s.as_ref().into()),
                        SubMessage::Audio(b) => Message::Binary(b),
                    };
                    if socket.send(ws_msg).await.is_err() {
                        break (None, "");
                    }
                }
                None if sub.kicked.is_cancelled() => {
                    break (Some(1008), "subscriber lagging: queue full; disconnected");
                }
                None => break (Some(1000), "session ended"),
            },
            () = sub.kicked.cancelled() => {
                counter!(m::CLOSES, "code" => "1008").increment(1);
                warn!(queue, "disconnecting lagging subscriber");
                break (Some(1008), "subscriber lagging: queue full; disconnected");
            }
            incoming = socket.recv() => if matches!(incoming, None | Some(Err(_)) | Some(Ok(Message::Close(_)))) {
                break (None, "");
            },
        }
    };
    sub.discard_rest();
    if let Some(code) = code {
        let _ = socket
            .send(Message::Close(Some(axum::extract::ws::CloseFrame {
                code,
                reason: reason.into(),
            })))
            .await;
    }
    gauge!(SUBSCRIBERS_ACTIVE).decrement(1.0);
}

//! Serving HTTP/1.1 ourselves (hyper with a timer): a header-read deadline, the open-connection
//! caps checked at accept (refused with a minimal 503 and `Retry-After`, counted), the client
//! address resolved through trusted proxies, and graceful shutdown. HTTP/2 is not served: the
//! gateway's clients are WebSockets and plain GETs, and HTTP/1's header deadline is the bound
//! that matters here.

pub mod fd;
pub mod limits;
pub mod tls;

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{header, Request, Response, StatusCode};
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics::counter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, warn};

use self::limits::{ConnLimits, ConnSlot, Refused};
use crate::config::{Config, MAX_REQUEST_HEAD_BYTES};
use crate::metrics as m;
use crate::proxy::{is_forwarded, TrustedProxies};

/// What the accept loop needs from the configuration.
pub struct ServeOptions {
    pub header_read_timeout: Duration,
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    pub proxies: TrustedProxies,
    /// `auth.mode = "auto"` turned auth off (loopback): refuse requests that came through a
    /// proxy, so a same-host proxy never silently publishes an unauthenticated gateway.
    pub refuse_forwarded: bool,
    /// How long shutdown waits for HTTP connections (not upgraded WebSockets) to finish.
    pub grace: Duration,
    /// TLS on the listener (`server.tls_cert_file`), or plain TCP.
    pub tls: Option<tokio_rustls::TlsAcceptor>,
}

impl ServeOptions {
    /// The options of `cfg`, with `max_connections` as it fits the descriptor limit; fails
    /// when the TLS certificate or key cannot be used.
    pub fn from_config(cfg: &Config) -> Result<Self, tls::TlsError> {
        let auto_off =
            cfg.auth.mode == crate::auth::AuthMode::Auto && !cfg.auth.required(&cfg.server.listen);
        let tls = match (&cfg.server.tls_cert_file, &cfg.server.tls_key_file) {
            (Some(cert), Some(key)) => Some(tls::acceptor(cert.as_ref(), key.as_ref())?),
            _ => None,
        };
        Ok(Self {
            header_read_timeout: cfg.server.header_read_timeout(),
            max_connections: fd::fit_connections(cfg.server.max_connections),
            max_connections_per_ip: cfg.server.max_connections_per_ip,
            proxies: TrustedProxies::new(&cfg.server.trusted_proxies),
            refuse_forwarded: auto_off,
            grace: cfg.server.shutdown_grace(),
            tls,
        })
    }
}

/// Serves `router` on `listener` until `shutdown`, then lets open HTTP requests finish (within
/// the grace period). Upgraded WebSockets are not waited for here: their tasks are tracked by
/// the caller.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    opts: ServeOptions,
    shutdown: CancellationToken,
) {
    let limits = Arc::new(ConnLimits::new(
        opts.max_connections,
        opts.max_connections_per_ip,
    ));
    let opts = Arc::new(opts);
    let conns = TaskTracker::new();
    loop {
        let (tcp, peer) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    accept_failed(e).await;
                    continue;
                }
            },
        };
        let trusted = opts.proxies.trusts(peer.ip());
        let slot = match limits.admit(peer.ip(), !trusted) {
            Ok(slot) => slot,
            Err(why) => {
                refuse_cheaply(&tcp, why);
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let conn = Conn {
            peer,
            opts: opts.clone(),
            limits: limits.clone(),
            forwarded: slot.forwarded.clone(),
        };
        let io = Guarded { tcp, _slot: slot };
        conns.spawn(conn.serve(io, router.clone(), shutdown.clone()));
    }
    conns.close();
    if tokio::time::timeout(opts.grace, conns.wait())
        .await
        .is_err()
    {
        warn!(
            open = conns.len(),
            "HTTP connections still open at the end of the grace period"
        );
    }
}

/// `accept` failed (e.g. out of descriptors): counted, logged at most once a second, and the
/// loop pauses briefly instead of spinning.
async fn accept_failed(e: std::io::Error) {
    static LAST: Mutex<Option<std::time::Instant>> = Mutex::new(None);
    counter!(m::CONNECTIONS_REFUSED, "reason" => "accept_error").increment(1);
    let now = std::time::Instant::now();
    let log = {
        let mut last = LAST.lock().expect("accept log lock is never poisoned");
        let due = last.is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1));
        if due {
            *last = Some(now);
        }
        due
    };
    if log {
        error!(error = %e, "accept failed");
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
}

/// A minimal 503 written without waiting (whatever the socket takes), then the socket closes.
fn refuse_cheaply(tcp: &TcpStream, why: Refused) {
    counter!(m::CONNECTIONS_REFUSED, "reason" => why.as_str()).increment(1);
    debug!(reason = why.as_str(), "connection refused at accept");
    let _ = tcp.try_write(
        b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    );
}

/// The TCP stream with the connection's slot: the slot lives as long as the IO, which an
/// upgraded WebSocket keeps.
struct Guarded<S = TcpStream> {
    tcp: S,
    _slot: ConnSlot,
}

impl<S: AsyncRead + Unpin> AsyncRead for Guarded<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Guarded<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }
}

/// One accepted connection.
#[derive(Clone)]
struct Conn {
    peer: SocketAddr,
    opts: Arc<ServeOptions>,
    limits: Arc<ConnLimits>,
    forwarded: Arc<Mutex<Option<limits::IpSlot>>>,
}

impl Conn {
    /// Serves the connection, after the TLS handshake when TLS is on (within the header-read
    /// deadline; a failed or slow handshake is counted and closes the socket).
    async fn serve(self, io: Guarded, router: Router, shutdown: CancellationToken) {
        let Some(acceptor) = self.opts.tls.clone() else {
            return self.serve_http(io, router, shutdown).await;
        };
        let deadline = self.opts.header_read_timeout;
        match tokio::time::timeout(deadline, acceptor.accept(io)).await {
            Ok(Ok(tls)) => self.serve_http(tls, router, shutdown).await,
            Ok(Err(e)) => {
                counter!(m::CONNECTIONS_REFUSED, "reason" => "tls_handshake").increment(1);
                debug!(peer = %self.peer, error = %e, "TLS handshake failed");
            }
            Err(_) => {
                counter!(m::CONNECTIONS_REFUSED, "reason" => "tls_timeout").increment(1);
                debug!(peer = %self.peer, "TLS handshake not done within the header deadline");
            }
        }
    }

    async fn serve_http<S>(self, io: S, router: Router, shutdown: CancellationToken)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let mut http = hyper::server::conn::http1::Builder::new();
        http.timer(TokioTimer::new())
            .header_read_timeout(self.opts.header_read_timeout)
            .max_buf_size(MAX_REQUEST_HEAD_BYTES);
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            let conn = self.clone();
            let mut router = router.clone();
            async move {
                let mut req = req;
                if let Some(refusal) = conn.refusal(&mut req) {
                    return Ok::<_, std::convert::Infallible>(refusal);
                }
                tower_service::Service::call(&mut router, req).await
            }
        });
        let served = http
            .serve_connection(TokioIo::new(io), service)
            .with_upgrades();
        tokio::pin!(served);
        let result = tokio::select! {
            result = served.as_mut() => result,
            () = shutdown.cancelled() => {
                served.as_mut().graceful_shutdown();
                served.await
            }
        };
        if let Err(e) = result {
            if e.is_timeout() {
                counter!(m::CONNECTIONS_REFUSED, "reason" => "header_timeout").increment(1);
            }
            debug!(error = %e, "connection ended with an error");
        }
    }

    /// Resolves the client address (through trusted proxies, into `ConnectInfo`) and applies
    /// the per-request refusals: a proxied request while auth is off by `auto`, a proxied client
    /// over its cap. `Some(response)` refuses the request.
    fn refusal(&self, req: &mut Request<Incoming>) -> Option<Response<Body>> {
        if self.opts.refuse_forwarded && is_forwarded(req.headers()) {
            return Some(proxied_without_auth());
        }
        let client = self.opts.proxies.client(self.peer, req.headers());
        if self.opts.proxies.trusts(self.peer.ip()) {
            let mut slot = self.forwarded.lock().expect("slot lock is never poisoned");
            // One HTTP/1 connection serves one request at a time: the previous request's
            // client gives its slot back first.
            slot.take();
            match self.limits.ip_slot(client.ip()) {
                Ok(s) => *slot = Some(s),
                Err(why) => {
                    counter!(m::CONNECTIONS_REFUSED, "reason" => why.as_str()).increment(1);
                    return Some(status(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "too many open connections from this address\n",
                    ));
                }
            }
        }
        req.extensions_mut().insert(ConnectInfo(client));
        None
    }
}

/// 403 for a proxied request while `auth.mode = "auto"` has turned auth off; logged at error
/// once per process (then counted only).
fn proxied_without_auth() -> Response<Body> {
    static LOGGED: AtomicBool = AtomicBool::new(false);
    counter!(m::CONNECTIONS_REFUSED, "reason" => "proxied_without_auth").increment(1);
    const WHY: &str = "refused: this request came through a proxy (Forwarded / X-Forwarded-For / \
        X-Real-IP), but voxgate listens on loopback with auth.mode = \"auto\", which turns \
        authentication off. Set auth.mode = \"jwt\" (with a key), or auth.mode = \"off\" to \
        serve the proxy's clients without authentication.\n";
    if !LOGGED.swap(true, Ordering::Relaxed) {
        error!("{}", WHY.trim_end());
    }
    status(StatusCode::FORBIDDEN, WHY)
}

fn status(code: StatusCode, body: &'static str) -> Response<Body> {
    let mut resp = Response::new(Body::from(body));
    *resp.status_mut() = code;
    if code == StatusCode::SERVICE_UNAVAILABLE {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
    }
    resp
}

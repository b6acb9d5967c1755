//! The connection layer over real sockets: the header-read deadline, the open-connection caps,
//! trusted proxies and `auth.mode = "auto"` behind a proxy, read-side pacing (fast senders are
//! slowed, floods of tiny messages closed), writers that cannot outlive their session, and
//! subscriber sockets that may not send.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use voxgate::cli::device;

const PCM_URL: &str = "/v1/listen?encoding=linear16&sample_rate=16000";

/// Reads until the server closes the TCP connection; `true` if it did within `limit`.
async fn server_closes(tcp: &mut TcpStream, limit: Duration) -> bool {
    let mut buf = [0u8; 4096];
    tokio::time::timeout(limit, async {
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_slow_header_connections_are_closed_at_the_header_deadline() {
    let mut cfg = test_config();
    cfg.server.header_read_timeout_seconds = 1.0;
    let gw = Gateway::start(cfg).await;
    let mut idle = TcpStream::connect(gw.addr).await.unwrap();
    let mut slow = TcpStream::connect(gw.addr).await.unwrap();
    slow.write_all(b"GET /v1/listen HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let t = std::time::Instant::now();
    assert!(
        server_closes(&mut idle, Duration::from_secs(5)).await,
        "idle socket held"
    );
    // A header line now and then does not extend the deadline.
    let trickle = async {
        for _ in 0..8 {
            tokio::time::sleep(Duration::from_millis(300)).await;
            if slow.write_all(b"X-Slow: 1\r\n").await.is_err() {
                break;
            }
        }
    };
    trickle.await;
    assert!(
        server_closes(&mut slow, Duration::from_secs(3)).await,
        "slowloris held"
    );
    assert!(t.elapsed() < Duration::from_secs(5));
}

/// Opens a raw TCP connection from a chosen loopback address.
async fn connect_from(local: &str, to: SocketAddr) -> TcpStream {
    let sock = TcpSocket::new_v4().unwrap();
    sock.bind(format!("{local}:0").parse().unwrap()).unwrap();
    sock.connect(to).await.unwrap()
}

/// The first bytes the server answers a fresh connection with (after our request, if any).
async fn answer(tcp: &mut TcpStream, request: &[u8]) -> String {
    let _ = tcp.write_all(request).await;
    let mut buf = vec![0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(3), tcp.read(&mut buf))
        .await
        .map_or(0, |r| r.unwrap_or(0));
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_caps_are_refused_at_accept_and_websockets_keep_counting() {
    let mut cfg = test_config();
    cfg.server.max_connections = 4;
    cfg.server.max_connections_per_ip = 2;
    let gw = Gateway::start(cfg).await;
    // Two from 127.0.0.1: one WebSocket session (counted for its life) and one idle socket.
    let (ws, _) = tokio_tungstenite::connect_async(gw.ws(PCM_URL))
        .await
        .unwrap();
    let idle = connect_from("127.0.0.1", gw.addr).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut third = connect_from("127.0.0.1", gw.addr).await;
    let got = answer(&mut third, b"").await;
    assert!(
        got.starts_with("HTTP/1.1 503") && got.contains("Retry-After"),
        "{got:?}"
    );
    // Another address still gets in, up to the global cap (4 = 2 + 2).
    let _b1 = connect_from("127.0.0.2", gw.addr).await;
    let _b2 = connect_from("127.0.0.3", gw.addr).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut over = connect_from("127.0.0.4", gw.addr).await;
    assert!(answer(&mut over, b"").await.starts_with("HTTP/1.1 503"));
    // The WebSocket's slot is given back when it closes.
    drop(ws);
    drop((_b1, _b2));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut again = connect_from("127.0.0.1", gw.addr).await;
    let got = answer(&mut again, b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(got.starts_with("HTTP/1.1 200"), "{got:?}");
    drop((idle, again));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let m = gw.metrics().await;
    assert!(
        metric_value(
            &m,
            "voxgate_connections_refused_total",
            "reason=\"max_connections_per_ip\""
        ) >= 1.0
    );
    assert!(
        metric_value(
            &m,
            "voxgate_connections_refused_total",
            "reason=\"max_connections\""
        ) >= 1.0
    );
}

/// A WebSocket upgrade request with extra headers.
async fn upgrade_with(
    url: &str,
    headers: &[(&'static str, &str)],
) -> Result<(), tokio_tungstenite::tungstenite::Error> {
    let mut req = url.into_client_request().unwrap();
    for (k, v) in headers {
        req.headers_mut().insert(*k, v.parse().unwrap());
    }
    tokio_tungstenite::connect_async(req).await.map(|_| ())
}

fn status_of(e: &tokio_tungstenite::tungstenite::Error) -> Option<(u16, String)> {
    match e {
        tokio_tungstenite::tungstenite::Error::Http(resp) => Some((
            resp.status().as_u16(),
            String::from_utf8_lossy(resp.body().as_deref().unwrap_or_default()).into_owned(),
        )),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_auth_on_loopback_refuses_proxied_requests_and_off_serves_them() {
    let gw = Gateway::start(test_config()).await; // auth.mode = "auto" on 127.0.0.1: off
    let url = gw.ws(PCM_URL);
    for header in ["x-forwarded-for", "forwarded", "x-real-ip"] {
        let value = if header == "forwarded" {
            "for=198.51.100.1"
        } else {
            "198.51.100.1"
        };
        let err = upgrade_with(&url, &[(header, value)]).await.unwrap_err();
        let (status, body) = status_of(&err).unwrap_or_else(|| panic!("{err:?}"));
        assert_eq!(status, 403);
        assert!(body.contains("auth.mode"), "{body}");
    }
    upgrade_with(&url, &[])
        .await
        .expect("direct clients are served");
    let mut cfg = test_config();
    cfg.auth.mode = voxgate::auth::AuthMode::Off;
    let off = Gateway::start(cfg).await;
    upgrade_with(&off.ws(PCM_URL), &[("x-forwarded-for", "198.51.100.1")])
        .await
        .expect("explicit auth.mode = off works behind a proxy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_ip_limits_key_on_the_client_a_trusted_proxy_names() {
    let mut cfg = test_config();
    cfg.auth.mode = voxgate::auth::AuthMode::Off;
    cfg.server.max_connections_per_ip = 1;
    cfg.server.trusted_proxies = vec!["127.0.0.1/32".into()];
    let gw = Gateway::start(cfg).await;
    let url = gw.ws(PCM_URL);
    // Clients behind the proxy: one each, whatever the proxy's own address.
    let mut held = Vec::new();
    for client in ["198.51.100.1", "198.51.100.2"] {
        let mut req = url.as_str().into_client_request().unwrap();
        req.headers_mut().insert(
            "x-forwarded-for",
            format!("{client}, 127.0.0.1").parse().unwrap(),
        );
        held.push(
            tokio_tungstenite::connect_async(req)
                .await
                .expect("one per client"),
        );
    }
    let err = upgrade_with(&url, &[("x-forwarded-for", "198.51.100.1")])
        .await
        .unwrap_err();
    assert_eq!(status_of(&err).map(|s| s.0), Some(503), "{err:?}");
    // From an untrusted peer the header is ignored: 127.0.0.2 is the client, and it has room.
    let mut stream = connect_from("127.0.0.2", gw.addr).await;
    let req = "GET /livez HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 198.51.100.1\r\n\r\n";
    assert!(answer(&mut stream, req.as_bytes())
        .await
        .starts_with("HTTP/1.1 200"));
}

/// 150 s of 16 kHz PCM in 100 ms messages (the reference speech, repeated).
fn pcm_150s() -> Vec<Vec<u8>> {
    let one = std::fs::read(corpus("reference/medium.s16le-16k-mono.pcm")).unwrap();
    let data: Vec<u8> = one.iter().copied().cycle().take(150 * 32_000).collect();
    data.chunks(3200).map(<[u8]>::to_vec).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_150_second_capture_sent_unpaced_is_slowed_and_decodes_completely() {
    let gw = Gateway::start(test_config()).await;
    let run = stream(&gw.ws(PCM_URL), pcm_150s(), Duration::ZERO).await;
    assert_eq!(run.close_code, Some(1000), "{:?}", run.of_type("Error"));
    assert_eq!(run.closed()["summary"]["samples_decoded"], 150 * 16_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_twilio_stream_at_five_times_real_time_decodes_completely() {
    let gw = Gateway::start(test_config()).await;
    let mulaw = std::fs::read(corpus("reference/long.mulaw-8k-mono.raw")).unwrap();
    let msgs = device::twilio_messages(&mulaw, "MZfast", &[]);
    let (ws, _) = tokio_tungstenite::connect_async(gw.ws("/v1/twilio"))
        .await
        .unwrap();
    let (mut tx, mut rx) = ws.split();
    let sender = tokio::spawn(async move {
        // 20 ms of audio every 4 ms.
        let mut tick = tokio::time::interval(Duration::from_millis(4));
        for m in msgs {
            tick.tick().await;
            tx.send(Message::Text(m.into())).await.unwrap();
        }
        tx
    });
    let mut closed = None;
    let mut code = None;
    while let Some(Ok(msg)) = tokio::time::timeout(Duration::from_secs(90), rx.next())
        .await
        .unwrap()
    {
        match msg {
            Message::Text(t) if t.contains("\"Closed\"") => {
                closed = Some(serde_json::from_str::<serde_json::Value>(&t).unwrap());
            }
            Message::Close(f) => {
                code = f.map(|f| u16::from(f.code));
                break;
            }
            _ => {}
        }
    }
    drop(sender.await);
    assert_eq!(code, Some(1000));
    let closed = closed.expect("Closed");
    assert_eq!(closed["summary"]["samples_decoded"], mulaw.len() as u64 * 2);
}

/// Sends `msgs` as fast as the socket takes them and reads until the close: (errors, code).
async fn flood(url: &str, msgs: Vec<Message>) -> (Vec<String>, Option<u16>) {
    let (ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let (mut tx, mut rx) = ws.split();
    let sender = tokio::spawn(async move {
        for m in msgs {
            if tx.send(m).await.is_err() {
                break;
            }
        }
    });
    let mut errors = Vec::new();
    let mut code = None;
    let read = async {
        while let Some(Ok(m)) = rx.next().await {
            match m {
                Message::Text(t) if t.contains("\"Error\"") => errors.push(t.to_string()),
                Message::Close(f) => {
                    code = f.map(|f| u16::from(f.code));
                    break;
                }
                _ => {}
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(20), read).await;
    sender.abort();
    (errors, code)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn floods_of_tiny_messages_and_of_pings_are_closed_with_1008() {
    let gw = Gateway::start(test_config()).await;
    let url = gw.ws("/v1/listen?encoding=linear8&sample_rate=8000");
    let tiny = (0..5000)
        .map(|_| Message::Binary(vec![0x80].into()))
        .collect();
    let (errors, code) = flood(&url, tiny).await;
    assert_eq!(code, Some(1008));
    assert!(
        errors.iter().any(|e| e.contains("message_flood")),
        "{errors:?}"
    );
    let pings = (0..5000)
        .map(|_| Message::Ping(Vec::new().into()))
        .collect();
    let (errors, code) = flood(&url, pings).await;
    assert_eq!(code, Some(1008), "pings count in the flood budget");
    assert!(
        errors.iter().any(|e| e.contains("message_flood")),
        "{errors:?}"
    );
}

/// The server side of the TCP connection whose client port is `client_port` is still open
/// (ESTABLISHED in /proc/net/tcp).
fn server_side_established(server_port: u16, client_port: u16) -> bool {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    table.lines().skip(1).any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        let port = |a: &str| u16::from_str_radix(a.rsplit(':').next().unwrap_or(""), 16).ok();
        f.len() > 3
            && port(f[1]) == Some(server_port)
            && port(f[2]) == Some(client_port)
            && f[3] == "01"
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_loses_its_socket_soon_after_its_session() {
    let mut cfg = test_config();
    cfg.server.client_queue_messages = 4;
    cfg.server.max_bytes_per_second = (64 << 20) as f64;
    let gw = Gateway::start(cfg).await;
    let sock = TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(2048).unwrap();
    let tcp = sock.connect(gw.addr).await.unwrap();
    let client_port = tcp.local_addr().unwrap().port();
    let (ws, _) = tokio_tungstenite::client_async(gw.ws(PCM_URL), tcp)
        .await
        .unwrap();
    let (mut tx, _never_read) = ws.split();
    // Each bad control message earns an Error event quoting it (about 200 KB each).
    let bad = format!(r#"{{"type":"{}"}}"#, "x".repeat(200_000));
    for _ in 0..200 {
        let sent = tokio::time::timeout(
            Duration::from_secs(2),
            tx.send(Message::Text(bad.clone().into())),
        )
        .await;
        if !matches!(sent, Ok(Ok(()))) {
            break;
        }
    }
    let t = std::time::Instant::now();
    while server_side_established(gw.addr.port(), client_port) {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the server still holds the socket of a session that ended"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(tx);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_that_send_anything_are_closed_with_1008() {
    let gw = Gateway::start(test_config()).await;
    let (_session, _) =
        tokio_tungstenite::connect_async(gw.ws(&format!("{PCM_URL}&session_id=sub-limits")))
            .await
            .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    for (msg, want) in [
        (Message::Text("hello".into()), Some(1008)),
        // Over the 4 KiB limit: closed (the close frame may be lost to a reset).
        (Message::Binary(vec![0u8; 64 * 1024].into()), None),
    ] {
        let (mut sub, _) =
            tokio_tungstenite::connect_async(gw.ws("/v1/sessions/sub-limits/subscribe"))
                .await
                .unwrap();
        let _ = sub.send(msg).await;
        let code = tokio::time::timeout(Duration::from_secs(5), async {
            while let Some(m) = sub.next().await {
                match m {
                    Ok(Message::Close(f)) => return f.map(|f| u16::from(f.code)),
                    Ok(_) => {}
                    Err(_) => return None,
                }
            }
            None
        })
        .await
        .expect("the subscriber is closed");
        if let Some(want) = want {
            assert_eq!(code, Some(want));
        }
    }
}

//! Trust: tokens on every endpoint, subscribers limited to their sessions, webhook URL policy,
//! connection-rate and per-user limits.

mod common;

use std::time::Duration;

use axum::routing::post;
use axum::{Json, Router};
use common::*;
use jsonwebtoken::{encode, EncodingKey, Header};
use voxgate::auth::{AuthMode, Claims};
use voxgate::config::Config;

const SECRET: &str = "0123456789abcdef-test-secret";

fn token(sub: &str, sid: Option<&str>, exp_in: i64, secret: &str) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let claims = Claims {
        sub: sub.into(),
        exp: (now + exp_in) as u64,
        aud: Some(serde_json::json!("voxgate")),
        sid: sid.map(str::to_owned),
        sessions: vec![],
        consumers: None,
        ..Claims::default()
    };
    encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

fn auth_config() -> Config {
    let mut cfg = test_config();
    cfg.auth.mode = AuthMode::Jwt;
    cfg.auth.hs256_secret = Some(SECRET.into());
    cfg
}

fn pcm() -> Vec<Vec<u8>> {
    pcm_messages("short", Some(1.0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_required_and_checked() {
    let gw = Gateway::start(auth_config()).await;
    let base = "/v1/listen?encoding=linear16&sample_rate=16000";
    for (t, why) in [
        (None, "missing"),
        (
            Some(token("ann", None, 600, "another-secret-of-16-bytes")),
            "wrong key",
        ),
        (Some(token("ann", None, -600, SECRET)), "expired"),
        (Some("not.a.jwt".to_owned()), "garbage"),
    ] {
        let url = match &t {
            Some(t) => gw.ws(&format!("{base}&token={t}")),
            None => gw.ws(base),
        };
        let run = stream(&url, pcm(), Duration::ZERO).await;
        assert_eq!(run.close_code, Some(1008), "{why}");
        assert_eq!(run.of_type("Error")[0]["code"], "unauthorized", "{why}");
        assert!(
            run.of_type("Closed").is_empty(),
            "{why}: no session was created"
        );
    }
    let good = token("ann", Some("ann-1"), 600, SECRET);
    let run = stream(
        &gw.ws(&format!("{base}&token={good}")),
        pcm(),
        Duration::ZERO,
    )
    .await;
    assert_eq!(run.close_code, Some(1000));
    assert_eq!(
        run.closed()["session_id"],
        "ann-1",
        "the token's session id is used"
    );
    // A token bound to one session cannot open another.
    let run = stream(
        &gw.ws(&format!("{base}&session_id=other&token={good}")),
        pcm(),
        Duration::ZERO,
    )
    .await;
    assert_eq!(run.close_code, Some(1008));
    assert_eq!(run.of_type("Error")[0]["code"], "forbidden");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_see_only_their_sessions() {
    let gw = Gateway::start(auth_config()).await;
    let ann = token("ann", None, 600, SECRET);
    let url = gw.ws(&format!(
        "/v1/listen?encoding=linear16&sample_rate=16000&session_id=ann-live&token={ann}"
    ));
    let (ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let bob = token("bob", None, 600, SECRET);
    let denied = tokio_tungstenite::connect_async(
        gw.ws(&format!("/v1/sessions/ann-live/subscribe?token={bob}")),
    )
    .await;
    let err = denied
        .expect_err("bob may not watch ann's session")
        .to_string();
    assert!(err.contains("404"), "as if it did not exist: {err}");
    let missing = tokio_tungstenite::connect_async(gw.ws("/v1/sessions/ann-live/subscribe")).await;
    assert!(missing.expect_err("no token").to_string().contains("401"));
    let ok = tokio_tungstenite::connect_async(
        gw.ws(&format!("/v1/sessions/ann-live/subscribe?token={ann}")),
    )
    .await;
    assert!(ok.is_ok(), "ann may watch her own session");
    drop(ws);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hook_webhooks_pointing_inside_are_refused() {
    async fn hook(Json(req): Json<serde_json::Value>) -> Json<serde_json::Value> {
        let target = req["query"]["target"].as_str().unwrap_or("").to_owned();
        Json(serde_json::json!({
            "allow": true,
            "uid": "u",
            "webhooks": [{"name": "w", "url": target, "delay_seconds": 0}]
        }))
    }
    let app = Router::new().route("/connect", post(hook));
    let addr = common::serve(app).await;
    let mut cfg = test_config();
    cfg.on_connect = Some(voxgate::config::OnConnectConfig {
        url: format!("http://{addr}/connect"),
        timeout_ms: 2000,
        max_webhooks: 8,
    });
    let gw = Gateway::start(cfg).await;
    for target in [
        "http://127.0.0.1:9/audio",
        "http://169.254.169.254/latest/meta-data",
        "http://localhost:9/x",
        "http://[::1]:9/x",
    ] {
        let q = format!(
            "/v1/listen?encoding=linear16&sample_rate=16000&target={}",
            url::form_urlencoded::byte_serialize(target.as_bytes()).collect::<String>()
        );
        let run = stream(&gw.ws(&q), pcm(), Duration::ZERO).await;
        assert_eq!(run.close_code, Some(1008), "{target}");
        assert_eq!(
            run.of_type("Error")[0]["code"],
            "webhook_denied",
            "{target}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_floods_and_user_caps_are_held() {
    let mut cfg = test_config();
    cfg.auth.connections_per_ip_per_second = 5.0;
    let gw = Gateway::start(cfg).await;
    // A burst of 30 connections: the bucket (burst 10) admits about 10; the rest get 1013.
    let mut refused = 0;
    let mut admitted = 0;
    for _ in 0..30 {
        let run = stream(
            &gw.ws("/v1/listen?encoding=linear16&sample_rate=16000"),
            vec![],
            Duration::ZERO,
        )
        .await;
        match run.close_code {
            Some(1013) => {
                refused += 1;
                let msg = run.of_type("Error")[0]["message"]
                    .as_str()
                    .unwrap()
                    .to_owned();
                assert!(msg.contains("retry after"), "{msg}");
            }
            Some(1000) => admitted += 1,
            other => panic!("unexpected close {other:?}"),
        }
    }
    assert!((10..=14).contains(&admitted), "admitted {admitted}");
    assert_eq!(refused + admitted, 30);
    let m = gw.metrics().await;
    assert!(
        metric_value(
            &m,
            "voxgate_sessions_rejected_total",
            "reason=\"rate_limited\""
        ) >= 16.0
    );

    // Per-user cap.
    let mut cfg = auth_config();
    cfg.auth.max_sessions_per_user = 1;
    let gw = Gateway::start(cfg).await;
    let ann = token("ann", None, 600, SECRET);
    let url = gw.ws(&format!(
        "/v1/listen?encoding=linear16&sample_rate=16000&token={ann}"
    ));
    let (first, _) = tokio_tungstenite::connect_async(url.clone()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let run = stream(&url, vec![], Duration::ZERO).await;
    assert_eq!(run.close_code, Some(1013));
    assert_eq!(run.of_type("Error")[0]["code"], "user_over_capacity");
    drop(first);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_floods_are_cut_off_and_others_keep_their_latency() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let mut cfg = test_config();
    cfg.server.max_messages_per_second = 200.0;
    let gw = Gateway::start(cfg).await;

    // The flooder: 5,000 one-byte PCM messages as fast as the socket takes them.
    let flood_url = gw.ws("/v1/listen?encoding=linear8&sample_rate=8000");
    let flooder = tokio::spawn(async move {
        let (ws, _) = tokio_tungstenite::connect_async(flood_url).await.unwrap();
        let (mut tx, mut rx) = ws.split();
        let reader = tokio::spawn(async move {
            let mut code = None;
            let mut error = None;
            while let Some(Ok(m)) = rx.next().await {
                match m {
                    Message::Text(t) if t.contains("\"Error\"") => error = Some(t.to_string()),
                    Message::Close(f) => {
                        code = f.map(|f| u16::from(f.code));
                        break;
                    }
                    _ => {}
                }
            }
            (code, error)
        });
        for _ in 0..5000 {
            if tx.send(Message::Binary(vec![0x80].into())).await.is_err() {
                break;
            }
        }
        reader.await.unwrap()
    });

    // A well-behaved resumable session measures send-to-Ack latency meanwhile.
    let (ws, _) = tokio_tungstenite::connect_async(
        gw.ws("/v1/listen?encoding=linear16&sample_rate=16000&resumable=true"),
    )
    .await
    .unwrap();
    let (mut tx, mut rx) = ws.split();
    let mut worst = Duration::ZERO;
    for chunk in pcm_messages("short", Some(3.0)) {
        let t = std::time::Instant::now();
        tx.send(Message::Binary(chunk.into())).await.unwrap();
        loop {
            let m = rx.next().await.unwrap().unwrap();
            if m.to_text().unwrap_or("").contains("\"Ack\"") {
                break;
            }
        }
        worst = worst.max(t.elapsed());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (code, error) = flooder.await.unwrap();
    assert_eq!(code, Some(1008));
    assert!(error.unwrap().contains("message_flood"));
    assert!(
        worst < Duration::from_secs(1),
        "worst Ack latency {worst:?}"
    );
    println!("worst send-to-Ack latency beside a flood: {worst:?}");
}

//! Security: ownership of sessions and drained states, token checks, the webhook address
//! policy on parsed addresses, signed webhook requests and what clients are told about backends.
//! Every test here attacks a real gateway over sockets on 127.0.0.1.

mod common;
mod nats_support;

use std::time::Duration;

use axum::routing::post;
use axum::{Json, Router};
use common::*;
use jsonwebtoken::{encode, EncodingKey, Header};
use voxgate::auth::{AuthMode, Claims};
use voxgate::config::Config;

const SECRET: &str = "0123456789abcdef-test-secret";

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn sign_claims(claims: &Claims) -> String {
    encode(
        &Header::default(),
        claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

fn claims(sub: &str) -> Claims {
    Claims {
        sub: sub.into(),
        exp: now() + 600,
        aud: Some(serde_json::json!("voxgate")),
        ..Claims::default()
    }
}

fn token(sub: &str) -> String {
    sign_claims(&claims(sub))
}

fn auth_config() -> Config {
    let mut cfg = test_config();
    cfg.auth.mode = AuthMode::Jwt;
    cfg.auth.hs256_secret = Some(SECRET.into());
    cfg
}

const LISTEN: &str = "/v1/listen?encoding=linear16&sample_rate=16000";

fn pcm() -> Vec<Vec<u8>> {
    pcm_messages("short", Some(1.0))
}

/// The refusal code of a session attempt with `token` (`None`: it ran and closed normally).
async fn refusal(gw: &Gateway, query: &str, token: &str) -> Option<String> {
    let run = stream(
        &gw.ws(&format!("{query}&token={token}")),
        pcm(),
        Duration::ZERO,
    )
    .await;
    if run.close_code == Some(1000) {
        return None;
    }
    Some(
        run.of_type("Error")
            .first()
            .map(|e| e["code"].as_str().unwrap().to_owned())
            .unwrap_or_else(|| format!("close {:?}", run.close_code)),
    )
}

/// D12: `nbf` is checked, `iss` when configured, the lifetime when capped, and `sub` may not be
/// empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_not_yet_valid_too_long_foreign_or_anonymous_are_refused() {
    let mut cfg = auth_config();
    cfg.auth.issuer = Some("https://issuer.example".into());
    cfg.auth.max_token_lifetime_seconds = Some(3600);
    let gw = Gateway::start(cfg).await;
    let good = Claims {
        iss: Some("https://issuer.example".into()),
        iat: Some(now()),
        ..claims("ann")
    };
    assert_eq!(refusal(&gw, LISTEN, &sign_claims(&good)).await, None);
    for (bad, why) in [
        (
            Claims {
                nbf: Some(now() + 3600),
                ..good.clone()
            },
            "nbf an hour ahead",
        ),
        (
            Claims {
                sub: String::new(),
                ..good.clone()
            },
            "empty sub",
        ),
        (
            Claims {
                iss: None,
                ..good.clone()
            },
            "no iss",
        ),
        (
            Claims {
                iss: Some("https://other.example".into()),
                ..good.clone()
            },
            "foreign iss",
        ),
        (
            Claims {
                exp: now() + 2 * 86_400,
                iat: None,
                ..good.clone()
            },
            "exp two days ahead",
        ),
        (
            Claims {
                iat: Some(now() - 7200),
                ..good.clone()
            },
            "issued for three hours",
        ),
    ] {
        assert_eq!(
            refusal(&gw, LISTEN, &sign_claims(&bad)).await.as_deref(),
            Some("unauthorized"),
            "{why}"
        );
    }
}

/// A hook that answers with the connect query's `target` as the session's only webhook.
async fn target_hook() -> String {
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
    format!("http://{addr}/connect")
}

fn with_target(target: &str) -> String {
    format!(
        "{LISTEN}&target={}",
        url::form_urlencoded::byte_serialize(target.as_bytes()).collect::<String>()
    )
}

/// D8: `deny_hosts` is compared on parsed addresses, so an IPv4-mapped spelling of a denied
/// address is denied too (it used to reach the victim with `allow_private = true`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denied_address_is_denied_in_every_spelling() {
    let victim = Receiver::start(Mode::Ok).await;
    let mut cfg = test_config();
    cfg.on_connect = Some(voxgate::config::OnConnectConfig {
        url: target_hook().await,
        timeout_ms: 2000,
        max_webhooks: 8,
    });
    cfg.webhook_policy.allow_private = true;
    cfg.webhook_policy.deny_hosts = vec!["127.0.0.1".into()];
    let gw = Gateway::start(cfg).await;
    let port = victim.addr.port();
    for target in [
        format!("http://127.0.0.1:{port}/w"),
        format!("http://[::ffff:127.0.0.1]:{port}/w"),
        format!("http://[::ffff:7f00:1]:{port}/w"),
    ] {
        let run = stream(&gw.ws(&with_target(&target)), pcm(), Duration::ZERO).await;
        assert_eq!(run.close_code, Some(1008), "{target}");
        assert_eq!(
            run.of_type("Error")[0]["code"],
            "webhook_denied",
            "{target}"
        );
    }
    assert!(
        victim.requests("w").is_empty(),
        "the victim was never reached"
    );
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A subscriber socket, or the HTTP status and body that refused it.
async fn subscribe(gw: &Gateway, id: &str, token: &str) -> Result<Ws, (u16, String)> {
    use tokio_tungstenite::tungstenite::Error;
    let url = gw.ws(&format!("/v1/sessions/{id}/subscribe?token={token}"));
    match tokio_tungstenite::connect_async(url).await {
        Ok((ws, _)) => Ok(ws),
        Err(Error::Http(resp)) => Err((
            resp.status().as_u16(),
            String::from_utf8_lossy(resp.body().as_deref().unwrap_or_default()).into_owned(),
        )),
        Err(e) => panic!("subscribe failed oddly: {e}"),
    }
}

/// Text events from a socket until it closes (or `until` is seen).
async fn events_until(ws: &mut Ws, until: &str) -> Vec<serde_json::Value> {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    let mut out = Vec::new();
    let read = async {
        while let Some(Ok(m)) = ws.next().await {
            if let Message::Text(t) = m {
                let v: serde_json::Value = serde_json::from_str(&t).unwrap();
                let done = v["type"] == until;
                out.push(v);
                if done {
                    break;
                }
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), read)
        .await
        .expect("the event comes within 30 s");
    out
}

/// Sends a second of audio on a resumable session's socket, waits until the gateway has it,
/// drains the gateway and returns the `resume_state` of its `Closed`.
async fn drain(gw: &Gateway, ws: Ws) -> String {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let (mut tx, mut rx) = ws.split();
    let audio = pcm();
    let sent: usize = audio.iter().map(Vec::len).sum();
    for m in audio {
        tx.send(Message::Binary(m.into())).await.unwrap();
    }
    let mut acked = false;
    while let Some(Ok(m)) = rx.next().await {
        let v: serde_json::Value = serde_json::from_str(m.to_text().unwrap_or("{}")).unwrap();
        if v["type"] == "Ack" && v["bytes"] == sent as u64 && !acked {
            acked = true;
            gw.shutdown.cancel();
        }
        if v["type"] == "Closed" {
            return v["resume_state"]
                .as_str()
                .expect("a resume_state")
                .to_owned();
        }
    }
    panic!("no Closed");
}

/// D5: a drained session's `resume_state` continues its own user's session once, on any
/// instance; another user cannot use it, and subscribers never see it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_state_is_bound_to_its_user_and_used_once() {
    let config = || {
        let mut cfg = auth_config();
        cfg.server.resume_secret = Some("shared-deployment-secret".into());
        cfg
    };
    let (a, b) = (
        Gateway::start(config()).await,
        Gateway::start(config()).await,
    );
    let alice = token("alice");
    let query = format!("{LISTEN}&resumable=true&session_id=alice-h");
    let (ws, _) = tokio_tungstenite::connect_async(a.ws(&format!("{query}&token={alice}")))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut watcher = subscribe(&a, "alice-h", &alice)
        .await
        .expect("her own session");
    let state = drain(&a, ws).await;
    let seen = events_until(&mut watcher, "Closed").await;
    let closed = seen.last().unwrap();
    assert_eq!(closed["type"], "Closed");
    assert!(
        closed["resume_state"].is_null(),
        "subscribers never get it: {closed}"
    );
    assert!(!seen.iter().any(|e| e.to_string().contains(&state)));

    let cont = format!("{LISTEN}&resumable=true&resume_state={state}");
    let bob = token("bob");
    assert_eq!(refusal(&b, &cont, &bob).await.as_deref(), Some("forbidden"));
    assert_eq!(
        refusal(&b, &cont, &alice).await,
        None,
        "alice continues her session"
    );
    assert_eq!(
        refusal(&b, &cont, &alice).await.as_deref(),
        Some("resume_failed"),
        "a state continues one session"
    );
    assert_eq!(
        b.metric("voxgate_resume_states_refused_total", "reason=\"replayed\"")
            .await,
        1.0
    );
}

/// D6: session ids live in their creator's namespace. Mallory creating `carol-call` first
/// neither blocks carol's `sid`-bound token nor lets carol's watchers see mallory's session;
/// a monitoring token sees carol's only when it names carol as the owner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_user_cannot_squat_or_impersonate_another_users_session_id() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let gw = Gateway::start(auth_config()).await;
    let id = "carol-call";
    let mallory = token("mallory");
    let (squat, _) = tokio_tungstenite::connect_async(
        gw.ws(&format!("{LISTEN}&session_id={id}&token={mallory}")),
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let carol = sign_claims(&Claims {
        sid: Some(id.into()),
        ..claims("carol")
    });
    let (ws, _) = tokio_tungstenite::connect_async(gw.ws(&format!("{LISTEN}&token={carol}")))
        .await
        .unwrap();
    let (mut tx, mut rx) = ws.split();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut watcher = subscribe(&gw, id, &carol)
        .await
        .expect("carol's sid token watches");
    let monitor = sign_claims(&Claims {
        sessions: vec![id.into()],
        owner: Some("carol".into()),
        ..claims("monitor")
    });
    let mut monitor_ws = subscribe(&gw, id, &monitor).await.expect("named owner");
    let stray = sign_claims(&Claims {
        sessions: vec![id.into()],
        ..claims("monitor")
    });
    assert_eq!(
        subscribe(&gw, id, &stray).await.err().map(|e| e.0),
        Some(404),
        "a grant without an owner names the holder's own sessions"
    );
    for m in pcm() {
        tx.send(Message::Binary(m.into())).await.unwrap();
    }
    tx.send(Message::Text(r#"{"type":"CloseStream"}"#.into()))
        .await
        .unwrap();
    let mut mine = Vec::new();
    while let Some(Ok(m)) = rx.next().await {
        if let Message::Text(t) = m {
            mine.push(serde_json::from_str::<serde_json::Value>(&t).unwrap());
        }
    }
    let closed = mine
        .iter()
        .find(|e| e["type"] == "Closed")
        .expect("carol's session ran");
    assert_eq!(closed["session_id"], id);
    assert_eq!(closed["code"], 1000, "{closed}");
    for w in [&mut watcher, &mut monitor_ws] {
        let seen = events_until(w, "Closed").await;
        assert_eq!(
            seen.last().unwrap()["summary"],
            closed["summary"],
            "carol's session, not mallory's"
        );
    }
    drop(squat);
}

/// D13: reattaching (`?resume=`) passes the per-IP connection rate like a new session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_attempts_are_rate_limited() {
    let mut cfg = test_config();
    cfg.auth.connections_per_ip_per_second = 2.0;
    let gw = Gateway::start(cfg).await;
    let url = gw.ws("/v1/listen?resume=x&resume_token=y");
    let runs =
        futures_util::future::join_all((0..20).map(|_| stream(&url, vec![], Duration::ZERO))).await;
    let code = |r: &ClientRun| r.of_type("Error")[0]["code"].as_str().unwrap().to_owned();
    let limited = runs.iter().filter(|r| code(r) == "rate_limited").count();
    assert!(
        limited >= 10,
        "burst of 4, then refused: {limited} of 20 limited"
    );
    assert!(runs
        .iter()
        .all(|r| ["rate_limited", "resume_failed"].contains(&code(r).as_str())));
}

/// D16: subscribe answers an unknown session and another user's session the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_reveals_no_session_ids() {
    let gw = Gateway::start(auth_config()).await;
    let ann = token("ann");
    let (ws, _) = tokio_tungstenite::connect_async(
        gw.ws(&format!("{LISTEN}&session_id=ann-live&token={ann}")),
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let bob = token("bob");
    let (live_status, live_body) = subscribe(&gw, "ann-live", &bob).await.err().unwrap();
    let (none_status, none_body) = subscribe(&gw, "nobody-xx", &bob).await.err().unwrap();
    assert_eq!(live_status, none_status);
    assert_eq!(
        live_body.replace("ann-live", "ID"),
        none_body.replace("nobody-xx", "ID")
    );
    assert!(subscribe(&gw, "ann-live", &ann).await.is_ok());
    drop(ws);
}

/// D17: what a backend says and where the hook lives stay in the gateway's log: the client's
/// `stt_unavailable` and `on_connect_failed`, and the unauthenticated `/readyz`, say neither.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_answers_and_hook_urls_do_not_reach_clients() {
    use voxgate::config::{SttBackend, SttConfig};
    const LEAK: &str = "Incorrect API key provided: sk-live-SECRET";
    async fn refuse() -> (axum::http::StatusCode, &'static str) {
        (axum::http::StatusCode::UNAUTHORIZED, LEAK)
    }
    let app = Router::new().route("/v1/audio/transcriptions", post(refuse));
    let addr = common::serve(app).await;
    let mut cfg = test_config();
    cfg.segmenter.silence_ms = 250;
    let mut stt = SttConfig::new("w", SttBackend::Openai, &format!("http://{addr}"));
    stt.max_retries = 0;
    cfg.stt.push(stt);
    let gw = Gateway::start(cfg).await;
    let mut speech = pcm_messages("short", None).concat();
    speech.extend(std::iter::repeat_n(0u8, 48_000));
    let msgs = speech.chunks(3200).map(<[u8]>::to_vec).collect();
    let run = stream(&gw.ws(&format!("{LISTEN}&stt=w")), msgs, Duration::ZERO).await;
    let warnings = run.of_type("Warning");
    let unavailable: Vec<_> = warnings
        .iter()
        .filter(|w| w["code"] == "stt_unavailable")
        .collect();
    assert_eq!(unavailable.len(), 1, "{warnings:?}");
    assert!(
        !unavailable[0].to_string().contains("SECRET"),
        "{}",
        unavailable[0]
    );
    let ready = gw.page("/readyz").await;
    assert!(
        ready.contains("stt w (openai)") && !ready.contains("SECRET"),
        "{ready}"
    );

    // A hook that cannot be reached: the client learns that, not where it is.
    let mut cfg = test_config();
    cfg.on_connect = Some(voxgate::config::OnConnectConfig {
        url: "http://127.0.0.1:1/internal-hook-path".into(),
        timeout_ms: 500,
        max_webhooks: 8,
    });
    let gw = Gateway::start(cfg).await;
    let run = stream(&gw.ws(LISTEN), pcm(), Duration::ZERO).await;
    let error = &run.of_type("Error")[0];
    assert_eq!(error["code"], "on_connect_failed");
    let text = format!("{error} {}", run.close_reason);
    assert!(
        !text.contains("internal-hook-path") && !text.contains(":1/"),
        "{text}"
    );
}

/// D15: a webhook request's signature covers its method, path, query, `x-voxgate-*` headers and
/// a timestamp: `voxgate sink` accepts the request as sent, and refuses it replayed with another
/// `uid`, with other sample headers, or signed too long ago.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_requests_cannot_be_altered_or_replayed_late() {
    use voxgate::cli::sink::{self, Sink, SinkConfig};
    use voxgate::consumers::contract::{canonical_string, sign};
    const KEY: &str = "webhook-secret-0123";
    let rx = Receiver::start(Mode::Ok).await;
    let mut cfg = test_config();
    let mut w = voxgate::config::WebhookConfig::new("signed", &rx.url("signed"), Some(0.5));
    w.secret = Some(KEY.into());
    cfg.webhooks.push(w);
    let gw = Gateway::start(cfg).await;
    let run = stream(
        &gw.ws(&format!("{LISTEN}&uid=alice")),
        pcm(),
        Duration::ZERO,
    )
    .await;
    assert_eq!(run.close_code, Some(1000));
    let sent = rx.requests("signed").remove(0);
    assert_eq!(sent.verify(KEY), Ok(()));

    let sink = Sink::new(SinkConfig {
        secret: Some(KEY.into()),
        ..SinkConfig::default()
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(sink::serve(sink.clone(), listener, stop.clone()));
    let http = reqwest::Client::new();
    let replay = |query: String, headers: axum::http::HeaderMap| {
        let mut headers = headers;
        headers.remove("host");
        headers.remove("content-length");
        http.post(format!("http://{addr}/signed?{query}"))
            .headers(headers)
            .body(sent.body.clone())
            .send()
    };
    let status = |r: reqwest::Response| r.status().as_u16();
    assert_eq!(
        status(
            replay(sent.query.clone(), sent.headers.clone())
                .await
                .unwrap()
        ),
        200
    );
    let other_uid = sent.query.replace("uid=alice", "uid=mallory");
    assert_ne!(other_uid, sent.query);
    assert_eq!(
        status(replay(other_uid, sent.headers.clone()).await.unwrap()),
        401,
        "uid"
    );
    let mut other = sent.headers.clone();
    other.insert("x-voxgate-start-sample", "999".parse().unwrap());
    assert_eq!(
        status(replay(sent.query.clone(), other).await.unwrap()),
        401,
        "start-sample"
    );
    // Signed correctly, but ten minutes ago.
    let mut late = sent.headers.clone();
    let then = (now() - 600).to_string();
    late.insert("x-voxgate-timestamp", then.parse().unwrap());
    let canonical = canonical_string("POST", "/signed", &sent.query, &late, &sent.body);
    late.insert(
        "x-voxgate-signature",
        sign(KEY, &canonical).parse().unwrap(),
    );
    assert_eq!(
        status(replay(sent.query.clone(), late).await.unwrap()),
        401,
        "stale"
    );
    assert_eq!(sink.stats(false).bad_signature, 3);
    stop.cancel();
}

/// D5 with the delivery bus: a drained state is spent deployment-wide, so a third instance with
/// no memory of it still refuses it while the continued session runs on the second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_bus_a_drained_state_is_used_once_across_instances() {
    let nats = nats_support::NatsServer::start();
    let config = || {
        let mut cfg = test_config();
        cfg.bus.url = Some(nats.url());
        cfg.bus.partitions = 2;
        cfg.server.resume_secret = Some("shared-deployment-secret".into());
        cfg
    };
    let a = Gateway::start(config()).await;
    let (ws, _) = tokio_tungstenite::connect_async(a.ws(&format!("{LISTEN}&resumable=true")))
        .await
        .unwrap();
    let state = drain(&a, ws).await;
    let cont = format!("{LISTEN}&resumable=true&resume_state={state}");
    let b = Gateway::start(config()).await;
    let (continued, _) = tokio_tungstenite::connect_async(b.ws(&cont)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let c = Gateway::start(config()).await;
    assert_eq!(
        refusal(&c, &cont, "").await.as_deref(),
        Some("resume_failed"),
        "spent on the bus by the second instance"
    );
    drop(continued);
}

//! Security: ownership of sessions and drained states, token checks, the webhook address
//! policy on parsed addresses, signed webhook requests and what clients are told about backends.
//! Every test here attacks a real gateway over sockets on 127.0.0.1.

mod common;

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

#[allow(dead_code)]
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
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
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

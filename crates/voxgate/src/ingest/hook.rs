//! The optional `on_connect` HTTP hook: it receives the connect request's token and query and
//! answers with the session's consumers (per-user webhook URLs and delays) or a rejection.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tracing::warn;

use super::request::ConnectRequest;
use crate::config::{OnConnectConfig, WebhookConfig};

#[derive(Debug, Serialize)]
struct HookRequest<'a> {
    endpoint: &'a str,
    token: Option<&'a str>,
    query: &'a std::collections::HashMap<String, String>,
    peer: String,
}

/// The hook's answer.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HookAnswer {
    pub allow: bool,
    #[serde(default)]
    pub reason: Option<String>,
    #[serde(default)]
    pub uid: Option<String>,
    #[serde(default)]
    pub webhooks: Vec<WebhookConfig>,
    /// Omi: realtime audio app URLs (each a webhook with `omi.audio_app_delay_seconds`).
    #[serde(default)]
    pub audio_apps: Vec<String>,
    /// Omi: the user's realtime transcript webhook.
    #[serde(default)]
    pub transcript_webhook: Option<String>,
    /// Omi: the user's conversation webhook.
    #[serde(default)]
    pub conversation_webhook: Option<String>,
    /// Speech-to-text backends for the session, by configured name (`[]` = none). Absent: the
    /// connect query's `stt=` or the configured defaults. Backend URLs and keys stay in config.
    #[serde(default)]
    pub stt: Option<Vec<String>>,
    /// Speech-to-text options for the session (`language`, `model`, `prompt`, `keyterms`),
    /// checked against each backend's allow-lists.
    #[serde(default)]
    pub stt_options: Option<crate::config::SttOptions>,
    /// Whether the session is recorded (`[recording]`); absent: `recording.default`. A token's
    /// `record` claim wins over it.
    #[serde(default)]
    pub record: Option<bool>,
}

/// Why the hook gave no answer (the message goes to the client with `on_connect_failed`, so it
/// names no URL: transport details are logged by `on_connect`).
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error("on_connect hook unreachable")]
    Unreachable(#[source] reqwest::Error),
    #[error("on_connect hook answered {0}")]
    Status(reqwest::StatusCode),
    #[error("on_connect hook answer unreadable")]
    Body(#[source] reqwest::Error),
    #[error("on_connect hook answer larger than 64 KiB")]
    TooLarge,
    #[error("on_connect hook answer: {0}")]
    Invalid(serde_json::Error),
}

/// Most bytes of a hook answer read.
const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// Asks the hook with the connect request's endpoint, token, query and peer; a failure is
/// logged with its details (the client is told only `HookError`'s generic text).
pub async fn on_connect(
    http: &reqwest::Client,
    cfg: &OnConnectConfig,
    req: &ConnectRequest,
) -> Result<HookAnswer, HookError> {
    let answer = ask(http, cfg, req).await;
    if let Err(e) = &answer {
        let detail = std::error::Error::source(e).map(|s| format!("{s:?}"));
        warn!(error = %e, detail = detail.as_deref().unwrap_or(""), peer = %req.peer, "on_connect hook failed");
    }
    answer
}

async fn ask(
    http: &reqwest::Client,
    cfg: &OnConnectConfig,
    req: &ConnectRequest,
) -> Result<HookAnswer, HookError> {
    let body = HookRequest {
        endpoint: req.endpoint.as_str(),
        token: req.token.as_deref(),
        query: &req.raw_query,
        peer: req.peer.to_string(),
    };
    let resp = http
        .post(&cfg.url)
        .timeout(Duration::from_millis(cfg.timeout_ms))
        .json(&body)
        .send()
        .await
        .map_err(HookError::Unreachable)?;
    let status = resp.status();
    if !status.is_success() {
        return Err(HookError::Status(status));
    }
    let bytes = resp.bytes().await.map_err(HookError::Body)?;
    if bytes.len() > MAX_ANSWER_BYTES {
        return Err(HookError::TooLarge);
    }
    serde_json::from_slice(&bytes).map_err(HookError::Invalid)
}

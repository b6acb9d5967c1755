//! The optional `on_connect` HTTP hook: it receives the connect request's token and query and
//! answers with the session's consumers (per-user webhook URLs and delays) or a rejection.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::{OnConnectConfig, WebhookConfig};
use crate::connection::ListenParams;

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
}

/// Asks the hook; any failure (timeout, non-2xx, bad JSON) is an error string for the client.
pub async fn on_connect(
    http: &reqwest::Client,
    cfg: &OnConnectConfig,
    params: &ListenParams,
    endpoint: &str,
) -> Result<HookAnswer, String> {
    let body = HookRequest {
        endpoint,
        token: params.token.as_deref(),
        query: &params.query,
        peer: params.peer.to_string(),
    };
    let resp = http
        .post(&cfg.url)
        .timeout(Duration::from_millis(cfg.timeout_ms))
        .json(&body)
        .send()
        .await
        .map_err(|e| format!("on_connect hook unreachable: {e}"))?;
    let status = resp.status();
    if !status.is_success() {
        return Err(format!("on_connect hook answered {status}"));
    }
    let bytes = resp
        .bytes()
        .await
        .map_err(|e| format!("on_connect hook body: {e}"))?;
    if bytes.len() > 64 * 1024 {
        return Err("on_connect hook answer larger than 64 KiB".into());
    }
    serde_json::from_slice(&bytes).map_err(|e| format!("on_connect hook answer: {e}"))
}

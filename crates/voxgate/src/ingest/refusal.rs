//! Refusing a connection before its session starts: a closed set of reasons, each with its close
//! code and client error code, mapped in one place; then an `Error` event and a close frame.

use std::net::SocketAddr;

use axum::extract::ws::{CloseFrame, Message};
use metrics::counter;
use tracing::info;
use voxgate_session::{CloseCode, ServerEvent};

use super::client::{await_peer_close, send_within, truncate_reason, WsSink, WsStream};
use crate::metrics as m;

/// Why a connection is refused. `code()` is the client error code and metric label,
/// `close_code()` the WebSocket close code (1013 = retry later, elsewhere too).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefuseReason {
    ShuttingDown,
    RateLimited,
    Unauthorized,
    OverCapacity,
    UserOverCapacity,
    UnsupportedEncoding,
    /// Twilio's `start` named a media format other than mu-law 8 kHz mono.
    UnsupportedFormat,
    InvalidSampleRate,
    MissingUid,
    ResumeFailed,
    InvalidSessionId,
    Forbidden,
    OnConnectFailed,
    OnConnectInvalid,
    Rejected,
    WebhookDenied,
    UnknownConsumer,
    InvalidConsumer,
    UnknownStt,
    InvalidParameters,
    SessionIdInUse,
    SessionEnded,
    BusUnavailable,
    /// Twilio's `start` did not come within `twilio.start_timeout_seconds` of the connect.
    StartTimeout,
    /// More messages before Twilio's `start` than `twilio.max_messages_before_start`.
    MessageFlood,
    /// Draining, told after the socket was accepted (Omi's listen side trips its circuit
    /// breaker on a refused upgrade, and reconnects elsewhere on 1001).
    Draining,
}

impl RefuseReason {
    /// The client error code (also the `reason` label of `voxgate_sessions_rejected_total`).
    pub fn code(self) -> &'static str {
        match self {
            Self::ShuttingDown => "shutting_down",
            Self::RateLimited => "rate_limited",
            Self::Unauthorized => "unauthorized",
            Self::OverCapacity => "over_capacity",
            Self::UserOverCapacity => "user_over_capacity",
            Self::UnsupportedEncoding => "unsupported_encoding",
            Self::UnsupportedFormat => "unsupported_format",
            Self::InvalidSampleRate => "invalid_sample_rate",
            Self::MissingUid => "missing_uid",
            Self::ResumeFailed => "resume_failed",
            Self::InvalidSessionId => "invalid_session_id",
            Self::Forbidden => "forbidden",
            Self::OnConnectFailed => "on_connect_failed",
            Self::OnConnectInvalid => "on_connect_invalid",
            Self::Rejected => "rejected",
            Self::WebhookDenied => "webhook_denied",
            Self::UnknownConsumer => "unknown_consumer",
            Self::InvalidConsumer => "invalid_consumer",
            Self::UnknownStt => "unknown_stt",
            Self::InvalidParameters => "invalid_parameters",
            Self::SessionIdInUse => "session_id_in_use",
            Self::SessionEnded => "session_ended",
            Self::BusUnavailable => "bus_unavailable",
            Self::StartTimeout => "start_timeout",
            Self::MessageFlood => "message_flood",
            Self::Draining => "draining",
        }
    }

    /// The WebSocket close code: capacity and dependencies say "try again later" (1013), a
    /// format we cannot take is 1003, our own failures 1011, and the rest are policy (1008).
    pub fn close_code(self) -> CloseCode {
        match self {
            Self::ShuttingDown
            | Self::RateLimited
            | Self::OverCapacity
            | Self::UserOverCapacity
            | Self::BusUnavailable => CloseCode::TryAgainLater,
            Self::UnsupportedEncoding | Self::UnsupportedFormat => CloseCode::Unsupported,
            Self::OnConnectFailed | Self::OnConnectInvalid => CloseCode::Internal,
            Self::Draining => CloseCode::GoingAway,
            _ => CloseCode::Policy,
        }
    }
}

impl RefuseReason {
    /// The HTTP status of a refusal at the handshake (protocols whose clients expect one):
    /// 401 for credentials, 503 for anything that passes (capacity, rate, draining; with
    /// `Retry-After`), 400 for the request itself.
    pub fn http_status(self) -> axum::http::StatusCode {
        use axum::http::StatusCode;
        match self.close_code() {
            _ if self == Self::Unauthorized => StatusCode::UNAUTHORIZED,
            _ if self == Self::Draining => StatusCode::SERVICE_UNAVAILABLE,
            CloseCode::TryAgainLater => StatusCode::SERVICE_UNAVAILABLE,
            CloseCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            _ => StatusCode::BAD_REQUEST,
        }
    }
}

/// A refusal before the session starts: an `Error` event, then a close with a reason.
#[derive(Debug)]
pub struct Refusal {
    pub reason: RefuseReason,
    pub message: String,
}

impl Refusal {
    /// The `Error` event that tells the client.
    pub fn event(&self) -> ServerEvent {
        ServerEvent::error(self.reason.code(), self.message.clone())
    }

    pub fn new(reason: RefuseReason, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
        }
    }
}

/// Answers a refused handshake with `refusal`'s HTTP status and `body` (JSON), counted and
/// logged; a 503 carries `Retry-After: 1`.
pub fn http_refusal(
    peer: SocketAddr,
    refusal: &Refusal,
    body: serde_json::Value,
    headers: &[(&'static str, &str)],
) -> axum::response::Response {
    use axum::http::{header, HeaderValue, StatusCode};
    use axum::response::IntoResponse;
    let error = refusal.reason.code();
    counter!(m::SESSIONS_REJECTED, "reason" => error).increment(1);
    counter!(m::CLIENT_ERRORS, "code" => error).increment(1);
    info!(%peer, error, message = ?refusal.message, "connection refused at the handshake");
    let status = refusal.reason.http_status();
    let mut response = (status, axum::Json(body)).into_response();
    let out = response.headers_mut();
    if status == StatusCode::SERVICE_UNAVAILABLE {
        out.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    for (name, value) in headers {
        if let Ok(v) = HeaderValue::from_str(value) {
            out.insert(*name, v);
        }
    }
    response
}

/// Tells the client why (`first`, the `Error` event in its frontend's form, or voxgate's own
/// `Error` event; then a close frame), counted and logged.
pub async fn refuse(
    mut sink: WsSink,
    mut stream: WsStream,
    peer: SocketAddr,
    refusal: Refusal,
    first: Option<Message>,
) {
    let error = refusal.reason.code();
    let code = refusal.reason.close_code().as_u16();
    counter!(m::SESSIONS_REJECTED, "reason" => error).increment(1);
    counter!(m::CLIENT_ERRORS, "code" => error).increment(1);
    counter!(m::CLOSES, "code" => code.to_string()).increment(1);
    info!(%peer, error, message = ?refusal.message, "connection refused");
    // Send failures mean the client is already gone; the refusal is counted and logged above.
    // Each send has a deadline, so a client that does not read cannot hold the refusal.
    let first = first.unwrap_or_else(|| Message::Text(refusal.event().to_json().into()));
    if send_within(&mut sink, first).await {
        let close = Message::Close(Some(CloseFrame {
            code,
            reason: truncate_reason(&refusal.message).into(),
        }));
        send_within(&mut sink, close).await;
    }
    await_peer_close(&mut stream).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_map_to_their_close_codes() {
        use RefuseReason::*;
        let table = [
            (ShuttingDown, 1013),
            (RateLimited, 1013),
            (Unauthorized, 1008),
            (OverCapacity, 1013),
            (UserOverCapacity, 1013),
            (UnsupportedEncoding, 1003),
            (UnsupportedFormat, 1003),
            (InvalidSampleRate, 1008),
            (MissingUid, 1008),
            (ResumeFailed, 1008),
            (InvalidSessionId, 1008),
            (Forbidden, 1008),
            (OnConnectFailed, 1011),
            (OnConnectInvalid, 1011),
            (Rejected, 1008),
            (WebhookDenied, 1008),
            (UnknownConsumer, 1008),
            (InvalidConsumer, 1008),
            (UnknownStt, 1008),
            (InvalidParameters, 1008),
            (SessionIdInUse, 1008),
            (SessionEnded, 1008),
            (BusUnavailable, 1013),
            (StartTimeout, 1008),
            (MessageFlood, 1008),
        ];
        for (reason, code) in table {
            assert_eq!(reason.close_code().as_u16(), code, "{reason:?}");
        }
        assert_eq!(SessionIdInUse.code(), "session_id_in_use");
        assert_eq!(OnConnectFailed.code(), "on_connect_failed");
    }
}

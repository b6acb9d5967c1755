//! Deepgram's live API on `/v1/listen`, for clients written against Deepgram (its SDKs,
//! Pipecat, LiveKit): their query parameters, control messages and auth in, Deepgram's message
//! shapes out, with any voxgate backend behind it.
//!
//! Deepgram clients that only let you set a host connect to exactly `/v1/listen`, so the dialect
//! is chosen per connection (`dialect`), not by path. The handshake is answered the way those
//! clients expect: a refused key is HTTP 401, overload is 503 with `Retry-After` (Pipecat gives up
//! for good on any 4xx), the offered `token`/`bearer` subprotocol is echoed and `dg-request-id`
//! names the request.

pub mod frontend;
pub mod query;
pub mod render;

use std::collections::HashMap;
use std::net::SocketAddr;

use axum::http::{header, HeaderMap, StatusCode};
use axum::response::Response;

use self::frontend::Deepgram;
use crate::config::Dialect;
use crate::ingest::admission;
use crate::ingest::refusal::{self, Refusal, RefuseReason};
use crate::ingest::request::{ConnectRequest, Endpoint};
use crate::shared::Shared;

/// The subprotocols a browser Deepgram client offers before its key (`token, <key>`).
pub const SUBPROTOCOLS: [&str; 2] = ["token", "bearer"];

/// Whether a `/v1/listen` connection speaks Deepgram's protocol (see `Dialect::Auto`).
pub fn chosen(mode: Dialect, headers: &HeaderMap, query: &HashMap<String, String>) -> bool {
    match mode {
        Dialect::Deepgram => return true,
        Dialect::Voxgate => return false,
        Dialect::Auto => {}
    }
    match query.get("dialect").map(String::as_str) {
        Some("deepgram") => return true,
        Some("voxgate") => return false,
        _ => {}
    }
    let token_auth = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.len() > 6 && v[..6].eq_ignore_ascii_case("token "));
    token_auth
        || subprotocol_key(headers).is_some()
        || headers.contains_key("x-deepgram-session-id")
}

/// The key a Deepgram client sends: `Authorization: Token|Bearer <key>`, the browser
/// subprotocol pair `token, <key>` / `bearer, <key>`, or `?token=`.
pub fn credentials(headers: &HeaderMap, query: &HashMap<String, String>) -> Option<String> {
    let auth = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, key) = v.split_once(' ')?;
            let known = ["token", "bearer"]
                .iter()
                .any(|s| scheme.eq_ignore_ascii_case(s));
            known.then(|| key.trim().to_owned())
        });
    auth.or_else(|| subprotocol_key(headers))
        .or_else(|| query.get("token").cloned())
}

/// The key of `Sec-WebSocket-Protocol: token, <key>` (or `bearer, <key>`).
fn subprotocol_key(headers: &HeaderMap) -> Option<String> {
    let offered = headers.get(header::SEC_WEBSOCKET_PROTOCOL)?.to_str().ok()?;
    let mut parts = offered.split(',').map(str::trim);
    let scheme = parts.next()?;
    let key = parts.next()?;
    (SUBPROTOCOLS.iter().any(|s| scheme.eq_ignore_ascii_case(s)) && !key.is_empty())
        .then(|| key.to_owned())
}

/// Admits a Deepgram connection before the upgrade, so that refusals are the HTTP statuses
/// Deepgram clients understand; the session is then prepared with this admission.
pub fn handshake(
    shared: &Shared,
    peer: SocketAddr,
    headers: &HeaderMap,
    query: HashMap<String, String>,
) -> Result<(ConnectRequest, Deepgram), Box<Response>> {
    let token = credentials(headers, &query);
    let request_id = uuid::Uuid::new_v4().to_string();
    let refuse = |refusal: Refusal| Box::new(http_refusal(peer, &request_id, refusal));
    let mut req = ConnectRequest::parse(Endpoint::Deepgram, peer, token, query);
    if let Err(why) = &req.source {
        return Err(refuse(Refusal::new(
            RefuseReason::UnsupportedEncoding,
            why.clone(),
        )));
    }
    let asked = query::Asked::parse(&req.raw_query, &shared.cfg).map_err(refuse)?;
    let admitted = admission::admit(shared, &req).map_err(refuse)?;
    let opts = asked.apply(&mut req, request_id, &shared.cfg);
    Ok((req, Deepgram::new(opts, admitted)))
}

/// A refused handshake, with a Deepgram-style body (see `refusal::http_refusal`).
fn http_refusal(peer: SocketAddr, request_id: &str, refusal: Refusal) -> Response {
    let err_code = match refusal.reason.http_status() {
        StatusCode::UNAUTHORIZED => "INVALID_AUTH",
        StatusCode::SERVICE_UNAVAILABLE => "TOO_MANY_REQUESTS",
        _ => "Bad Request",
    };
    let body = serde_json::json!({
        "err_code": err_code,
        "err_msg": refusal.message,
        "request_id": request_id,
        "category": refusal.reason.code(),
    });
    refusal::http_refusal(peer, &refusal, body, &[("dg-request-id", request_id)])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    fn query(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn deepgram_clients_are_told_apart_by_how_they_authenticate() {
        let none = query(&[]);
        let auto = Dialect::Auto;
        assert!(chosen(
            auto,
            &headers(&[("authorization", "Token k")]),
            &none
        ));
        assert!(chosen(
            auto,
            &headers(&[("sec-websocket-protocol", "token, k")]),
            &none
        ));
        assert!(chosen(
            auto,
            &headers(&[("x-deepgram-session-id", "u")]),
            &none
        ));
        // voxgate's own clients: a bearer JWT, or nothing.
        assert!(!chosen(
            auto,
            &headers(&[("authorization", "Bearer j")]),
            &none
        ));
        assert!(!chosen(auto, &headers(&[]), &query(&[("model", "nova-3")])));
        // The query overrides the rule; config overrides both.
        let dg = query(&[("dialect", "deepgram")]);
        assert!(chosen(auto, &headers(&[]), &dg));
        let vox = query(&[("dialect", "voxgate")]);
        assert!(!chosen(
            auto,
            &headers(&[("authorization", "Token k")]),
            &vox
        ));
        assert!(chosen(Dialect::Deepgram, &headers(&[]), &vox));
        assert!(!chosen(
            Dialect::Voxgate,
            &headers(&[("authorization", "Token k")]),
            &dg
        ));
    }

    #[test]
    fn the_key_comes_from_the_header_the_subprotocol_or_the_query() {
        let none = query(&[]);
        let key =
            |h: &[(&'static str, &str)], q: &HashMap<String, String>| credentials(&headers(h), q);
        assert_eq!(
            key(&[("authorization", "Token abc")], &none).as_deref(),
            Some("abc")
        );
        assert_eq!(
            key(&[("authorization", "bearer j.w.t")], &none).as_deref(),
            Some("j.w.t")
        );
        assert_eq!(
            key(&[("sec-websocket-protocol", "token, abc")], &none).as_deref(),
            Some("abc")
        );
        assert_eq!(key(&[("sec-websocket-protocol", "chat")], &none), None);
        assert_eq!(key(&[], &query(&[("token", "q")])).as_deref(), Some("q"));
        assert_eq!(key(&[("authorization", "Basic x")], &none), None);
    }
}

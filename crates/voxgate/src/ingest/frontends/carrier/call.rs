//! What every carrier family shares: the call a stream describes (`CallStart`), the limits
//! before it is described, how it becomes the session's request, and its events for
//! subscribers.

use std::collections::HashMap;

use voxgate_session::ServerEvent;

use super::start;
use crate::fanout::subscribers::Hub;
use crate::ingest::admission::Admitted;
use crate::ingest::frontends::{Accept, Action, Frontend};
use crate::ingest::request::{valid_session_id, Carrier, ConnectRequest};
use crate::shared::Shared;

/// What a carrier told about its call before the audio.
#[derive(Debug, Clone)]
pub struct CallStart {
    pub carrier: Carrier,
    pub stream_id: String,
    pub call_id: String,
    /// Custom parameters (string values only): `token`, `consumers`, `uid`, `session_id` choose
    /// the session as the query does on `/v1/listen`.
    pub custom: HashMap<String, String>,
    /// voxgate's name of the audio encoding (`mulaw`, `alaw`, `linear16`).
    pub encoding: &'static str,
    pub sample_rate: u32,
    pub channels: u8,
    /// The description as sent, for subscribers.
    pub detail: serde_json::Value,
}

/// The `[carriers]` limits of the phase before the call is described.
pub(super) fn start_limits(shared: &Shared, what: &'static str) -> start::StartLimits {
    start::StartLimits {
        timeout: shared.cfg.carriers.start_timeout(),
        max_messages: shared.cfg.carriers.max_messages_before_start,
        section: "carriers",
        what,
    }
}

/// The session a described call asks for: its token checked, its custom parameters mirrored
/// into the query, its stream id as the session id (unless one was asked for), its format.
pub(super) fn session_for(
    shared: &Shared,
    mut req: ConnectRequest,
    mut admitted: Admitted,
    call: CallStart,
    make: impl FnOnce(&CallStart, Admitted) -> Box<dyn Frontend>,
) -> Accept {
    let token = call.custom.get("token").cloned();
    if let Err(refusal) = start::check_token(shared, &mut admitted, &mut req, token) {
        return Accept::Refuse(req, refusal);
    }
    for (k, v) in &call.custom {
        if matches!(k.as_str(), "consumers" | "uid" | "session_id" | "parties") {
            req.raw_query.insert(k.clone(), v.clone());
        }
    }
    if !req.raw_query.contains_key("session_id") && valid_session_id(&call.stream_id) {
        req.raw_query
            .insert("session_id".into(), call.stream_id.clone());
    }
    let mut typed = ConnectRequest::parse(req.endpoint, req.peer, req.token, req.raw_query);
    typed.set_source(call.encoding, call.sample_rate);
    if call.channels > 1 {
        typed
            .raw_query
            .insert("channels".into(), call.channels.to_string());
        typed.source = crate::ingest::request::source_format(&typed.raw_query);
    }
    let frontend = make(&call, admitted);
    Accept::Session(typed, frontend)
}

/// The string values of a JSON object (custom parameters).
pub(super) fn string_map(v: &serde_json::Value) -> HashMap<String, String> {
    v.as_object()
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                .collect()
        })
        .unwrap_or_default()
}

/// A carrier's control event for the consumers and subscribers.
pub(super) fn telephony(event: &str, detail: Option<&serde_json::Value>) -> Action {
    Action::Notice(ServerEvent::Telephony {
        event: event.to_owned(),
        detail: detail.cloned().unwrap_or_default(),
    })
}

/// Tells the session's subscribers how the call started (`carrier` added to the description).
pub(super) fn publish_start(hub: &Hub, carrier: Carrier, mut detail: serde_json::Value) {
    if let Some(obj) = detail.as_object_mut() {
        obj.insert("carrier".into(), carrier.as_str().into());
    }
    let event = ServerEvent::Telephony {
        event: "start".into(),
        detail,
    };
    hub.publish_event(&event.to_json());
}

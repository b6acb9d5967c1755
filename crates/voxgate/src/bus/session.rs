//! A session's record on the bus: created with its frozen sinks when the session starts here, or
//! read and continued when another gateway ran it and went away.

use std::sync::Arc;

use tracing::{info, warn};

use super::publish::Continuation;
use super::{Bus, BusError, SessionRecord, Subjects, TranscriptTarget, MAX_BATCH_SECONDS};
use crate::config::WebhookConfig;
use crate::fanout::stt::Backend;

/// The bus side of one session.
pub struct BusSession {
    pub subjects: Subjects,
    pub record: SessionRecord,
    /// Whether this gateway created the record (else it continues the session).
    pub created: bool,
    pub continuation: Option<Continuation>,
}

/// Why a session cannot start on the bus.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The bus did not answer (retry later).
    #[error("the delivery bus is unavailable; retry later")]
    Unavailable(#[source] BusError),
    /// A webhook's batch would not fit one bus message.
    #[error("webhook {0:?}: delay_seconds must be <= {max} with the delivery bus", max = MAX_BATCH_SECONDS)]
    BatchTooLong(String),
    /// With tokens, only the session's own user may continue it.
    #[error("session {0:?} belongs to another user")]
    Forbidden(String),
    /// The session closed for good.
    #[error("session {0:?} already ended; use a new session_id")]
    Ended(String),
}

/// Who opens the session and with which sinks.
pub struct Opening<'a> {
    pub session_id: &'a str,
    pub uid: &'a str,
    pub authenticated: bool,
    pub from_hook: bool,
    pub webhooks: &'a [Arc<WebhookConfig>],
    pub stt: &'a [Arc<Backend>],
}

/// Freezes a new session's sinks in the bus, or loads and continues an existing record.
pub async fn open(bus: &Bus, o: Opening<'_>) -> Result<BusSession, OpenError> {
    let session_id = o.session_id;
    let unavailable = |e: BusError| {
        warn!(session = %session_id, error = %e, "bus unavailable at session start");
        OpenError::Unavailable(e)
    };
    let subjects = Subjects::new(&bus.cfg, session_id);
    let key = subjects.record_key();
    let record = new_record(bus, &o)?;
    if bus
        .create_record(&key, &record)
        .await
        .map_err(unavailable)?
    {
        return Ok(BusSession {
            subjects,
            record,
            created: true,
            continuation: None,
        });
    }
    let existing = bus
        .record(&key)
        .await
        .map_err(unavailable)?
        .ok_or_else(|| unavailable(BusError::Nats("session record vanished".into())))?;
    // With tokens, only the session's own user may continue it (its audio goes to that user's
    // sinks).
    if o.authenticated && existing.uid != o.uid {
        return Err(OpenError::Forbidden(session_id.to_owned()));
    }
    if existing.ended {
        return Err(OpenError::Ended(session_id.to_owned()));
    }
    let cont = Continuation::read(bus, &subjects, &existing)
        .await
        .map_err(unavailable)?;
    info!(session = %session_id, samples = cont.samples(), utterances = cont.utterances, "continuing a bus session started elsewhere");
    Ok(BusSession {
        subjects,
        record: existing,
        created: false,
        continuation: Some(cont),
    })
}

/// The record a new session freezes: its audio webhooks and its transcript webhooks.
fn new_record(bus: &Bus, o: &Opening<'_>) -> Result<SessionRecord, OpenError> {
    let audio: Vec<WebhookConfig> = o
        .webhooks
        .iter()
        .filter(|w| w.delay_seconds.is_some())
        .map(|w| (**w).clone())
        .collect();
    if let Some(w) = audio
        .iter()
        .find(|w| w.delay_seconds.is_some_and(|d| d > MAX_BATCH_SECONDS))
    {
        return Err(OpenError::BatchTooLong(w.name.clone()));
    }
    Ok(SessionRecord {
        session_id: o.session_id.to_owned(),
        uid: o.uid.to_owned(),
        tenant: bus.cfg.tenant.clone(),
        audio,
        transcripts: o
            .stt
            .iter()
            .filter_map(|b| {
                Some(TranscriptTarget {
                    backend: b.cfg.name.clone(),
                    url: b.cfg.transcript_webhook.clone()?,
                    timeout_ms: b.cfg.timeout_ms,
                })
            })
            .collect(),
        from_hook: o.from_hook,
        ended: false,
    })
}

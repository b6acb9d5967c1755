//! Continuing a session on another instance after a drain. The draining instance flushes every
//! consumer, then puts a signed state in `Closed`; the client reconnects anywhere with
//! `?resume_state=...` and resends its stream from the start; the new instance discards the
//! samples already delivered and continues media time, utterance numbers and webhook sequences.

use base64::Engine;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

/// What a continued session needs to know.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandoffState {
    pub session_id: String,
    pub uid: String,
    pub samples: u64,
    pub utterances: u64,
    /// Webhook names and the sequence number each continues at.
    pub webhooks: Vec<(String, u64)>,
    /// Unix seconds after which the state is refused.
    pub expires: u64,
    /// A random id: each state continues one session (`SpentStates`).
    pub jti: String,
}

/// Why a `resume_state` is refused (the message goes to the client with `resume_failed`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HandoffError {
    #[error("resume_state too long")]
    TooLong,
    #[error("malformed resume_state")]
    Malformed,
    #[error("resume_state signature does not verify")]
    BadSignature,
    #[error("resume_state expired")]
    Expired,
}

/// Longest `resume_state` accepted.
const MAX_TOKEN_BYTES: usize = 8192;

fn mac(secret: &str, payload: &str) -> String {
    let mut m = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    m.update(payload.as_bytes());
    hex::encode(m.finalize().into_bytes())
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl HandoffState {
    pub fn sign(&self, secret: &str) -> String {
        let json = serde_json::to_vec(self).expect("state serializes");
        let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json);
        let tag = mac(secret, &payload);
        format!("{payload}.{tag}")
    }

    pub fn verify(token: &str, secret: &str) -> Result<Self, HandoffError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(HandoffError::TooLong);
        }
        let (payload, tag) = token.split_once('.').ok_or(HandoffError::Malformed)?;
        let want = mac(secret, payload);
        if !crate::auth::constant_time_eq(want.as_bytes(), tag.as_bytes()) {
            return Err(HandoffError::BadSignature);
        }
        let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .map_err(|_| HandoffError::Malformed)?;
        let state: Self = serde_json::from_slice(&json).map_err(|_| HandoffError::Malformed)?;
        if state.expires < unix_now() {
            return Err(HandoffError::Expired);
        }
        Ok(state)
    }

    /// The state of a session that closed with `summary` (its webhook consumers' next sequence
    /// numbers included), valid for the grace period but at least a minute.
    pub fn from_summary(
        session_id: &str,
        uid: &str,
        summary: &voxgate_session::CloseSummary,
        grace: std::time::Duration,
    ) -> Self {
        Self {
            session_id: session_id.to_owned(),
            uid: uid.to_owned(),
            samples: summary.samples_decoded,
            utterances: summary.utterances,
            webhooks: summary
                .consumers
                .iter()
                .filter(|c| c.kind == crate::fanout::ConsumerKind::Webhook.as_str())
                .map(|c| (c.name.clone(), c.next_seq))
                .collect(),
            expires: 0,
            jti: uuid::Uuid::new_v4().simple().to_string(),
        }
        .expiring_in(grace.as_secs_f64().max(60.0))
    }

    pub fn expiring_in(mut self, seconds: f64) -> Self {
        self.expires = unix_now() + seconds.max(1.0) as u64;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signed_states_verify_and_tampered_ones_do_not() {
        let s = HandoffState {
            session_id: "a".into(),
            uid: "u".into(),
            samples: 5,
            utterances: 1,
            webhooks: vec![("w".into(), 3)],
            expires: 0,
            jti: "j".into(),
        }
        .expiring_in(60.0);
        let t = s.sign("0123456789abcdef");
        assert_eq!(HandoffState::verify(&t, "0123456789abcdef").unwrap(), s);
        assert!(HandoffState::verify(&t, "another-secret-xx").is_err());
        let mut bad = t.clone();
        bad.insert(3, 'x');
        assert!(HandoffState::verify(&bad, "0123456789abcdef").is_err());
        let old = HandoffState { expires: 1, ..s };
        assert!(HandoffState::verify(&old.sign("k"), "k").is_err());
    }
}

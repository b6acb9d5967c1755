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
}

fn mac(secret: &str, payload: &str) -> String {
    let mut m = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    m.update(payload.as_bytes());
    hex::encode(m.finalize().into_bytes())
}

fn unix_now() -> u64 {
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

    pub fn verify(token: &str, secret: &str) -> Result<Self, String> {
        if token.len() > 8192 {
            return Err("resume_state too long".into());
        }
        let (payload, tag) = token.split_once('.').ok_or("malformed resume_state")?;
        let want = mac(secret, payload);
        let same = want.len() == tag.len()
            && want
                .bytes()
                .zip(tag.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0;
        if !same {
            return Err("resume_state signature does not verify".into());
        }
        let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .map_err(|_| "malformed resume_state")?;
        let state: Self = serde_json::from_slice(&json).map_err(|_| "malformed resume_state")?;
        if state.expires < unix_now() {
            return Err("resume_state expired".into());
        }
        Ok(state)
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

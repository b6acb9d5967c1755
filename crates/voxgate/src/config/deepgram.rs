//! `[deepgram]`: Deepgram's live API on `/v1/listen` (which connections speak it, and the bounds
//! on what a Deepgram client may ask of the segmenter).

use serde::{Deserialize, Serialize};

/// Which protocol `/v1/listen` speaks to a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dialect {
    /// Per connection: `dialect=` in the query, else Deepgram when the client authenticates the
    /// way Deepgram clients do (`Authorization: Token`, the `token`/`bearer` subprotocol, or an
    /// `x-deepgram-session-id` header), else voxgate's own protocol.
    #[default]
    Auto,
    /// Every connection speaks Deepgram's protocol.
    Deepgram,
    /// Every connection speaks voxgate's protocol.
    Voxgate,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeepgramConfig {
    /// How `/v1/listen` chooses its protocol per connection. Default `auto`.
    pub dialect: Dialect,
    /// The shortest silence (`endpointing=` ms) that ends an utterance for a Deepgram client;
    /// a shorter one is raised to it. Deepgram's own default is 10 ms and LiveKit sends 25 ms:
    /// taken literally, every pause between words would cut an utterance and cost a backend
    /// request. Default 300.
    pub min_endpointing_ms: u64,
}

impl Default for DeepgramConfig {
    fn default() -> Self {
        Self {
            dialect: Dialect::Auto,
            min_endpointing_ms: 300,
        }
    }
}

impl DeepgramConfig {
    pub(super) fn validate(&self, errors: &mut Vec<String>) {
        if !(10..=10_000).contains(&self.min_endpointing_ms) {
            errors.push("deepgram.min_endpointing_ms: must be in [10, 10000]".into());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_endpointing_floor_is_checked() {
        let mut d = DeepgramConfig::default();
        let mut errors = Vec::new();
        d.validate(&mut errors);
        assert!(errors.is_empty());
        d.min_endpointing_ms = 0;
        d.validate(&mut errors);
        assert_eq!(
            errors,
            ["deepgram.min_endpointing_ms: must be in [10, 10000]"]
        );
    }
}

//! What a session asks of its speech-to-text backends (`language`, `model`, `prompt`, key
//! terms), from the connect query, the `on_connect` answer or a token claim. Kept apart from
//! `config` and `auth` so that both may name it without a cycle.

use serde::{Deserialize, Serialize};

/// What a session asks of its speech-to-text backends (connect query, `on_connect` answer's
/// `stt_options`, or a token's `stt` claim); checked per backend by `SttConfig::permit`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SttOptions {
    #[serde(default)]
    pub language: Option<String>,
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub prompt: Option<String>,
    #[serde(default)]
    pub keyterms: Vec<String>,
}

impl SttOptions {
    /// From a connect query: `language`, `model`, `prompt`, `keyterm` (comma-separated).
    pub fn from_query(query: &std::collections::HashMap<String, String>) -> Self {
        let get = |k: &str| query.get(k).filter(|v| !v.is_empty()).cloned();
        Self {
            language: get("language"),
            model: get("model"),
            prompt: get("prompt"),
            keyterms: query
                .get("keyterm")
                .map(|v| {
                    v.split(',')
                        .map(str::trim)
                        .filter(|t| !t.is_empty())
                        .map(str::to_owned)
                        .collect()
                })
                .unwrap_or_default(),
        }
    }

    /// Field by field, the first source that sets a field wins (`self` first).
    pub fn or(self, other: &SttOptions) -> Self {
        Self {
            language: self.language.or_else(|| other.language.clone()),
            model: self.model.or_else(|| other.model.clone()),
            prompt: self.prompt.or_else(|| other.prompt.clone()),
            keyterms: if self.keyterms.is_empty() {
                other.keyterms.clone()
            } else {
                self.keyterms
            },
        }
    }

    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

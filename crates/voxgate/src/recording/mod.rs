//! Recordings in object storage: where a session's audio and events live (`layout`), opening
//! the configured store (`open`), and reading a recording back as one WAV by streaming its
//! chunks (`assemble`), for the HTTP endpoint (`recording_http`) and `voxgate recording`. The recorder
//! consumer that writes them is `fanout::recorder`.
//!
//! Layout under the store URL's prefix, per session (`owner` is the token's user, `_` without
//! tokens):
//! - `{owner}/{session}/audio/{start:012}-{end:012}.pcm`: PCM16 LE 16 kHz mono samples
//!   `[start, end)` of the session's timeline. Keys are sample ranges cut at multiples of
//!   `chunk_seconds`, so writing the same audio again (a retry, a resumed or continued session)
//!   writes the same key with the same bytes.
//! - `{owner}/{session}/events/{sample:012}-{writer}-{seq:04}.jsonl`: session events (one JSON
//!   per line), flushed with each audio chunk and at close; `sample` is where the session stood.
//! - `{owner}/{session}/summary.json`: written at close (close code, samples, what was lost).

pub mod assemble;
pub mod crypt;
pub mod layout;

use std::sync::Arc;

use object_store::path::Path;
use object_store::ObjectStore;

use crate::config::RecordingConfig;

/// A recording store and the prefix recordings go under.
#[derive(Debug, Clone)]
pub struct Store {
    pub inner: Arc<dyn ObjectStore>,
    pub prefix: Path,
}

/// Why the recording store cannot be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("recording.url {0:?}: {1}")]
    Url(String, String),
    #[error("recording.url {0:?}: {1}")]
    Store(String, #[source] object_store::Error),
    #[error("recording directory {0:?}: {1}")]
    Dir(String, #[source] std::io::Error),
}

impl Store {
    /// Opens `cfg.url`: a URL with a scheme through `object_store`, a plain path as a local
    /// directory (relative to the working directory). Nothing is created until the first write.
    pub fn open(cfg: &RecordingConfig) -> Result<Self, OpenError> {
        let raw = cfg.url.trim();
        let url = if raw.contains("://") {
            url::Url::parse(raw).map_err(|e| OpenError::Url(raw.into(), e.to_string()))?
        } else {
            let cwd = std::env::current_dir().map_err(|e| OpenError::Dir(raw.into(), e))?;
            url::Url::from_directory_path(cwd.join(raw))
                .map_err(|()| OpenError::Url(raw.into(), "not a directory path".into()))?
        };
        let (store, prefix) = object_store::parse_url_opts(&url, cfg.options.iter())
            .map_err(|e| OpenError::Store(raw.into(), e))?;
        Ok(Self {
            inner: Arc::from(store),
            prefix,
        })
    }
}

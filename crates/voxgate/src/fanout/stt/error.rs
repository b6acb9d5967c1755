//! Why a session gets no speech-to-text: an unknown backend name, or a failed utterance.

/// A session asked for a backend that is not configured.
#[derive(Debug, thiserror::Error)]
#[error("no speech-to-text backend named {0:?}")]
pub struct UnknownBackend(pub String);

/// Why an utterance got no transcript (the text is what `stt_unavailable` and `/readyz` say).
#[derive(Debug, thiserror::Error)]
pub enum SttError {
    #[error("unreadable answer: {0}")]
    BadAnswer(reqwest::Error),
    #[error("HTTP {status}: {body}")]
    Status {
        status: reqwest::StatusCode,
        /// The start of the answer's body.
        body: String,
    },
    #[error("request timed out")]
    Timeout,
    #[error("transport error: {0}")]
    Transport(reqwest::Error),
    #[error("backend closed")]
    Closed,
    #[error("{0} is not a per-utterance backend")]
    NotPerUtterance(&'static str),
    #[cfg(feature = "pocketsphinx")]
    #[error(transparent)]
    Sphinx(#[from] super::pocketsphinx::SphinxError),
}

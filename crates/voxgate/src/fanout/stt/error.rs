//! Why a session gets no speech-to-text: an unknown backend name, or a failed utterance.

/// A session asked for a backend that is not configured.
#[derive(Debug, thiserror::Error)]
#[error("no speech-to-text backend named {0:?}")]
pub struct UnknownBackend(pub String);

/// Why an utterance got no transcript. The text (with the backend's answer) goes to the log
/// only; clients (`stt_unavailable`) and `/readyz` get `kind()`.
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
    /// An embedded recognizer (PocketSphinx, Whisper) failed.
    #[cfg(any(feature = "pocketsphinx", feature = "whisper"))]
    #[error(transparent)]
    Local(#[from] super::local::LocalError),
}

impl SttError {
    /// A generic class of the failure, safe for clients and `/readyz` (no backend body, URL or
    /// path).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::BadAnswer(_) => "unreadable answer",
            Self::Status { status, .. } if status.is_client_error() => "refused by the backend",
            Self::Status { .. } => "backend error",
            Self::Timeout => "timed out",
            Self::Transport(_) => "unreachable",
            Self::Closed => "backend closed",
            Self::NotPerUtterance(_) => "not a per-utterance backend",
            #[cfg(any(feature = "pocketsphinx", feature = "whisper"))]
            Self::Local(_) => "decoder failed",
        }
    }
}

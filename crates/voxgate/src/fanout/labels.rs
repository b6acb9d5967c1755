//! The closed label sets of the fan-out layer: which kind of consumer a series or summary is
//! about, and why it dropped bytes. Each `as_str` is the exact string exported in metrics
//! (`consumer`, `reason` labels) and in `ConsumerSummary.kind`; changing one changes an
//! exported series.

/// A kind of consumer (the `consumer` label and `ConsumerSummary.kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConsumerKind {
    /// An audio-bytes webhook (`webhook.rs`).
    Webhook,
    /// A webhook of JSON documents (`json_webhook.rs`).
    JsonWebhook,
    /// A speech-to-text backend (`stt/`).
    Stt,
    /// The delivery bus publisher (`bus/publish.rs`).
    Bus,
    /// A realtime subscriber of the hub (`subscribers.rs`).
    Subscriber,
    /// An answer the gateway gives itself when no webhook takes it (Omi's finalize reply).
    Reply,
    /// The recorder writing to object storage (`recorder.rs`).
    Recorder,
}

impl ConsumerKind {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Webhook => "webhook",
            Self::JsonWebhook => "json_webhook",
            Self::Stt => "stt",
            Self::Bus => "bus",
            Self::Subscriber => "subscriber",
            Self::Reply => "reply",
            Self::Recorder => "recorder",
        }
    }

    /// Whether what it delivers is audio, counted in `voxgate_delivered_bytes_total`. JSON
    /// documents are not (their drops are counted, under their own kind).
    pub const fn delivers_audio(self) -> bool {
        !matches!(self, Self::JsonWebhook | Self::Reply)
    }
}

/// Why a consumer gave bytes up (the `reason` label of `voxgate_dropped_bytes_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Over the consumer's byte cap (`max_buffer_seconds`).
    BufferFull,
    /// The consumer's queue had no room.
    QueueFull,
    /// The consumer's task is gone.
    ConsumerGone,
    /// Still held when the close deadline passed.
    CloseTimeout,
    /// Over the bus publisher's cap, or its queue had no room (the session closes with 1013).
    BusFull,
    /// Larger than the bus server accepts.
    TooLarge,
    /// The endpoint's circuit breaker was open.
    CircuitOpen,
    /// The endpoint answered with a status not worth retrying.
    Rejected,
    /// Retries ran out.
    GaveUp,
    /// The speech-to-text backend failed for the utterance.
    SttFailed,
    /// A streaming backend stayed away longer than the buffer lasts.
    BackendUnavailable,
    /// A streaming backend's audio that was never sent when the session ended.
    NotSent,
}

impl DropReason {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::BufferFull => "buffer_full",
            Self::QueueFull => "queue_full",
            Self::ConsumerGone => "consumer_gone",
            Self::CloseTimeout => "close_timeout",
            Self::BusFull => "bus_full",
            Self::TooLarge => "too_large",
            Self::CircuitOpen => "circuit_open",
            Self::Rejected => "rejected",
            Self::GaveUp => "gave_up",
            Self::SttFailed => "stt_failed",
            Self::BackendUnavailable => "backend_unavailable",
            Self::NotSent => "not_sent",
        }
    }
}

impl std::fmt::Display for DropReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

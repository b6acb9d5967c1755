//! Metrics: the `metrics` facade with a Prometheus exporter rendered at `/metrics`. Label sets
//! are closed (consumer kinds, reasons, outcomes, formats), never session ids.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use metrics::{counter, describe_counter, describe_gauge, gauge};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

pub const SESSIONS_ACTIVE: &str = "voxgate_sessions_active";
pub const SESSIONS_TOTAL: &str = "voxgate_sessions_total";
pub const SESSIONS_REJECTED: &str = "voxgate_sessions_rejected_total";
pub const BUFFERED_BYTES: &str = "voxgate_buffered_bytes";
pub const DECODE_ERRORS: &str = "voxgate_decode_errors_total";
pub const RESYNCS: &str = "voxgate_resyncs_total";
pub const UTTERANCES: &str = "voxgate_utterances_total";
pub const UTTERANCE_LIMIT: &str = "voxgate_utterance_limit_total";
pub const DROPPED_BYTES: &str = "voxgate_dropped_bytes_total";
pub const DELIVERED_BYTES: &str = "voxgate_delivered_bytes_total";
pub const WEBHOOK_REQUESTS: &str = "voxgate_webhook_requests_total";
pub const BYTES_IN: &str = "voxgate_bytes_in_total";
pub const CLOSES: &str = "voxgate_ws_closes_total";
pub const CLIENT_ERRORS: &str = "voxgate_client_errors_total";
pub const GAP_SAMPLES: &str = "voxgate_gap_samples_total";
pub const RESUME_DUPLICATES: &str = "voxgate_resume_duplicate_bytes_total";
pub const SUBSCRIBERS_ACTIVE: &str = "voxgate_subscribers_active";
pub const STT_REQUESTS: &str = "voxgate_stt_requests_total";
pub const STT_LATENCY: &str = "voxgate_stt_latency_seconds";
pub const STT_LOST: &str = "voxgate_stt_lost_total";
pub const STT_FINALIZE_FALLBACKS: &str = "voxgate_stt_finalize_fallbacks_total";
pub const TRANSCRIPT_DELIVERIES: &str = "voxgate_transcript_webhook_total";
pub const BUS_PUBLISHES: &str = "voxgate_bus_publishes_total";
pub const BUS_DELIVERIES: &str = "voxgate_bus_deliveries_total";
pub const BUS_CONNECTED: &str = "voxgate_bus_connected";
pub const NOTICES_DROPPED: &str = "voxgate_notices_dropped_total";
pub const RESUME_STATES_REFUSED: &str = "voxgate_resume_states_refused_total";
pub const BREAKERS_UNTRACKED: &str = "voxgate_webhook_breakers_untracked_total";
pub const GAP_DROPPED_SAMPLES: &str = "voxgate_gap_dropped_samples_total";
pub const CONNECTIONS_OPEN: &str = "voxgate_connections_open";
pub const CONNECTIONS_REFUSED: &str = "voxgate_connections_refused_total";
pub const PACED: &str = "voxgate_paced_total";
pub const LOG_LINES_SUPPRESSED: &str = "voxgate_log_lines_suppressed_total";
pub const LOG_LINES_DROPPED: &str = "voxgate_log_lines_dropped_total";
pub const CARRIER_FRAMES: &str = "voxgate_carrier_frames_total";
pub const RECORDING_WRITES: &str = "voxgate_recording_writes_total";
pub const RECORDING_EVENTS_DROPPED: &str = "voxgate_recording_events_dropped_total";
pub const RECORDING_FETCHES: &str = "voxgate_recording_fetches_total";
pub const OMI_REPLAYS: &str = "voxgate_omi_replays_total";
pub const OMI_TIMELINES: &str = "voxgate_omi_timelines_total";
pub const OMI_SUPERSEDED_FRAMES: &str = "voxgate_omi_superseded_frames_total";

/// Consumer kinds (the `consumer` label).
pub const CONSUMER_KINDS: [&str; 5] = ["webhook", "subscriber", "stt", "bus", "recorder"];
/// Formats (the `format` label of audio seconds).
const FORMATS: [&str; 8] = [
    "webm", "ogg", "opus", "linear16", "float32", "linear8", "mulaw", "alaw",
];

static AUDIO_SAMPLES: [AtomicU64; 8] = [const { AtomicU64::new(0) }; 8];
static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
/// Reads the log writer's dropped-line count (set once by the binary that owns the writer).
static LOG_DROPS: OnceLock<Box<dyn Fn() -> u64 + Send + Sync>> = OnceLock::new();

/// Installs the global recorder once (tests start many servers in one process).
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    metrics_exporter_prometheus::Matcher::Full(STT_LATENCY.into()),
                    &[0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0],
                )
                .expect("bucket list is not empty")
                .install_recorder()
                .expect("the metrics recorder is installed once, here");
            describe();
            handle
        })
        .clone()
}

fn describe() {
    describe_counter!(
        RECORDING_WRITES,
        "Recording object writes, by object (audio, events, summary) and outcome (ok, retry, failed)"
    );
    describe_counter!(
        RECORDING_EVENTS_DROPPED,
        "Session events the recorder dropped (its event buffer full, or their write given up)"
    );
    describe_counter!(
        OMI_REPLAYS,
        "Omi audio_timeline=2 frames overlapping audio already received, by outcome (exact, trimmed, conflict, unverifiable)"
    );
    describe_counter!(
        OMI_TIMELINES,
        "Omi audio_timeline=2 sessions by how their timeline was found (fresh, continued after a reconnect, took_over from an older socket, full: a private one)"
    );
    describe_counter!(
        OMI_SUPERSEDED_FRAMES,
        "Omi audio frames ignored because a newer socket of the same user and conversation took the timeline"
    );
    describe_counter!(
        RECORDING_FETCHES,
        "Recording fetches over HTTP, by outcome (ok, not_found, unauthorized, failed)"
    );
    describe_gauge!(SESSIONS_ACTIVE, "Live ingest sessions");
    describe_counter!(SESSIONS_TOTAL, "Sessions accepted, by endpoint");
    describe_counter!(SESSIONS_REJECTED, "Connections refused, by reason");
    describe_counter!(
        RESUME_STATES_REFUSED,
        "Drained-session states refused: foreign (another user's), replayed, spent_set_full"
    );
    describe_counter!(
        BREAKERS_UNTRACKED,
        "Webhook requests given an unshared circuit breaker because the breaker map was full"
    );
    describe_counter!(
        NOTICES_DROPPED,
        "Consumer notices (events, close requests) dropped because the session queue was full"
    );
    describe_gauge!(
        BUFFERED_BYTES,
        "Audio bytes held by consumers over all sessions (queues, batches, in flight)"
    );
    describe_counter!(
        DECODE_ERRORS,
        "Frames that could not be decoded and were skipped"
    );
    describe_counter!(
        RESYNCS,
        "Times a demuxer lost sync and resumed at the next cluster/page"
    );
    describe_counter!(UTTERANCES, "Utterances started");
    describe_counter!(
        UTTERANCE_LIMIT,
        "Utterances finalized at max_utterance_seconds"
    );
    describe_counter!(
        DROPPED_BYTES,
        "Audio bytes a consumer gave up on, by reason"
    );
    describe_counter!(DELIVERED_BYTES, "Audio bytes delivered to consumers");
    describe_counter!(WEBHOOK_REQUESTS, "Webhook HTTP attempts, by outcome");
    describe_counter!(BYTES_IN, "Bytes of audio messages received");
    describe_counter!(CLOSES, "Sessions closed, by WebSocket close code");
    describe_counter!(CLIENT_ERRORS, "Error events sent to clients, by code");
    describe_counter!(
        CARRIER_FRAMES,
        "Carrier media frames out of order, by carrier and outcome: reordered (held, then placed), lost (given up, filled with silence), late (dropped)"
    );
    describe_gauge!(SUBSCRIBERS_ACTIVE, "Realtime subscribers connected");
    describe_counter!(
        STT_REQUESTS,
        "Speech-to-text attempts and connections, by backend and outcome"
    );
    metrics::describe_histogram!(
        STT_LATENCY,
        metrics::Unit::Seconds,
        "From utterance end to its final transcript, by backend"
    );
    describe_counter!(
        STT_LOST,
        "Utterances that got no final transcript (stt_lost warning), by backend"
    );
    describe_counter!(
        STT_FINALIZE_FALLBACKS,
        "Backends switched from Finalize to endpointing after refusing Finalize, by backend"
    );
    describe_counter!(
        TRANSCRIPT_DELIVERIES,
        "Transcript webhook POSTs, by outcome (delivered, gave_up, queue_full)"
    );
    describe_counter!(
        RESUME_DUPLICATES,
        "Bytes a resuming client resent that the session already had (dropped)"
    );
    describe_counter!(
        GAP_SAMPLES,
        "16 kHz samples inserted for gaps in device sequence numbers or telephony timestamps (concealed or silence)"
    );
    describe_counter!(
        BUS_PUBLISHES,
        "Bus publishes by the gateway, by outcome (ok, duplicate, error, too_large)"
    );
    describe_counter!(
        BUS_DELIVERIES,
        "Bus messages handled by deliver workers, by kind and outcome"
    );
    describe_gauge!(BUS_CONNECTED, "1 while the delivery bus connection is up");
    describe_counter!(
        GAP_DROPPED_SAMPLES,
        "16 kHz samples of gaps not filled: over the session's fill budget ([gap_fill]) or 10 s per gap"
    );
    describe_gauge!(
        CONNECTIONS_OPEN,
        "Open TCP connections, upgraded WebSockets included"
    );
    describe_counter!(
        CONNECTIONS_REFUSED,
        "Connections or requests refused by the connection layer, by reason (max_connections, max_connections_per_ip, header_timeout, proxied_without_auth, accept_error)"
    );
    describe_counter!(
        PACED,
        "Times a connection was not read because it sent faster than its read budget, by budget (messages, bytes)"
    );
    describe_counter!(
        LOG_LINES_SUPPRESSED,
        "Client-caused warnings logged at debug instead of warn (over the per-connection log budget)"
    );
    gauge!(SESSIONS_ACTIVE).set(0.0);
    gauge!(SUBSCRIBERS_ACTIVE).set(0.0);
    for kind in CONSUMER_KINDS {
        gauge!(BUFFERED_BYTES, "consumer" => kind).set(0.0);
    }
    counter!(DECODE_ERRORS).absolute(0);
    counter!(RESYNCS).absolute(0);
    counter!(UTTERANCE_LIMIT).absolute(0);
}

/// Exports the log writer's dropped-line count as `voxgate_log_lines_dropped_total`.
pub fn export_log_drops(read: impl Fn() -> u64 + Send + Sync + 'static) {
    let _ = LOG_DROPS.set(Box::new(read));
}

/// Counts decoded samples (16 kHz) for `voxgate_audio_seconds_total{format}`.
pub fn add_audio_samples(format: &str, samples: u64) {
    if let Some(i) = FORMATS.iter().position(|f| *f == format) {
        AUDIO_SAMPLES[i].fetch_add(samples, Ordering::Relaxed);
    }
}

/// The Prometheus text page: the recorder's metrics plus the fractional audio-seconds counter.
pub fn render(handle: &PrometheusHandle) -> String {
    let mut out = handle.render();
    out.push_str("# HELP voxgate_audio_seconds_total Seconds of audio decoded, by source format\n");
    out.push_str("# TYPE voxgate_audio_seconds_total counter\n");
    for (i, f) in FORMATS.iter().enumerate() {
        let secs = AUDIO_SAMPLES[i].load(Ordering::Relaxed) as f64 / 16_000.0;
        out.push_str(&format!(
            "voxgate_audio_seconds_total{{format=\"{f}\"}} {secs}\n"
        ));
    }
    if let Some(read) = LOG_DROPS.get() {
        out.push_str("# HELP voxgate_log_lines_dropped_total Log lines dropped because the log writer's buffer was full\n");
        out.push_str("# TYPE voxgate_log_lines_dropped_total counter\n");
        out.push_str(&format!("voxgate_log_lines_dropped_total {}\n", read()));
    }
    out
}

/// Bytes held by one consumer kind, mirrored in the `voxgate_buffered_bytes` gauge.
pub fn buffered(kind: &'static str, delta: i64) {
    let g = gauge!(BUFFERED_BYTES, "consumer" => kind);
    if delta >= 0 {
        g.increment(delta as f64);
    } else {
        g.decrement((-delta) as f64);
    }
}

pub fn dropped(kind: &'static str, reason: &'static str, bytes: u64) {
    counter!(DROPPED_BYTES, "consumer" => kind, "reason" => reason).increment(bytes);
}

/// Counts what an event sent to a client means to operators (the connection logs it, within its
/// log budget: `ingest::log_budget`).
pub fn observe_event(event: &voxgate_session::ServerEvent) {
    use voxgate_session::{ServerEvent, UtteranceReason};
    match event {
        ServerEvent::SpeechStarted { .. } => counter!(UTTERANCES).increment(1),
        ServerEvent::UtteranceEnd {
            reason: UtteranceReason::Limit,
            ..
        } => counter!(UTTERANCE_LIMIT).increment(1),
        ServerEvent::Warning { code, .. } => match code.as_str() {
            "decode_error" => counter!(DECODE_ERRORS).increment(1),
            "decode_resynced" => counter!(RESYNCS).increment(1),
            _ => {}
        },
        ServerEvent::Error { code, .. } => {
            counter!(CLIENT_ERRORS, "code" => code.clone()).increment(1);
        }
        _ => {}
    }
}

//! The worst-case memory of one session, by formula from the configuration (logged at start and
//! checked against measurements by the `memory` integration test).

use super::{Config, SttConfig};

/// Earshot's state (about 8 KiB) plus one frame.
const SEGMENTER: usize = 16 * 1024;
/// A JSON event for the client is a few hundred bytes at most.
const EVENT: usize = 512;
/// A parsed `serde_json::Value` tree is up to about 20x its text (an Omi JSON frame's tree lives
/// while its event is dispatched).
const JSON_TREE: usize = 20;
/// Largest request head (line and headers) buffered per connection; larger ones get 431.
pub const MAX_REQUEST_HEAD_BYTES: usize = 64 * 1024;
/// What one open connection may hold outside any session: its request-head buffer, the
/// WebSocket read buffer (4 KiB) and task state.
pub const CONNECTION_BYTES: usize = MAX_REQUEST_HEAD_BYTES + 4096 + 8192;

impl Config {
    /// Worst-case bytes one session may hold, by formula: the largest WebSocket message, the
    /// decoder's bound, the segmenter window, the client event queue, and every consumer cap.
    pub fn session_memory_bound(&self) -> usize {
        // With a bus, a session's audio webhooks are served by its bus publisher, which holds
        // at most `bus.max_buffer_seconds` of audio per webhook instead of the webhook's own cap.
        let webhooks: usize = self
            .webhooks
            .iter()
            .filter(|w| w.delay_seconds.is_some())
            .map(|w| match self.bus.url {
                Some(_) => self.bus.max_buffer_bytes(),
                None => w.max_buffer_bytes(),
            })
            .sum();
        // Any backend may be selected by the connect query.
        let stt: usize = self.stt.iter().map(SttConfig::max_buffer_bytes).sum();
        // A subscriber queue holds at most `queue_messages` items, each at most one decoded
        // message (a max-size message of 8 kHz u8 PCM doubles at 16 kHz PCM16: x4 bound).
        let subscriber = self.subscribers.queue_messages * self.server.max_message_bytes * 4;
        // The message itself plus its decoded PCM (at most x4).
        let message = self.server.max_message_bytes * 5;
        message
            + self.media.max_pending_bytes
            + self.media.max_element_bytes
            + SEGMENTER
            + self.server.client_queue_messages * EVENT
            + webhooks
            + stt
            + subscriber * self.subscribers.max_per_session
            + self.omi_json_bound()
            + self.hook_webhooks_bound()
            + self.recording_bound()
            + self.carrier_bound(stt)
    }

    /// A carrier call: the frames its reorder window holds (each at most one message's
    /// payload), and per party of a stereo call a lane (its channel's bytes and decoded PCM of
    /// one message, at most 3x the message, and a segmenter) and every backend's buffer again
    /// (`parties=caller,agent` transcribes each party apart).
    fn carrier_bound(&self, stt: usize) -> usize {
        let c = &self.carriers;
        let lane = 3 * self.server.max_message_bytes + SEGMENTER + stt;
        c.reorder_window_frames * self.server.max_message_bytes + usize::from(c.max_parties) * lane
    }

    /// The recorder (any session may be recorded by its token or hook): its audio buffer, its
    /// event buffer, and the body of the object being written (a copy of a chunk it holds).
    fn recording_bound(&self) -> usize {
        let r = &self.recording;
        r.max_buffer_bytes() + r.max_event_bytes + r.chunk_samples() * 2
    }

    /// Audio webhooks from the `on_connect` hook: at most `on_connect.max_webhooks`, each with
    /// a buffer of up to 3600 s (its validation limit), or the bus buffer with a bus.
    fn hook_webhooks_bound(&self) -> usize {
        let each = match self.bus.url {
            Some(_) => self.bus.max_buffer_bytes(),
            None => super::pcm_bytes(3600.0),
        };
        self.on_connect
            .as_ref()
            .map_or(0, |h| h.max_webhooks * each)
    }

    /// Omi JSON frames: the transcript and conversation webhooks' byte caps, and one parsed
    /// frame (its tree and serialized document).
    fn omi_json_bound(&self) -> usize {
        2 * self.omi.json_queue_bytes
            + (JSON_TREE + 1) * self.omi.max_json_bytes
            + self.omi.replay_window_bytes(48_000)
    }
}

impl Config {
    /// Worst-case bytes of the process's connections and sessions: every session at its bound
    /// plus every open connection (`server.max_connections`) at `CONNECTION_BYTES`.
    pub fn process_memory_bound(&self) -> usize {
        self.server.max_sessions * self.session_memory_bound()
            + self.server.max_connections * CONNECTION_BYTES
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{Config, WebhookConfig};

    #[test]
    fn the_memory_bound_counts_the_bus_buffer_instead_of_the_webhook_cap() {
        let mut cfg = Config::default();
        let mut w = WebhookConfig::new("w", "http://127.0.0.1:9/", Some(1.0));
        w.max_buffer_seconds = 60.0;
        cfg.webhooks.push(w);
        let in_process = cfg.session_memory_bound();
        cfg.bus.url = Some("nats://127.0.0.1:4222".into());
        cfg.bus.max_buffer_seconds = 30.0;
        assert_eq!(in_process - cfg.session_memory_bound(), 30 * 32_000);
    }

    #[test]
    fn the_default_bound_is_the_sum_of_its_parts() {
        let cfg = Config::default();
        let mib = 1 << 20;
        let fixed = mib * 5
            + cfg.media.max_pending_bytes
            + cfg.media.max_element_bytes
            + 16 * 1024
            + 256 * 512;
        let omi = 2 * 2 * mib + 21 * 64 * 1024 + 10 * 48_000 * 2;
        let recording = 60 * 32_000 + 256 * 1024 + 10 * 32_000;
        // 16 reordered frames, two parties' lanes.
        let carriers = 16 * mib + 2 * (3 * mib + 16 * 1024);
        assert_eq!(
            cfg.session_memory_bound(),
            fixed + 256 * mib * 4 * 8 + omi + recording + carriers
        );
    }

    #[test]
    fn the_bound_counts_the_reorder_window_and_each_party() {
        let mut cfg = Config::default();
        cfg.carriers.max_parties = 0;
        let base = cfg.session_memory_bound();
        cfg.carriers.reorder_window_frames += 10;
        assert_eq!(cfg.session_memory_bound() - base, 10 << 20);
        let mut s = crate::config::SttConfig::new("s", crate::config::SttBackend::Openai, "");
        s.max_buffer_seconds = 10.0;
        cfg.stt.push(s);
        let one = cfg.session_memory_bound();
        cfg.carriers.max_parties = 2;
        let lane = 3 * (1 << 20) + 16 * 1024;
        assert_eq!(cfg.session_memory_bound() - one, 2 * (lane + 10 * 32_000));
    }

    #[test]
    fn the_process_bound_counts_every_open_connection() {
        let mut cfg = Config::default();
        let base = cfg.process_memory_bound();
        cfg.server.max_connections += 10;
        assert_eq!(
            cfg.process_memory_bound() - base,
            10 * super::CONNECTION_BYTES
        );
    }
}

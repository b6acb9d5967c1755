//! The session's budget for synthesized audio: gap fills (device sequence numbers, telephony
//! timestamps, capture times) and the concealment they run are bounded by the wall-clock time
//! since the session started, so tiny messages claiming long gaps cannot be amplified into
//! minutes of audio and CPU.

use std::time::{Duration, Instant};

use super::{Session, MAX_GAP_SAMPLES};
use crate::{ServerEvent, SAMPLE_RATE};

impl Session {
    /// Synthesized samples the session may still insert at `now`: every sample of wall-clock
    /// time since the session started, plus the slack, minus what was filled already. Real
    /// audio never counts, so a client sending faster than real time is not affected.
    pub fn gap_budget(&self, now: Instant) -> u64 {
        let elapsed = self
            .started_at
            .map_or(Duration::ZERO, |t| now.saturating_duration_since(t));
        let elapsed_ms = u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX);
        elapsed_ms
            .saturating_mul(u64::from(SAMPLE_RATE) / 1000)
            .saturating_add(self.cfg.gap_slack_samples)
            .saturating_sub(self.stats.gap_samples)
    }

    /// Fills a known gap within the budget; what is cut is counted, and the client is warned
    /// once per episode (until a gap fits again).
    pub(super) fn fill_gap(&mut self, now: Instant, requested: u64) {
        self.touch(now);
        let wanted = requested.min(MAX_GAP_SAMPLES);
        let budget = self.gap_budget(now);
        let samples = wanted.min(budget);
        self.stats.gap_samples += samples;
        self.stats.gap_dropped_samples = self
            .stats
            .gap_dropped_samples
            .saturating_add(requested - samples);
        if samples < wanted && !self.gap_over_budget {
            self.emit(ServerEvent::warning(
                "gap_fill_budget",
                format!(
                    "gaps in the stream ask for more filled audio than the wall-clock time since the session started; {} samples not filled (more are dropped without a further warning)",
                    wanted - samples
                ),
            ));
        }
        self.gap_over_budget = samples < wanted;
        if samples == 0 {
            return;
        }
        self.pcm.clear();
        // Raw Opus conceals the start of the loss from its decoder state; the rest is silence.
        self.decoder.conceal(samples, &mut self.pcm);
        self.pcm.resize(samples as usize, 0);
        self.route_pcm();
        if let Some(lanes) = &mut self.parties {
            lanes.silence(samples as usize, self.cfg.wants_audio, &mut self.outputs);
        }
    }
}

#[cfg(test)]
mod tests {
    use voxgate_media::SourceFormat;

    use super::*;
    use crate::{Input, Output, SessionConfig};

    fn session() -> Session {
        let source = SourceFormat::Linear16 {
            sample_rate: 16_000,
            channels: 1,
        };
        let mut s = Session::new(SessionConfig::new("g", source)).unwrap();
        while s.poll_output().is_some() {}
        s
    }

    fn warnings(s: &mut Session) -> usize {
        std::iter::from_fn(|| s.poll_output())
            .filter(|o| matches!(o, Output::Event(ServerEvent::Warning { code, .. }) if code == "gap_fill_budget"))
            .count()
    }

    #[test]
    fn fills_are_bounded_by_wall_clock_plus_slack_and_warned_once() {
        let mut s = session();
        #[allow(clippy::disallowed_methods)] // the test is the driver: it owns the clock
        let t0 = Instant::now();
        s.start(t0);
        for _ in 0..10 {
            s.handle_input(Input::Silence {
                now: t0,
                samples: MAX_GAP_SAMPLES,
            })
            .unwrap();
        }
        assert_eq!(s.stats().gap_samples, 32_000, "2 s of slack");
        assert_eq!(s.stats().gap_dropped_samples, 10 * MAX_GAP_SAMPLES - 32_000);
        assert_eq!(warnings(&mut s), 1, "one warning per episode");
        // A second later one more second may be filled.
        let t1 = t0 + Duration::from_secs(1);
        s.handle_input(Input::Silence {
            now: t1,
            samples: 16_000,
        })
        .unwrap();
        assert_eq!(s.stats().gap_samples, 48_000);
        assert_eq!(
            warnings(&mut s),
            0,
            "the gap fit: the episode ended quietly"
        );
        s.handle_input(Input::Silence {
            now: t1,
            samples: 1,
        })
        .unwrap();
        assert_eq!(warnings(&mut s), 1, "a new episode is warned again");
        assert_eq!(s.summary().gap_samples, 48_000);
    }

    #[test]
    fn real_audio_faster_than_real_time_is_not_budgeted() {
        let mut s = session();
        #[allow(clippy::disallowed_methods)] // the test is the driver: it owns the clock
        let t0 = Instant::now();
        s.start(t0);
        let pcm = vec![0u8; 64_000]; // 2 s per message, all at once
        for _ in 0..30 {
            s.handle_input(Input::Audio {
                now: t0,
                data: &pcm,
            })
            .unwrap();
        }
        assert_eq!(s.stats().samples, 30 * 32_000);
        assert_eq!(s.gap_budget(t0), 32_000);
    }

    #[test]
    fn a_new_source_format_continues_media_time() {
        let mut s = session();
        #[allow(clippy::disallowed_methods)] // the test is the driver: it owns the clock
        let now = Instant::now();
        s.start(now);
        // 0.5 s of 16 kHz PCM16, then the client says its audio is mu-law 8 kHz from now on.
        s.handle_input(Input::Audio {
            now,
            data: &[0u8; 16_000],
        })
        .unwrap();
        s.set_source(SourceFormat::Mulaw {
            sample_rate: 8_000,
            channels: 1,
        })
        .unwrap();
        s.handle_input(Input::Audio {
            now,
            data: &[0xffu8; 4_000],
        })
        .unwrap();
        while s.poll_output().is_some() {}
        // The 8 kHz resampler holds a few samples until more audio (or the end) comes.
        let samples = s.stats().samples;
        assert!(
            (15_900..=16_000).contains(&samples),
            "0.5 s + 0.5 s at 16 kHz: {samples}"
        );
    }
}

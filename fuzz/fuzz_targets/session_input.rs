//! The session's client protocol under arbitrary input: a sequence of text (control) and binary
//! (audio) messages, timeouts and closes, in any source format. Asserts no panic, that pending
//! bytes stay under the limit, that `Close` is the last output, and that nothing is accepted
//! after it.
#![no_main]

use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use voxgate_media::SourceFormat;
use voxgate_session::{Input, Output, Session, SessionConfig};

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let source = match data[0] % 5 {
        0 => SourceFormat::Auto,
        1 => SourceFormat::Linear16 { sample_rate: 16_000, channels: 1 },
        2 => SourceFormat::Mulaw { sample_rate: 8_000, channels: 1 },
        3 => SourceFormat::Opus { sample_rate: 16_000, channels: 1 },
        _ => SourceFormat::Float32 { sample_rate: 44_100, channels: 2 },
    };
    let mut cfg = SessionConfig::new("fuzz", source);
    cfg.wants_audio = data[1] & 1 == 1;
    cfg.segmenter.max_utterance_samples = 16_000;
    let limit = cfg.limits.max_pending_bytes;
    let Ok(mut session) = Session::new(cfg) else { return };
    let t0 = Instant::now();
    let mut now = t0;
    session.start(now);
    let mut rest = &data[2..];
    let mut closed = false;
    while let Some((&op, tail)) = rest.split_first() {
        let len = usize::from(tail.first().copied().unwrap_or(0)).min(tail.len().saturating_sub(1));
        let body = tail.get(1..1 + len).unwrap_or(&[]);
        rest = tail.get(1 + len..).unwrap_or(&[]);
        now += Duration::from_millis(u64::from(op >> 4) * 100);
        let input = match op % 6 {
            0 | 1 => Input::Audio { now, data: body },
            2 => Input::Text { now, text: std::str::from_utf8(body).unwrap_or("{}") },
            3 => Input::Text {
                now,
                text: [r#"{"type":"KeepAlive"}"#, r#"{"type":"Finalize"}"#, r#"{"type":"CloseStream"}"#]
                    [usize::from(op >> 6) % 3],
            },
            4 => Input::Timeout { now },
            _ => Input::Silence { now, samples: u64::from(op) * 100 },
        };
        let result = session.handle_input(input);
        assert_eq!(result.is_err(), closed, "input refused exactly when closed");
        assert!(session.pending_bytes() <= limit);
        while let Some(out) = session.poll_output() {
            assert!(!closed, "nothing follows Close");
            if let Output::Close { .. } = out {
                closed = true;
            }
        }
    }
});

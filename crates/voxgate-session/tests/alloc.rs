//! No allocation per chunk in steady state: a counting allocator watches a session decode a
//! stream message by message, and after a warm-up (the decoder's buffers, the output queue and
//! the scratch vectors reach their working size) every further message must allocate nothing, for
//! each source format a client sends: browser WebM and Ogg, raw PCM and device Opus packets.
//!
//! With a consumer that takes audio, the one allocation left per message is the buffer all the
//! session's consumers share.
//!
//! Counted on the test's own thread only (other test threads allocate as they like).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::time::{Duration, Instant};

use voxgate_media::SourceFormat;
use voxgate_session::{Input, Output, Session, SessionConfig};

struct Counting;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
        unsafe { System.alloc(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn allocations() -> u64 {
    ALLOCATIONS.with(Cell::get)
}

fn corpus(rel: &str) -> Vec<u8> {
    let path = format!("{}/../../testdata/corpus/{rel}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("read {path}: {e}"))
}

/// A capture cut at its recorded message boundaries.
fn capture(name: &str, ext: &str) -> Vec<Vec<u8>> {
    let data = corpus(&format!("captures/{name}.{ext}"));
    let index: serde_json::Value =
        serde_json::from_slice(&corpus(&format!("captures/{name}.index.json"))).unwrap();
    index["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let at = m["offset"].as_u64().unwrap() as usize;
            data[at..at + m["length"].as_u64().unwrap() as usize].to_vec()
        })
        .collect()
}

/// 16 kHz PCM16 in 100 ms messages.
fn pcm_messages() -> Vec<Vec<u8>> {
    corpus("reference/medium.s16le-16k-mono.pcm")
        .chunks(3_200)
        .map(<[u8]>::to_vec)
        .collect()
}

/// The same speech as a device sends it: one 20 ms Opus packet per message.
fn opus_packets() -> Vec<Vec<u8>> {
    let pcm: Vec<i16> = corpus("reference/medium.s16le-16k-mono.pcm")
        .chunks_exact(2)
        .map(|b| i16::from_le_bytes([b[0], b[1]]))
        .collect();
    let mut enc =
        opus::Encoder::new(16_000, opus::Channels::Mono, opus::Application::Voip).unwrap();
    pcm.chunks_exact(320)
        .map(|frame| enc.encode_vec(frame, 1_500).unwrap())
        .collect()
}

/// Feeds `messages` to a session; returns the allocations of each message after `warm_up`
/// messages (input and draining of its outputs).
fn steady_state(source: SourceFormat, messages: &[Vec<u8>], wants_audio: bool) -> Vec<u64> {
    let mut cfg = SessionConfig::new("alloc", source);
    cfg.wants_audio = wants_audio;
    cfg.idle_timeout = Duration::from_secs(3_600);
    let mut session = Session::new(cfg).unwrap();
    // Long enough for utterances to open and close and the output queue to reach its size.
    let warm_up = messages.len() / 3;
    #[allow(clippy::disallowed_methods)] // the test is the driver: it owns the clock
    let now = Instant::now();
    session.start(now);
    let mut per_message = Vec::with_capacity(messages.len());
    for (i, data) in messages.iter().enumerate() {
        let before = allocations();
        session
            .handle_input(Input::Audio { now, data })
            .expect("open session");
        while let Some(out) = session.poll_output() {
            if let Output::Close { reason, .. } = &out {
                panic!("closed: {reason}");
            }
            drop(out);
        }
        if i >= warm_up {
            per_message.push(allocations() - before);
        }
    }
    per_message
}

/// `None` when no message allocated, else what allocated where.
fn allocating(what: &str, per_message: &[u64]) -> Option<String> {
    let total: u64 = per_message.iter().sum();
    let at: Vec<usize> = (0..per_message.len())
        .filter(|&i| per_message[i] > 0)
        .collect();
    (total > 0).then(|| {
        format!(
            "{what}: {total} allocations over {} steady-state messages (at {at:?})",
            per_message.len()
        )
    })
}

#[test]
fn no_allocation_per_message_in_steady_state() {
    let pcm16 = SourceFormat::Linear16 {
        sample_rate: 16_000,
        channels: 1,
    };
    let opus = SourceFormat::Opus {
        sample_rate: 16_000,
        channels: 1,
    };
    let cases: [(&str, SourceFormat, Vec<Vec<u8>>); 4] = [
        (
            "webm",
            SourceFormat::Auto,
            capture("chromium_medium_250ms", "webm"),
        ),
        (
            "ogg",
            SourceFormat::Auto,
            capture("firefox_medium_250ms_ogg", "ogg"),
        ),
        ("pcm", pcm16, pcm_messages()),
        ("device opus", opus, opus_packets()),
    ];
    let failures: Vec<String> = cases
        .iter()
        .filter_map(|(name, source, messages)| {
            allocating(name, &steady_state(*source, messages, false))
        })
        .collect();
    assert!(failures.is_empty(), "{failures:#?}");
    // With a consumer that takes audio, each message's decoded audio becomes one shared buffer
    // that every consumer reads (never a copy per consumer): at most one allocation per message.
    for (name, source, messages) in &cases {
        let per_message = steady_state(*source, messages, true);
        let worst = per_message.iter().max().copied().unwrap_or(0);
        assert!(worst <= 1, "{name} with an audio consumer: {per_message:?}");
    }
}

//! Per-session memory has a formula and stays flat: a counting allocator watches a session decode
//! the 152 s Chromium capture message by message. Its heap never exceeds the decoder's documented
//! bound plus the session's own fixed parts, and does not grow between 10 s and the end.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use voxgate_media::{memory_bound, SourceFormat};
use voxgate_session::{Input, Output, Session, SessionConfig};

struct Counting;

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = CURRENT.fetch_add(layout.size(), Ordering::SeqCst) + layout.size();
            PEAK.fetch_max(now, Ordering::SeqCst);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        CURRENT.fetch_sub(layout.size(), Ordering::SeqCst);
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// The session's own fixed parts: VAD state and frame (~10 KiB), one message's decoded PCM
/// scratch, the output queue of one input, counters.
const SESSION_FIXED: usize = 64 * 1024;

#[test]
fn a_long_stream_runs_in_constant_bounded_memory() {
    let dir = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../testdata/corpus/captures/"
    );
    let data = std::fs::read(format!("{dir}chromium_long_250ms.webm")).unwrap();
    let index: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{dir}chromium_long_250ms.index.json")).unwrap(),
    )
    .unwrap();
    let messages: Vec<(usize, usize)> = index["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let o = m["offset"].as_u64().unwrap() as usize;
            (o, o + m["length"].as_u64().unwrap() as usize)
        })
        .collect();

    let cfg = SessionConfig::new("mem", SourceFormat::Auto);
    let bound = memory_bound(&cfg.limits) + SESSION_FIXED;
    let base = CURRENT.load(Ordering::SeqCst);
    PEAK.store(base, Ordering::SeqCst);
    let mut session = Session::new(cfg).unwrap();
    #[allow(clippy::disallowed_methods)] // the test is the driver: it owns the clock
    let now = Instant::now();
    session.start(now);
    let mut at_10s = None;
    let mut events = 0usize;
    for (i, &(start, end)) in messages.iter().enumerate() {
        session
            .handle_input(Input::Audio {
                now,
                data: &data[start..end],
            })
            .unwrap();
        while let Some(out) = session.poll_output() {
            assert!(
                !matches!(out, Output::Audio(_)),
                "no consumer, no audio output"
            );
            events += 1;
        }
        if i == 40 {
            at_10s = Some(CURRENT.load(Ordering::SeqCst));
        }
    }
    let at_end = CURRENT.load(Ordering::SeqCst);
    let peak = PEAK.load(Ordering::SeqCst) - base;
    session
        .handle_input(Input::Text {
            now,
            text: r#"{"type":"CloseStream"}"#,
        })
        .unwrap();
    let mut closed = false;
    while let Some(out) = session.poll_output() {
        closed |= matches!(out, Output::Close { .. });
    }
    assert!(closed);
    assert!(
        events > 150,
        "progress and utterance events were produced ({events})"
    );
    println!(
        "peak {peak} B of bound {bound} B; live after 10 s {} B, at the end {} B",
        at_10s.unwrap() - base,
        at_end - base
    );
    assert!(
        peak <= bound,
        "peak heap {peak} B exceeds the formula's {bound} B"
    );
    let growth = at_end as i64 - at_10s.unwrap() as i64;
    assert!(
        growth.abs() < 4096,
        "heap grew {growth} B between 10 s and 152 s"
    );
}

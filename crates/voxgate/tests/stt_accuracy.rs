//! `voxgate accuracy` against a Deepgram-compatible fixture: the backend's own transcript of
//! the WAV is read to the end of its stream, whatever control frames the server sends on the
//! way (uvicorn-based servers such as WhisperLiveKit ping every 20 s and drop a client whose
//! pongs do not come back).

mod common;
mod stt_support;

use std::path::PathBuf;

use stt_support::*;
use voxgate::cli::accuracy::{items, measure};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_direct_stream_reads_past_a_ping_to_the_backends_last_result() {
    let dg = Deepgram::with(DgBehavior {
        ping_first: true,
        ..Default::default()
    })
    .await;
    let mut cfg = stt_config();
    cfg.stt.push(deepgram_cfg("dg", &dg.url()));
    let corpus = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/corpus");
    let items = items(&corpus, &["short.wav".to_owned()]).unwrap();
    assert_eq!(items.len(), 1);
    let rows = measure(cfg, &items, 0.0, &[]).await.unwrap();
    assert_eq!(rows.len(), 1);
    let r = &rows[0];
    // The fixture answers the stream's CloseStream with a final "tail" after its ping.
    assert_eq!(r.direct_text, "tail", "{r:?}");
    assert!(!r.gateway_text.is_empty(), "{r:?}");
    assert_eq!(
        dg.count("CloseStream"),
        2,
        "the gateway's session and the direct stream"
    );
}

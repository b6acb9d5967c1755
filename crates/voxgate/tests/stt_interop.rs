//! Against a real, published speech-to-text server: faster-whisper-server (OpenAI-compatible,
//! Whisper tiny.en, offline), installed by `scripts/deps fws` into target/tools/fws. Corpus
//! speech goes through the gateway; the word error rate of its transcripts must be within 0.1
//! of the server's own transcript of the same audio as a WAV.
//!
//! When the server is not installed the test fails, unless `INTEROP_OPTIONAL=1`: then
//! it says loudly that it skipped. `scripts/test` installs the server and runs it.

mod fws_support;

use std::path::PathBuf;

use fws_support::start_fws;
use voxgate::cli::accuracy::{items, measure};
use voxgate::config::{Config, SttBackend, SttConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faster_whisper_server_through_the_gateway_matches_its_own_transcript() {
    let Some(fws) = start_fws().await else { return };
    let mut cfg = Config::default();
    cfg.segmenter.silence_ms = 250;
    let mut s = SttConfig::new("fws", SttBackend::Openai, &fws.url);
    s.timeout_ms = 60_000;
    cfg.stt.push(s);
    let corpus = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/corpus");
    // A browser capture of each text that CI can afford, plus the source speech as PCM.
    let only = ["chromium_short_250ms", "chromium_medium_250ms", "short.wav"].map(String::from);
    let items = items(&corpus, &only).unwrap();
    assert_eq!(items.len(), 3);
    let rows = measure(cfg, &items, 0.0, &[]).await.unwrap();
    for r in &rows {
        eprintln!(
            "{}: via voxgate {:.3} ({:?}); server on the WAV {:.3} ({:?})",
            r.item, r.gateway_wer, r.gateway_text, r.direct_wer, r.direct_text
        );
        assert!(
            !r.gateway_text.is_empty(),
            "{}: transcripts came back",
            r.item
        );
        assert!(
            r.gateway_wer <= r.direct_wer + 0.1,
            "{}: WER through voxgate {:.3} vs the server's own {:.3}",
            r.item,
            r.gateway_wer,
            r.direct_wer
        );
        assert!(
            r.direct_wer < 0.5,
            "the server itself understood {}",
            r.item
        );
    }
}

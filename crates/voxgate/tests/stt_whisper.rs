//! The embedded Whisper backend (cargo feature `whisper`): corpus speech transcribed inside the
//! gateway's own process, its front end checked against OpenAI's reference mel filters, and
//! its limits (decoding time, a missing model) reported like any backend's failures.
//! Needs `scripts/deps whisper` (the tiny.en model and `mel_80.npy` under target/tools).
#![cfg(feature = "whisper")]

mod common;
mod stt_support;

use std::time::Duration;

use common::*;
use stt_support::*;
use voxgate::cli::accuracy::{items, measure};
use voxgate::config::{Config, SttBackend, SttConfig};
use voxgate::fanout::stt::whisper::mel;

fn whisper_cfg(name: &str) -> SttConfig {
    let mut s = SttConfig::new(name, SttBackend::Whisper, "");
    let dir = tools("whisper/tiny.en");
    assert!(
        dir.join("model.bin").exists(),
        "{} is missing: run scripts/deps whisper",
        dir.display()
    );
    s.model_dir = Some(dir.display().to_string());
    s.timeout_ms = 60_000;
    s
}

/// A `.npy` file of little-endian f32 (OpenAI ships the filters so, in `mel_filters.npz`).
fn read_npy_f32(path: &std::path::Path) -> (Vec<usize>, Vec<f32>) {
    let bytes = std::fs::read(path)
        .unwrap_or_else(|e| panic!("{}: {e} (run scripts/deps whisper)", path.display()));
    assert_eq!(&bytes[..6], b"\x93NUMPY");
    let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    let header = std::str::from_utf8(&bytes[10..10 + header_len]).unwrap();
    assert!(header.contains("'descr': '<f4'"), "{header}");
    let shape = header.split("'shape': (").nth(1).unwrap();
    let shape: Vec<usize> = shape[..shape.find(')').unwrap()]
        .split(',')
        .filter_map(|d| d.trim().parse().ok())
        .collect();
    let data = bytes[10 + header_len..]
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    (shape, data)
}

#[test]
fn mel_filters_match_whisper_reference() {
    let (shape, reference) = read_npy_f32(&tools("whisper/mel_80.npy"));
    assert_eq!(shape, [80, 201]);
    let ours = mel::filters(80, mel::N_FFT, mel::SAMPLE_RATE);
    assert_eq!(ours.len(), reference.len());
    let peak = reference.iter().copied().fold(0f32, f32::max);
    let worst = ours
        .iter()
        .zip(&reference)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    eprintln!("largest difference {worst:e} (largest weight {peak})");
    assert!(worst <= peak * 1e-5, "largest difference {worst}");
}

/// The README's first command (`scripts/serve`) runs this config from the repository root.
#[test]
fn the_demo_config_serves_whisper_by_default() {
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let cfg = Config::load(Some(&root.join("config/demo.toml"))).unwrap();
    let defaults: Vec<_> = cfg.stt.iter().filter(|s| s.default).collect();
    assert_eq!(defaults.len(), 1);
    assert_eq!(defaults[0].backend, SttBackend::Whisper);
    let dir = root.join(defaults[0].model_dir.as_deref().unwrap());
    assert!(dir.join("model.bin").exists(), "{}", dir.display());
    assert!(cfg
        .stt
        .iter()
        .any(|s| s.backend == SttBackend::Pocketsphinx));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whisper_transcribes_corpus_speech_in_process() {
    let mut cfg = stt_config();
    cfg.stt.push(whisper_cfg("whisper"));
    let corpus = corpus("");
    // A browser capture as the page sends it, and the source speech as PCM.
    let only = ["chromium_short_250ms", "short.wav"].map(String::from);
    let items = items(&corpus, &only).unwrap();
    assert_eq!(items.len(), 2);
    let rows = measure(cfg, &items, 0.0, &[]).await.unwrap();
    for r in &rows {
        eprintln!(
            "{}: via voxgate {:.3} ({:?}); whole WAV {:.3} ({:?})",
            r.item, r.gateway_wer, r.gateway_text, r.direct_wer, r.direct_text
        );
        let text = r.gateway_text.to_lowercase();
        let heard: Vec<_> = [
            "quick", "brown", "fox", "lazy", "dog", "quiet", "river", "bank",
        ]
        .into_iter()
        .filter(|w| text.contains(w))
        .collect();
        assert!(
            heard.len() >= 7,
            "{}: key words {heard:?} in {text:?}",
            r.item
        );
    }
}

/// Streams two corpus sentences to a gateway with only `backend`; the client must be warned
/// `stt_unavailable` and `voxgate_stt_requests_total{outcome}` must count the failure.
async fn failure_is_warned_and_counted(backend: SttConfig, outcome: &str) -> Gateway {
    let name = backend.name.clone();
    let mut cfg = stt_config();
    cfg.stt.push(backend);
    let gw = Gateway::start(cfg).await;
    let run = stream(
        &gw.ws("/v1/listen?encoding=linear16"),
        sentences(2),
        Duration::from_millis(2),
    )
    .await;
    assert_eq!(run.close_code, Some(1000), "{:?}", run.close_reason);
    assert!(!run.of_type("UtteranceEnd").is_empty());
    assert!(transcripts(&run, &name).iter().all(|t| t["text"] == ""));
    assert!(warnings(&run, "stt_unavailable") >= 1, "{:?}", run.events);
    let label = format!("backend=\"{name}\",outcome=\"{outcome}\"");
    let counted = gw.metric("voxgate_stt_requests_total", &label).await;
    assert!(counted >= 1.0, "{label}: {counted}");
    gw
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decoding_past_the_timeout_is_reported_and_counted() {
    let mut slow = whisper_cfg("slow");
    // Loading the model alone takes longer than this.
    slow.timeout_ms = 1;
    slow.max_retries = 0;
    let gw = failure_is_warned_and_counted(slow, "timeout").await;
    gw.shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_model_is_reported_not_silent() {
    let mut gone = SttConfig::new("gone", SttBackend::Whisper, "");
    gone.model_dir = Some("/nonexistent/whisper".into());
    gone.max_retries = 0;
    let gw = failure_is_warned_and_counted(gone, "error").await;
    let ready = gw.page("/readyz").await;
    assert!(
        ready.contains("stt gone (whisper)") && ready.contains("decoder failed"),
        "{ready}"
    );
    gw.shutdown.cancel();
}

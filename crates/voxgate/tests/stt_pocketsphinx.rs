//! The embedded PocketSphinx backend recognizes the corpus short sentence ("The quick brown fox
//! jumps over the lazy dog near the quiet river bank.") through the whole gateway path.
//! Needs `--features pocketsphinx`, Debian `libpocketsphinx-dev` + `pocketsphinx-en-us`, and
//! `espeak-ng` (`scripts/deps` installs them with `VOXGATE_STT_DEPS=1`).
//!
//! PocketSphinx is demo-grade: on the corpus recording's voice it hears "we are so but lady
//! all the white really". So, as the dependency survey advised, the test speaks the corpus text
//! with espeak-ng's `en-us+f2` voice at 150 wpm (22.05 kHz, resampled by the gateway).
#![cfg(feature = "pocketsphinx")]

mod common;

use std::time::{Duration, Instant};

use common::*;
use voxgate::config::{SttBackend, SttConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pocketsphinx_recognizes_the_short_sentence() {
    let mut cfg = test_config();
    cfg.stt
        .push(SttConfig::new("sphinx", SttBackend::Pocketsphinx, ""));
    let gw = Gateway::start(cfg).await;
    let text = std::fs::read_to_string(corpus("source/short.txt")).unwrap();
    let wav = std::env::temp_dir().join(format!("voxgate-sphinx-{}.wav", std::process::id()));
    let status = std::process::Command::new("espeak-ng")
        .args(["-v", "en-us+f2", "-s", "150", "-w"])
        .arg(&wav)
        .arg(text.trim())
        .status()
        .expect("espeak-ng is installed (scripts/deps)");
    assert!(status.success());
    let data = std::fs::read(&wav).unwrap();
    let _ = std::fs::remove_file(&wav);
    let at = data.windows(4).position(|w| w == b"data").unwrap() + 8;
    let rate = u32::from_le_bytes(data[24..28].try_into().unwrap());
    // 0.5 s of silence after the speech ends the utterance on silence.
    let mut pcm = data[at..].to_vec();
    pcm.extend(std::iter::repeat_n(0u8, rate as usize));
    let messages: Vec<Vec<u8>> = pcm.chunks(4410).map(<[u8]>::to_vec).collect();
    let started = Instant::now();
    // Real-time pacing is not needed: decoding is per utterance, after its end.
    let run = stream(
        &gw.ws(&format!("/v1/listen?encoding=linear16&sample_rate={rate}")),
        messages,
        Duration::ZERO,
    )
    .await;
    let elapsed = started.elapsed();
    assert_eq!(run.close_code, Some(1000), "{:?}", run.close_reason);
    let finals: Vec<_> = run
        .of_type("Transcript")
        .into_iter()
        .filter(|t| t["backend"] == "sphinx" && t["is_final"] == true)
        .collect();
    assert!(!finals.is_empty(), "no transcript: {:?}", run.events);
    let text = finals
        .iter()
        .map(|t| t["text"].as_str().unwrap())
        .collect::<Vec<_>>()
        .join(" ")
        .to_lowercase();
    let hits: Vec<_> = [
        "quick", "brown", "fox", "lazy", "dog", "quiet", "river", "bank",
    ]
    .into_iter()
    .filter(|w| text.split_whitespace().any(|t| t == *w))
    .collect();
    eprintln!(
        "pocketsphinx heard {text:?} ({} key words: {hits:?}) in {elapsed:?} for {:.2} s of audio",
        hits.len(),
        run.closed()["summary"]["seconds_decoded"].as_f64().unwrap()
    );
    assert!(
        hits.iter().any(|w| ["fox", "dog", "river"].contains(w)) && hits.len() >= 2,
        "expected key words in {text:?}"
    );
    assert_eq!(run.closed()["summary"]["consumers"][0]["dropped_bytes"], 0);
    let m = gw.metrics().await;
    assert!(
        metric_value(
            &m,
            "voxgate_stt_requests_total",
            "backend=\"sphinx\",outcome=\"success\""
        ) >= 1.0
            || metric_value(&m, "voxgate_stt_requests_total", "outcome=\"success\"") >= 1.0
    );
    gw.shutdown.cancel();
}

//! Streaming speech-to-text never loses an utterance silently: against backends that refuse
//! `Finalize`, never answer, answer without words, or close mid-utterance and stay away, every
//! utterance ends with a final transcript, an empty final, or a counted `stt_lost` with a
//! client warning, and the session closes on time; isolated utterances get a connection each.
//! Also: per-session options reach the backend and are checked against its allow-lists.

mod common;
mod stt_support;

use std::time::{Duration, Instant};

use common::*;
use stt_support::*;
use voxgate::config::FinalizeMode;

/// Metrics are process-wide; tests that read counters run one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Streams `n` sentences; returns the run and the time from the client's `CloseStream` to the
/// server's close.
async fn run_sentences(gw: &Gateway, query: &str, n: usize) -> (ClientRun, Duration) {
    let msgs = sentences(n);
    let audio = Duration::from_millis(5) * msgs.len() as u32;
    let started = Instant::now();
    let run = stream(
        &gw.ws(&format!("/v1/listen?encoding=linear16{query}")),
        msgs,
        Duration::from_millis(5),
    )
    .await;
    let closing = started.elapsed().saturating_sub(audio);
    (run, closing)
}

/// Every utterance's fate: a final with words, an empty final, or lost (by id).
fn accounted(run: &ClientRun, backend: &str) -> (usize, usize, usize) {
    let finals: Vec<_> = transcripts(run, backend)
        .into_iter()
        .filter(|t| t["is_final"] == true)
        .collect();
    let (mut words, mut empty, mut missing) = (0, 0, 0);
    for e in run.of_type("UtteranceEnd") {
        let mine: Vec<_> = finals
            .iter()
            .filter(|t| t["utterance"] == e["utterance"])
            .collect();
        if mine.iter().any(|t| t["text"] != "") {
            words += 1;
        } else if !mine.is_empty() {
            empty += 1;
        } else {
            missing += 1;
        }
    }
    (words, empty, missing)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_finalize_switches_to_endpointing_when_the_backend_refuses_it() {
    let _serial = SERIAL.lock().await;
    let dg = Deepgram::with(DgBehavior {
        finalize: OnFinalize::Refuse,
        endpoint_every: Some(16_000),
        ..Default::default()
    })
    .await;
    let mut cfg = stt_config();
    let mut s = deepgram_cfg("refuser", &dg.url());
    assert_eq!(s.finalize, FinalizeMode::Auto, "auto is the default");
    s.flush_timeout_ms = 5_000;
    cfg.stt.push(s);
    let gw = Gateway::start(cfg).await;
    let (first, _) = run_sentences(&gw, "", 3).await;
    assert_eq!(first.close_code, Some(1000), "{}", first.close_reason);
    assert_eq!(dg.count("Finalize"), 1, "refused once, never sent again");
    assert_eq!(dg.conns().len(), 2, "one reconnect after the refusal");
    let ends = first.of_type("UtteranceEnd").len();
    assert!(ends >= 3, "{ends}");
    let (words, _empty, missing) = accounted(&first, "refuser");
    assert_eq!(
        missing, 0,
        "every utterance ends with a final: {:?}",
        first.events
    );
    assert!(words >= 2, "the speech came back as words");
    assert_eq!(warnings(&first, "stt_lost"), 0);
    assert_eq!(
        warnings(&first, "stt_unavailable"),
        0,
        "a refusal is not an outage"
    );
    let m = gw.metrics().await;
    let label = "backend=\"refuser\"";
    assert_eq!(
        metric_value(&m, "voxgate_stt_finalize_fallbacks_total", label),
        1.0
    );
    assert_eq!(metric_value(&m, "voxgate_stt_lost_total", label), 0.0);

    // The backend's mode is remembered: the next session sends no Finalize at all.
    let (second, _) = run_sentences(&gw, "", 2).await;
    assert_eq!(second.close_code, Some(1000));
    assert_eq!(dg.count("Finalize"), 1);
    assert_eq!(dg.conns().len(), 3, "one connection for the second session");
    assert_eq!(accounted(&second, "refuser").2, 0);
    assert_eq!(
        gw.metric("voxgate_stt_finalize_fallbacks_total", label)
            .await,
        1.0,
        "counted once per backend"
    );
    gw.shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_never_answers_counts_every_utterance_lost_and_closes_on_time() {
    let _serial = SERIAL.lock().await;
    let dg = Deepgram::with(DgBehavior {
        finalize: OnFinalize::Ignore,
        close_stream: OnCloseStream::Hang,
        ..Default::default()
    })
    .await;
    let mut cfg = stt_config();
    let mut s = deepgram_cfg("mute", &dg.url());
    s.flush_timeout_ms = 1_000;
    cfg.stt.push(s);
    let gw = Gateway::start(cfg).await;
    let (run, closing) = run_sentences(&gw, "", 2).await;
    assert_eq!(run.close_code, Some(1000), "{}", run.close_reason);
    assert!(
        closing < Duration::from_secs(6),
        "the session closes at the flush deadline, not the 10 s close deadline: {closing:?}"
    );
    let ends = run.of_type("UtteranceEnd").len();
    assert!(ends >= 2);
    let (words, empty, missing) = accounted(&run, "mute");
    assert_eq!((words, empty, missing), (0, 0, ends));
    assert_eq!(warnings(&run, "stt_lost"), 1, "one warning for the session");
    assert_eq!(
        gw.metric("voxgate_stt_lost_total", "backend=\"mute\"")
            .await,
        ends as f64,
        "every utterance counted"
    );
    assert_eq!(dg.count("CloseStream"), 1);
    gw.shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finalize_answers_without_words_give_empty_finals() {
    let _serial = SERIAL.lock().await;
    let dg = Deepgram::with(DgBehavior {
        finalize: OnFinalize::AnswerEmpty,
        no_interims: true,
        ..Default::default()
    })
    .await;
    let mut cfg = stt_config();
    let mut s = deepgram_cfg("quiet", &dg.url());
    s.finalize = FinalizeMode::Message;
    cfg.stt.push(s);
    let gw = Gateway::start(cfg).await;
    let (run, _) = run_sentences(&gw, "", 2).await;
    assert_eq!(run.close_code, Some(1000));
    let ends = run.of_type("UtteranceEnd").len();
    assert!(ends >= 2);
    assert_eq!(accounted(&run, "quiet"), (0, ends, 0), "{:?}", run.events);
    assert_eq!(warnings(&run, "stt_lost"), 0);
    gw.shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_closes_mid_utterance_and_stays_away_counts_the_loss() {
    let _serial = SERIAL.lock().await;
    let dg = Deepgram::with(DgBehavior {
        drop_first_after: Some(24_000),
        only_first: true,
        ..Default::default()
    })
    .await;
    let mut cfg = stt_config();
    let mut s = deepgram_cfg("gone", &dg.url());
    s.flush_timeout_ms = 1_000;
    cfg.stt.push(s);
    let gw = Gateway::start(cfg).await;
    let (run, closing) = run_sentences(&gw, "", 2).await;
    assert_eq!(run.close_code, Some(1000), "{}", run.close_reason);
    assert!(closing < Duration::from_secs(6), "{closing:?}");
    assert_eq!(warnings(&run, "stt_unavailable"), 1);
    let ends = run.of_type("UtteranceEnd").len();
    assert_eq!(accounted(&run, "gone"), (0, 0, ends));
    assert_eq!(warnings(&run, "stt_lost"), 1);
    assert_eq!(
        gw.metric("voxgate_stt_lost_total", "backend=\"gone\"")
            .await,
        ends as f64
    );
    gw.shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn isolated_utterances_get_a_connection_each_cut_with_close_stream() {
    let _serial = SERIAL.lock().await;
    let dg = Deepgram::with(DgBehavior {
        no_interims: true,
        silence_is_empty: true,
        ..Default::default()
    })
    .await;
    let mut cfg = stt_config();
    let mut s = deepgram_cfg("iso", &dg.url());
    s.finalize = FinalizeMode::None;
    s.isolate_utterances = true;
    cfg.stt.push(s);
    let gw = Gateway::start(cfg).await;
    let (run, _) = run_sentences(&gw, "", 3).await;
    assert_eq!(run.close_code, Some(1000), "{}", run.close_reason);
    let ends = run.of_type("UtteranceEnd").len();
    assert!(ends >= 3, "{ends}");
    assert_eq!(accounted(&run, "iso"), (ends, 0, 0), "{:?}", run.events);
    // One connection per utterance, each cut with CloseStream once the utterance ended (the
    // fixture answers it with the connection's only final), and one for the trailing silence.
    let conns = dg.conns();
    assert_eq!(conns.len(), ends + 1, "{conns:?}");
    assert!(conns
        .iter()
        .all(|c| c.log.last().unwrap().1 == "CloseStream"));
    assert_eq!(dg.count("CloseStream"), ends + 1);
    assert_eq!(dg.count("Finalize"), 0);
    for e in run.of_type("UtteranceEnd") {
        let words: Vec<_> = transcripts(&run, "iso")
            .into_iter()
            .filter(|t| t["utterance"] == e["utterance"] && t["text"] != "")
            .collect();
        assert_eq!(words.len(), 1, "one connection's words each: {words:?}");
    }
    assert_eq!(warnings(&run, "stt_lost"), 0);
    assert_eq!(warnings(&run, "stt_unavailable"), 0);
    gw.shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_options_reach_the_backend_within_its_allow_lists() {
    let _serial = SERIAL.lock().await;
    let dg = Deepgram::start(None).await;
    let mut cfg = stt_config();
    let mut s = deepgram_cfg("dg", &dg.url());
    s.allowed_languages = vec!["de".into(), "en-US".into()];
    s.allowed_models = vec!["nova-3".into()];
    s.allow_prompt = true;
    cfg.stt.push(s);
    let gw = Gateway::start(cfg).await;
    let msgs = || pcm_messages("short", Some(1.0));
    let run = stream(
        &gw.ws("/v1/listen?encoding=linear16&language=de&model=nova-3&keyterm=fox,river%20bank"),
        msgs(),
        Duration::ZERO,
    )
    .await;
    assert_eq!(run.close_code, Some(1000), "{}", run.close_reason);
    let conns = dg.conns();
    let q = &conns[0].query;
    assert_eq!(q.get("language").map(String::as_str), Some("de"));
    assert_eq!(q.get("model").map(String::as_str), Some("nova-3"));
    assert_eq!(
        q.get("keyterm").map(String::as_str),
        Some("river bank"),
        "{q:?}"
    );
    // Not in the allow-list: refused before the session starts.
    for bad in [
        "language=fr",
        "model=huge",
        &format!("prompt={}", "x".repeat(1001)),
    ] {
        let run = stream(
            &gw.ws(&format!("/v1/listen?encoding=linear16&{bad}")),
            vec![],
            Duration::ZERO,
        )
        .await;
        assert_eq!(run.close_code, Some(1008), "{bad}");
        assert_eq!(
            run.of_type("Error")[0]["code"],
            "invalid_parameters",
            "{bad}"
        );
    }
    assert_eq!(dg.conns().len(), 1);
    gw.shutdown.cancel();
}

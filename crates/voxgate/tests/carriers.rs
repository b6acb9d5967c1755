//! Phone carriers and PBXs end to end over real sockets: each replays a call built from corpus
//! speech (`source/short.wav`) in the carrier's exact framing (`voxgate::cli::carrier`, whose
//! framings cite the providers' docs), with control events, a lost frame, frames out of order
//! and a malformed frame, while a second call on the same endpoint goes on untouched.

mod common;

use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;
use voxgate::cli::carrier::{self, Call, Frame};
use voxgate::cli::device;
use voxgate::config::WebhookConfig;
use voxgate::ingest::request::Carrier;

/// The corpus sentence at 8 kHz: 44,855 samples, 89,710 at the session's 16 kHz.
const SHORT_16K: u64 = 44_855 * 2;

fn short_call(c: Carrier, params: &[(&str, &str)]) -> Call {
    let (rate, samples) = device::read_wav(&corpus("source/short.wav")).unwrap();
    let params: Vec<(String, String)> = params
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    carrier::call(c, rate, &samples, &params).unwrap()
}

fn to_ws(frame: Frame) -> Message {
    match frame {
        Frame::Text(t) => Message::Text(t.into()),
        Frame::Binary(b) => Message::Binary(b.into()),
        Frame::Close => Message::Close(None),
    }
}

/// Sends a call's frames (without pacing) and collects what comes back until the close.
async fn replay(url: &str, frames: Vec<Frame>) -> ClientRun {
    replay_l16(url, None, frames).await
}

/// A gateway with a webhook `calls` that only sessions asking for it get.
async fn gateway() -> (Gateway, Receiver) {
    let rx = Receiver::start(Mode::Ok).await;
    let mut cfg = test_config();
    let mut w = WebhookConfig::new("calls", &rx.url("calls"), Some(5.0));
    w.default = false;
    cfg.webhooks.push(w);
    (Gateway::start(cfg).await, rx)
}

/// The call with its 11th media frame lost, its 21st and 22nd swapped, a DTMF after the 5th
/// and malformed messages after the 30th.
fn damaged(call: &Call, dtmf: &str, malformed: &[&str]) -> Vec<Frame> {
    let mut frames: Vec<Frame> = call.frames.iter().map(|t| t.frame.clone()).collect();
    frames.swap(call.media[20], call.media[21]);
    let after = call.media[30] + 1;
    for (i, bad) in malformed.iter().enumerate() {
        frames.insert(after + i, Frame::Text(bad.to_string()));
    }
    frames.insert(call.media[5] + 1, Frame::Text(dtmf.to_owned()));
    frames.remove(call.media[10]);
    frames
}

fn warning_codes(run: &ClientRun) -> Vec<String> {
    run.of_type("Warning")
        .iter()
        .map(|w| w["code"].as_str().unwrap().to_owned())
        .collect()
}

/// Runs a damaged call and a clean one at once on `carrier`'s path; checks the decoded length,
/// the gap filled for the lost frame, the webhook's audio, and that the clean call is whole.
/// Returns the damaged call's run.
async fn damaged_and_clean(c: Carrier, dtmf: &str, malformed: &[&str], frame_ms: u64) -> ClientRun {
    let (gw, rx) = gateway().await;
    let url = gw.ws(&format!("/v1/{}", c.as_str()));
    let bad = short_call(c, &[("consumers", "calls")]);
    let good = short_call(c, &[]);
    let good_frames = good.frames.iter().map(|t| t.frame.clone()).collect();
    let (run, clean) = tokio::join!(
        replay(&url, damaged(&bad, dtmf, malformed)),
        replay(&url, good_frames)
    );
    assert_eq!(run.close_code, Some(1000), "{:?}", run.events);
    assert_eq!(clean.close_code, Some(1000), "{:?}", clean.events);
    assert!(warning_codes(&clean).is_empty(), "{:?}", clean.events);
    let summary = &clean.closed()["summary"];
    assert_eq!(
        summary["samples_decoded"], SHORT_16K,
        "the clean call is whole"
    );
    assert_eq!(summary["gap_samples"], 0);
    let summary = &run.closed()["summary"];
    // The lost frame comes back as silence of its length; the swapped ones in place.
    assert_eq!(summary["gap_samples"], frame_ms * 16, "{summary}");
    assert_eq!(summary["samples_decoded"], SHORT_16K, "{summary}");
    let reqs = rx.requests("calls");
    assert_eq!(reqs.iter().map(|r| r.samples).sum::<u64>(), SHORT_16K);
    let lost = format!("carrier=\"{}\",outcome=\"lost\"", c.as_str());
    // Other tests of the process may count too: at least this call's one.
    assert!(gw.metric("voxgate_carrier_frames_total", &lost).await >= 1.0);
    run
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signalwire_stream_is_reordered_gap_filled_and_warned() {
    // SignalWire's <Stream> sends Twilio's messages (developer.signalwire.com compatibility-api
    // cxml/voice/stream): camelCase, mediaFormat audio/x-mulaw 8000.
    let dtmf = r#"{"event":"dtmf","streamSid":"x","dtmf":{"track":"inbound_track","digit":"7"}}"#;
    let run = damaged_and_clean(
        Carrier::SignalWire,
        dtmf,
        &[
            "{not json",
            r#"{"event":"media","media":{"chunk":"99","payload":"%%%"}}"#,
        ],
        20,
    )
    .await;
    let codes = warning_codes(&run);
    for code in ["bad_message", "bad_payload", "media_gap"] {
        assert!(codes.iter().any(|c| c == code), "{code} in {codes:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telnyx_stream_answers_malformed_frames_with_its_error_event() {
    // Telnyx media streaming (developers.telnyx.com/api-reference/websockets/
    // stream-call-media-over-websocket): snake_case, stream_id, media.chunk, PCMU; errors are
    // {"event":"error","payload":{code,title,detail}}.
    let dtmf = r#"{"event":"dtmf","sequence_number":"9","stream_id":"x","dtmf":{"digit":"*"}}"#;
    let run = damaged_and_clean(Carrier::Telnyx, dtmf, &["{not json"], 20).await;
    let errors: Vec<_> = run
        .events
        .iter()
        .filter(|e| e["event"] == "error")
        .collect();
    assert!(
        errors.iter().any(|e| e["payload"]["code"] == "bad_message"),
        "{:?}",
        run.events
    );
    assert!(
        run.of_type("Warning").is_empty(),
        "Telnyx gets its own error shape"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telnyx_pcma_and_a_late_frame() {
    let (gw, _rx) = gateway().await;
    let call = short_call(Carrier::Telnyx, &[("encoding", "PCMA")]);
    let mut frames: Vec<Frame> = call.frames.iter().map(|t| t.frame.clone()).collect();
    // Frame 3 arrives after more than the reorder window (16) of later frames: given up,
    // filled, then dropped as late when it comes.
    let late = frames.remove(call.media[3]);
    frames.insert(call.media[3] + 20, late);
    let run = replay(&gw.ws("/v1/telnyx"), frames).await;
    assert_eq!(run.close_code, Some(1000));
    let summary = &run.closed()["summary"];
    assert_eq!(summary["samples_decoded"], SHORT_16K, "{summary}");
    assert_eq!(summary["gap_samples"], 320);
    let late = gw
        .metric("voxgate_carrier_frames_total", "outcome=\"late\"")
        .await;
    assert!(late >= 1.0, "{late}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plivo_stream_is_reordered_gap_filled_and_warned() {
    // Plivo audio streams (plivo.com/docs/voice/xml/the-stream-element; Pipecat
    // serializers/plivo.py): streamId, mediaFormat audio/x-mulaw 8000, numeric chunk.
    let dtmf = r#"{"event":"dtmf","streamId":"x","dtmf":{"digit":"1"}}"#;
    let run = damaged_and_clean(
        Carrier::Plivo,
        dtmf,
        &[r#"{"event":"media","media":{"payload":"!!"}}"#],
        20,
    )
    .await;
    assert!(warning_codes(&run).contains(&"bad_payload".to_owned()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exotel_stream_of_pcm16_is_reordered_gap_filled_and_warned() {
    // Exotel AgentStream (developer.exotel.com/docs/agentstream/websocket-protocol; Pipecat
    // serializers/exotel.py): snake_case, base64 PCM16 LE 8 kHz, 100 ms media events.
    let dtmf = r#"{"event":"dtmf","stream_sid":"x","dtmf":{"duration":"100","digit":"3"}}"#;
    let run = damaged_and_clean(Carrier::Exotel, dtmf, &["[1,2"], 100).await;
    assert!(warning_codes(&run).contains(&"bad_message".to_owned()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn carrier_control_events_reach_subscribers_and_bad_formats_are_refused() {
    let (gw, _rx) = gateway().await;
    let call = short_call(Carrier::Exotel, &[("session_id", "exo-watched")]);
    let mut frames: Vec<Frame> = call.frames.iter().map(|t| t.frame.clone()).collect();
    frames.insert(
        call.media[2],
        Frame::Text(r#"{"event":"dtmf","dtmf":{"digit":"9"}}"#.into()),
    );
    let (ws, _) = tokio_tungstenite::connect_async(gw.ws("/v1/exotel"))
        .await
        .unwrap();
    let (mut tx, mut rx) = ws.split();
    // Start, then subscribe before the media.
    for f in frames.drain(..call.media[0]) {
        tx.send(to_ws(f)).await.unwrap();
    }
    let sub_url = gw.ws("/v1/sessions/exo-watched/subscribe");
    let mut sub = None;
    for _ in 0..50 {
        if let Ok((s, _)) = tokio_tungstenite::connect_async(&sub_url).await {
            sub = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut sub = sub.expect("the session is registered");
    for f in frames {
        tx.send(to_ws(f)).await.unwrap();
    }
    while let Some(Ok(m)) = rx.next().await {
        if matches!(m, Message::Close(_)) {
            break;
        }
    }
    let mut seen = Vec::new();
    while let Ok(Some(Ok(Message::Text(t)))) =
        tokio::time::timeout(Duration::from_secs(5), sub.next()).await
    {
        let v: serde_json::Value = serde_json::from_str(&t).unwrap();
        if v["type"] == "Telephony" {
            seen.push(v["event"].as_str().unwrap().to_owned());
        }
        if v["type"] == "Closed" {
            break;
        }
    }
    assert!(seen.contains(&"dtmf".to_owned()), "{seen:?}");
    assert!(seen.contains(&"stop".to_owned()), "{seen:?}");

    // A start with a format the carrier does not send is refused with 1003.
    let start = r#"{"event":"start","stream_id":"s","start":{"media_format":{"encoding":"G722","sample_rate":16000}}}"#;
    let run = replay(&gw.ws("/v1/telnyx"), vec![Frame::Text(start.into())]).await;
    assert_eq!(run.close_code, Some(1003));
}

/// The 16 kHz corpus sentence's length in samples.
const SHORT_16K_WAV: u64 = 89_710;

/// Connects offering `protocol` (checking it is echoed), sends `frames`, collects events until
/// the close.
async fn replay_l16(url: &str, protocol: Option<&str>, frames: Vec<Frame>) -> ClientRun {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut request = url.into_client_request().unwrap();
    if let Some(p) = protocol {
        request
            .headers_mut()
            .insert("sec-websocket-protocol", p.parse().unwrap());
    }
    let (ws, response) = tokio_tungstenite::connect_async(request).await.unwrap();
    let echoed = response.headers().get("sec-websocket-protocol");
    assert_eq!(
        echoed.and_then(|v| v.to_str().ok()),
        protocol,
        "subprotocol echoed"
    );
    let (mut tx, mut rx) = ws.split();
    let mut run = ClientRun::default();
    for f in frames {
        tx.send(to_ws(f)).await.unwrap();
    }
    let read = async {
        while let Some(Ok(msg)) = rx.next().await {
            match msg {
                Message::Text(t) => run.events.push(serde_json::from_str(&t).unwrap()),
                Message::Close(f) => {
                    run.close_code = f.map(|f| u16::from(f.code));
                    break;
                }
                _ => {}
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), read)
        .await
        .unwrap();
    run
}

/// The webhook samples of session `id` once its last request came (the call ended with a
/// close, so the summary is not the client's to read).
async fn samples_of(rx: &Receiver, id: &str, want: u64) -> u64 {
    let total = || {
        rx.requests("calls")
            .iter()
            .filter(|r| r.session_id == id)
            .map(|r| r.samples)
            .sum::<u64>()
    };
    for _ in 0..100 {
        if total() >= want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    total()
}

/// A damaged L16 call (a DTMF and a malformed control message mid-stream) and a clean one at
/// once: both decode to the whole sentence, the malformed message is answered with a warning.
async fn l16_calls(c: Carrier, protocol: Option<&str>, dtmf: &str) {
    let (gw, rx) = gateway().await;
    let (rate, samples) = device::read_wav(&corpus("source/short.wav")).unwrap();
    let mut urls = Vec::new();
    let mut calls = Vec::new();
    for id in ["call-a", "call-b"] {
        let params = [
            ("consumers".to_owned(), "calls".to_owned()),
            ("session_id".to_owned(), id.to_owned()),
        ];
        // An audio fork's and Asterisk's session is chosen in the URL; the others' in their
        // description.
        let (query, params) = match c {
            Carrier::AudioFork | Carrier::Asterisk => (
                format!("?sample_rate={rate}&consumers=calls&session_id={id}"),
                vec![],
            ),
            _ => (String::new(), params.to_vec()),
        };
        urls.push(gw.ws(&format!("/v1/{}{query}", c.as_str())));
        calls.push(carrier::call(c, rate, &samples, &params).unwrap());
    }
    let mut bad: Vec<Frame> = calls[0].frames.iter().map(|t| t.frame.clone()).collect();
    bad.insert(calls[0].media[40], Frame::Text("{oops".into()));
    bad.insert(calls[0].media[10], Frame::Text(dtmf.into()));
    let good = calls[1].frames.iter().map(|t| t.frame.clone()).collect();
    let (run, clean) = tokio::join!(
        replay_l16(&urls[0], protocol, bad),
        replay_l16(&urls[1], protocol, good)
    );
    let codes = warning_codes(&run);
    assert!(
        codes.contains(&"bad_message".to_owned()),
        "{:?}",
        run.events
    );
    assert!(warning_codes(&clean).is_empty(), "{:?}", clean.events);
    assert_eq!(
        samples_of(&rx, "call-a", SHORT_16K_WAV).await,
        SHORT_16K_WAV
    );
    // Binary L16 has no sequence numbers: nothing is synthesized, the length is exact.
    assert_eq!(
        samples_of(&rx, "call-b", SHORT_16K_WAV).await,
        SHORT_16K_WAV
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vonage_websocket_l16_calls() {
    // developer.vonage.com/voice/voice-api/concepts/websockets: a text
    // {"event":"websocket:connected","content-type":"audio/l16;rate=16000",...headers}, then
    // binary 20 ms L16 frames; DTMF as {"event":"websocket:dtmf","digit":"5","duration":260}.
    let dtmf = r#"{"event":"websocket:dtmf","digit":"5","duration":260}"#;
    l16_calls(Carrier::Vonage, None, dtmf).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jambonz_listen_l16_calls() {
    // docs.jambonz.org verbs/listen: subprotocol audio.jambonz.org, a first text frame of call
    // metadata (callSid, from, to, sampleRate, mixType), then binary L16; dtmf when passDtmf.
    let dtmf = r#"{"event":"dtmf","dtmf":"7","duration":"250"}"#;
    l16_calls(Carrier::Jambonz, Some("audio.jambonz.org"), dtmf).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn freeswitch_audio_fork_l16_calls() {
    // drachtio-freeswitch-modules mod_audio_fork README: subprotocol audio.drachtio.org, the
    // fork command's rate (here 16000 in the URL), binary L16, an optional metadata text frame.
    let meta = r#"{"event":"metadata","uuid":"fs-1","caller":"1000"}"#;
    l16_calls(Carrier::AudioFork, Some("audio.drachtio.org"), meta).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sinch_stream_l16_calls_are_answered_or_rejected() {
    // developers.sinch.com voice-2.0 api-reference stream: a ConnectRequest
    // {"command":"connect","version":1,"callId","applicationKey","codec":"PCM","sampleRate",
    // "callHeaders":{..}} answered {"command":"answer"|"busy"|"reject"}, then binary 16-bit LE
    // mono PCM; the server may send {"command":"clear"|"heartbeat"} (a text here to forward).
    let heartbeat = r#"{"command":"heartbeat"}"#;
    l16_calls(Carrier::Sinch, None, heartbeat).await;
    let (gw, _rx) = gateway().await;
    let call = short_call(Carrier::Sinch, &[]);
    let frames: Vec<Frame> = call.frames.iter().map(|t| t.frame.clone()).collect();
    let run = replay(&gw.ws("/v1/sinch"), frames).await;
    assert_eq!(run.events[0]["command"], "answer", "{:?}", run.events);
    // A codec Sinch's docs do not define is rejected the Sinch way, then closed with 1003.
    let connect = r#"{"command":"connect","version":1,"callId":"c1","applicationKey":"k","codec":"OPUS","sampleRate":48000,"callHeaders":{}}"#;
    let run = replay(&gw.ws("/v1/sinch"), vec![Frame::Text(connect.into())]).await;
    assert_eq!(run.events[0]["command"], "reject", "{:?}", run.events);
    assert_eq!(run.close_code, Some(1003));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asterisk_chan_websocket_calls() {
    // docs.asterisk.org Channel-Drivers/WebSocket: Asterisk dials out, sends a TEXT
    // `MEDIA_START connection_id:.. channel:.. format:slin16 optimal_frame_size:640 ptime:20`,
    // then BINARY media in the channel's codec; later events such as `DTMF_END digit:5`.
    l16_calls(Carrier::Asterisk, Some("media"), "DTMF_END digit:5").await;
    // The JSON control format (`control_message_format = json`) with a passthrough codec
    // voxgate does not decode: refused with 1003.
    let (gw, _rx) = gateway().await;
    let start = r#"{"event":"MEDIA_START","connection_id":"c9","channel":"WebSocket/c9/0x9","channel_id":"1761245643.1","format":"opus","optimal_frame_size":960,"ptime":20,"channel_variables":{}}"#;
    let run = replay(&gw.ws("/v1/asterisk"), vec![Frame::Text(start.into())]).await;
    assert_eq!(run.close_code, Some(1003));
}

/// One AudioSocket frame: kind, big-endian u16 length, payload (docs.asterisk.org AudioSocket
/// protocol; CyCoreSystems/audiosocket `message.go`).
fn audiosocket_frame(kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![kind];
    f.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// Sends an AudioSocket call: the UUID, `frames` 20 ms slin16 (kind 0x12) frames of the corpus
/// sentence with a DTMF after the 5th, then `end` (a hangup, or an oversized header); returns
/// what the server wrote back before closing.
async fn audiosocket_call(
    addr: &str,
    uuid: uuid::Uuid,
    frames: Option<usize>,
    end: Vec<u8>,
) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (_, samples) = device::read_wav(&corpus("source/short.wav")).unwrap();
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut out = audiosocket_frame(0x01, uuid.as_bytes());
    let chunks: Vec<_> = samples.chunks(320).collect();
    for (i, chunk) in chunks
        .iter()
        .take(frames.unwrap_or(chunks.len()))
        .enumerate()
    {
        let pcm: Vec<u8> = chunk.iter().flat_map(|s| s.to_le_bytes()).collect();
        out.extend(audiosocket_frame(0x12, &pcm));
        if i == 5 {
            out.extend(audiosocket_frame(0x03, b"4"));
        }
    }
    out.extend(end);
    tcp.write_all(&out).await.unwrap();
    let mut back = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), tcp.read_to_end(&mut back))
        .await
        .unwrap()
        .unwrap();
    back
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asterisk_audiosocket_calls_and_an_oversized_frame() {
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = free.local_addr().unwrap().to_string();
    drop(free);
    let rx = Receiver::start(Mode::Ok).await;
    let mut cfg = test_config();
    cfg.webhooks
        .push(WebhookConfig::new("calls", &rx.url("calls"), Some(5.0)));
    cfg.carriers.audiosocket_listen = Some(addr.clone());
    let _gw = Gateway::start(cfg).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (a, b) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
    // Call A sends 30 frames, then a header announcing 60,000 bytes (over the 8,192 cap).
    let oversized = vec![0x10, 0xEA, 0x60];
    let (back_a, back_b) = tokio::join!(
        audiosocket_call(&addr, a, Some(30), oversized),
        audiosocket_call(&addr, b, None, audiosocket_frame(0x00, &[]))
    );
    assert_eq!(back_a, [0, 0, 0], "the oversized call is hung up");
    assert_eq!(back_b, [0, 0, 0], "the hangup is answered with a hangup");
    assert_eq!(samples_of(&rx, &a.to_string(), 9_600).await, 9_600);
    assert_eq!(
        samples_of(&rx, &b.to_string(), SHORT_16K_WAV).await,
        SHORT_16K_WAV
    );
}

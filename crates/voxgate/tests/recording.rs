//! Recordings end to end: the 150 s Chromium capture streamed through a resumable session while
//! the store goes away for a few seconds and the socket is killed and resumed once; the
//! recording fetched over HTTP afterwards is sample-identical to the capture's reference
//! decode, and the recorder held no more than its cap. Once against a local directory (the
//! store "goes away" by being replaced with a file) and once against a real SeaweedFS S3 server
//! (killed and restarted on the same data). Plus: a store down past the buffer drops audio,
//! counted and told to the client; fetching is limited to the recording's owner.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;
use voxgate::config::Config;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;
type Events = Arc<Mutex<Vec<serde_json::Value>>>;

/// A store that can be taken away and brought back mid-session.
trait Outage {
    async fn down(&mut self);
    async fn up(&mut self);
}

/// A local directory: "down" replaces it with a regular file, so every write fails.
struct LocalDir {
    dir: PathBuf,
}

impl Outage for LocalDir {
    async fn down(&mut self) {
        std::fs::rename(&self.dir, self.dir.with_extension("away")).unwrap();
        std::fs::write(&self.dir, b"not a directory").unwrap();
    }
    async fn up(&mut self) {
        std::fs::remove_file(&self.dir).unwrap();
        std::fs::rename(self.dir.with_extension("away"), &self.dir).unwrap();
    }
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("voxgate-rec-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn recording_config(url: &str) -> Config {
    let mut cfg = test_config();
    cfg.server.resume_grace_seconds = 5.0;
    cfg.server.close_flush_seconds = 20.0;
    let r = &mut cfg.recording;
    r.url = url.into();
    r.default = true;
    r.chunk_seconds = 2.0;
    r.max_buffer_seconds = 120.0;
    r.max_retries = 60;
    r.backoff_initial_ms = 50;
    r.backoff_max_ms = 500;
    r.timeout_ms = 2000;
    cfg
}

/// Reads events in the background, remembering the last acknowledged byte.
fn reader(
    ws: Ws,
    acked: Arc<AtomicU64>,
    events: Events,
) -> (
    futures_util::stream::SplitSink<Ws, Message>,
    tokio::task::JoinHandle<Option<u16>>,
) {
    let (tx, mut rx) = ws.split();
    let task = tokio::spawn(async move {
        while let Some(Ok(msg)) = rx.next().await {
            match msg {
                Message::Text(t) => {
                    let v: serde_json::Value = serde_json::from_str(&t).unwrap();
                    if v["type"] == "Ack" {
                        acked.store(v["bytes"].as_u64().unwrap(), Ordering::SeqCst);
                    } else {
                        events.lock().unwrap().push(v);
                    }
                }
                Message::Close(f) => return f.map(|f| u16::from(f.code)),
                _ => {}
            }
        }
        None
    });
    (tx, task)
}

/// Polls the recorder's buffered-bytes gauge until stopped; returns the peak.
fn peak_buffered(
    gw: &Gateway,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<f64>,
) {
    let (stop, mut stopped) = tokio::sync::oneshot::channel();
    let url = format!("http://{}/metrics", gw.addr);
    let task = tokio::spawn(async move {
        let mut peak: f64 = 0.0;
        loop {
            if let Ok(r) = reqwest::get(&url).await {
                let text = r.text().await.unwrap_or_default();
                peak = peak.max(metric_value(
                    &text,
                    "voxgate_buffered_bytes",
                    "consumer=\"recorder\"",
                ));
            }
            tokio::select! {
                _ = &mut stopped => return peak,
                () = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
    });
    (stop, task)
}

/// Streams the long capture into session `sid` (about 15 s for 151.8 s of audio); the store
/// is down from message 150 for `outage_ms`, the socket is killed at message 420 and resumed.
/// Returns the client's events.
async fn long_session(
    gw: &Gateway,
    sid: &str,
    store: &mut impl Outage,
    outage_ms: u64,
) -> Vec<serde_json::Value> {
    let data = std::fs::read(corpus("captures/chromium_long_250ms.webm")).unwrap();
    let messages = capture_messages("chromium_long_250ms.webm");
    let acked = Arc::new(AtomicU64::new(0));
    let events: Events = Arc::default();
    let url = gw.ws(&format!("/v1/listen?resumable=true&session_id={sid}"));
    let (ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let (mut tx, mut task) = reader(ws, acked.clone(), events.clone());
    tokio::time::sleep(Duration::from_millis(100)).await;
    let token = events
        .lock()
        .unwrap()
        .iter()
        .find(|e| e["type"] == "Resumable")
        .expect("Resumable first")["resume_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut offset = 0usize;
    let mut outage_until = None;
    for (i, m) in messages.iter().enumerate() {
        if i == 150 {
            store.down().await;
            outage_until = Some(tokio::time::Instant::now() + Duration::from_millis(outage_ms));
        }
        if outage_until.is_some_and(|t| tokio::time::Instant::now() >= t) {
            outage_until = None;
            store.up().await;
        }
        if i == 420 {
            task.abort();
            drop(tx);
            tokio::time::sleep(Duration::from_millis(50)).await;
            // Resend from a little before the last Ack: the duplicates are the server's to drop.
            let from = acked.load(Ordering::SeqCst).saturating_sub(3000);
            let url = gw.ws(&format!(
                "/v1/listen?resume={sid}&resume_token={token}&resume_from={from}"
            ));
            let (ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
            (tx, task) = reader(ws, acked.clone(), events.clone());
            tx.send(Message::Binary(data[from as usize..offset].to_vec().into()))
                .await
                .unwrap();
        }
        if tx.send(Message::Binary(m.clone().into())).await.is_err() {
            let ev = events.lock().unwrap();
            panic!(
                "the session closed at message {i}: {:?}",
                &ev[ev.len().saturating_sub(3)..]
            );
        }
        offset += m.len();
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(outage_until.is_none(), "the store came back before the end");
    tx.send(Message::Text(r#"{"type":"CloseStream"}"#.into()))
        .await
        .unwrap();
    let code = tokio::time::timeout(Duration::from_secs(60), task)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(code, Some(1000));
    let events = events.lock().unwrap().clone();
    events
}

/// The capture decoded in one go, in its message boundaries, by voxgate's own pipeline.
fn reference_samples() -> Vec<i16> {
    let out = scratch("reference").join("decoded.wav");
    voxgate::cli::decode::run(&voxgate::cli::decode::DecodeArgs {
        input: corpus("captures/chromium_long_250ms.webm"),
        index: Some(corpus("captures/chromium_long_250ms.index.json")),
        chunk_bytes: None,
        encoding: None,
        sample_rate: None,
        channels: None,
        output: out.clone(),
    })
    .unwrap();
    let reader = hound::WavReader::open(&out).unwrap();
    reader.into_samples::<i16>().map(Result::unwrap).collect()
}

fn wav_samples(bytes: &[u8]) -> Vec<i16> {
    let reader = hound::WavReader::new(std::io::Cursor::new(bytes)).unwrap();
    let spec = reader.spec();
    assert_eq!(
        (spec.sample_rate, spec.channels, spec.bits_per_sample),
        (16_000, 1, 16)
    );
    reader.into_samples::<i16>().map(Result::unwrap).collect()
}

/// The whole scenario against `store`: recorded, fetched, compared, the cap checked.
async fn records_through_an_outage_and_a_resume(
    cfg: Config,
    store: &mut impl Outage,
    outage_ms: u64,
) {
    let cap = cfg.recording.max_buffer_bytes() as f64;
    let gw = Gateway::start(cfg).await;
    let (stop, peak) = peak_buffered(&gw);
    let sid = format!("long-{}", std::process::id());
    let events = long_session(&gw, &sid, store, outage_ms).await;
    let _ = stop.send(());
    let peak = peak.await.unwrap();
    let closed = events.iter().find(|e| e["type"] == "Closed").unwrap();
    let recorder = closed["summary"]["consumers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "recorder")
        .expect("a recorder summary");
    assert_eq!(recorder["dropped_bytes"], 0, "{closed}");
    assert!(
        !events.iter().any(|e| e["code"] == "consumer_dropping"),
        "no drops"
    );
    assert_eq!(events.iter().filter(|e| e["type"] == "Resumed").count(), 1);

    let http = reqwest::Client::new();
    let base = format!("http://{}/v1/sessions/{sid}/recording", gw.addr);
    let wav = http.get(&base).send().await.unwrap();
    assert_eq!(wav.status(), 200);
    assert_eq!(wav.headers()["content-type"], "audio/wav");
    let got = wav_samples(&wav.bytes().await.unwrap());
    let want = reference_samples();
    assert_eq!(got.len(), want.len(), "151.8 s, as uninterrupted");
    let differ: Vec<usize> = (0..got.len()).filter(|&i| got[i] != want[i]).collect();
    assert!(
        differ.is_empty(),
        "sample-identical to the reference decode: {} differ, first at {:?}, last at {:?}",
        differ.len(),
        differ.first(),
        differ.last()
    );

    let lines = http
        .get(format!("{base}/events"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let lines: Vec<serde_json::Value> = lines
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let summary = lines.last().unwrap();
    assert_eq!(summary["type"], "RecordingSummary", "{summary}");
    assert_eq!(summary["close_code"], 1000);
    assert_eq!(summary["lost"], serde_json::json!([]));
    assert_eq!(
        summary["samples_written"].as_u64().unwrap() as usize,
        want.len()
    );
    assert!(
        summary["write_retries"].as_u64().unwrap() > 0,
        "the outage was felt: {summary}"
    );
    assert!(
        lines.iter().any(|l| l["type"] == "UtteranceEnd"),
        "events beside the audio"
    );
    assert!(
        peak > 0.0 && peak <= cap,
        "recorder held {peak} bytes; cap {cap}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_recording_survives_a_store_outage_and_a_resume() {
    let dir = scratch("local").join("store");
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = recording_config(dir.to_str().unwrap());
    records_through_an_outage_and_a_resume(cfg, &mut LocalDir { dir: dir.clone() }, 3000).await;
    // The layout: anonymous owner, the session, chunks named by sample ranges.
    let sid = format!("long-{}", std::process::id());
    let audio = dir.join("_").join(&sid).join("audio");
    let mut names: Vec<String> = std::fs::read_dir(&audio)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names[0], "000000000000-000000032000.pcm");
    assert_eq!(names[1], "000000032000-000000064000.pcm");
    assert_eq!(names.last().unwrap(), "000002400000-000002428800.pcm");
    let _ = std::fs::remove_dir_all(dir.parent().unwrap());
}

/// SeaweedFS on loopback ports: `weed server` (master, volume, filer) runs throughout; its S3
/// gateway (`weed s3`, one identity) is the store the test kills and restarts.
struct Weed {
    dir: PathBuf,
    ports: Vec<u16>,
    _server: tokio::process::Child,
    s3: Option<tokio::process::Child>,
}

const WEED_KEY: &str = "voxgate-test";
const WEED_SECRET: &str = "voxgate-test-secret";

fn weed(dir: &Path, args: Vec<String>) -> tokio::process::Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("weed.log"))
        .unwrap();
    tokio::process::Command::new(tools("seaweedfs/bin/weed"))
        .args(args)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

impl Weed {
    async fn start(dir: &Path) -> Option<Self> {
        if !tools("seaweedfs/bin/weed").exists() {
            return None;
        }
        let listeners: Vec<_> = (0..8)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
            .collect();
        let p: Vec<u16> = listeners
            .iter()
            .map(|l| l.local_addr().unwrap().port())
            .collect();
        drop(listeners);
        let identities = serde_json::json!({"identities": [{"name": "voxgate",
            "credentials": [{"accessKey": WEED_KEY, "secretKey": WEED_SECRET}],
            "actions": ["Admin", "Read", "Write", "List"]}]});
        std::fs::write(dir.join("s3.json"), identities.to_string()).unwrap();
        std::fs::create_dir_all(dir.join("data")).unwrap();
        let server = weed(
            dir,
            vec![
                "server".into(),
                format!("-dir={}", dir.join("data").display()),
                "-ip=127.0.0.1".into(),
                "-ip.bind=127.0.0.1".into(),
                "-filer".into(),
                format!("-master.port={}", p[0]),
                format!("-master.port.grpc={}", p[1]),
                format!("-volume.port={}", p[2]),
                format!("-volume.port.grpc={}", p[3]),
                format!("-filer.port={}", p[4]),
                format!("-filer.port.grpc={}", p[5]),
                "-master.volumeSizeLimitMB=64".into(),
                "-volume.max=8".into(),
            ],
        );
        let mut weed = Self {
            dir: dir.to_owned(),
            ports: p,
            _server: server,
            s3: None,
        };
        weed.up().await;
        Some(weed)
    }

    fn s3_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.ports[6])
    }
}

impl Outage for Weed {
    async fn down(&mut self) {
        let mut s3 = self.s3.take().unwrap();
        s3.kill().await.unwrap();
    }

    /// Starts the S3 gateway and waits until it answers a listing (the filer behind it ready).
    async fn up(&mut self) {
        let p = &self.ports;
        let args = vec![
            "s3".into(),
            format!("-filer=127.0.0.1:{}.{}", p[4], p[5]),
            "-ip.bind=127.0.0.1".into(),
            format!("-port={}", p[6]),
            format!("-port.grpc={}", p[7]),
            "-port.iceberg=0".into(),
            "-port.lance=0".into(),
            format!("-config={}", self.dir.join("s3.json").display()),
        ];
        self.s3 = Some(weed(&self.dir, args));
        for _ in 0..240 {
            if let Ok(r) = reqwest::get(self.s3_url()).await {
                if r.status().as_u16() == 403 {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        panic!(
            "SeaweedFS S3 did not answer within 60 s; see {}",
            self.dir.join("weed.log").display()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_s3_recording_survives_the_server_killed_and_a_resume() {
    let dir = scratch("weed");
    let Some(mut weed) = Weed::start(&dir).await else {
        assert!(
            std::env::var("RECORDING_S3_OPTIONAL").is_ok_and(|v| v == "1"),
            "SeaweedFS is not installed: run scripts/deps seaweedfs (or set RECORDING_S3_OPTIONAL=1)"
        );
        return;
    };
    let mut cfg = recording_config("s3://recordings/voxgate");
    cfg.recording.options = [
        ("aws_endpoint", weed.s3_url()),
        ("aws_allow_http", "true".into()),
        ("aws_region", "us-east-1".into()),
        ("aws_access_key_id", WEED_KEY.into()),
        ("aws_secret_access_key", WEED_SECRET.into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    // Killed for 2 s; its restart takes a few more.
    records_through_an_outage_and_a_resume(cfg, &mut weed, 2000).await;
    drop(weed);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_down_past_the_buffer_drops_counted_and_warns() {
    let root = scratch("down");
    let dir = root.join("store");
    std::fs::write(&dir, b"not a directory").unwrap();
    let mut cfg = recording_config(dir.to_str().unwrap());
    cfg.recording.chunk_seconds = 0.5;
    cfg.recording.max_buffer_seconds = 1.0;
    cfg.recording.max_retries = 1;
    cfg.server.close_flush_seconds = 2.0;
    let gw = Gateway::start(cfg).await;
    let run = stream(
        &gw.ws("/v1/listen?encoding=linear16&sample_rate=16000"),
        pcm_messages("medium", Some(10.0)),
        Duration::ZERO,
    )
    .await;
    assert_eq!(run.close_code, Some(1000));
    let warned = run.of_type("Warning").iter().any(|w| {
        w["code"] == "consumer_dropping" && w["message"].as_str().unwrap().contains("recorder")
    });
    assert!(warned, "the client is told: {:?}", run.events);
    let recorder = run.closed()["summary"]["consumers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "recorder")
        .cloned()
        .unwrap();
    assert!(
        recorder["dropped_bytes"].as_u64().unwrap() > 0,
        "{recorder}"
    );
    assert_eq!(recorder["delivered_bytes"], 0);
    let dropped = gw
        .metric("voxgate_dropped_bytes_total", "consumer=\"recorder\"")
        .await;
    assert!(dropped > 0.0);
    let given_up = gw
        .metric("voxgate_recording_writes_total", "outcome=\"failed\"")
        .await;
    assert!(given_up > 0.0);
    let _ = std::fs::remove_dir_all(&root);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_owner_fetches_a_recording() {
    use sha2::Digest;
    let root = scratch("owner");
    let mut cfg = keyed_config("ann-key");
    cfg.auth.api_keys.push(voxgate::auth::ApiKey {
        user: "bob".into(),
        sha256: hex::encode(sha2::Sha256::digest(b"bob-key")),
    });
    cfg.recording.url = root.to_str().unwrap().into();
    cfg.recording.default = true;
    let gw = Gateway::start(cfg).await;
    let run = stream(
        &gw.ws("/v1/listen?encoding=linear16&sample_rate=16000&session_id=mine&token=ann-key"),
        pcm_messages("short", Some(2.0)),
        Duration::ZERO,
    )
    .await;
    assert_eq!(run.close_code, Some(1000));
    let url = format!("http://{}/v1/sessions/mine/recording", gw.addr);
    let http = reqwest::Client::new();
    let status = |r: reqwest::Response| r.status().as_u16();
    assert_eq!(status(http.get(&url).send().await.unwrap()), 401);
    assert_eq!(
        status(http.get(&url).bearer_auth("bob-key").send().await.unwrap()),
        404
    );
    let ok = http
        .get(format!("{url}?token=ann-key"))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    assert_eq!(wav_samples(&ok.bytes().await.unwrap()).len(), 32_000);
    assert!(
        root.join("ann").join("mine").join("summary.json").exists(),
        "under the owner"
    );
    let _ = std::fs::remove_dir_all(&root);
}

//! The delivery bus end to end: a real nats-server (JetStream), gateways and `voxgate deliver`
//! workers, a real HTTP webhook sink. Chaos: the gateway killed mid-session, the worker killed
//! mid-delivery, NATS restarted; the sink still gets every acknowledged sample, in order.

mod common;
mod nats_support;

use std::collections::BTreeMap;
use std::net::TcpListener as StdListener;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{pcm_messages, test_config, Gateway, Mode, Received, Receiver};
use futures_util::{SinkExt, StreamExt};
use nats_support::NatsServer;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;
use voxgate::config::{Config, WebhookConfig};

fn bus_config(nats: &str, sink: &Receiver) -> Config {
    let mut cfg = test_config();
    cfg.bus.url = Some(nats.to_owned());
    cfg.bus.partitions = 2;
    cfg.bus.ack_wait_seconds = 2.0;
    cfg.bus.backoff_initial_ms = 100;
    cfg.bus.backoff_max_ms = 500;
    cfg.bus.max_deliver = 50;
    let mut w = WebhookConfig::new("audio", &sink.url("audio"), Some(1.0));
    w.secret = Some("sink-secret-0123456789".into());
    w.timeout_ms = 1000;
    cfg.webhooks.push(w);
    cfg
}

/// A `voxgate deliver` worker for partitions 0 and 1, in this process.
struct Worker {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Worker {
    fn start(cfg: &Config) -> Self {
        let stop = CancellationToken::new();
        let task = tokio::spawn(voxgate::bus::deliver::run(
            cfg.clone(),
            vec![0, 1],
            stop.clone(),
        ));
        Self { stop, task }
    }

    async fn stop(self) {
        self.stop.cancel();
        self.task.await.unwrap().unwrap();
    }
}

/// The bus consumer's entry in a `Closed` event's summary.
fn bus_summary(closed: &serde_json::Value) -> serde_json::Value {
    closed["summary"]["consumers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["kind"] == "bus")
        .expect("the session has a bus consumer")
        .clone()
}

/// Waits until the sink holds samples `0..total` for `path`; returns its requests by sequence
/// (first arrival of each), after checking each duplicate repeats key and body exactly.
async fn wait_contiguous(
    sink: &Receiver,
    path: &str,
    total: u64,
    within: Duration,
) -> Vec<Received> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let got: Vec<Received> = sink
            .got
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.path == path)
            .cloned()
            .collect();
        let mut first: BTreeMap<u64, Received> = BTreeMap::new();
        for r in &got {
            match first.get(&r.seq) {
                Some(prev) => {
                    assert_eq!(
                        prev.idempotency_key, r.idempotency_key,
                        "a duplicate has the same key"
                    );
                    assert_eq!(prev.body, r.body, "a duplicate has the same body");
                }
                None => {
                    first.insert(r.seq, r.clone());
                }
            }
        }
        let mut next = 0u64;
        for (i, (seq, r)) in first.iter().enumerate() {
            assert_eq!(*seq, i as u64, "sequence numbers are contiguous from 0");
            assert_eq!(r.start, next, "batch {seq} starts where the previous ended");
            next += r.samples;
        }
        if next >= total {
            assert_eq!(next, total, "no sample beyond what was sent");
            // Order: the first arrival of each sequence came after the first of the previous one.
            let mut seen = std::collections::HashSet::new();
            let order: Vec<u64> = got
                .iter()
                .map(|r| r.seq)
                .filter(|s| seen.insert(*s))
                .collect();
            assert!(
                order.windows(2).all(|w| w[0] < w[1]),
                "first deliveries arrive in sequence order: {order:?}"
            );
            return first.into_values().collect();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "sink has samples 0..{next} of {total} after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bus_session_reaches_the_sink_through_deliver_in_order_despite_sink_errors() {
    let nats = NatsServer::start();
    let sink = Receiver::start(Mode::Fail(503)).await;
    let cfg = bus_config(&nats.url(), &sink);
    let gw = Gateway::start(cfg.clone()).await;
    let worker = Worker::start(&cfg);

    let msgs = pcm_messages("medium", Some(12.0));
    let total: u64 = msgs.iter().map(|m| m.len() as u64 / 2).sum();
    // The sink fails (503) for the first two seconds: deliveries are NAKed and come back in order.
    let flip = sink.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(2)).await;
        flip.set_mode(Mode::Ok);
    });
    let run = common::stream(
        &gw.ws("/v1/listen?encoding=linear16&sample_rate=16000&session_id=bus-e2e-1"),
        msgs,
        Duration::from_millis(5),
    )
    .await;
    let closed = run.closed();
    assert_eq!(closed["code"], 1000, "{closed}");
    let bus = bus_summary(closed);
    assert_eq!(
        bus["delivered_bytes"],
        total * 2,
        "everything was published: {bus}"
    );
    assert_eq!(bus["dropped_bytes"], 0);
    let persisted = run.of_type("Persisted");
    assert_eq!(
        persisted.last().unwrap()["samples"],
        total,
        "the last Persisted covers the session"
    );
    assert!(
        closed["summary"]["consumers"]
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["kind"] != "webhook"),
        "no in-process webhook with a bus"
    );

    let got = wait_contiguous(&sink, "audio", total, Duration::from_secs(30)).await;
    assert_eq!(got.len(), 12, "1 s batches");
    for r in &got {
        assert_eq!(r.idempotency_key, format!("bus-e2e-1:audio:{}", r.seq));
        assert_eq!(
            r.verify("sink-secret-0123456789"),
            Ok(()),
            "signed like the in-process webhook"
        );
    }
    let m = gw.metrics().await;
    assert!(common::metric_value(&m, "voxgate_bus_deliveries_total", "outcome=\"retry\"") > 0.0);
    assert!(
        common::metric_value(&m, "voxgate_bus_deliveries_total", "outcome=\"delivered\"") >= 12.0
    );
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejecting_sink_dead_letters_and_delivery_goes_on() {
    let nats = NatsServer::start();
    let sink = Receiver::start(Mode::Fail(400)).await;
    let cfg = bus_config(&nats.url(), &sink);
    let gw = Gateway::start(cfg.clone()).await;
    let msgs = pcm_messages("medium", Some(3.0));
    let run = common::stream(
        &gw.ws("/v1/listen?encoding=linear16&sample_rate=16000&session_id=bus-dead-1"),
        msgs,
        Duration::ZERO,
    )
    .await;
    assert_eq!(run.closed()["code"], 1000);
    // Dead letters are readable on their subject; the worker terminated the three batches.
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let worker = Worker::start(&cfg);
    let stream = js.get_stream("VOX").await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let dead = loop {
        if let Ok(m) = stream
            .get_last_raw_message_by_subject("vox.dead.default.bus-dead-1")
            .await
        {
            let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
            if v["message_id"] == "bus-dead-1:audio:2" {
                break v;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no dead letter for the last batch"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(dead["reason"], "rejected");
    assert_eq!(dead["status"], 400);
    worker.stop().await;
}

/// A gateway or worker as its own process, so the test can SIGKILL it.
struct Proc {
    child: Child,
    port: u16,
}

impl Proc {
    fn free_port() -> u16 {
        StdListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    async fn gateway(config: &std::path::Path) -> Proc {
        let port = Self::free_port();
        let child = Command::new(env!("CARGO_BIN_EXE_voxgate"))
            .args(["serve", "--config"])
            .arg(config)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .env("VOXGATE_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let p = Proc { child, port };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while reqwest::get(format!("http://127.0.0.1:{port}/readyz"))
            .await
            .map(|r| r.status().is_success())
            .ok()
            != Some(true)
        {
            assert!(tokio::time::Instant::now() < deadline, "gateway not ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        p
    }

    fn worker(config: &std::path::Path) -> Proc {
        let child = Command::new(env!("CARGO_BIN_EXE_voxgate"))
            .args(["deliver", "--config"])
            .arg(config)
            .env("VOXGATE_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        Proc { child, port: 0 }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A fixed instant the test client stamps events against (`_at_ms`).
fn epoch() -> std::time::Instant {
    static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(std::time::Instant::now)
}

/// Streams `msgs` from `from` on, paced; returns the index reached when `stop_at` is hit (or all
/// sent), the events seen and whether the server closed the socket.
async fn send_some(
    url: &str,
    msgs: &[Vec<u8>],
    stop_at: usize,
    events: Arc<Mutex<Vec<serde_json::Value>>>,
    close: bool,
    pace: Duration,
) {
    let (ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let (mut tx, mut rx) = ws.split();
    let reader = tokio::spawn(async move {
        while let Some(Ok(m)) = rx.next().await {
            if let Message::Text(t) = m {
                let mut v: serde_json::Value = serde_json::from_str(&t).unwrap();
                v["_at_ms"] = (epoch().elapsed().as_millis() as u64).into();
                events.lock().unwrap().push(v);
            }
        }
    });
    for m in &msgs[..stop_at] {
        if tx.send(Message::Binary(m.clone().into())).await.is_err() {
            break;
        }
        tokio::time::sleep(pace).await;
    }
    if close {
        let _ = tx
            .send(Message::Text(r#"{"type":"CloseStream"}"#.into()))
            .await;
        let _ = tokio::time::timeout(Duration::from_secs(30), reader).await;
    } else {
        tokio::time::sleep(Duration::from_millis(300)).await;
        reader.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_killed_worker_killed_and_nats_restarted_lose_no_acknowledged_chunk() {
    let mut nats = NatsServer::start();
    let sink = Receiver::start(Mode::Ok).await;
    let cfg = bus_config(&nats.url(), &sink);
    let dir = std::env::temp_dir().join(format!("voxgate-bus-chaos-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("voxgate.toml");
    let mut toml = format!(
        "[bus]\nurl = {:?}\npartitions = 2\nack_wait_seconds = 2.0\nbackoff_initial_ms = 100\nbackoff_max_ms = 500\nmax_deliver = 50\n\n[auth]\nconnections_per_ip_per_second = 10000.0\n\n",
        nats.url()
    );
    let w = &cfg.webhooks[0];
    toml.push_str(&format!(
        "[[webhooks]]\nname = \"audio\"\nurl = {:?}\ndelay_seconds = 1.0\nsecret = {:?}\ntimeout_ms = 1000\n",
        w.url,
        w.secret.as_deref().unwrap()
    ));
    std::fs::write(&config, &toml).unwrap();
    // Gateway B is configured differently: the session's frozen record, not B's config, decides
    // where its audio goes.
    let config_b = dir.join("voxgate-b.toml");
    std::fs::write(
        &config_b,
        toml.replace(&sink.url("audio"), &sink.url("other")),
    )
    .unwrap();

    let msgs = pcm_messages("medium", Some(20.0));
    let total: u64 = msgs.iter().map(|m| m.len() as u64 / 2).sum();
    let url = |p: &Proc| {
        format!(
            "ws://127.0.0.1:{}/v1/listen?encoding=linear16&sample_rate=16000&session_id=bus-chaos-1",
            p.port
        )
    };

    let mut worker = Proc::worker(&config);
    // 1. Gateway A takes the first 8 s, then dies without a word (SIGKILL).
    let mut a = Proc::gateway(&config).await;
    let events_a = Arc::new(Mutex::new(Vec::new()));
    send_some(
        &url(&a),
        &msgs,
        80,
        events_a.clone(),
        false,
        Duration::from_millis(10),
    )
    .await;
    a.kill();
    let persisted_a = events_a
        .lock()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "Persisted")
        .map(|e| e["samples"].as_u64().unwrap())
        .max()
        .unwrap_or(0);
    assert!(
        persisted_a >= 16_000,
        "gateway A acknowledged some audio: {persisted_a}"
    );
    // Every chunk A acknowledged reaches the sink although A is gone.
    wait_contiguous(
        &sink,
        "audio",
        persisted_a - persisted_a % 16_000,
        Duration::from_secs(20),
    )
    .await;

    // 2. The client resends from the start to gateway B, which continues the session from the
    //    bus (B skips what A published).
    let b = Proc::gateway(&config_b).await;
    let events_b = Arc::new(Mutex::new(Vec::new()));
    let before = sink.got.lock().unwrap().len();
    sink.set_mode(Mode::Slow(400));
    let sender = {
        let url = url(&b);
        let msgs = msgs.clone();
        let events = events_b.clone();
        // 25 ms per 100 ms message: the rest of the session takes about 5 s of wall time.
        tokio::spawn(async move {
            send_some(
                &url,
                &msgs,
                msgs.len(),
                events,
                true,
                Duration::from_millis(25),
            )
            .await
        })
    };
    // 3. The worker dies mid-delivery: the moment the slow sink has B's first new batch (it
    //    answers after 400 ms), the worker is SIGKILLed with that request unanswered. A new
    //    worker takes over the durable consumers and redelivers it with the same key.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while sink.got.lock().unwrap().len() == before {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no batch from gateway B"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    worker.kill();
    let in_flight = sink.got.lock().unwrap()[before].idempotency_key.clone();
    sink.set_mode(Mode::Ok);
    let _worker2 = Proc::worker(&config);
    // 4. NATS is killed and restarted while B streams.
    tokio::time::sleep(Duration::from_millis(500)).await;
    nats.kill();
    // Longer than bus.publish_timeout_ms (2 s): publishes fail and are retried, same ids.
    tokio::time::sleep(Duration::from_millis(3000)).await;
    nats.restart();
    sender.await.unwrap();
    let metrics = reqwest::get(format!("http://127.0.0.1:{}/metrics", b.port))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        common::metric_value(&metrics, "voxgate_bus_publishes_total", "outcome=\"error\"") > 0.0,
        "gateway B published while NATS was down (and retried)"
    );
    let events = events_b.lock().unwrap().clone();
    let closed = events
        .iter()
        .find(|e| e["type"] == "Closed")
        .unwrap_or_else(|| panic!("no Closed from gateway B: {events:?}"))
        .clone();
    assert_eq!(closed["code"], 1000, "{closed}");
    let bus = bus_summary(&closed);
    let published_by_b = bus["delivered_bytes"].as_u64().unwrap() / 2;
    assert!(
        published_by_b <= total - persisted_a,
        "gateway B continued where A's acknowledged audio ended ({published_by_b} of {total} samples published by B, A acknowledged {persisted_a})"
    );

    let got = wait_contiguous(&sink, "audio", total, Duration::from_secs(60)).await;
    assert_eq!(got.len(), 20);
    for r in &got {
        assert_eq!(r.idempotency_key, format!("bus-chaos-1:audio:{}", r.seq));
    }
    assert!(
        sink.requests("other").is_empty(),
        "the frozen sinks were used"
    );
    let repeats = sink
        .got
        .lock()
        .unwrap()
        .iter()
        .filter(|r| r.idempotency_key == in_flight)
        .count();
    assert!(
        repeats >= 2,
        "the batch in flight when the worker died was delivered again, same key ({in_flight})"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_node_cluster_survives_killing_the_stream_leader_mid_session() {
    let mut cluster = nats_support::NatsCluster::start();
    cluster.wait_ready().await;
    nats_support::js_ready(&cluster.url(0)).await;
    let sink = Receiver::start(Mode::Ok).await;
    let mut cfg = bus_config(&cluster.urls().join(","), &sink);
    cfg.bus.replicas = 3;
    let gw = Gateway::start(cfg.clone()).await;
    let worker = Worker::start(&cfg);

    // 20 s of audio at twice real time; the stream leader dies 3 s in.
    let msgs = pcm_messages("medium", Some(20.0));
    let total: u64 = msgs.iter().map(|m| m.len() as u64 / 2).sum();
    let client = async_nats::connect(cluster.urls()[0].clone())
        .await
        .unwrap();
    let js = async_nats::jetstream::new(client);
    // The gateway creates the stream as it starts.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut stream = loop {
        match js.get_stream("VOX").await {
            Ok(s) => break s,
            Err(e) => assert!(tokio::time::Instant::now() < deadline, "no stream: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let leader = loop {
        let info = stream.info().await.unwrap().clone();
        if let Some(l) = info.cluster.and_then(|c| c.leader) {
            break l;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "stream VOX has no leader"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let victim = cluster.index_of(&leader).expect("the leader is a node");
    let events = Arc::new(Mutex::new(Vec::new()));
    let sender = {
        let url = gw.ws("/v1/listen?encoding=linear16&sample_rate=16000&session_id=bus-r3-1");
        let msgs = msgs.clone();
        let events = events.clone();
        tokio::spawn(async move {
            send_some(
                &url,
                &msgs,
                msgs.len(),
                events,
                true,
                Duration::from_millis(50),
            )
            .await
        })
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    let killed = std::time::Instant::now();
    cluster.kill(victim);
    sender.await.unwrap();
    let events = events.lock().unwrap().clone();
    let closed = events
        .iter()
        .find(|e| e["type"] == "Closed")
        .unwrap_or_else(|| panic!("no Closed: {events:?}"))
        .clone();
    assert_eq!(closed["code"], 1000, "{closed}");
    let got = wait_contiguous(&sink, "audio", total, Duration::from_secs(60)).await;
    assert_eq!(got.len(), 20);
    // The outage as the client saw it: the longest pause between `Persisted` events (they come
    // every 0.5 s of wall time at this pace while publishing works).
    let at: Vec<u64> = events
        .iter()
        .filter(|e| e["type"] == "Persisted")
        .map(|e| e["_at_ms"].as_u64().unwrap())
        .collect();
    let outage = at.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
    let m = gw.metrics().await;
    println!(
        "stream leader {leader} killed: longest pause between Persisted events {outage} ms; all 20 batches at the sink {:?} after the kill; publish errors {}",
        killed.elapsed(),
        common::metric_value(&m, "voxgate_bus_publishes_total", "outcome=\"error\"")
    );
    cluster.restart(victim);
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_down_bus_warns_then_closes_with_1013_and_counts_the_loss() {
    let mut nats = NatsServer::start();
    let sink = Receiver::start(Mode::Ok).await;
    let mut cfg = bus_config(&nats.url(), &sink);
    cfg.bus.max_buffer_seconds = 2.0;
    cfg.server.close_flush_seconds = 1.0;
    let gw = Gateway::start(cfg.clone()).await;
    let ready = |gw: &Gateway| {
        let url = format!("http://{}/readyz", gw.addr);
        async move { reqwest::get(url).await.unwrap().status().as_u16() }
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while ready(&gw).await != 200 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "gateway never ready"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let url = gw.ws("/v1/listen?encoding=linear16&sample_rate=16000&session_id=bus-down-1");
    let (ws, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    let (mut tx, mut rx) = ws.split();
    let msgs = pcm_messages("medium", Some(10.0));
    // The session is set up (its record frozen) once it reports Started.
    tx.send(Message::Binary(msgs[0].clone().into()))
        .await
        .unwrap();
    let mut events = Vec::new();
    while let Ok(Some(Ok(m))) = tokio::time::timeout(Duration::from_secs(10), rx.next()).await {
        if let Message::Text(t) = m {
            let v: serde_json::Value = serde_json::from_str(&t).unwrap();
            let started = v["type"] == "Started";
            events.push(v);
            if started {
                break;
            }
        }
    }
    assert!(events.iter().any(|e| e["type"] == "Started"), "{events:?}");
    nats.kill();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while ready(&gw).await != 503 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "readyz stays 200 with the bus down"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // 10 s of audio at once: 2 s fit in the bus buffer, the rest cannot.
    for m in &msgs[1..] {
        if tx.send(Message::Binary(m.clone().into())).await.is_err() {
            break;
        }
    }
    let mut close = None;
    while let Ok(Some(Ok(m))) = tokio::time::timeout(Duration::from_secs(20), rx.next()).await {
        match m {
            Message::Text(t) => events.push(serde_json::from_str::<serde_json::Value>(&t).unwrap()),
            Message::Close(f) => {
                close = f.map(|f| u16::from(f.code));
                break;
            }
            _ => {}
        }
    }
    let pos = |kind: &str, code: &str| {
        events
            .iter()
            .position(|e| e["type"] == kind && e["code"] == code)
            .unwrap_or_else(|| panic!("no {kind} {code} in {events:?}"))
    };
    assert!(
        pos("Warning", "bus_slow") < pos("Error", "bus_unavailable"),
        "warned before the error"
    );
    assert_eq!(close, Some(1013), "retryable close");
    let closed = events
        .iter()
        .find(|e| e["type"] == "Closed")
        .expect("Closed");
    assert_eq!(closed["code"], 1013);
    let bus = bus_summary(closed);
    assert!(
        bus["dropped_bytes"].as_u64().unwrap() > 0,
        "the loss is counted: {bus}"
    );
    assert!(
        gw.metric("voxgate_dropped_bytes_total", "consumer=\"bus\"")
            .await
            > 0.0,
        "and in the metric"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn final_transcripts_reach_the_transcript_webhook_through_the_bus() {
    use axum::routing::post;
    use voxgate::config::{SttBackend, SttConfig};
    // A speech-to-text backend that answers every utterance.
    let app = axum::Router::new().route(
        "/v1/audio/transcriptions",
        post(|| async { axum::Json(serde_json::json!({"text": "hello"})) }),
    );
    let stt_addr = common::serve(app).await;

    let nats = NatsServer::start();
    let sink = Receiver::start(Mode::Ok).await;
    let mut cfg = bus_config(&nats.url(), &sink);
    cfg.webhooks.clear();
    cfg.segmenter.silence_ms = 250;
    let mut s = SttConfig::new("whisper", SttBackend::Openai, &format!("http://{stt_addr}"));
    s.transcript_webhook = Some(sink.url("transcripts"));
    cfg.stt.push(s);
    let gw = Gateway::start(cfg.clone()).await;
    let worker = Worker::start(&cfg);

    // The short sentence three times, 1.5 s of silence after each.
    let one: Vec<u8> = pcm_messages("short", None).concat();
    let mut all = Vec::new();
    for _ in 0..3 {
        all.extend_from_slice(&one);
        all.extend(std::iter::repeat_n(0u8, 48_000));
    }
    let msgs: Vec<Vec<u8>> = all.chunks(3200).map(<[u8]>::to_vec).collect();
    let run = common::stream(
        &gw.ws("/v1/listen?encoding=linear16&sample_rate=16000&session_id=bus-tx-1"),
        msgs,
        Duration::ZERO,
    )
    .await;
    assert_eq!(run.close_code, Some(1000), "{}", run.close_reason);
    let finals = run
        .of_type("Transcript")
        .into_iter()
        .filter(|t| t["is_final"] == true)
        .count();
    assert!(finals >= 3, "one final transcript per sentence: {finals}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let got = sink.requests("transcripts");
        if got.len() >= finals {
            let mut seqs: Vec<u64> = got
                .iter()
                .map(|r| {
                    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
                    assert_eq!(v["backend"], "whisper");
                    assert_eq!(v["session_id"], "bus-tx-1");
                    assert_eq!(v["text"], "hello");
                    let seq = v["sequence"].as_u64().unwrap();
                    assert_eq!(r.idempotency_key, format!("bus-tx-1:whisper:{seq}"));
                    seq
                })
                .collect();
            seqs.dedup();
            assert_eq!(
                seqs,
                (0..finals as u64).collect::<Vec<_>>(),
                "in order, once each"
            );
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} of {finals} transcripts",
            got.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_its_own_user_continues_an_open_bus_session() {
    use jsonwebtoken::{encode, EncodingKey, Header};
    use voxgate::auth::{AuthMode, Claims};
    const SECRET: &str = "0123456789abcdef-test-secret";
    let token = |sub: &str| {
        let exp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 600;
        let claims = Claims {
            sub: sub.into(),
            exp,
            aud: Some(serde_json::json!("voxgate")),
            sid: None,
            sessions: vec![],
            consumers: None,
            ..Claims::default()
        };
        encode(
            &Header::default(),
            &claims,
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap()
    };
    let nats = NatsServer::start();
    let sink = Receiver::start(Mode::Ok).await;
    let mut cfg = bus_config(&nats.url(), &sink);
    cfg.auth.mode = AuthMode::Jwt;
    cfg.auth.hs256_secret = Some(SECRET.into());
    let gw = Gateway::start(cfg).await;
    // Alice's session is left open on the bus (its gateway went away mid-session).
    let base = "/v1/listen?encoding=linear16&sample_rate=16000&session_id=bus-owned-1";
    let (ws, _) =
        tokio_tungstenite::connect_async(gw.ws(&format!("{base}&token={}", token("alice"))))
            .await
            .unwrap();
    let (mut tx, mut rx) = ws.split();
    tx.send(Message::Binary(
        pcm_messages("medium", Some(0.1))[0].clone().into(),
    ))
    .await
    .unwrap();
    while let Ok(Some(Ok(m))) = tokio::time::timeout(Duration::from_secs(10), rx.next()).await {
        if matches!(&m, Message::Text(t) if t.contains("\"Started\"")) {
            break;
        }
    }
    drop((tx, rx)); // the socket drops: the session ends as the peer's close, not for good
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Mark the record open again, as a gateway that died mid-session would have left it.
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let kv = js.get_key_value("vox-sessions").await.unwrap();
    let mut rec: serde_json::Value =
        serde_json::from_slice(&kv.get("default.bus-owned-1").await.unwrap().unwrap()).unwrap();
    assert_eq!(rec["uid"], "alice");
    rec["ended"] = false.into();
    kv.put("default.bus-owned-1", rec.to_string().into())
        .await
        .unwrap();

    let bob = common::stream(
        &gw.ws(&format!("{base}&token={}", token("bob"))),
        vec![],
        Duration::ZERO,
    )
    .await;
    assert_eq!(bob.close_code, Some(1008), "{}", bob.close_reason);
    assert!(
        bob.of_type("Error")
            .iter()
            .any(|e| e["code"] == "forbidden"),
        "{:?}",
        bob.events
    );
    let alice = common::stream(
        &gw.ws(&format!("{base}&token={}", token("alice"))),
        pcm_messages("medium", Some(1.0)),
        Duration::ZERO,
    )
    .await;
    assert_eq!(
        alice.close_code,
        Some(1000),
        "alice continues: {}",
        alice.close_reason
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_attempts_dead_letters_the_head_and_leaves_no_hole_behind_it() {
    let nats = NatsServer::start();
    let sink = Receiver::start(Mode::Fail(503)).await;
    let mut cfg = bus_config(&nats.url(), &sink);
    cfg.bus.max_deliver = 3;
    cfg.bus.backoff_initial_ms = 50;
    cfg.bus.backoff_max_ms = 100;
    let gw = Gateway::start(cfg.clone()).await;
    // Ten 1 s batches wait on the bus while the sink is down.
    let run = common::stream(
        &gw.ws("/v1/listen?encoding=linear16&sample_rate=16000&session_id=bus-holes-1"),
        pcm_messages("medium", Some(10.0)),
        Duration::ZERO,
    )
    .await;
    assert_eq!(run.close_code, Some(1000));
    let worker = Worker::start(&cfg);
    // The sink comes back as soon as the first batch has run out of attempts.
    let mut down = true;
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let stream = js.get_stream("VOX").await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let delivered: std::collections::BTreeSet<u64> =
            sink.requests("audio").iter().map(|r| r.seq).collect();
        // Dead letters: read them all from the stream.
        let mut dead = std::collections::BTreeSet::new();
        let info = stream.get_info().await.unwrap();
        for seq in 1..=info.state.last_sequence {
            if let Ok(m) = stream.get_raw_message(seq).await {
                if m.subject.as_str() == "vox.dead.default.bus-holes-1" {
                    let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
                    assert_eq!(v["reason"], "max_deliver");
                    let id = v["message_id"].as_str().unwrap();
                    dead.insert(id.rsplit(':').next().unwrap().parse::<u64>().unwrap());
                }
            }
        }
        if down && !dead.is_empty() {
            sink.set_mode(Mode::Ok);
            down = false;
        }
        let all: std::collections::BTreeSet<u64> = delivered.union(&dead).copied().collect();
        if all.len() == 10 {
            assert!(!dead.is_empty(), "the head ran out of attempts");
            assert!(!delivered.is_empty(), "batches after it were delivered");
            assert_eq!(
                all,
                (0..10).collect(),
                "every batch delivered or dead-lettered, no hole"
            );
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "delivered {delivered:?}, dead {dead:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_gateway_flushes_to_the_bus_and_another_one_continues_the_session() {
    let nats = NatsServer::start();
    let sink = Receiver::start(Mode::Ok).await;
    let cfg = bus_config(&nats.url(), &sink);
    let a = Gateway::start(cfg.clone()).await;
    let worker = Worker::start(&cfg);
    let msgs = pcm_messages("medium", Some(10.0));
    let total: u64 = msgs.iter().map(|m| m.len() as u64 / 2).sum();
    let path = "/v1/listen?encoding=linear16&sample_rate=16000&session_id=bus-drain-1";
    // 4.5 s of audio to A, then A drains (SIGTERM): it flushes its partial batch to the bus.
    let (ws, _) = tokio_tungstenite::connect_async(a.ws(path)).await.unwrap();
    let (mut tx, mut rx) = ws.split();
    for m in &msgs[..45] {
        tx.send(Message::Binary(m.clone().into())).await.unwrap();
    }
    // Wait until A has decoded all of it, then drain.
    let mut events: Vec<serde_json::Value> = Vec::new();
    while let Ok(Some(Ok(m))) = tokio::time::timeout(Duration::from_secs(10), rx.next()).await {
        if let Message::Text(t) = m {
            let v: serde_json::Value = serde_json::from_str(&t).unwrap();
            let done = v["type"] == "Progress" && v["seconds_decoded"].as_f64() == Some(4.0);
            events.push(v);
            if done {
                break;
            }
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    a.shutdown.cancel();
    while let Ok(Some(Ok(m))) = tokio::time::timeout(Duration::from_secs(20), rx.next()).await {
        match m {
            Message::Text(t) => events.push(serde_json::from_str(&t).unwrap()),
            Message::Close(_) => break,
            _ => {}
        }
    }
    drop(tx);
    let closed_a = events
        .iter()
        .find(|e| e["type"] == "Closed")
        .unwrap_or_else(|| panic!("A did not close: {events:?}"))
        .clone();
    assert!(
        events.iter().any(|e| e["type"] == "Reconnect"),
        "{events:?}"
    );
    assert_eq!(closed_a["code"], 1001);
    let persisted_a = events
        .iter()
        .filter(|e| e["type"] == "Persisted")
        .map(|e| e["samples"].as_u64().unwrap())
        .max()
        .unwrap();
    assert_eq!(
        persisted_a,
        45 * 1600,
        "the drain published everything A had, the partial batch too"
    );

    // The client resends everything to B, which continues after A's last sample.
    let b = Gateway::start(cfg.clone()).await;
    let run = common::stream(&b.ws(path), msgs, Duration::ZERO).await;
    assert_eq!(run.close_code, Some(1000), "{}", run.close_reason);
    let got = wait_contiguous(&sink, "audio", total, Duration::from_secs(30)).await;
    assert_eq!(
        got.len(),
        11,
        "4 full batches and a partial one from A, 6 from B"
    );
    assert_eq!(got[4].samples, 8_000, "A's partial batch");
    assert_eq!(got[5].start, persisted_a, "B starts where A ended");
    worker.stop().await;
}

//! The NATS test harness against real nats-server processes (`scripts/deps nats` installs one):
//! JetStream file storage survives a SIGKILL and restart, and an R3 stream keeps accepting
//! publishes (after a measured outage) when its leader node is SIGKILLed.

mod nats_support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, message::PublishMessage, stream};
use nats_support::{js_ready, NatsCluster, NatsServer};

const TEST_LIMIT: Duration = Duration::from_secs(50);

#[tokio::test]
async fn single_server_stream_survives_kill_and_restart() {
    let started = Instant::now();
    let mut server = NatsServer::start();
    js_ready(&server.url()).await;

    let client = async_nats::connect(server.url()).await.expect("connect");
    let js = jetstream::new(client.clone());
    js.create_stream(stream::Config {
        name: "T".to_string(),
        subjects: vec!["t.>".to_string()],
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await
    .expect("create stream T");
    for i in 0..3 {
        let ack = js
            .publish(format!("t.{i}"), format!("m{i}").into())
            .await
            .expect("publish")
            .await
            .expect("PubAck");
        assert_eq!(ack.stream, "T");
        assert_eq!(ack.sequence, i + 1);
    }
    drop(js);
    drop(client);

    server.kill();
    assert!(!server.is_running());
    server.restart();
    js_ready(&server.url()).await;

    let client = async_nats::connect(server.url()).await.expect("reconnect");
    let js = jetstream::new(client);
    let info = js
        .get_stream("T")
        .await
        .expect("stream T after restart")
        .get_info()
        .await
        .expect("stream info");
    assert_eq!(
        info.state.messages,
        3,
        "log: {}",
        server.log_path().display()
    );
    assert_eq!(info.state.last_sequence, 3);
    assert!(
        started.elapsed() < TEST_LIMIT,
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn cluster_r3_stream_survives_leader_kill() {
    let started = Instant::now();
    let mut cluster = NatsCluster::start();
    cluster.wait_ready().await;
    js_ready(&cluster.url(0)).await;

    let client = async_nats::ConnectOptions::new()
        .connect(cluster.urls())
        .await
        .expect("connect to cluster");
    let mut js = jetstream::new(client);
    // Short ack wait: an unanswered publish is retried (deduplicated by its message id).
    js.set_timeout(Duration::from_secs(1));
    js.create_stream(stream::Config {
        name: "C".to_string(),
        subjects: vec!["c.>".to_string()],
        storage: stream::StorageType::File,
        num_replicas: 3,
        ..Default::default()
    })
    .await
    .expect("create R3 stream C");

    for n in 1..=100u64 {
        let (seq, _, _) = publish_until_acked(&js, n, started).await;
        assert_eq!(seq, n);
    }

    let info = js
        .get_stream("C")
        .await
        .expect("stream C")
        .get_info()
        .await
        .expect("info");
    let leader = info
        .cluster
        .as_ref()
        .and_then(|c| c.leader.clone())
        .expect("stream C has a cluster leader");
    let victim = cluster.index_of(&leader).expect("leader is one of n1..n3");
    println!("stream leader {leader}: killing it");

    let killed_at = Instant::now();
    cluster.kill(victim);
    let mut first_ack_after_kill = None;
    let mut worst_publish = Duration::ZERO;
    let mut failures: BTreeMap<String, u32> = BTreeMap::new();
    for n in 101..=200u64 {
        let (seq, took, errors) = publish_until_acked(&js, n, started).await;
        assert_eq!(seq, n, "sequence of message {n}");
        first_ack_after_kill.get_or_insert_with(|| killed_at.elapsed());
        worst_publish = worst_publish.max(took);
        for e in errors {
            *failures.entry(e).or_default() += 1;
        }
    }
    let outage = first_ack_after_kill.expect("published after kill");
    println!(
        "publish outage after killing stream leader {leader}: {} ms to the first PubAck, \
         worst single publish {} ms; 100 publishes in {} ms; failed attempts: {failures:?}",
        outage.as_millis(),
        worst_publish.as_millis(),
        killed_at.elapsed().as_millis()
    );

    let restarted_at = Instant::now();
    cluster.restart(victim);
    cluster.wait_ready().await;

    // The restarted node catches up: all three replicas current, and 200 messages.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let info = js
            .get_stream("C")
            .await
            .expect("stream C")
            .get_info()
            .await
            .expect("info");
        assert_eq!(info.state.messages, 200);
        assert_eq!(info.state.last_sequence, 200);
        let cl = info.cluster.expect("cluster info");
        let caught_up = cl.replicas.len() == 2
            && cl
                .replicas
                .iter()
                .all(|r| r.current && !r.offline && r.lag.unwrap_or(0) == 0);
        if caught_up {
            println!(
                "stream leader now {:?}; {} restarted and caught up in {} ms",
                cl.leader,
                leader,
                restarted_at.elapsed().as_millis()
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "replicas not caught up after restarting {leader}: {:?}",
            cl.replicas
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        started.elapsed() < TEST_LIMIT,
        "took {:?}",
        started.elapsed()
    );
}

/// Publishes message `n` (id `m-n`) to `c.N` until it is acked; returns the stream sequence, how
/// long it took and the errors of the attempts that failed. Panics past the test's time limit.
async fn publish_until_acked(
    js: &jetstream::Context,
    n: u64,
    started: Instant,
) -> (u64, Duration, Vec<String>) {
    let t0 = Instant::now();
    let mut errors = Vec::new();
    loop {
        let msg = PublishMessage::build()
            .payload(format!("m{n}").into())
            .message_id(format!("m-{n}"));
        let res = match js.send_publish(format!("c.{n}"), msg).await {
            Ok(ack) => ack.await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match res {
            Ok(ack) => return (ack.sequence, t0.elapsed(), errors),
            Err(e) => {
                assert!(
                    started.elapsed() < TEST_LIMIT,
                    "message {n} not acked within the test's limit: {e}"
                );
                errors.push(e);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

//! Logging over the real binary: a client cannot forge log lines, its warnings are rate-limited
//! per connection, and a log reader that never drains stderr cannot stall ingest.

mod common;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

/// Starts `voxgate serve` on a free loopback port with `log_level`, stderr going to `stderr`.
async fn spawn_gateway(log_level: &str, log_lines: &str, stderr: Stdio) -> (Child, SocketAddr) {
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_voxgate"))
        .args(["serve", "--listen", &addr.to_string()])
        .env("VOXGATE_LOG", log_level)
        .env("VOXGATE_SERVER__LOG_BUFFER_LINES", log_lines)
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .unwrap();
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return (child, addr);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("the gateway did not start");
}

/// SIGTERM, then wait (the log writer flushes on the way out).
fn stop(mut child: Child) {
    // SAFETY: kill sends a signal to our own child process.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_cannot_forge_a_log_line_and_its_warnings_are_rate_limited() {
    let path = std::env::temp_dir().join(format!("voxgate-log-{}.txt", std::process::id()));
    let file = std::fs::File::create(&path).unwrap();
    let (child, addr) = spawn_gateway("info", "10000", Stdio::from(file)).await;
    let url = format!("ws://{addr}/v1/listen?encoding=linear16&sample_rate=16000");
    let (ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let (mut tx, mut rx) = ws.split();
    let forged = "{\"type\":\"X\\n2099-01-01T00:00:00Z  INFO voxgate: FORGED admin login ok\"}";
    for _ in 0..30 {
        tx.send(Message::Text(forged.into())).await.unwrap();
    }
    tx.send(Message::Text(r#"{"type":"CloseStream"}"#.into()))
        .await
        .unwrap();
    let mut errors = 0;
    while let Ok(Some(Ok(m))) = tokio::time::timeout(Duration::from_secs(10), rx.next()).await {
        match m {
            Message::Text(t) if t.contains("bad_control_message") => errors += 1,
            Message::Close(_) => break,
            _ => {}
        }
    }
    assert_eq!(errors, 30, "every bad message is still answered");
    stop(child);
    let log = std::fs::read_to_string(&path).unwrap();
    std::fs::remove_file(&path).ok();
    assert!(
        !log.lines().any(|l| l.starts_with("2099")),
        "a forged line reached the log:\n{log}"
    );
    let warned = log
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("error sent to client"))
        .count();
    assert!((1..=5).contains(&warned), "{warned} warn lines:\n{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_never_stall_ingest_when_nobody_reads_them() {
    // Trace logging writes lines for every frame into a pipe this test never reads.
    let (child, addr) = spawn_gateway("trace", "100", Stdio::piped()).await;
    let url = format!("ws://{addr}/v1/listen?encoding=linear16&sample_rate=16000");
    let run = stream(&url, pcm_messages("medium", None), Duration::ZERO).await;
    assert_eq!(run.close_code, Some(1000));
    let metrics = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let dropped = metric_value(&metrics, "voxgate_log_lines_dropped_total", "");
    stop(child);
    assert!(dropped > 0.0, "the full pipe made the writer drop lines");
}

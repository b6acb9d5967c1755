//! The binary: config validation before binding, `decode` output and errors.

use std::process::Command;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_voxgate"))
}

fn corpus(rel: &str) -> String {
    format!("{}/../../testdata/corpus/{rel}", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn invalid_config_exits_non_zero_with_every_error() {
    let dir = std::env::temp_dir().join(format!("voxgate-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bad.toml");
    std::fs::write(
        &path,
        "[server]\nlisten = \"nowhere\"\nmax_sessions = 0\n[[webhooks]]\nname = \"a\"\nurl = \"ftp://x\"\ndelay_seconds = 0\n",
    )
    .unwrap();
    let out = bin()
        .args(["serve", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    for needle in ["server.listen", "server.max_sessions", "webhooks[0].url"] {
        assert!(err.contains(needle), "{needle} missing from {err}");
    }
    let out = bin()
        .args(["serve"])
        .env("VOXGATE_SERVER__MAX_MESSAGE_BYTES", "3")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("max_message_bytes"));
}

#[test]
fn decode_prints_one_json_line_and_fails_cleanly() {
    let dir = std::env::temp_dir().join(format!("voxgate-dec-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out_wav = dir.join("out.wav");
    let out = bin()
        .arg("decode")
        .arg(corpus("captures/chromium_short_250ms.webm"))
        .arg("--index")
        .arg(corpus("captures/chromium_short_250ms.index.json"))
        .arg("-o")
        .arg(&out_wav)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let samples = line["samples"].as_u64().unwrap();
    let wav = hound::WavReader::open(&out_wav).unwrap();
    assert_eq!(u64::from(wav.len()), samples);
    assert!((line["seconds"].as_f64().unwrap() - 7.08).abs() < 0.03);
    assert_eq!(line["decode_errors"], 0);

    let junk = dir.join("junk.bin");
    std::fs::write(&junk, b"this is not audio at all, just text").unwrap();
    let out = bin()
        .arg("decode")
        .arg(&junk)
        .arg("-o")
        .arg(dir.join("x.wav"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "one-line error: {err}");
}

/// Streaming STT backends may be `wss://`: the WebSocket client is built with TLS.
#[tokio::test]
async fn websocket_client_speaks_tls() {
    // A plain TCP listener: the TLS handshake must be attempted (and fail), not refused as
    // "TLS support not compiled in".
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        use tokio::io::AsyncWriteExt;
        let _ = s.write_all(b"HTTP/1.1 400 no\r\n\r\n").await;
    });
    let err =
        tokio_tungstenite::connect_async(format!("wss://localhost:{}/v1/listen", addr.port()))
            .await
            .expect_err("not a TLS server")
            .to_string();
    assert!(!err.to_lowercase().contains("not compiled"), "{err}");
    assert!(!err.contains("TlsFeatureNotEnabled"), "{err}");
}

#[test]
fn deliver_refuses_to_start_without_a_bus_or_with_a_bad_partition() {
    let out = bin().args(["deliver"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("bus.url is not set"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = bin()
        .args(["deliver", "--partitions", "9"])
        .env("VOXGATE_BUS__URL", "nats://127.0.0.1:9")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("out of range"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

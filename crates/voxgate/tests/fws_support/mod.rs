//! A real faster-whisper-server (OpenAI-compatible, Whisper tiny.en, offline) on a free
//! loopback port, installed by `scripts/deps fws` into target/tools/fws. Without it a test fails,
//! unless `INTEROP_OPTIONAL=1`: then it says loudly that it skipped.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

pub fn tools() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/tools/fws")
}

/// A running faster-whisper-server on a free loopback port, stopped on drop.
pub struct Fws {
    child: tokio::process::Child,
    pub url: String,
}

impl Drop for Fws {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

pub async fn start_fws() -> Option<Fws> {
    let bin = tools().join("bin/faster-whisper-server");
    let model = std::fs::read_to_string(tools().join("model-dir")).ok();
    let (true, Some(model)) = (bin.exists(), model) else {
        let optional = std::env::var("INTEROP_OPTIONAL").is_ok_and(|v| v == "1");
        assert!(
            optional,
            "faster-whisper-server is not installed: run `scripts/deps fws` \
             (or set INTEROP_OPTIONAL=1 to skip this test)"
        );
        eprintln!("\n*** SKIPPED: faster-whisper-server not installed (scripts/deps fws); INTEROP_OPTIONAL=1 ***\n");
        return None;
    };
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = tokio::process::Command::new(bin)
        .arg(model.trim())
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HUB_DISABLE_TELEMETRY", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("faster-whisper-server starts");
    let url = format!("http://127.0.0.1:{port}");
    for _ in 0..300 {
        if reqwest::get(format!("{url}/health"))
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            return Some(Fws { child, url });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("faster-whisper-server did not answer /health within 30 s");
}

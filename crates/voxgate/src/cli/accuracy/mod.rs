//! `voxgate accuracy`: streams the corpus speech (every capture and the source speech) through
//! a gateway to each configured speech-to-text backend and prints the word error rate of the
//! gateway's final transcripts next to the backend's own result on the same audio as a WAV,
//! so the cost (or gain) of the gateway's segmentation shows.

mod corpus;
mod run;
pub mod wer;

use std::path::PathBuf;

use tokio_util::sync::CancellationToken;

pub use corpus::{items, Item};

use crate::config::Config;

#[derive(Debug, clap::Args)]
pub struct AccuracyArgs {
    /// The config whose `[[stt]]` backends are measured (its other consumers, hook, bus and
    /// auth are left out).
    #[arg(long)]
    pub config: PathBuf,
    /// The corpus directory (captures/, source/).
    #[arg(long, default_value = "testdata/corpus")]
    pub corpus: PathBuf,
    /// Playback speed: 1 = real time, 0 = as fast as possible.
    #[arg(long, default_value_t = 1.0)]
    pub speed: f64,
    /// Only items whose name contains one of these (repeatable), e.g. `short`.
    #[arg(long)]
    pub only: Vec<String>,
    /// Only these backends (repeatable); default all.
    #[arg(long)]
    pub backend: Vec<String>,
    /// Print JSON lines instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// One item through one backend.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Row {
    pub item: String,
    pub backend: String,
    /// WER of the gateway's final transcripts.
    pub gateway_wer: f64,
    /// WER of the backend's own transcript of the WAV.
    pub direct_wer: f64,
    pub gateway_text: String,
    pub direct_text: String,
}

/// Measures every item through every backend of `cfg` (or those named in `only_backends`).
pub async fn measure(
    mut cfg: Config,
    items: &[Item],
    speed: f64,
    only_backends: &[String],
) -> anyhow::Result<Vec<Row>> {
    cfg.stt
        .retain(|s| only_backends.is_empty() || only_backends.contains(&s.name));
    anyhow::ensure!(!cfg.stt.is_empty(), "no [[stt]] backend to measure");
    gateway_only(&mut cfg);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("ws://{}", listener.local_addr()?);
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(crate::app::run(cfg.clone(), listener, shutdown.clone()));
    let mut rows = Vec::new();
    for backend in &cfg.stt {
        for item in items {
            let gateway_text = run::via_gateway(&base, &backend.name, item, speed).await?;
            let direct_text = run::direct(backend, item, speed).await?;
            rows.push(Row {
                item: item.name.clone(),
                backend: backend.name.clone(),
                gateway_wer: wer::wer(&item.reference, &gateway_text),
                direct_wer: wer::wer(&item.reference, &direct_text),
                gateway_text,
                direct_text,
            });
        }
    }
    shutdown.cancel();
    let _ = server.await;
    Ok(rows)
}

/// Leaves only speech-to-text in `cfg`: no webhooks, hook, bus or auth; backends chosen per
/// stream; a long flush at close (a streaming backend may take a minute to drain) and a
/// buffer that holds the longest item.
fn gateway_only(cfg: &mut Config) {
    cfg.webhooks.clear();
    cfg.on_connect = None;
    cfg.bus = Default::default();
    cfg.auth = Default::default();
    cfg.auth.connections_per_ip_per_second = 1000.0;
    cfg.server.close_flush_seconds = cfg.server.close_flush_seconds.max(180.0);
    for s in &mut cfg.stt {
        s.default = false;
        s.transcript_webhook = None;
        s.flush_timeout_ms = s.flush_timeout_ms.max(170_000);
        // Unpaced, a long item arrives faster than it is transcribed: hold all of it.
        s.max_buffer_seconds = s.max_buffer_seconds.max(600.0);
    }
}

/// The rows as a Markdown table.
pub fn table(rows: &[Row]) -> String {
    let mut out = String::from(
        "| item | backend | WER via voxgate | WER of the backend on the WAV | difference |\n\
         | --- | --- | --- | --- | --- |\n",
    );
    for r in rows {
        out.push_str(&format!(
            "| {} | {} | {:.3} | {:.3} | {:+.3} |\n",
            r.item,
            r.backend,
            r.gateway_wer,
            r.direct_wer,
            r.gateway_wer - r.direct_wer
        ));
    }
    out
}

/// `voxgate accuracy`.
pub async fn run(args: &AccuracyArgs) -> anyhow::Result<Vec<Row>> {
    let cfg = Config::load(Some(&args.config)).map_err(|e| anyhow::anyhow!("{e}"))?;
    let items = items(&args.corpus, &args.only)?;
    anyhow::ensure!(
        !items.is_empty(),
        "no corpus items under {}",
        args.corpus.display()
    );
    let rows = measure(cfg, &items, args.speed, &args.backend).await?;
    if args.json {
        for r in &rows {
            println!("{}", serde_json::to_string(r)?);
        }
    } else {
        print!("{}", table(&rows));
    }
    Ok(rows)
}

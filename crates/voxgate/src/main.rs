//! The `voxgate` binary: a startup story read top to bottom.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use tracing::info;
use voxgate::cli;
use voxgate::config::Config;

#[derive(Parser)]
#[command(name = "voxgate", version, about = "A real-time voice audio gateway")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (embedded defaults when no config is given).
    Serve {
        /// TOML config file; `VOXGATE_*` variables override it.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Listen address (overrides server.listen).
        #[arg(long)]
        listen: Option<String>,
    },
    /// Decode a capture to 16 kHz mono WAV through the ingest pipeline; prints one JSON line.
    Decode(cli::decode::DecodeArgs),
    /// Stream a file to a gateway and print its events as JSON lines.
    Stream(cli::stream::StreamArgs),
    /// Load-test a gateway: N concurrent sessions streaming a capture, bounded in time.
    Load(cli::load::LoadArgs),
    /// An audio-bytes webhook receiver that checks signatures, sequences and continuity.
    Sink(cli::sink::SinkArgs),
    /// A bus delivery worker: consumes JetStream partitions and makes the webhook requests.
    Deliver(cli::deliver::DeliverArgs),
}

fn init_tracing() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("VOXGATE_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { config, listen } => {
            init_tracing();
            let mut cfg = match Config::load(config.as_deref()) {
                Ok(cfg) => cfg,
                Err(e) => {
                    eprintln!("voxgate: {e}");
                    return std::process::ExitCode::from(2);
                }
            };
            if let Some(addr) = listen {
                cfg.server.listen = addr;
                if let Err(e) = cfg.validate() {
                    eprintln!("voxgate: {e}");
                    return std::process::ExitCode::from(2);
                }
            }
            match serve(cfg) {
                Ok(()) => std::process::ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("voxgate: {e:#}");
                    std::process::ExitCode::FAILURE
                }
            }
        }
        Command::Decode(args) => match cli::decode::run(&args) {
            Ok(report) => {
                println!(
                    "{}",
                    serde_json::to_string(&report).expect("report serializes")
                );
                std::process::ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("voxgate decode: {e:#}");
                std::process::ExitCode::FAILURE
            }
        },
        Command::Stream(args) => {
            let rt = tokio::runtime::Runtime::new().expect("tokio runtime starts");
            match rt.block_on(cli::stream::run(&args)) {
                Ok(0) => std::process::ExitCode::SUCCESS,
                Ok(_) => std::process::ExitCode::FAILURE,
                Err(e) => {
                    eprintln!("voxgate stream: {e:#}");
                    std::process::ExitCode::FAILURE
                }
            }
        }
        Command::Load(args) => {
            let rt = tokio::runtime::Runtime::new().expect("tokio runtime starts");
            match rt.block_on(cli::load::run(&args)) {
                Ok(r) if r.sessions_failed == 0 => std::process::ExitCode::SUCCESS,
                Ok(_) => std::process::ExitCode::FAILURE,
                Err(e) => {
                    eprintln!("voxgate load: {e:#}");
                    std::process::ExitCode::from(2)
                }
            }
        }
        Command::Deliver(args) => {
            init_tracing();
            let rt = tokio::runtime::Runtime::new().expect("tokio runtime starts");
            let shutdown = CancellationToken::new();
            let signal = shutdown.clone();
            match rt.block_on(async move {
                tokio::spawn(async move {
                    wait_for_signal().await;
                    info!("signal received; stopping the deliver worker");
                    signal.cancel();
                });
                cli::deliver::run(&args, shutdown).await
            }) {
                Ok(()) => std::process::ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("voxgate deliver: {e:#}");
                    std::process::ExitCode::from(2)
                }
            }
        }
        Command::Sink(args) => {
            let rt = tokio::runtime::Runtime::new().expect("tokio runtime starts");
            match rt.block_on(cli::sink::run(&args)) {
                Ok(stats) => {
                    println!(
                        "{}",
                        serde_json::to_string(&stats).expect("stats serialize")
                    );
                    std::process::ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("voxgate sink: {e:#}");
                    std::process::ExitCode::FAILURE
                }
            }
        }
    }
}

fn serve(cfg: Config) -> anyhow::Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&cfg.server.listen).await?;
        info!(
            session_memory_bound = cfg.session_memory_bound(),
            max_sessions = cfg.server.max_sessions,
            webhooks = cfg.webhooks.len(),
            "config loaded"
        );
        let shutdown = CancellationToken::new();
        let signal = shutdown.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            info!("signal received; shutting down");
            signal.cancel();
        });
        voxgate::server::run(cfg, listener, shutdown).await
    })
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler installs");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

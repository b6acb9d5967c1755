//! The `voxgate` binary: a startup story read top to bottom.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
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
    /// Word error rate of each speech-to-text backend through the gateway vs on the WAV.
    Accuracy(cli::accuracy::AccuracyArgs),
    /// A recorded session from the store as one WAV (and its events as JSON lines).
    Recording(cli::recording::RecordingArgs),
}

/// Logs go to stderr through a bounded, lossy, non-blocking writer: when nobody drains stderr
/// fast enough, lines are dropped (and counted in `voxgate_log_lines_dropped_total`) instead of
/// stalling every connection task. The guard flushes what is buffered when dropped: keep it
/// until the process ends.
fn init_tracing(buffered_lines: usize) -> tracing_appender::non_blocking::WorkerGuard {
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(buffered_lines)
        .thread_name("voxgate-log")
        .finish(std::io::stderr());
    let dropped = writer.error_counter();
    voxgate::metrics::export_log_drops(move || dropped.dropped_lines() as u64);
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("VOXGATE_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(writer)
        .init();
    guard
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Serve { config, listen } => serve(config, listen),
        Command::Decode(args) => print_json("decode", cli::decode::run(&args)),
        Command::Stream(args) => match runtime().block_on(cli::stream::run(&args)) {
            Ok(0) => ExitCode::SUCCESS,
            Ok(_) => ExitCode::FAILURE,
            Err(e) => fail("stream", e, ExitCode::FAILURE),
        },
        Command::Load(args) => match runtime().block_on(cli::load::run(&args)) {
            Ok(r) if r.sessions_failed == 0 => ExitCode::SUCCESS,
            Ok(_) => ExitCode::FAILURE,
            Err(e) => fail("load", e, ExitCode::from(2)),
        },
        Command::Deliver(args) => deliver(args),
        Command::Sink(args) => print_json("sink", runtime().block_on(cli::sink::run(&args))),
        Command::Accuracy(args) => match runtime().block_on(cli::accuracy::run(&args)) {
            Ok(_) => ExitCode::SUCCESS,
            Err(e) => fail("accuracy", e, ExitCode::FAILURE),
        },
        Command::Recording(args) => {
            print_json("recording", runtime().block_on(cli::recording::run(&args)))
        }
    }
}

/// The gateway: config (exit 2 if invalid) → tracing → bind → serve until a signal → drain.
fn serve(config: Option<PathBuf>, listen: Option<String>) -> ExitCode {
    let cfg = match load_config(config, listen) {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("voxgate: {e}");
            return ExitCode::from(2);
        }
    };
    let _log_guard = init_tracing(cfg.server.log_buffer_lines);
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => return fail("", e.into(), ExitCode::FAILURE),
    };
    let served = rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&cfg.server.listen).await?;
        info!(
            session_memory_bound = cfg.session_memory_bound(),
            process_memory_bound = cfg.process_memory_bound(),
            max_sessions = cfg.server.max_sessions,
            webhooks = cfg.webhooks.len(),
            "config loaded"
        );
        let shutdown = voxgate::shutdown::on_signal("signal received; shutting down");
        voxgate::app::run(cfg, listener, shutdown).await
    });
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail("", e, ExitCode::FAILURE),
    }
}

/// The config file (or embedded defaults) and environment, with `--listen` applied; validated.
fn load_config(
    file: Option<PathBuf>,
    listen: Option<String>,
) -> Result<Config, voxgate::config::ConfigErrors> {
    let mut cfg = Config::load(file.as_deref())?;
    if let Some(addr) = listen {
        cfg.server.listen = addr;
        cfg.validate()?;
    }
    Ok(cfg)
}

/// A bus delivery worker until a signal.
fn deliver(args: cli::deliver::DeliverArgs) -> ExitCode {
    let _log_guard = init_tracing(voxgate::config::ServerConfig::default().log_buffer_lines);
    let done = runtime().block_on(async move {
        let shutdown = voxgate::shutdown::on_signal("signal received; stopping the deliver worker");
        cli::deliver::run(&args, shutdown).await
    });
    match done {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail("deliver", e, ExitCode::from(2)),
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Runtime::new().expect("tokio runtime starts")
}

/// Prints a command's result as one JSON line.
fn print_json<T: serde::Serialize>(command: &str, result: anyhow::Result<T>) -> ExitCode {
    match result {
        Ok(value) => {
            let line = serde_json::to_string(&value).expect("reports serialize");
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => fail(command, e, ExitCode::FAILURE),
    }
}

fn fail(command: &str, e: anyhow::Error, code: ExitCode) -> ExitCode {
    match command {
        "" => eprintln!("voxgate: {e:#}"),
        _ => eprintln!("voxgate {command}: {e:#}"),
    }
    code
}

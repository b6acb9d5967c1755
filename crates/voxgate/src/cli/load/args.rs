//! The `voxgate load` flags, their checks, and the values derived from them (the metrics page to
//! scrape, the session id prefix). Clap holds every default; nothing here repeats one.

use std::path::PathBuf;

use clap::Parser;

#[derive(Debug, Clone, clap::Args)]
pub struct LoadArgs {
    /// Ingest WebSocket URL (add ?encoding=linear16&sample_rate=16000 for raw PCM). Repeat it to
    /// spread the sessions round-robin over several gateways (same query on every URL).
    #[arg(long, default_value = "ws://127.0.0.1:8080/v1/listen")]
    pub url: Vec<String>,
    /// Concurrent sessions.
    #[arg(long, default_value_t = 10)]
    pub sessions: usize,
    /// Seconds of full load after the ramp; then every session closes.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// The capture to stream.
    #[arg(long)]
    pub file: PathBuf,
    /// Capture index (capture-index/1): message boundaries and spacing.
    #[arg(long)]
    pub index: Option<PathBuf>,
    /// Playback speed: 1 = real time, 10 = ten times faster, 0 = as fast as possible.
    #[arg(long, default_value_t = 1.0)]
    pub speed: f64,
    /// Seconds over which the sessions start (evenly spread).
    #[arg(long, default_value_t = 0.0)]
    pub ramp: f64,
    /// Write the JSON report here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// A gateway process: its RSS (VmRSS) is sampled every second and its CPU time measured.
    /// Repeatable (one per gateway); the report's RSS figures are their sum.
    #[arg(long)]
    pub server_pid: Vec<u32>,
    /// Another process whose CPU time (and RSS) to measure over the full-load window: `PID` or
    /// `NAME=PID` (e.g. `nats1=1234`). Repeatable.
    #[arg(long)]
    pub cpu_pid: Vec<String>,
    /// Run an audio webhook receiver here (e.g. 127.0.0.1:18300; point the gateway's webhook at
    /// `http://ADDR/NAME`) and measure chunk-to-webhook latency, gaps and duplicates.
    #[arg(long)]
    pub sink_listen: Option<String>,
    /// With --sink-listen: seconds to wait after the last session closed for the sink to hold
    /// every sample sent.
    #[arg(long, default_value_t = 30.0)]
    pub sink_wait: f64,
    /// With --sink-listen: session ids are `PREFIX-<slot>-<connection>` (default `load-<random>`).
    #[arg(long)]
    pub session_prefix: Option<String>,
    /// Prometheus page to scrape (default: /metrics on the first URL's host; "none" to disable).
    #[arg(long)]
    pub metrics_url: Option<String>,
    /// Plot RSS and buffered bytes over time to this SVG.
    #[arg(long)]
    pub svg: Option<PathBuf>,
    /// Without an index: media milliseconds per message.
    #[arg(long, default_value_t = 100.0)]
    pub chunk_ms: f64,
    /// Seconds to wait for `Closed` after `CloseStream`.
    #[arg(long, default_value_t = 30.0)]
    pub close_timeout: f64,
    /// Idle sessions: connect, send only KeepAlive every 5 s, close at the deadline.
    #[arg(long)]
    pub idle: bool,
    /// Print nothing (the report is still returned / written).
    #[arg(long)]
    pub quiet: bool,
}

/// `voxgate load` on its own, so that [`LoadArgs::new`] can ask clap for the defaults.
#[derive(Debug, Parser)]
#[command(name = "load")]
struct LoadCommand {
    #[command(flatten)]
    args: LoadArgs,
}

impl LoadArgs {
    /// Arguments with the CLI defaults, quiet, for library use.
    pub fn new(url: impl Into<String>, file: impl Into<PathBuf>) -> Self {
        // `--file` has no default, so clap needs some value; the real one is set after parsing
        // because clap would refuse an empty path, which `run` reports as an unreadable file.
        let mut args = LoadCommand::try_parse_from(["load", "--file", "capture"])
            .expect("the flag defaults parse")
            .args;
        args.url = vec![url.into()];
        args.file = file.into();
        args.quiet = true;
        args
    }

    /// Refuses values the run cannot honour, before anything starts.
    pub(super) fn validate(&self) -> Result<(), ArgsError> {
        // Written as "not (valid)" so that NaN is refused too.
        if self.sessions == 0 {
            return Err(ArgsError::NoSessions);
        }
        if !(self.duration > 0.0 && self.duration.is_finite()) {
            return Err(ArgsError::Duration);
        }
        if !(self.speed >= 0.0 && self.ramp >= 0.0) {
            return Err(ArgsError::Negative);
        }
        if !(self.sink_wait >= 0.0 && self.sink_wait.is_finite()) {
            return Err(ArgsError::SinkWait);
        }
        Ok(())
    }

    /// The Prometheus page to scrape: `--metrics-url` ("none": none), else `/metrics` on the
    /// first URL's host.
    pub(super) fn metrics_url(&self) -> Option<String> {
        match self.metrics_url.as_deref() {
            Some("none") => None,
            Some(u) => Some(u.to_owned()),
            None => default_metrics_url(self.url.first()?),
        }
    }

    /// `--session-prefix`, or `load-<random>`; refused when the longest id it makes
    /// (`PREFIX-<slot>-<connection>`) is not a valid session id.
    pub(super) fn session_prefix(&self) -> Result<String, ArgsError> {
        let prefix = self
            .session_prefix
            .clone()
            .unwrap_or_else(|| format!("load-{:06x}", rand::random::<u32>() & 0xff_ffff));
        let longest = format!("{prefix}-{}-999999", self.sessions);
        if crate::ingest::request::valid_session_id(&longest) {
            Ok(prefix)
        } else {
            Err(ArgsError::SessionPrefix)
        }
    }
}

/// A flag value the load tool refuses.
#[derive(Debug, thiserror::Error)]
pub(super) enum ArgsError {
    #[error("--sessions must be at least 1")]
    NoSessions,
    #[error("--duration must be positive")]
    Duration,
    #[error("--speed and --ramp must not be negative")]
    Negative,
    #[error("--sink-wait must not be negative")]
    SinkWait,
    #[error("--session-prefix: session ids must be at most 128 characters of A-Z a-z 0-9 - _ . :")]
    SessionPrefix,
    #[error("--cpu-pid {0:?}: expected PID or NAME=PID")]
    CpuPid(String),
}

/// `http(s)://HOST:PORT/metrics` of a `ws(s)://` URL.
fn default_metrics_url(ws: &str) -> Option<String> {
    let u = url::Url::parse(ws).ok()?;
    let scheme = if u.scheme() == "wss" { "https" } else { "http" };
    Some(format!(
        "{scheme}://{}:{}/metrics",
        u.host_str()?,
        u.port_or_known_default()?
    ))
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_command_is_well_formed() {
        LoadCommand::command().debug_assert();
    }

    #[test]
    fn new_has_the_cli_defaults_but_is_quiet() {
        let cli = LoadCommand::parse_from(["load", "--url", "ws://h/x", "--file", "a.pcm"]).args;
        assert!(!cli.quiet);
        let cli = LoadArgs { quiet: true, ..cli };
        let lib = LoadArgs::new("ws://h/x", "a.pcm");
        assert_eq!(format!("{lib:?}"), format!("{cli:?}"));
        assert_eq!(lib.sessions, 10);
        assert_eq!(lib.close_timeout, 30.0);
    }

    #[test]
    fn new_keeps_values_clap_would_refuse() {
        let args = LoadArgs::new("-", "");
        assert_eq!(args.url, ["-"]);
        assert_eq!(args.file, PathBuf::new());
    }

    #[test]
    fn validate_refuses_nonsense() {
        let ok = LoadArgs::new("ws://h/x", "a");
        assert!(ok.validate().is_ok());
        let bad = [
            LoadArgs {
                sessions: 0,
                ..ok.clone()
            },
            LoadArgs {
                duration: f64::NAN,
                ..ok.clone()
            },
            LoadArgs {
                speed: -1.0,
                ..ok.clone()
            },
            LoadArgs {
                sink_wait: f64::INFINITY,
                ..ok.clone()
            },
        ];
        for a in bad {
            assert!(a.validate().is_err(), "{a:?}");
        }
    }

    #[test]
    fn metrics_url_from_ws() {
        assert_eq!(
            default_metrics_url("ws://127.0.0.1:8080/v1/listen?encoding=linear16").as_deref(),
            Some("http://127.0.0.1:8080/metrics")
        );
        let mut args = LoadArgs::new("wss://gw.example/v1/listen", "a");
        assert_eq!(
            args.metrics_url().as_deref(),
            Some("https://gw.example:443/metrics")
        );
        args.metrics_url = Some("none".into());
        assert_eq!(args.metrics_url(), None);
    }

    #[test]
    fn session_prefix_must_make_valid_ids() {
        let mut args = LoadArgs::new("ws://h/x", "a");
        assert!(args.session_prefix().unwrap().starts_with("load-"));
        args.session_prefix = Some("t".into());
        assert_eq!(args.session_prefix().unwrap(), "t");
        args.session_prefix = Some("no spaces".into());
        assert!(args.session_prefix().is_err());
    }
}

//! What the tool measures besides its sessions: once a second the RSS (`/proc/PID/status`) of
//! every measured process, the gateway's `/metrics` (buffered bytes, live sessions) and the
//! embedded sink's progress; and the CPU time (`/proc/PID/stat`) of every measured process at the
//! start and the end of the full-load window. Linux only: elsewhere the readings are missing.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::args::{ArgsError, LoadArgs};
use super::Ctx;

/// Linux's USER_HZ: `/proc/PID/stat` times are in these ticks.
const CLOCK_TICKS: f64 = 100.0;

/// One once-a-second sample.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    pub t: f64,
    pub rss_bytes: Option<u64>,
    pub buffered_bytes: Option<f64>,
    pub server_sessions: Option<f64>,
    pub client_sessions: i64,
    /// Webhook requests the embedded sink has received so far.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sink_requests: Option<u64>,
    /// Largest chunk-to-webhook latency among the batches received since the previous sample.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sink_latency_max_ms: Option<f32>,
}

/// One measured process (`--server-pid`, `--cpu-pid`, and the load tool itself).
#[derive(Debug, Clone, Default, Serialize)]
pub struct ProcessReport {
    pub label: String,
    pub pid: u32,
    pub role: String,
    /// utime + stime consumed during the full-load window (after the ramp, until the deadline).
    pub cpu_seconds: Option<f64>,
    /// `cpu_seconds` divided by the window's length (1.0 = one core busy); for a process that
    /// exited, by the part of the window it was alive.
    pub cpu_per_second: Option<f64>,
    /// CPU seconds from the tool's start to its end (ramp and closing included).
    pub cpu_seconds_run: Option<f64>,
    pub rss_baseline_bytes: Option<u64>,
    pub rss_peak_bytes: Option<u64>,
    pub rss_end_bytes: Option<u64>,
    /// The process was gone before the end of the window (its CPU time is up to the last reading).
    pub exited: bool,
}

/// Why a process is measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Role {
    /// A gateway (`--server-pid`): its RSS is the report's server RSS.
    Server,
    /// Anything else (`--cpu-pid`).
    Cpu,
    /// The load tool itself.
    Load,
}

impl Role {
    /// The name in the report.
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Self::Server => "server",
            Self::Cpu => "cpu",
            Self::Load => "load",
        }
    }
}

/// A process to measure.
#[derive(Debug, Clone)]
pub(super) struct Proc {
    label: String,
    pub(super) pid: u32,
    role: Role,
}

/// Every `--server-pid`, every `--cpu-pid`, then the tool itself.
pub(super) fn processes(args: &LoadArgs) -> Result<Vec<Proc>, ArgsError> {
    let mut out = Vec::new();
    for (i, &pid) in args.server_pid.iter().enumerate() {
        let label = if args.server_pid.len() == 1 {
            "server".to_owned()
        } else {
            format!("server{i}")
        };
        out.push(Proc {
            label,
            pid,
            role: Role::Server,
        });
    }
    for spec in &args.cpu_pid {
        let (label, pid) = match spec.split_once('=') {
            Some((name, pid)) => (name.to_owned(), pid),
            None => (format!("pid{spec}"), spec.as_str()),
        };
        let pid: u32 = pid
            .trim()
            .parse()
            .map_err(|_| ArgsError::CpuPid(spec.clone()))?;
        out.push(Proc {
            label,
            pid,
            role: Role::Cpu,
        });
    }
    out.push(Proc {
        label: "load".to_owned(),
        pid: std::process::id(),
        role: Role::Load,
    });
    Ok(out)
}

/// utime + stime of a process in clock ticks (`/proc/PID/stat` fields 14 and 15).
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state): utime is field 14, stime field 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// CPU time of the calling thread in seconds (`/proc/thread-self/schedstat`, nanoseconds: finer
/// than the clock ticks of `stat`).
pub(super) fn thread_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let ns: u64 = stat.split_whitespace().next()?.parse().ok()?;
    Some(ns as f64 / 1e9)
}

/// VmRSS of a process, in bytes.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Sum of every series of a metric in a Prometheus text page.
pub fn metric_sum(text: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for l in text.lines().filter(|l| !l.starts_with('#')) {
        if l.starts_with(name) && matches!(l.as_bytes().get(name.len()), Some(b'{' | b' ')) {
            if let Some(v) = l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) {
                *found.get_or_insert(0.0) += v;
            }
        }
    }
    found
}

/// RSS and CPU readings of one process.
#[derive(Debug, Clone, Default)]
pub(super) struct ProcSeries {
    rss: Vec<(f64, u64)>,
    cpu_first: Option<(f64, u64)>,
    cpu_last: Option<(f64, u64)>,
}

/// Scrapes the gateway's Prometheus page; says once when it cannot.
struct Scraper {
    client: Option<reqwest::Client>,
    url: Option<String>,
    failed: bool,
}

impl Scraper {
    fn new(url: Option<String>) -> Self {
        let client = match reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
        {
            Ok(c) => Some(c),
            Err(e) => {
                eprintln!("voxgate load: no HTTP client for the metrics scrape ({e}); buffered bytes and server sessions will be missing");
                None
            }
        };
        Self {
            client,
            url,
            failed: false,
        }
    }

    /// (buffered bytes, live server sessions), when the page could be read.
    async fn scrape(&mut self) -> (Option<f64>, Option<f64>) {
        let (Some(client), Some(url)) = (&self.client, &self.url) else {
            return (None, None);
        };
        let text = match client.get(url).send().await {
            Ok(resp) => resp.text().await,
            Err(e) => Err(e),
        };
        match text {
            Ok(text) => (
                Some(metric_sum(&text, crate::metrics::BUFFERED_BYTES).unwrap_or(0.0)),
                metric_sum(&text, crate::metrics::SESSIONS_ACTIVE),
            ),
            Err(e) => {
                if !std::mem::replace(&mut self.failed, true) {
                    eprintln!("voxgate load: metrics scrape failed ({e}); samples without it are marked missing");
                }
                (None, None)
            }
        }
    }
}

/// Reads every process at `t`; returns the summed RSS of the gateways.
fn read_processes(procs: &[Proc], series: &mut [ProcSeries], t: f64) -> Option<u64> {
    let mut server_rss = None;
    for (p, s) in procs.iter().zip(series.iter_mut()) {
        if let Some(rss) = rss_bytes(p.pid) {
            s.rss.push((t, rss));
            if p.role == Role::Server {
                *server_rss.get_or_insert(0) += rss;
            }
        }
        if let Some(ticks) = cpu_ticks(p.pid) {
            s.cpu_first.get_or_insert((t, ticks));
            s.cpu_last = Some((t, ticks));
        }
    }
    server_rss
}

/// Samples once a second from `start` until `stop`, and once more when stopped.
pub(super) async fn sample_loop(
    ctx: Arc<Ctx>,
    metrics_url: Option<String>,
    procs: Vec<Proc>,
    start: Instant,
    stop: CancellationToken,
) -> (Vec<Sample>, Vec<ProcSeries>) {
    let mut series = vec![ProcSeries::default(); procs.len()];
    let mut scraper = Scraper::new(metrics_url);
    let mut out = Vec::new();
    let mut next = start;
    loop {
        let (buffered_bytes, server_sessions) = scraper.scrape().await;
        let t = start.elapsed().as_secs_f64();
        let rss_bytes = read_processes(&procs, &mut series, t);
        let (sink_requests, sink_latency_max_ms) = match &ctx.sink {
            Some(sink) => {
                let (n, max) = sink.tick();
                (Some(n), max)
            }
            None => (None, None),
        };
        out.push(Sample {
            t,
            rss_bytes,
            buffered_bytes,
            server_sessions,
            client_sessions: ctx.live.connected.load(Ordering::Relaxed),
            sink_requests,
            sink_latency_max_ms,
        });
        if stop.is_cancelled() {
            break;
        }
        next += Duration::from_secs(1);
        tokio::select! {
            _ = tokio::time::sleep_until(next) => {}
            _ = stop.cancelled() => {}
        }
    }
    (out, series)
}

/// The full-load window, in seconds from the tool's start.
#[derive(Debug, Clone, Copy)]
struct Window {
    from: f64,
    to: f64,
}

/// CPU ticks of every process at the start and at the end of the full-load window.
pub(super) struct CpuWindow {
    from: Vec<Option<u64>>,
    to: Vec<Option<u64>>,
    window: Window,
}

/// Reads the CPU time of `pids` at `from` and at `to`; times count from `start`.
pub(super) async fn cpu_window(
    pids: Vec<u32>,
    start: Instant,
    from: Instant,
    to: Instant,
) -> CpuWindow {
    tokio::time::sleep_until(from).await;
    let a: Vec<Option<u64>> = pids.iter().map(|&p| cpu_ticks(p)).collect();
    let ta = Instant::now();
    tokio::time::sleep_until(to).await;
    let b: Vec<Option<u64>> = pids.iter().map(|&p| cpu_ticks(p)).collect();
    CpuWindow {
        from: a,
        to: b,
        window: Window {
            from: (ta - start).as_secs_f64(),
            to: start.elapsed().as_secs_f64(),
        },
    }
}

/// The report of every process, from its once-a-second readings and the window's CPU times.
pub(super) fn process_reports(
    procs: &[Proc],
    series: &[ProcSeries],
    cpu: &CpuWindow,
) -> Vec<ProcessReport> {
    procs
        .iter()
        .enumerate()
        .map(|(i, p)| process_report(p, &series[i], cpu.from[i], cpu.to[i], cpu.window))
        .collect()
}

fn process_report(
    p: &Proc,
    series: &ProcSeries,
    from: Option<u64>,
    to: Option<u64>,
    window: Window,
) -> ProcessReport {
    // A process gone before the end of the window: up to its last reading (per second of that).
    let (to, exited, until) = match to {
        Some(t) => (Some(t), false, window.to),
        None => (
            series.cpu_last.map(|(_, t)| t),
            true,
            series.cpu_last.map_or(window.from, |(at, _)| at),
        ),
    };
    let window = until - window.from;
    let cpu = match (from, to) {
        (Some(a), Some(b)) => Some(b.saturating_sub(a) as f64 / CLOCK_TICKS),
        _ => None,
    };
    let run = match (series.cpu_first, series.cpu_last) {
        (Some((_, a)), Some((_, b))) => Some(b.saturating_sub(a) as f64 / CLOCK_TICKS),
        _ => None,
    };
    ProcessReport {
        label: p.label.clone(),
        pid: p.pid,
        role: p.role.as_str().to_owned(),
        cpu_seconds: cpu,
        cpu_per_second: cpu.filter(|_| window > 0.1).map(|c| c / window),
        cpu_seconds_run: run,
        rss_baseline_bytes: series.rss.first().map(|x| x.1),
        rss_peak_bytes: series.rss.iter().map(|x| x.1).max(),
        rss_end_bytes: series.rss.last().map(|x| x.1),
        exited,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_sums_labels() {
        let text = "# HELP x\nvoxgate_buffered_bytes{consumer=\"webhook\"} 10\nvoxgate_buffered_bytes{consumer=\"subscriber\"} 5\nvoxgate_buffered_bytes_other 7\n";
        assert_eq!(metric_sum(text, "voxgate_buffered_bytes"), Some(15.0));
        assert_eq!(metric_sum(text, "voxgate_sessions_active"), None);
    }

    #[test]
    fn thread_cpu_time_advances_with_work() {
        let from = thread_cpu_seconds().expect("schedstat");
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
        }
        assert!(thread_cpu_seconds().unwrap() > from, "{x}");
    }

    #[test]
    fn cpu_ticks_of_self() {
        assert!(cpu_ticks(std::process::id()).is_some());
    }

    #[test]
    fn processes_are_labelled_by_role() {
        let mut args = LoadArgs::new("ws://h/x", "a");
        args.server_pid = vec![1, 2];
        args.cpu_pid = vec!["nats=3".into(), "4".into()];
        let p = processes(&args).unwrap();
        let got: Vec<_> = p
            .iter()
            .map(|p| (p.label.as_str(), p.pid, p.role.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                ("server0", 1, "server"),
                ("server1", 2, "server"),
                ("nats", 3, "cpu"),
                ("pid4", 4, "cpu"),
                ("load", std::process::id(), "load"),
            ]
        );
        args.cpu_pid = vec!["nats=x".into()];
        assert!(matches!(processes(&args), Err(ArgsError::CpuPid(s)) if s == "nats=x"));
    }

    #[test]
    fn an_exited_process_is_measured_until_its_last_reading() {
        let p = Proc {
            label: "x".into(),
            pid: 1,
            role: Role::Cpu,
        };
        let series = ProcSeries {
            rss: vec![(0.0, 5), (1.0, 9), (2.0, 7)],
            cpu_first: Some((0.0, 100)),
            cpu_last: Some((3.0, 300)),
        };
        let window = Window {
            from: 1.0,
            to: 11.0,
        };
        let alive = process_report(&p, &series, Some(150), Some(350), window);
        assert_eq!(alive.cpu_seconds, Some(2.0));
        assert_eq!(alive.cpu_per_second, Some(0.2));
        assert_eq!(alive.cpu_seconds_run, Some(2.0));
        assert_eq!(
            (
                alive.rss_baseline_bytes,
                alive.rss_peak_bytes,
                alive.rss_end_bytes
            ),
            (Some(5), Some(9), Some(7))
        );
        let gone = process_report(&p, &series, Some(150), None, window);
        assert!(gone.exited);
        assert_eq!(gone.cpu_seconds, Some(1.5));
        assert_eq!(gone.cpu_per_second, Some(0.75));
    }
}

//! The run's report: what the session slots, the sampler and the sink measured, summed into one
//! [`LoadReport`], the human summary of it, and where it is written.

use std::collections::BTreeMap;
use std::fmt::Write;

use serde::Serialize;

use super::args::LoadArgs;
use super::client::SlotResult;
use super::sampler::{ProcessReport, Sample};
use super::sink::SinkReport;

/// Samples per second of the audio the gateway decodes to.
const SAMPLE_RATE: f64 = 16_000.0;

/// Percentiles of a set of milliseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Latency {
    pub count: usize,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Latency {
    /// Nearest-rank percentiles; all zero for no values.
    pub(super) fn of(mut v: Vec<f32>) -> Self {
        if v.is_empty() {
            return Self::default();
        }
        v.sort_by(f32::total_cmp);
        let pct = |p: f64| {
            let i = ((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1;
            f64::from(v[i])
        };
        Self {
            count: v.len(),
            p50_ms: pct(0.50),
            p90_ms: pct(0.90),
            p99_ms: pct(0.99),
            max_ms: f64::from(v[v.len() - 1]),
        }
    }
}

/// What the run measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LoadReport {
    /// The first URL (`urls` has them all).
    pub url: String,
    pub urls: Vec<String>,
    pub file: String,
    pub sessions: usize,
    pub duration_s: f64,
    pub speed: f64,
    pub ramp_s: f64,
    pub idle: bool,
    pub wall_seconds: f64,
    /// Session slots whose every connection ended with `Closed` and close code 1000.
    pub sessions_held: usize,
    pub sessions_failed: usize,
    pub connections: u64,
    pub connections_failed: u64,
    pub messages_sent: u64,
    pub bytes_sent: u64,
    /// Media seconds sent (16 kHz samples the server should decode, from the local decode).
    pub seconds_sent: f64,
    pub samples_sent: u64,
    /// Sum of `Closed.summary.samples_decoded` (and seconds).
    pub closed_samples_decoded: u64,
    pub closed_seconds_decoded: f64,
    /// Sum of the last `Progress.seconds_decoded` of every connection.
    pub progress_seconds: f64,
    pub closed_events: u64,
    pub delivered_bytes: u64,
    pub dropped_bytes: u64,
    pub decode_errors: u64,
    /// Progress event latency.
    pub latency: Latency,
    /// From `CloseStream` to `Closed`.
    pub close_latency: Latency,
    /// Error events by code, abnormal close codes (`close_NNNN`) and client-side failures.
    pub errors: BTreeMap<String, u64>,
    pub rss_baseline_bytes: Option<u64>,
    pub rss_peak_bytes: Option<u64>,
    /// Mean RSS over the samples taken during full load (after the ramp).
    pub rss_loaded_bytes: Option<u64>,
    pub rss_end_bytes: Option<u64>,
    /// (rss_loaded - rss_baseline) / sessions.
    pub rss_per_session_bytes: Option<f64>,
    pub buffered_peak_bytes: Option<f64>,
    pub buffered_end_bytes: Option<f64>,
    /// CPU and RSS per measured process.
    pub processes: Vec<ProcessReport>,
    /// The embedded webhook receiver's findings (with `--sink-listen`).
    pub sink: Option<SinkReport>,
    /// What a stream cost the gateway next to what decoding its audio costs.
    pub stream_cost: StreamCost,
    pub timeline: Vec<Sample>,
}

/// Gateway CPU per second of audio next to the decode-only floor for the same capture.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StreamCost {
    /// CPU ms the (first) `--server-pid` spent over the run per second of audio it decoded
    /// (`Closed` summaries): connection setup, decode, detection, consumers, everything.
    pub server_cpu_ms_per_audio_s: Option<f64>,
    /// CPU ms this tool spends decoding one second of the same capture, message by message, in
    /// one thread with voxgate's decoder (what `voxgate decode` does without writing a file).
    pub decode_cpu_ms_per_audio_s: Option<f64>,
    /// server / decode: 1.0 would mean the gateway costs no more than decoding.
    pub ratio: Option<f64>,
}

/// Everything a run collected, for [`LoadReport::build`].
pub(super) struct Collected {
    pub(super) slots: Vec<SlotResult>,
    pub(super) timeline: Vec<Sample>,
    pub(super) processes: Vec<ProcessReport>,
    pub(super) sink: Option<SinkReport>,
    pub(super) wall_seconds: f64,
    pub(super) messages_sent: u64,
    pub(super) bytes_sent: u64,
    /// Seconds from the tool's start to the first session's start (the sampler's baseline).
    pub(super) lead_in_s: f64,
    pub(super) decode_cpu_ms_per_audio_s: Option<f64>,
}

impl LoadReport {
    pub(super) fn build(args: &LoadArgs, c: Collected) -> Self {
        let mut r = Self {
            url: args.url[0].clone(),
            urls: args.url.clone(),
            file: args.file.display().to_string(),
            sessions: args.sessions,
            duration_s: args.duration,
            speed: args.speed,
            ramp_s: args.ramp,
            idle: args.idle,
            wall_seconds: c.wall_seconds,
            messages_sent: c.messages_sent,
            bytes_sent: c.bytes_sent,
            sink: c.sink,
            ..Self::default()
        };
        r.add_slots(c.slots);
        let loaded_from = args.ramp + c.lead_in_s;
        r.summarize_timeline(&c.timeline, loaded_from, loaded_from + args.duration);
        r.processes = c.processes;
        r.stream_cost = r.stream_cost(c.decode_cpu_ms_per_audio_s);
        r.timeline = c.timeline;
        r
    }

    fn stream_cost(&self, decode: Option<f64>) -> StreamCost {
        let server = self
            .processes
            .iter()
            .find(|p| p.role == "server")
            .and_then(|p| p.cpu_seconds_run)
            .filter(|_| self.closed_seconds_decoded > 0.0)
            .map(|cpu| cpu * 1e3 / self.closed_seconds_decoded);
        let ratio = match (server, decode) {
            (Some(s), Some(d)) if d > 0.0 => Some(s / d),
            _ => None,
        };
        StreamCost {
            server_cpu_ms_per_audio_s: server,
            decode_cpu_ms_per_audio_s: decode,
            ratio,
        }
    }

    /// Sums what every session slot saw.
    fn add_slots(&mut self, slots: Vec<SlotResult>) {
        let mut lat = Vec::new();
        let mut close_lat = Vec::new();
        for s in slots {
            if s.failed {
                self.sessions_failed += 1;
            } else {
                self.sessions_held += 1;
            }
            self.connections += s.connections;
            self.connections_failed += s.connections_failed;
            self.samples_sent += s.samples_sent;
            self.closed_events += s.closed_events;
            self.closed_samples_decoded += s.closed_samples;
            self.closed_seconds_decoded += s.closed_seconds;
            self.progress_seconds += s.progress_seconds;
            self.delivered_bytes += s.delivered;
            self.dropped_bytes += s.dropped;
            self.decode_errors += s.decode_errors;
            lat.extend(s.latencies);
            close_lat.extend(s.close_latencies);
            for (k, v) in s.errors {
                *self.errors.entry(k).or_default() += v;
            }
        }
        self.seconds_sent = self.samples_sent as f64 / SAMPLE_RATE;
        self.latency = Latency::of(lat);
        self.close_latency = Latency::of(close_lat);
    }

    /// RSS and buffered-bytes figures from the timeline; "loaded" is from a second after
    /// `loaded_from` (seconds from the tool's start) until `loaded_to`.
    fn summarize_timeline(&mut self, t: &[Sample], loaded_from: f64, loaded_to: f64) {
        let rss: Vec<(f64, u64)> = t.iter().filter_map(|s| Some((s.t, s.rss_bytes?))).collect();
        self.rss_baseline_bytes = rss.first().map(|x| x.1);
        self.rss_peak_bytes = rss.iter().map(|x| x.1).max();
        self.rss_end_bytes = rss.last().map(|x| x.1);
        let loaded: Vec<u64> = rss
            .iter()
            .filter(|(ts, _)| *ts >= loaded_from + 1.0 && *ts <= loaded_to)
            .map(|x| x.1)
            .collect();
        if !loaded.is_empty() {
            let mean = loaded.iter().sum::<u64>() / loaded.len() as u64;
            self.rss_loaded_bytes = Some(mean);
            if let Some(base) = self.rss_baseline_bytes {
                self.rss_per_session_bytes =
                    Some((mean as f64 - base as f64) / self.sessions as f64);
            }
        }
        let buf: Vec<f64> = t.iter().filter_map(|s| s.buffered_bytes).collect();
        self.buffered_peak_bytes = buf.iter().copied().reduce(f64::max);
        self.buffered_end_bytes = buf.last().copied();
    }
}

/// Writes the JSON report and the SVG plot where the arguments say, and prints the summary
/// unless quiet.
pub(super) fn write(r: &LoadReport, args: &LoadArgs) -> Result<(), WriteError> {
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(r)?)?;
    }
    if let Some(path) = &args.svg {
        std::fs::write(path, super::svg::svg(r))?;
    }
    if !args.quiet {
        println!("{}", human(r));
    }
    Ok(())
}

/// The report could not be written.
#[derive(Debug, thiserror::Error)]
pub(super) enum WriteError {
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

pub(super) fn mib(b: u64) -> f64 {
    b as f64 / 1048576.0
}

/// The human summary.
pub fn human(r: &LoadReport) -> String {
    let mut s = String::new();
    write_traffic(&mut s, r);
    write_memory(&mut s, r);
    if let Some(k) = &r.sink {
        write_sink(&mut s, k);
    }
    for p in &r.processes {
        write_process(&mut s, p);
    }
    write_cost(&mut s, &r.stream_cost);
    if r.errors.is_empty() {
        let _ = write!(s, "  errors: none");
    } else {
        let list: Vec<String> = r.errors.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let _ = write!(s, "  errors: {}", list.join(" "));
    }
    s
}

/// Sessions, what was sent and decoded, and the event latencies.
fn write_traffic(s: &mut String, r: &LoadReport) {
    let _ = writeln!(
        s,
        "voxgate load: {} sessions x {:.0} s at {}x ({}), wall {:.1} s",
        r.sessions,
        r.duration_s,
        r.speed,
        if r.idle { "idle" } else { "streaming" },
        r.wall_seconds
    );
    let _ = writeln!(
        s,
        "  sessions held {} failed {}; connections {} failed {}",
        r.sessions_held, r.sessions_failed, r.connections, r.connections_failed
    );
    let _ = writeln!(
        s,
        "  sent {} messages, {:.1} MB, {:.1} media s; server decoded {:.1} s (Closed), {:.1} s (last Progress)",
        r.messages_sent,
        r.bytes_sent as f64 / 1e6,
        r.seconds_sent,
        r.closed_seconds_decoded,
        r.progress_seconds
    );
    let _ = writeln!(
        s,
        "  samples sent {} decoded {} ({} Closed events); consumers delivered {} B dropped {} B",
        r.samples_sent,
        r.closed_samples_decoded,
        r.closed_events,
        r.delivered_bytes,
        r.dropped_bytes
    );
    let _ = writeln!(
        s,
        "  event latency p50 {:.1} ms p90 {:.1} ms p99 {:.1} ms max {:.1} ms (n={}); close p50 {:.1} ms p99 {:.1} ms",
        r.latency.p50_ms,
        r.latency.p90_ms,
        r.latency.p99_ms,
        r.latency.max_ms,
        r.latency.count,
        r.close_latency.p50_ms,
        r.close_latency.p99_ms
    );
}

/// The gateways' RSS and buffered bytes, when measured.
fn write_memory(s: &mut String, r: &LoadReport) {
    if let (Some(b), Some(p), Some(e)) = (r.rss_baseline_bytes, r.rss_peak_bytes, r.rss_end_bytes) {
        let _ = writeln!(
            s,
            "  server RSS baseline {:.1} MiB, loaded {:.1} MiB, peak {:.1} MiB, end {:.1} MiB; per session {:.1} KiB",
            mib(b),
            mib(r.rss_loaded_bytes.unwrap_or(0)),
            mib(p),
            mib(e),
            r.rss_per_session_bytes.unwrap_or(0.0) / 1024.0
        );
    }
    if let Some(p) = r.buffered_peak_bytes {
        let _ = writeln!(
            s,
            "  buffered bytes peak {:.0}, end {:.0}",
            p,
            r.buffered_end_bytes.unwrap_or(0.0)
        );
    }
}

fn write_sink(s: &mut String, k: &SinkReport) {
    let _ = writeln!(
        s,
        "  sink {}: {} requests, {} batches, {} samples; duplicates {} (mismatched {}), gaps {}, missing {} samples, overlaps {}, extra {}, bad {}, unknown session {}; sessions complete {}/{} (settled in {:.1} s)",
        k.listen,
        k.requests,
        k.batches,
        k.samples,
        k.duplicates,
        k.duplicate_mismatches,
        k.gaps,
        k.missing_samples,
        k.overlaps,
        k.extra_samples,
        k.bad_requests,
        k.unknown_session_requests,
        k.sessions_complete,
        k.sessions,
        k.settle_seconds
    );
    match &k.latency {
        Some(l) => {
            let _ = writeln!(
                s,
                "  chunk-to-webhook latency p50 {:.1} ms p90 {:.1} ms p99 {:.1} ms max {:.1} ms (n={}); longest silence {:.2} s at t={:.1} s",
                l.p50_ms, l.p90_ms, l.p99_ms, l.max_ms, l.count, k.longest_silence_s, k.longest_silence_at_s
            );
        }
        None => {
            let _ = writeln!(
                s,
                "  chunk-to-webhook latency: not measured; longest silence {:.2} s at t={:.1} s",
                k.longest_silence_s, k.longest_silence_at_s
            );
        }
    }
}

fn write_cost(s: &mut String, c: &StreamCost) {
    let or_dash = |v: Option<f64>, digits: usize| v.map_or("-".into(), |c| format!("{c:.digits$}"));
    let _ = writeln!(
        s,
        "  cost per stream: server {} ms CPU per audio second, decode alone {} ms, ratio {}",
        or_dash(c.server_cpu_ms_per_audio_s, 3),
        or_dash(c.decode_cpu_ms_per_audio_s, 3),
        or_dash(c.ratio, 2)
    );
}

fn write_process(s: &mut String, p: &ProcessReport) {
    let or_dash = |v: Option<f64>, digits: usize| v.map_or("-".into(), |c| format!("{c:.digits$}"));
    let _ = writeln!(
        s,
        "  {} {} (pid {}): CPU {} s under full load ({} s/s), {} s over the run; RSS peak {}{}",
        p.role,
        p.label,
        p.pid,
        or_dash(p.cpu_seconds, 2),
        or_dash(p.cpu_per_second, 3),
        or_dash(p.cpu_seconds_run, 2),
        p.rss_peak_bytes
            .map_or("-".into(), |b| format!("{:.1} MiB", mib(b))),
        if p.exited { " (exited)" } else { "" }
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let l = Latency::of((1..=100).map(|x| x as f32).collect());
        assert_eq!(l.p50_ms, 50.0);
        assert_eq!(l.p99_ms, 99.0);
        assert_eq!(l.max_ms, 100.0);
        assert_eq!(Latency::of(vec![]).count, 0);
        // Nearest rank, whatever the input order.
        let l = Latency::of(vec![3.0, 1.0, 2.0]);
        assert_eq!((l.count, l.p50_ms, l.p90_ms, l.max_ms), (3, 2.0, 3.0, 3.0));
    }

    fn slot(failed: bool, latencies: Vec<f32>, errors: &[(&str, u64)]) -> SlotResult {
        SlotResult {
            failed,
            connections: 2,
            connections_failed: u64::from(failed),
            samples_sent: 16_000,
            closed_events: 2,
            closed_samples: 16_000,
            latencies,
            errors: errors.iter().map(|&(k, v)| (k.to_owned(), v)).collect(),
            ..SlotResult::default()
        }
    }

    #[test]
    fn slots_add_up() {
        let mut r = LoadReport::default();
        r.add_slots(vec![
            slot(false, vec![1.0, 2.0], &[]),
            slot(true, vec![3.0], &[("close_1011", 1), ("io", 1)]),
            slot(true, vec![], &[("close_1011", 2)]),
        ]);
        assert_eq!((r.sessions_held, r.sessions_failed), (1, 2));
        assert_eq!((r.connections, r.connections_failed), (6, 2));
        assert_eq!((r.samples_sent, r.seconds_sent), (48_000, 3.0));
        assert_eq!(r.latency.count, 3);
        assert_eq!(r.close_latency.count, 0);
        assert_eq!(r.errors["close_1011"], 3);
        assert_eq!(r.errors["io"], 1);
    }

    fn sample(t: f64, rss: Option<u64>, buffered: Option<f64>) -> Sample {
        Sample {
            t,
            rss_bytes: rss,
            buffered_bytes: buffered,
            server_sessions: None,
            client_sessions: 0,
            sink_requests: None,
            sink_latency_max_ms: None,
        }
    }

    #[test]
    fn loaded_rss_is_the_mean_after_the_first_loaded_second() {
        let mut r = LoadReport {
            sessions: 2,
            ..LoadReport::default()
        };
        let t = [
            sample(0.0, Some(1000), Some(5.0)),
            sample(1.0, Some(3000), None),
            sample(2.0, Some(5000), Some(9.0)),
            sample(3.0, None, Some(2.0)),
            sample(4.0, Some(2000), None),
        ];
        r.summarize_timeline(&t, 0.5, 3.0);
        assert_eq!(r.rss_baseline_bytes, Some(1000));
        assert_eq!(r.rss_peak_bytes, Some(5000));
        assert_eq!(r.rss_end_bytes, Some(2000));
        assert_eq!(r.rss_loaded_bytes, Some(5000), "only t=2 is in [1.5, 3]");
        assert_eq!(r.rss_per_session_bytes, Some(2000.0));
        assert_eq!(r.buffered_peak_bytes, Some(9.0));
        assert_eq!(r.buffered_end_bytes, Some(2.0));
    }

    /// The summary's wording is what people grep in benchmark notes: keep it.
    #[test]
    fn human_summary_text() {
        let mut errors = BTreeMap::new();
        errors.insert("close_1011".to_owned(), 2);
        let r = LoadReport {
            sessions: 2,
            duration_s: 10.0,
            speed: 2.5,
            wall_seconds: 12.34,
            sessions_held: 1,
            sessions_failed: 1,
            connections: 3,
            connections_failed: 1,
            messages_sent: 10,
            bytes_sent: 2_500_000,
            rss_baseline_bytes: Some(1 << 20),
            rss_peak_bytes: Some(3 << 20),
            rss_end_bytes: Some(2 << 20),
            processes: vec![ProcessReport {
                label: "nats".into(),
                pid: 7,
                role: "cpu".into(),
                cpu_seconds: Some(1.5),
                exited: true,
                ..ProcessReport::default()
            }],
            sink: Some(SinkReport {
                listen: "127.0.0.1:9".into(),
                sessions: 3,
                sessions_complete: 3,
                longest_silence_s: 0.5,
                ..SinkReport::default()
            }),
            errors,
            ..LoadReport::default()
        };
        let want = "\
voxgate load: 2 sessions x 10 s at 2.5x (streaming), wall 12.3 s
  sessions held 1 failed 1; connections 3 failed 1
  sent 10 messages, 2.5 MB, 0.0 media s; server decoded 0.0 s (Closed), 0.0 s (last Progress)
  samples sent 0 decoded 0 (0 Closed events); consumers delivered 0 B dropped 0 B
  event latency p50 0.0 ms p90 0.0 ms p99 0.0 ms max 0.0 ms (n=0); close p50 0.0 ms p99 0.0 ms
  server RSS baseline 1.0 MiB, loaded 0.0 MiB, peak 3.0 MiB, end 2.0 MiB; per session 0.0 KiB
  sink 127.0.0.1:9: 0 requests, 0 batches, 0 samples; duplicates 0 (mismatched 0), gaps 0, missing 0 samples, overlaps 0, extra 0, bad 0, unknown session 0; sessions complete 3/3 (settled in 0.0 s)
  chunk-to-webhook latency: not measured; longest silence 0.50 s at t=0.0 s
  cpu nats (pid 7): CPU 1.50 s under full load (- s/s), - s over the run; RSS peak - (exited)
  cost per stream: server - ms CPU per audio second, decode alone - ms, ratio -
  errors: close_1011=2";
        assert_eq!(human(&r), want);
    }

    #[test]
    fn stream_cost_is_server_cpu_over_decoded_audio() {
        let server = |role: &str, cpu: f64| ProcessReport {
            role: role.into(),
            cpu_seconds_run: Some(cpu),
            ..ProcessReport::default()
        };
        let r = LoadReport {
            closed_seconds_decoded: 1_000.0,
            processes: vec![server("cpu", 9.0), server("server", 3.0)],
            ..LoadReport::default()
        };
        let c = r.stream_cost(Some(1.5));
        assert_eq!(c.server_cpu_ms_per_audio_s, Some(3.0));
        assert_eq!(c.ratio, Some(2.0));
        let none = LoadReport::default().stream_cost(Some(1.5));
        assert_eq!(none.server_cpu_ms_per_audio_s, None);
        assert_eq!(none.ratio, None);
    }
}

//! `--svg`: a plot of the gateways' RSS (MiB, left axis, blue) and buffered bytes (KiB, right
//! axis, orange) over the run, from the report's timeline. Plain SVG text, no dependencies.

use std::fmt::Write;

use super::report::{mib, LoadReport};

const RSS_COLOUR: &str = "#1f77b4";
const BUFFERED_COLOUR: &str = "#ff7f0e";

/// The canvas and its plot area, in SVG user units, and the time axis.
struct Plot {
    w: f64,
    h: f64,
    /// Left and top margins; the plot area is `pw` x `ph` from there.
    ml: f64,
    mt: f64,
    pw: f64,
    ph: f64,
    /// Seconds at the right edge.
    tmax: f64,
}

impl Plot {
    fn new(tmax: f64) -> Self {
        let (w, h, ml, mr, mt, mb) = (800.0, 360.0, 70.0, 80.0, 30.0, 40.0);
        Self {
            w,
            h,
            ml,
            mt,
            pw: w - ml - mr,
            ph: h - mt - mb,
            tmax,
        }
    }

    fn header(&self, r: &LoadReport) -> String {
        let Self {
            w,
            h,
            ml,
            mt,
            pw,
            ph,
            ..
        } = self;
        format!(
            r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">
<rect width="{w}" height="{h}" fill="white"/>
<text x="{ml}" y="18">voxgate load: {} sessions, {:.0} s at {}x - server RSS (blue, MiB) and buffered bytes (orange, KiB)</text>
<rect x="{ml}" y="{mt}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>
"##,
            r.sessions, r.duration_s, r.speed
        )
    }

    /// Grid line `f` (0 = bottom, 1 = top) with both axes' labels and the time label under it.
    fn grid(&self, s: &mut String, f: f64, rmax: f64, bmax: f64) {
        let Self { ml, mt, pw, ph, .. } = *self;
        let y = mt + ph - f * ph;
        let _ = writeln!(
            s,
            "<line x1=\"{ml}\" x2=\"{}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"#eee\"/>",
            ml + pw
        );
        let _ = writeln!(
            s,
            "<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\" fill=\"{RSS_COLOUR}\">{:.1}</text>",
            ml - 6.0,
            y + 4.0,
            rmax * f
        );
        let _ = writeln!(
            s,
            "<text x=\"{}\" y=\"{:.1}\" fill=\"{BUFFERED_COLOUR}\">{:.1}</text>",
            ml + pw + 6.0,
            y + 4.0,
            bmax * f
        );
        let x = ml + f * pw;
        let _ = writeln!(
            s,
            "<text x=\"{x:.1}\" y=\"{}\" text-anchor=\"middle\">{:.0} s</text>",
            mt + ph + 18.0,
            self.tmax * f
        );
    }

    /// A series as a polyline, `max` at the top of the plot (higher values are clipped).
    fn polyline(&self, s: &mut String, v: &[(f64, f64)], max: f64, colour: &str) {
        let points = v
            .iter()
            .map(|(t, y)| {
                format!(
                    "{:.1},{:.1}",
                    self.ml + t / self.tmax * self.pw,
                    self.mt + self.ph - (y / max).min(1.0) * self.ph
                )
            })
            .collect::<Vec<_>>()
            .join(" ");
        let _ = writeln!(
            s,
            "<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"2\" points=\"{points}\"/>"
        );
    }
}

/// The top of an axis: 10% above the largest value, or 1 when there is none.
fn axis_top(v: &[(f64, f64)]) -> f64 {
    let m = v.iter().map(|p| p.1).fold(0.0, f64::max);
    if m > 0.0 {
        m * 1.1
    } else {
        1.0
    }
}

/// A plot of server RSS (MiB, left axis) and buffered bytes (KiB, right axis) over time.
pub fn svg(r: &LoadReport) -> String {
    let tmax = r.timeline.last().map_or(1.0, |s| s.t).max(1.0);
    let plot = Plot::new(tmax);
    let rss: Vec<(f64, f64)> = r
        .timeline
        .iter()
        .filter_map(|s| Some((s.t, mib(s.rss_bytes?))))
        .collect();
    let buf: Vec<(f64, f64)> = r
        .timeline
        .iter()
        .filter_map(|s| Some((s.t, s.buffered_bytes? / 1024.0)))
        .collect();
    let (rmax, bmax) = (axis_top(&rss), axis_top(&buf));
    let mut s = plot.header(r);
    for i in 0..=4 {
        plot.grid(&mut s, f64::from(i) / 4.0, rmax, bmax);
    }
    if !rss.is_empty() {
        plot.polyline(&mut s, &rss, rmax, RSS_COLOUR);
    }
    if !buf.is_empty() {
        plot.polyline(&mut s, &buf, bmax, BUFFERED_COLOUR);
    }
    s += "</svg>\n";
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::load::sampler::Sample;

    #[test]
    fn an_empty_report_plots_axes_only() {
        let s = svg(&LoadReport::default());
        assert!(s.starts_with("<svg ") && s.ends_with("</svg>\n"));
        assert_eq!(s.matches("<line ").count(), 5);
        assert!(!s.contains("<polyline"));
    }

    #[test]
    fn series_scale_to_the_plot() {
        let sample = |t, rss| Sample {
            t,
            rss_bytes: Some(rss),
            buffered_bytes: None,
            server_sessions: None,
            client_sessions: 0,
            sink_requests: None,
            sink_latency_max_ms: None,
        };
        let r = LoadReport {
            timeline: vec![sample(0.0, 0), sample(2.0, 10 << 20)],
            ..LoadReport::default()
        };
        let s = svg(&r);
        // t=0 at the left edge and the bottom; 10 MiB is 1/1.1 of the height (the axis top is
        // 11 MiB); t=2 at the right edge.
        assert!(s.contains("points=\"70.0,320.0 720.0,56.4\""), "{s}");
        assert_eq!(s.matches("<polyline").count(), 1);
    }
}

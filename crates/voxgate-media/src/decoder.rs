//! The per-stream pipeline behind [`Decoder`]: sniff -> demux -> decode -> downmix -> 16 kHz.
//!
//! Owns the bounded event queue and the counters. Hands bytes to the demuxer a few KiB at a time,
//! so a large chunk never makes it hold more than `max_pending_bytes`. Frame-local errors are
//! counted and reported as events; only format and limit errors are returned, and they stick.

use std::collections::VecDeque;

use crate::demux::DemuxEvent;
use crate::detect::{sniff, Sniff, SNIFF_LEN};
use crate::ogg::OggDemuxer;
use crate::opus_stage::OpusStage;
use crate::pcm::{PcmStage, SampleFormat};
use crate::webm::WebmDemuxer;
use crate::{DetectedFormat, Limits, MediaError, MediaEvent, SourceFormat, Stats, OUTPUT_RATE};

/// Events held before coalescing: further `Resynced` merge into the last one, further
/// `DecodeError`s are dropped (still counted in `Stats::decode_errors` and
/// [`Decoder::events_dropped`]).
pub const EVENT_QUEUE_CAP: usize = 64;

/// Rate libopus decodes at. 16 kHz: no 48 kHz synthesis and no resampler (see the benchmark).
const OPUS_DECODE_RATE: u32 = OUTPUT_RATE;

/// libopus decoder state (mono, about 18 KiB in 1.5/1.6) plus decode buffers, rounded up.
const CODEC_STATE_BYTES: usize = 64 * 1024;
/// Largest resampler phase table (512 phases × 96 taps × 4 bytes) plus its history.
const RESAMPLER_BYTES: usize = 512 * 96 * 4 + 1024;
/// An event with its message.
const EVENT_BYTES: usize = 128;

/// Documented worst-case heap bytes one [`Decoder`] holds under `limits`, excluding the caller's
/// `out` vector: the demux buffer (`max_pending_bytes`), one element or packet copy
/// (`max_element_bytes`, a BlockGroup's Block or an Ogg packet spanning pages), codec state, the
/// resampler tables and the event queue.
pub fn memory_bound(limits: &Limits) -> usize {
    limits.max_pending_bytes
        + limits.max_element_bytes
        + CODEC_STATE_BYTES
        + RESAMPLER_BYTES
        + EVENT_QUEUE_CAP * EVENT_BYTES
        + SNIFF_LEN
}

/// Counters and the event queue, lent to the pipeline stages.
#[derive(Debug, Default)]
struct Report {
    stats: Stats,
    events: VecDeque<MediaEvent>,
    events_dropped: u64,
    format: Option<DetectedFormat>,
}

impl Report {
    fn event(&mut self, ev: MediaEvent) {
        if self.events.len() < EVENT_QUEUE_CAP {
            self.events.push_back(ev);
            return;
        }
        if let MediaEvent::Resynced { skipped_bytes } = ev {
            let last = self.events.iter_mut().rev().find_map(|e| match e {
                MediaEvent::Resynced { skipped_bytes } => Some(skipped_bytes),
                _ => None,
            });
            if let Some(total) = last {
                *total += skipped_bytes;
                return;
            }
        }
        self.events_dropped += 1;
    }

    fn decode_error(&mut self, what: &str) {
        self.stats.decode_errors += 1;
        self.event(MediaEvent::DecodeError {
            what: what.to_owned(),
        });
    }

    fn detected(&mut self, format: DetectedFormat) {
        if self.format.is_none() {
            self.event(MediaEvent::FormatDetected(format));
        }
        self.format = Some(format);
    }
}

/// The two push demuxers, behind one interface.
trait Demux {
    fn feed(&mut self, chunk: &[u8]) -> usize;
    fn poll(&mut self) -> Result<Option<DemuxEvent<'_>>, MediaError>;
    fn pending_bytes(&self) -> usize;
    fn peak_pending_bytes(&self) -> usize;
    fn is_truncated(&self) -> bool;
}

macro_rules! impl_demux {
    ($t:ty) => {
        impl Demux for $t {
            fn feed(&mut self, chunk: &[u8]) -> usize {
                <$t>::feed(self, chunk)
            }
            fn poll(&mut self) -> Result<Option<DemuxEvent<'_>>, MediaError> {
                <$t>::poll(self)
            }
            fn pending_bytes(&self) -> usize {
                <$t>::pending_bytes(self)
            }
            fn peak_pending_bytes(&self) -> usize {
                <$t>::peak_pending_bytes(self)
            }
            fn is_truncated(&self) -> bool {
                <$t>::is_truncated(self)
            }
        }
    };
}
impl_demux!(WebmDemuxer);
impl_demux!(OggDemuxer);

/// A demuxer and the Opus decoder its header created.
struct Container<D> {
    demux: D,
    opus: Option<OpusStage>,
    ogg: bool,
}

impl<D: Demux> Container<D> {
    fn push(
        &mut self,
        mut chunk: &[u8],
        out: &mut Vec<i16>,
        r: &mut Report,
    ) -> Result<(), MediaError> {
        loop {
            let pending_before = self.demux.pending_bytes();
            let taken = self.demux.feed(chunk);
            chunk = &chunk[taken..];
            while let Some(ev) = self.demux.poll()? {
                match ev {
                    DemuxEvent::Head(head) => {
                        if let Some(old) = &mut self.opus {
                            old.finish(out); // a restarted recorder: flush, start afresh
                        }
                        self.opus = Some(OpusStage::new(OPUS_DECODE_RATE, head.pre_skip)?);
                        r.detected(if self.ogg {
                            DetectedFormat::OggOpus {
                                channels: head.channels,
                            }
                        } else {
                            DetectedFormat::WebmOpus {
                                channels: head.channels,
                            }
                        });
                    }
                    DemuxEvent::Packet { data, trim_end } => {
                        let opus = self
                            .opus
                            .as_mut()
                            .expect("demuxers send Head before packets");
                        match opus.decode(data, trim_end, out) {
                            Ok(_) => r.stats.frames += 1,
                            Err(e) => r.decode_error(&e.to_string()),
                        }
                    }
                    DemuxEvent::EndAt { granule } => {
                        if let Some(opus) = &mut self.opus {
                            opus.end_at(granule);
                        }
                    }
                    DemuxEvent::Resynced { skipped_bytes } => {
                        r.stats.resyncs += 1;
                        r.event(MediaEvent::Resynced { skipped_bytes });
                    }
                    DemuxEvent::FrameError(what) => r.decode_error(what),
                }
            }
            r.stats.pending_bytes = self.demux.pending_bytes();
            r.stats.peak_pending_bytes = r
                .stats
                .peak_pending_bytes
                .max(self.demux.peak_pending_bytes());
            if chunk.is_empty() {
                return Ok(());
            }
            if taken == 0 && self.demux.pending_bytes() >= pending_before {
                // Defensive: the demuxers report a full buffer as an error; never spin.
                return Err(MediaError::Limit(
                    "unparsed input exceeds max_pending_bytes",
                ));
            }
        }
    }

    fn finish(&mut self, out: &mut Vec<i16>, r: &mut Report) {
        if self.demux.is_truncated() {
            // A live stream cut between messages (Chromium ends each one with the first byte of
            // the next block): not corruption, but what was pending is gone; say so.
            let bytes = self.demux.pending_bytes() as u64;
            r.stats.truncated_bytes += bytes;
            r.event(MediaEvent::Truncated { bytes });
        }
        if let Some(opus) = &mut self.opus {
            opus.finish(out);
        }
    }
}

enum Pipeline {
    Sniff { head: Vec<u8>, limits: Limits },
    Webm(Container<WebmDemuxer>),
    Ogg(Container<OggDemuxer>),
    Opus(OpusStage),
    Pcm(PcmStage),
    Done,
}

/// One stream's whole ingest pipeline: sniff/demux -> decode -> downmix -> resample to 16 kHz mono.
pub struct Decoder {
    pipeline: Pipeline,
    report: Report,
    failed: Option<MediaError>,
}

impl std::fmt::Debug for Decoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Decoder")
            .field("format", &self.report.format)
            .field("stats", &self.report.stats)
            .field("failed", &self.failed)
            .finish_non_exhaustive()
    }
}

fn check_raw(rate: u32, channels: u8) -> Result<(), MediaError> {
    if !(8_000..=48_000).contains(&rate) {
        return Err(MediaError::Params(format!(
            "sample_rate {rate} outside 8000..=48000"
        )));
    }
    if !(1..=8).contains(&channels) {
        return Err(MediaError::Params(format!(
            "channels {channels} outside 1..=8"
        )));
    }
    Ok(())
}

impl Decoder {
    /// Builds a pipeline for `format`. Parameters (rate 8000..=48000, channels 1..=8 for raw
    /// formats; Opus rates 8/12/16/24/48 kHz, 1..=2 channels) are checked here.
    pub fn new(format: SourceFormat, limits: Limits) -> Result<Self, MediaError> {
        let raw = |f, rate, ch| -> Result<(Pipeline, DetectedFormat), MediaError> {
            check_raw(rate, ch)?;
            let det = match f {
                SampleFormat::S16 => DetectedFormat::Linear16 {
                    sample_rate: rate,
                    channels: ch,
                },
                SampleFormat::F32 => DetectedFormat::Float32 {
                    sample_rate: rate,
                    channels: ch,
                },
                SampleFormat::U8 => DetectedFormat::Linear8 {
                    sample_rate: rate,
                    channels: ch,
                },
                SampleFormat::Mulaw => DetectedFormat::Mulaw {
                    sample_rate: rate,
                    channels: ch,
                },
                SampleFormat::Alaw => DetectedFormat::Alaw {
                    sample_rate: rate,
                    channels: ch,
                },
            };
            Ok((Pipeline::Pcm(PcmStage::new(f, rate, ch)), det))
        };
        let (pipeline, detected) = match format {
            SourceFormat::Auto => (
                Pipeline::Sniff {
                    head: Vec::with_capacity(SNIFF_LEN),
                    limits,
                },
                None,
            ),
            SourceFormat::Opus {
                sample_rate,
                channels,
            } => {
                if ![8_000, 12_000, 16_000, 24_000, 48_000].contains(&sample_rate) {
                    return Err(MediaError::Params(format!(
                        "Opus sample_rate {sample_rate} is not 8000, 12000, 16000, 24000 or 48000"
                    )));
                }
                if !(1..=2).contains(&channels) {
                    return Err(MediaError::Params(format!(
                        "Opus channels {channels} outside 1..=2"
                    )));
                }
                let stage = OpusStage::new(OPUS_DECODE_RATE, 0)?;
                (
                    Pipeline::Opus(stage),
                    Some(DetectedFormat::Opus {
                        sample_rate,
                        channels,
                    }),
                )
            }
            SourceFormat::Linear16 {
                sample_rate,
                channels,
            } => raw(SampleFormat::S16, sample_rate, channels).map(|(p, d)| (p, Some(d)))?,
            SourceFormat::Float32 {
                sample_rate,
                channels,
            } => raw(SampleFormat::F32, sample_rate, channels).map(|(p, d)| (p, Some(d)))?,
            SourceFormat::Linear8 {
                sample_rate,
                channels,
            } => raw(SampleFormat::U8, sample_rate, channels).map(|(p, d)| (p, Some(d)))?,
            SourceFormat::Mulaw {
                sample_rate,
                channels,
            } => raw(SampleFormat::Mulaw, sample_rate, channels).map(|(p, d)| (p, Some(d)))?,
            SourceFormat::Alaw {
                sample_rate,
                channels,
            } => raw(SampleFormat::Alaw, sample_rate, channels).map(|(p, d)| (p, Some(d)))?,
        };
        let mut report = Report::default();
        if let Some(d) = detected {
            report.detected(d);
        }
        Ok(Self {
            pipeline,
            report,
            failed: None,
        })
    }

    /// Conceals lost audio (e.g. device Opus packets missing by sequence number) with the codec's
    /// packet-loss concealment: appends up to `samples` 16 kHz samples to `out` and returns how
    /// many. Only raw Opus streams conceal; others return 0 (the caller inserts silence).
    pub fn conceal(&mut self, samples: u64, out: &mut Vec<i16>) -> u64 {
        match &mut self.pipeline {
            Pipeline::Opus(stage) if self.report.stats.frames > 0 => stage.conceal(samples, out),
            _ => 0,
        }
    }

    /// Feeds one chunk split anywhere (for `SourceFormat::Opus`, exactly one packet; empty chunks
    /// are legal). Appends the 16 kHz mono samples it could produce to `out`. Returns `Err` only
    /// for fatal errors; the decoder then stays failed.
    pub fn push(&mut self, chunk: &[u8], out: &mut Vec<i16>) -> Result<(), MediaError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        self.report.stats.bytes_in += chunk.len() as u64;
        let before = out.len();
        let result = self.route(chunk, out);
        self.report.stats.samples_out += (out.len() - before) as u64;
        if let Err(e) = &result {
            self.failed = Some(e.clone());
            self.pipeline = Pipeline::Done;
            self.report.stats.pending_bytes = 0;
        }
        result
    }

    fn route(&mut self, chunk: &[u8], out: &mut Vec<i16>) -> Result<(), MediaError> {
        let r = &mut self.report;
        match &mut self.pipeline {
            Pipeline::Sniff { head, .. } => {
                let take = (SNIFF_LEN - head.len()).min(chunk.len());
                head.extend_from_slice(&chunk[..take]);
                r.stats.pending_bytes = head.len();
                r.stats.peak_pending_bytes = r.stats.peak_pending_bytes.max(head.len());
                self.detect(false, out)?;
                if matches!(self.pipeline, Pipeline::Sniff { .. }) {
                    return Ok(());
                }
                self.route(&chunk[take..], out)
            }
            Pipeline::Webm(c) => c.push(chunk, out, r),
            Pipeline::Ogg(c) => c.push(chunk, out, r),
            Pipeline::Opus(stage) => {
                if chunk.is_empty() {
                    return Ok(());
                }
                match stage.decode(chunk, 0, out) {
                    Ok(_) => r.stats.frames += 1,
                    Err(e) => r.decode_error(&e.to_string()),
                }
                Ok(())
            }
            Pipeline::Pcm(stage) => {
                r.stats.frames += stage.push(chunk, out);
                r.stats.pending_bytes = stage.pending_bytes();
                Ok(())
            }
            Pipeline::Done => Err(MediaError::Params("push after finish".into())),
        }
    }

    /// Replaces the sniffing stage once the head bytes decide the container.
    fn detect(&mut self, eof: bool, out: &mut Vec<i16>) -> Result<(), MediaError> {
        let Pipeline::Sniff { head, limits } = &mut self.pipeline else {
            return Ok(());
        };
        if head.is_empty() {
            return Ok(());
        }
        let head = std::mem::take(head);
        let limits = limits.clone();
        match sniff(&head, eof) {
            Sniff::NeedMore => {
                self.pipeline = Pipeline::Sniff { head, limits };
                return Ok(());
            }
            Sniff::Webm => {
                self.pipeline = Pipeline::Webm(Container {
                    demux: WebmDemuxer::new(&limits),
                    opus: None,
                    ogg: false,
                })
            }
            Sniff::Ogg => {
                self.pipeline = Pipeline::Ogg(Container {
                    demux: OggDemuxer::new(&limits),
                    opus: None,
                    ogg: true,
                })
            }
            Sniff::Unsupported(what) => return Err(MediaError::Unsupported(what)),
        }
        self.route(&head, out)
    }

    /// End of stream: flushes resampler state into `out`. A truncated trailing element is counted
    /// as a decode error, not returned.
    pub fn finish(&mut self, out: &mut Vec<i16>) -> Result<(), MediaError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let before = out.len();
        if let Err(e) = self.detect(true, out) {
            self.failed = Some(e.clone());
            self.pipeline = Pipeline::Done;
            return Err(e);
        }
        let r = &mut self.report;
        match std::mem::replace(&mut self.pipeline, Pipeline::Done) {
            Pipeline::Webm(mut c) => c.finish(out, r),
            Pipeline::Ogg(mut c) => c.finish(out, r),
            Pipeline::Opus(mut stage) => stage.finish(out),
            Pipeline::Pcm(mut stage) => {
                if stage.finish(out) > 0 {
                    r.decode_error("stream ended inside a sample frame");
                }
            }
            Pipeline::Sniff { .. } | Pipeline::Done => {}
        }
        r.stats.pending_bytes = 0;
        r.stats.samples_out += (out.len() - before) as u64;
        Ok(())
    }

    /// Next event, oldest first; `None` when drained.
    pub fn poll_event(&mut self) -> Option<MediaEvent> {
        self.report.events.pop_front()
    }

    /// Counters of this stream.
    pub fn stats(&self) -> &Stats {
        &self.report.stats
    }

    /// The stream's format, once known (at once for raw formats, after the header for containers).
    pub fn format(&self) -> Option<DetectedFormat> {
        self.report.format
    }

    /// Unparsed input bytes held right now (same as `stats().pending_bytes`).
    pub fn pending_bytes(&self) -> usize {
        self.report.stats.pending_bytes
    }

    /// Events dropped because the queue held [`EVENT_QUEUE_CAP`] (their causes stay counted).
    pub fn events_dropped(&self) -> u64 {
        self.report.events_dropped
    }
}

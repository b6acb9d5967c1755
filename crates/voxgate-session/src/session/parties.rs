//! Two-party sessions: a stereo raw stream whose channels are a call's two parties (the caller
//! first, then the agent) is also split into one lane per party, each with its own mono decoder
//! and segmenter, so consumers can take one party's audio and utterances while the mix (the
//! session's main decoder) goes on exactly as for any stereo stream.
//!
//! Splitting the raw bytes before decoding (rather than teaching the decoder to emit channels)
//! keeps the decoder, the mix and every existing consumer unchanged; it needs only the sample
//! width, which raw formats fix. Containers (WebM/Ogg Opus) are never split.

use std::collections::VecDeque;
use std::sync::Arc;

use voxgate_media::{Decoder, SourceFormat};

use super::{AudioChunk, Output, SessionConfig};
use crate::protocol::{Party, ServerEvent, UtteranceReason};
use crate::seconds;
use crate::segmenter::{Segment, Segmenter};

/// Most parties a session splits (a phone call has two).
pub const MAX_PARTIES: u8 = 2;

/// One party's decoder, segmenter and media time.
struct Lane {
    party: Party,
    decoder: Decoder,
    segmenter: Segmenter,
    /// 16 kHz samples decoded so far (media time, aligned with the mix's).
    samples: u64,
    /// This message's bytes of the party's channel.
    bytes: Vec<u8>,
    pcm: Vec<i16>,
    segments: Vec<Segment>,
}

/// The lanes of a two-party session.
pub(super) struct Parties {
    /// Bytes per sample of one channel, and channels per frame.
    width: usize,
    channels: usize,
    /// The start of a frame split across messages (less than one frame).
    carry: Vec<u8>,
    lanes: Vec<Lane>,
}

/// A raw stereo source's one-channel format and sample width; `None` for anything else.
fn mono_of(source: SourceFormat) -> Option<(SourceFormat, usize)> {
    let (mono, width) = match source {
        SourceFormat::Linear16 {
            sample_rate,
            channels: 2,
        } => (
            SourceFormat::Linear16 {
                sample_rate,
                channels: 1,
            },
            2,
        ),
        SourceFormat::Float32 {
            sample_rate,
            channels: 2,
        } => (
            SourceFormat::Float32 {
                sample_rate,
                channels: 1,
            },
            4,
        ),
        SourceFormat::Linear8 {
            sample_rate,
            channels: 2,
        } => (
            SourceFormat::Linear8 {
                sample_rate,
                channels: 1,
            },
            1,
        ),
        SourceFormat::Mulaw {
            sample_rate,
            channels: 2,
        } => (
            SourceFormat::Mulaw {
                sample_rate,
                channels: 1,
            },
            1,
        ),
        SourceFormat::Alaw {
            sample_rate,
            channels: 2,
        } => (
            SourceFormat::Alaw {
                sample_rate,
                channels: 1,
            },
            1,
        ),
        _ => return None,
    };
    Some((mono, width))
}

impl Parties {
    /// The lanes `cfg` asks for (`max_parties`, at most `MAX_PARTIES`), when its source is raw
    /// stereo. A continued session is not split: its resent audio would start the lanes at a
    /// media time they cannot skip to.
    pub(super) fn new(cfg: &SessionConfig) -> Option<Self> {
        let (mono, width) = mono_of(cfg.source)?;
        if cfg.max_parties == 0 || cfg.continue_at.is_some() {
            return None;
        }
        let lanes = Party::ALL
            .into_iter()
            .take(usize::from(cfg.max_parties.min(MAX_PARTIES)))
            .map(|party| {
                Some(Lane {
                    party,
                    decoder: Decoder::new(mono, cfg.limits.clone()).ok()?,
                    segmenter: Segmenter::new(cfg.segmenter.clone()),
                    samples: 0,
                    bytes: Vec::new(),
                    pcm: Vec::new(),
                    segments: Vec::new(),
                })
            })
            .collect::<Option<Vec<_>>>()?;
        Some(Self {
            width,
            channels: 2,
            carry: Vec::new(),
            lanes,
        })
    }

    /// Splits one message's interleaved frames into the lanes and routes what they decode.
    pub(super) fn push(&mut self, data: &[u8], audio: bool, out: &mut VecDeque<Output>) {
        let frame = self.width * self.channels;
        let mut joined = std::mem::take(&mut self.carry);
        joined.extend_from_slice(data);
        let whole = joined.len() / frame * frame;
        self.carry = joined.split_off(whole);
        for (ch, lane) in self.lanes.iter_mut().enumerate() {
            lane.bytes.clear();
            let at = ch * self.width;
            for f in joined.chunks_exact(frame) {
                lane.bytes.extend_from_slice(&f[at..at + self.width]);
            }
            lane.pcm.clear();
            // A raw mono decoder of a width-aligned buffer has nothing to refuse; the mix's
            // decoder reports the stream's problems.
            let _ = lane.decoder.push(&lane.bytes, &mut lane.pcm);
            while lane.decoder.poll_event().is_some() {}
            lane.route(audio, out);
        }
    }

    /// Silence for a known gap, so each party's media time stays the mix's.
    pub(super) fn silence(&mut self, samples: usize, audio: bool, out: &mut VecDeque<Output>) {
        for lane in &mut self.lanes {
            lane.pcm.clear();
            lane.pcm.resize(samples, 0);
            lane.route(audio, out);
        }
    }

    /// Ends each party's open utterance (`Finalize`, or the close after `flush`).
    pub(super) fn finalize(&mut self, reason: UtteranceReason, out: &mut VecDeque<Output>) {
        for lane in &mut self.lanes {
            lane.segmenter.finalize(reason, &mut lane.segments);
            lane.route_segments(out);
        }
    }

    /// What the lanes' decoders still hold (the stream ended).
    pub(super) fn flush(&mut self, audio: bool, out: &mut VecDeque<Output>) {
        self.carry.clear();
        for lane in &mut self.lanes {
            lane.pcm.clear();
            let _ = lane.decoder.finish(&mut lane.pcm);
            while lane.decoder.poll_event().is_some() {}
            lane.route(audio, out);
        }
    }

    pub(super) fn reconfigure(&mut self, cfg: &crate::SegmenterConfig) {
        for lane in &mut self.lanes {
            lane.segmenter.reconfigure(cfg.clone());
        }
    }
}

impl Lane {
    fn route(&mut self, audio: bool, out: &mut VecDeque<Output>) {
        if self.pcm.is_empty() {
            return;
        }
        let start = self.samples;
        self.samples += self.pcm.len() as u64;
        if audio {
            out.push_back(Output::Audio(AudioChunk {
                start,
                pcm: Arc::from(self.pcm.as_slice()),
                party: Some(self.party),
            }));
        }
        self.segmenter.push(&self.pcm, &mut self.segments);
        self.route_segments(out);
    }

    fn route_segments(&mut self, out: &mut VecDeque<Output>) {
        let party = Some(self.party);
        for segment in self.segments.drain(..) {
            let event = match segment {
                Segment::Started { utterance, start } => ServerEvent::SpeechStarted {
                    utterance,
                    timestamp: seconds(start),
                    party,
                },
                Segment::Ended {
                    utterance,
                    start,
                    end,
                    reason,
                } => ServerEvent::UtteranceEnd {
                    utterance,
                    start: seconds(start),
                    end: seconds(end),
                    reason,
                    party,
                },
            };
            out.push_back(Output::Event(event));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Input, Session};

    fn stereo(max_parties: u8) -> Session {
        let source = SourceFormat::Linear16 {
            sample_rate: 16_000,
            channels: 2,
        };
        let mut cfg = SessionConfig::new("p", source);
        cfg.wants_audio = true;
        cfg.max_parties = max_parties;
        Session::new(cfg).unwrap()
    }

    /// Frames of caller 1000, agent -1000, sent in messages that split a frame.
    fn feed(s: &mut Session) -> Vec<AudioChunk> {
        let frame: Vec<u8> = [1000i16, -1000]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let bytes: Vec<u8> = frame.iter().copied().cycle().take(4 * 1600).collect();
        #[allow(clippy::disallowed_methods)] // the test is the driver: it owns the clock
        let now = std::time::Instant::now();
        for part in bytes.chunks(1001) {
            s.handle_input(Input::Audio { now, data: part }).unwrap();
        }
        std::iter::from_fn(|| s.poll_output())
            .filter_map(|o| match o {
                Output::Audio(c) => Some(c),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_stereo_stream_is_split_into_its_parties_and_the_mix() {
        let chunks = feed(&mut stereo(2));
        let of = |p: Option<Party>| -> Vec<i16> {
            let mine = chunks.iter().filter(|c| c.party == p);
            mine.flat_map(|c| c.pcm.iter().copied()).collect()
        };
        let (caller, agent, mix) = (of(Some(Party::Caller)), of(Some(Party::Agent)), of(None));
        assert_eq!((caller.len(), agent.len(), mix.len()), (1600, 1600, 1600));
        assert!(caller.iter().all(|&v| v == 1000), "the caller is channel 0");
        assert!(agent.iter().all(|&v| v == -1000), "the agent is channel 1");
        assert!(mix.iter().all(|&v| v.abs() <= 1), "the mix is unchanged");
    }

    #[test]
    fn parties_are_capped_and_off_by_default() {
        let lanes = |n| {
            let chunks = feed(&mut stereo(n));
            let mut parties: Vec<_> = chunks.iter().filter_map(|c| c.party).collect();
            parties.sort_by_key(|p| p.as_str());
            parties.dedup();
            parties
        };
        assert_eq!(lanes(0), []);
        assert_eq!(lanes(1), [Party::Caller]);
        assert_eq!(lanes(9), [Party::Agent, Party::Caller]);
    }
}

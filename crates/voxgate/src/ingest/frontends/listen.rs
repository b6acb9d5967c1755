//! voxgate's own protocol on `/v1/listen`: binary audio, JSON control, JSON events. Device Opus
//! with `seq=1` frames each packet with a sequence number so that losses can be concealed.

use std::collections::HashMap;

use axum::extract::ws::Message;
use bytes::Bytes;
use voxgate_session::ServerEvent;

use super::{Action, Frontend};

/// voxgate's own protocol on `/v1/listen`: binary audio, JSON control, JSON events.
/// With `seq_header`, each binary message starts with a big-endian u32 sequence number
/// (device Opus); a gap in the numbers is concealed with `frame_samples` per lost packet (Opus
/// packet-loss concealment from the decoder's state).
pub struct Listen {
    pub seq: Option<SeqHeader>,
}

/// Sequence-number framing for device packets.
pub struct SeqHeader {
    pub frame_samples: u64,
    pub next: Option<u32>,
}

/// Most packets concealed for one gap (a longer gap is a reset, not loss).
const MAX_LOST_PACKETS: u32 = 50;

impl Frontend for Listen {
    fn on_binary(&mut self, data: Bytes, out: &mut Vec<Action>) {
        let Some(seq) = &mut self.seq else {
            out.push(Action::Audio(data));
            return;
        };
        if data.is_empty() {
            return;
        }
        if data.len() < 4 {
            out.push(Action::Notice(ServerEvent::warning(
                "bad_packet",
                format!(
                    "a {}-byte message cannot hold the 4-byte sequence header; dropped",
                    data.len()
                ),
            )));
            return;
        }
        let n = u32::from_be_bytes([data[0], data[1], data[2], data[3]]);
        match seq.next {
            Some(expected) if n != expected => {
                let lost = n.wrapping_sub(expected);
                if lost > u32::MAX / 2 {
                    out.push(Action::Notice(ServerEvent::warning(
                        "late_packet",
                        format!("packet {n} arrived after {expected}; dropped"),
                    )));
                    return;
                }
                if lost <= MAX_LOST_PACKETS {
                    out.push(Action::Silence(u64::from(lost) * seq.frame_samples));
                }
                out.push(Action::Notice(ServerEvent::warning(
                    "packets_lost",
                    format!("{lost} packets lost before {n}; concealed"),
                )));
            }
            _ => {}
        }
        seq.next = Some(n.wrapping_add(1));
        out.push(Action::Audio(data.slice(4..)));
    }

    fn on_text(&mut self, text: &str, out: &mut Vec<Action>) {
        out.push(Action::ControlText(text.to_owned()));
    }

    fn render(&mut self, event: &ServerEvent, out: &mut Vec<Message>) {
        out.push(Message::Text(event.to_json().into()));
    }

    fn supports_resume(&self) -> bool {
        true
    }
}

impl Listen {
    /// The frontend for a connect query: with `seq=1`, each message starts with a 4-byte
    /// sequence number; `frame_ms` (2-120, default 20) sizes what a lost packet conceals.
    pub fn new(query: &HashMap<String, String>) -> Self {
        if !matches!(query.get("seq").map(String::as_str), Some("1" | "true")) {
            return Self { seq: None };
        }
        let frame_ms: u64 = query
            .get("frame_ms")
            .and_then(|v| v.parse().ok())
            .filter(|ms| (2..=120).contains(ms))
            .unwrap_or(20);
        Self {
            seq: Some(SeqHeader {
                frame_samples: frame_ms * u64::from(voxgate_session::SAMPLE_RATE) / 1000,
                next: None,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seq_listen() -> Listen {
        let q = [("seq", "1"), ("frame_ms", "20")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Listen::new(&q)
    }

    fn packet(n: u32, body: &[u8]) -> Bytes {
        let mut v = n.to_be_bytes().to_vec();
        v.extend_from_slice(body);
        Bytes::from(v)
    }

    #[test]
    fn without_seq_every_message_is_audio() {
        let mut l = Listen::new(&HashMap::new());
        let mut out = Vec::new();
        l.on_binary(Bytes::from_static(b"abc"), &mut out);
        assert!(matches!(&out[..], [Action::Audio(b)] if b.as_ref() == b"abc"));
    }

    #[test]
    fn a_sequence_gap_is_concealed_and_reported() {
        let mut l = seq_listen();
        let mut out = Vec::new();
        l.on_binary(packet(7, b"a"), &mut out);
        l.on_binary(packet(10, b"b"), &mut out);
        assert!(matches!(&out[0], Action::Audio(b) if b.as_ref() == b"a"));
        assert!(matches!(out[1], Action::Silence(640)), "{:?}", out[1]);
        assert!(
            matches!(&out[2], Action::Notice(ServerEvent::Warning { code, .. }) if code == "packets_lost")
        );
        assert!(matches!(&out[3], Action::Audio(b) if b.as_ref() == b"b"));
    }

    #[test]
    fn late_and_short_packets_are_dropped_with_a_warning() {
        let mut l = seq_listen();
        let mut out = Vec::new();
        l.on_binary(packet(5, b"a"), &mut out);
        out.clear();
        l.on_binary(packet(3, b"x"), &mut out);
        l.on_binary(Bytes::from_static(b"\x00\x01"), &mut out);
        let codes: Vec<_> = out
            .iter()
            .map(|a| match a {
                Action::Notice(ServerEvent::Warning { code, .. }) => code.as_str(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(codes, ["late_packet", "bad_packet"]);
    }

    #[test]
    fn a_gap_beyond_the_cap_is_reported_but_not_filled() {
        let mut l = seq_listen();
        let mut out = Vec::new();
        l.on_binary(packet(0, b"a"), &mut out);
        out.clear();
        l.on_binary(packet(1 + MAX_LOST_PACKETS + 1, b"b"), &mut out);
        assert!(!out.iter().any(|a| matches!(a, Action::Silence(_))));
    }
}

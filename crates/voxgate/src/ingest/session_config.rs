//! The `SessionConfig` of a new session: limits and segmenter from config, the source format and
//! resumability from the request, and where media time continues for a drained session or one
//! another gateway published on the bus.

use voxgate_media::SourceFormat;
use voxgate_session::{ContinuePoint, SessionConfig, MAX_PARTIES};

use super::handoff::HandoffState;
use super::request::{ConnectRequest, Endpoint};
use crate::bus::publish::Continuation;
use crate::config::Config;

/// Builds the session's config (pure). `resumable`: the client asked and its protocol can.
pub fn build(
    cfg: &Config,
    req: &ConnectRequest,
    session_id: &str,
    source: SourceFormat,
    resumable: bool,
    handoff: Option<&HandoffState>,
    bus: Option<&Continuation>,
) -> SessionConfig {
    let mut s = SessionConfig::new(session_id.to_owned(), source);
    s.limits = cfg.limits();
    s.segmenter = req.segmenter.clone().unwrap_or_else(|| cfg.segmenter());
    s.idle_timeout = req.idle_timeout.unwrap_or_else(|| cfg.idle_timeout());
    s.max_duration = cfg.max_session();
    s.gap_slack_samples = cfg.gap_fill.slack_samples();
    s.ack = resumable && req.resumable && cfg.server.resume_grace().is_some();
    // `fresh_recorder=true`: the client started a new recorder (a live microphone cannot resend
    // what it already sent), so nothing it sends is discarded; otherwise it resends from the start.
    let resend_from_start = !req.fresh_recorder;
    s.continue_at = match (bus, handoff) {
        (Some(cont), _) => Some(ContinuePoint {
            samples: cont.samples(),
            utterances: cont.utterances,
            resend_from_start,
        }),
        (None, Some(h)) => Some(ContinuePoint {
            samples: h.samples,
            utterances: h.utterances,
            resend_from_start,
        }),
        (None, None) => None,
    };
    s.max_parties = max_parties(cfg, req);
    s
}

/// Parties the session is split into: a carrier's stereo stream carries the caller and the
/// agent on its two channels (`carriers.max_parties` of them are kept apart); any other
/// session is one mix.
pub fn max_parties(cfg: &Config, req: &ConnectRequest) -> u8 {
    let stereo = match req.source {
        Ok(SourceFormat::Linear16 { channels, .. })
        | Ok(SourceFormat::Mulaw { channels, .. })
        | Ok(SourceFormat::Alaw { channels, .. }) => channels == 2,
        _ => false,
    };
    match req.endpoint {
        Endpoint::Carrier(_) if stereo => cfg.carriers.max_parties.min(MAX_PARTIES),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::request::Endpoint;

    fn req(pairs: &[(&str, &str)]) -> ConnectRequest {
        ConnectRequest::from_pairs(Endpoint::Listen, pairs)
    }

    #[test]
    fn acks_need_the_client_the_protocol_and_a_grace_period() {
        let mut cfg = Config::default();
        cfg.server.resume_grace_seconds = 5.0;
        let r = req(&[("resumable", "true")]);
        assert!(build(&cfg, &r, "s", SourceFormat::Auto, true, None, None).ack);
        assert!(!build(&cfg, &r, "s", SourceFormat::Auto, false, None, None).ack);
        assert!(!build(&cfg, &req(&[]), "s", SourceFormat::Auto, true, None, None).ack);
        cfg.server.resume_grace_seconds = 0.0;
        assert!(!build(&cfg, &r, "s", SourceFormat::Auto, true, None, None).ack);
    }

    #[test]
    fn a_continued_session_starts_where_it_stopped() {
        let cfg = Config::default();
        let h = HandoffState {
            session_id: "s".into(),
            uid: String::new(),
            samples: 16_000,
            utterances: 2,
            webhooks: Vec::new(),
            expires: 0,
            jti: "j".into(),
        };
        let s = build(
            &cfg,
            &req(&[("fresh_recorder", "1")]),
            "s",
            SourceFormat::Auto,
            true,
            Some(&h),
            None,
        );
        let at = s.continue_at.expect("continues");
        assert_eq!(
            (at.samples, at.utterances, at.resend_from_start),
            (16_000, 2, false)
        );
        let s = build(&cfg, &req(&[]), "s", SourceFormat::Auto, true, None, None);
        assert!(s.continue_at.is_none());
    }
}

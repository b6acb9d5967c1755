//! Resumable sessions within one instance: a live session parks when its socket drops and waits
//! up to its grace period; `/v1/listen?resume=<id>&resume_token=<t>[&resume_from=<byte>]` hands
//! it the new socket after the same admission as a new session (shutdown, per-IP rate, token).
//! `ResumeCursor` is the pure part: which resent bytes are duplicates, and
//! whether the first message after a resume starts a new recorder.

use axum::extract::ws::WebSocket;

use super::admission;
use super::client::split;
use super::refusal::{refuse, Refusal, RefuseReason};
use super::request::{ConnectRequest, ReattachRequest};
use crate::shared::Shared;

pub use crate::sessions::{Reattach, ResumeSlot};

/// Where a resumed client's stream stands against what the session already has.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ResumeCursor {
    /// Bytes the client resends that the session already has.
    skip_bytes: u64,
    /// The next message may start a new recorder (a container header).
    check_restart: bool,
}

/// What a resume position means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResumeFrom {
    /// At or before what was received: the difference is skipped.
    Ok,
    /// Past what was received: this many bytes are missing.
    Gap(u64),
}

impl ResumeCursor {
    /// A client resumed at stream byte `from` (`None`: where the server is); `have` bytes were
    /// received.
    pub fn resumed(&mut self, from: Option<u64>, have: u64) -> ResumeFrom {
        self.check_restart = true;
        self.skip_bytes = 0;
        match from {
            Some(from) if from < have => {
                self.skip_bytes = have - from;
                ResumeFrom::Ok
            }
            Some(from) if from > have => ResumeFrom::Gap(from - have),
            _ => ResumeFrom::Ok,
        }
    }

    /// How many leading bytes of this message are duplicates to discard.
    pub fn duplicates(&mut self, len: usize) -> usize {
        let dup = self.skip_bytes.min(len as u64);
        self.skip_bytes -= dup;
        dup as usize
    }

    /// Whether this (first, de-duplicated) message restarts the recorder: a WebM or Ogg header.
    /// Only the first message after a resume is checked.
    pub fn restarts_recorder(&mut self, data: &[u8]) -> bool {
        std::mem::take(&mut self.check_restart)
            && (data.starts_with(&[0x1A, 0x45, 0xDF, 0xA3]) || data.starts_with(b"OggS"))
    }
}

/// Admits a reconnecting client in the order new sessions are admitted (shutdown, per-IP
/// connection rate, token), without a capacity permit: the session holds one already. With
/// tokens the session is looked up in the token user's namespace, so only its owner (holding
/// the resume token too) can reattach.
fn admit(shared: &Shared, req: &ConnectRequest, ask: &ReattachRequest) -> Result<String, Refusal> {
    admission::open(shared)?;
    admission::rate(shared, req)?;
    let principal = admission::verify(shared, req)?;
    if let Some(p) = &principal {
        if p.session.as_ref().is_some_and(|sid| *sid != ask.session_id) {
            return Err(Refusal::new(
                RefuseReason::Forbidden,
                "this token is bound to another session_id",
            ));
        }
    }
    Ok(principal.map(|p| p.user).unwrap_or_default())
}

/// `/v1/listen?resume=...`: hands the socket to the live session, or refuses it.
pub async fn reattach(
    shared: &Shared,
    socket: WebSocket,
    req: &ConnectRequest,
    ask: ReattachRequest,
) {
    let peer = req.peer;
    let owner = match admit(shared, req, &ask) {
        Ok(owner) => owner,
        Err(refusal) => {
            let (sink, stream) = split(socket);
            return refuse(sink, stream, peer, refusal, None).await;
        }
    };
    let Some(tx) = shared.resumable.sender(&owner, &ask.session_id, &ask.token) else {
        let (sink, stream) = split(socket);
        let refusal = Refusal::new(
            RefuseReason::ResumeFailed,
            format!(
                "no resumable session {:?} with that token (ended, expired or never resumable)",
                ask.session_id
            ),
        );
        return refuse(sink, stream, peer, refusal, None).await;
    };
    if let Err(e) = tx.send((socket, ask.from)).await {
        let (sink, stream) = split((e.0).0);
        let refusal = Refusal::new(
            RefuseReason::ResumeFailed,
            "the session ended while resuming",
        );
        refuse(sink, stream, peer, refusal, None).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resent_bytes_are_skipped_exactly_once() {
        let mut c = ResumeCursor::default();
        assert_eq!(c.resumed(Some(100), 250), ResumeFrom::Ok);
        assert_eq!(c.duplicates(100), 100);
        assert_eq!(c.duplicates(100), 50);
        assert_eq!(c.duplicates(100), 0);
    }

    #[test]
    fn a_resume_past_the_end_is_a_gap() {
        let mut c = ResumeCursor::default();
        assert_eq!(c.resumed(Some(300), 250), ResumeFrom::Gap(50));
        assert_eq!(c.duplicates(10), 0);
        assert_eq!(c.resumed(None, 250), ResumeFrom::Ok);
        assert_eq!(c.duplicates(10), 0);
    }

    #[test]
    fn only_the_first_message_after_a_resume_may_restart_the_recorder() {
        let mut c = ResumeCursor::default();
        assert!(!c.restarts_recorder(b"OggS...."), "no resume yet");
        c.resumed(None, 0);
        assert!(c.restarts_recorder(&[0x1A, 0x45, 0xDF, 0xA3, 0x01]));
        assert!(!c.restarts_recorder(b"OggS...."), "checked once");
        c.resumed(None, 0);
        assert!(!c.restarts_recorder(b"\x00\x01"));
        assert!(!c.restarts_recorder(b"OggS"));
    }
}

//! Whose session this is: its id (a drained session's, the query's, the token's, or a new UUID),
//! its user, and the user's session slot. A token bound to a session may only create that one;
//! a drained session's state continues only its own user's session, and only once.

use metrics::counter;
use tracing::warn;

use super::handoff::{unix_now, HandoffState};
use super::refusal::{Refusal, RefuseReason};
use super::request::{valid_session_id, ConnectRequest};
use crate::auth::{Principal, UserSessions, UserSlot};
use crate::metrics as m;
use crate::sessions::{SpendError, SpentStates};

/// The session's identity before consumers are planned (the hook or the bus may set the uid).
#[derive(Debug)]
pub struct Identity {
    pub session_id: String,
    pub uid: String,
}

/// Resolves the session id and uid (pure).
pub fn resolve(
    req: &ConnectRequest,
    principal: Option<&Principal>,
    handoff: Option<&HandoffState>,
) -> Result<Identity, Refusal> {
    let session_id = match (handoff, &req.session_id) {
        (Some(h), _) => h.session_id.clone(),
        (None, Some(id)) if valid_session_id(id) => id.clone(),
        (None, Some(_)) => {
            return Err(Refusal::new(
                RefuseReason::InvalidSessionId,
                "session_id must be 1-128 characters of A-Z a-z 0-9 - _ . :",
            ))
        }
        (None, None) => match principal.and_then(|p| p.session.clone()) {
            Some(sid) if valid_session_id(&sid) => sid,
            _ => uuid::Uuid::new_v4().to_string(),
        },
    };
    if let Some(p) = principal {
        if p.session.as_ref().is_some_and(|sid| sid != &session_id) {
            return Err(Refusal::new(
                RefuseReason::Forbidden,
                "this token is bound to another session_id",
            ));
        }
        if handoff.is_some_and(|h| h.uid != p.user) {
            counter!(m::RESUME_STATES_REFUSED, "reason" => "foreign").increment(1);
            return Err(Refusal::new(
                RefuseReason::Forbidden,
                "this resume_state belongs to another user",
            ));
        }
    }
    let uid = match (principal, handoff) {
        (Some(p), _) => p.user.clone(),
        (None, Some(h)) => h.uid.clone(),
        (None, None) => req.uid.clone().unwrap_or_default(),
    };
    Ok(Identity { session_id, uid })
}

/// Spends a drained session's state: it continues one session only.
pub fn spend(spent: &SpentStates, handoff: Option<&HandoffState>) -> Result<(), Refusal> {
    let Some(h) = handoff else { return Ok(()) };
    spent.spend(&h.jti, h.expires, unix_now()).map_err(|e| {
        let reason = match e {
            SpendError::Replayed => "replayed",
            SpendError::Full => "spent_set_full",
        };
        counter!(m::RESUME_STATES_REFUSED, "reason" => reason).increment(1);
        Refusal::new(RefuseReason::ResumeFailed, e.to_string())
    })
}

/// With a bus, a drained session's state is spent deployment-wide instead (a create-only key in
/// the records bucket), so no other instance continues it again.
pub async fn spend_on_bus(
    bus: &crate::bus::Bus,
    handoff: Option<&HandoffState>,
) -> Result<(), Refusal> {
    let Some(h) = handoff else { return Ok(()) };
    match bus
        .spend_once(&format!("_spent_resume_state.{}", h.jti))
        .await
    {
        Ok(true) => Ok(()),
        Ok(false) => {
            counter!(m::RESUME_STATES_REFUSED, "reason" => "replayed").increment(1);
            Err(Refusal::new(
                RefuseReason::ResumeFailed,
                SpendError::Replayed.to_string(),
            ))
        }
        Err(e) => {
            warn!(error = %e, "cannot spend a resume_state on the bus");
            Err(Refusal::new(
                RefuseReason::BusUnavailable,
                "the delivery bus is unavailable; retry later",
            ))
        }
    }
}

/// Takes one of the token user's session slots (`None` without tokens).
pub fn user_slot(
    users: &UserSessions,
    principal: Option<&Principal>,
    max: usize,
) -> Result<Option<UserSlot>, Refusal> {
    let Some(p) = principal else { return Ok(None) };
    users.acquire(&p.user, max).map(Some).ok_or_else(|| {
        Refusal::new(
            RefuseReason::UserOverCapacity,
            format!("user already has {max} live sessions; retry after one ends"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::request::Endpoint;

    fn req(pairs: &[(&str, &str)]) -> ConnectRequest {
        ConnectRequest::from_pairs(Endpoint::Listen, pairs)
    }

    fn principal(user: &str, session: Option<&str>) -> Principal {
        Principal {
            user: user.into(),
            session: session.map(str::to_owned),
            sessions: Vec::new(),
            consumers: None,
            owner: None,
            stt: None,
            record: None,
        }
    }

    #[test]
    fn the_query_names_the_session_and_the_token_names_the_user() {
        let p = principal("alice", None);
        let who = resolve(
            &req(&[("session_id", "s1"), ("uid", "bob")]),
            Some(&p),
            None,
        )
        .unwrap();
        assert_eq!((who.session_id.as_str(), who.uid.as_str()), ("s1", "alice"));
        let who = resolve(&req(&[("uid", "bob")]), None, None).unwrap();
        assert_eq!(who.uid, "bob");
        assert_eq!(who.session_id.len(), 36, "a new UUID");
    }

    #[test]
    fn a_session_bound_token_creates_only_its_session() {
        let p = principal("alice", Some("mine"));
        assert_eq!(
            resolve(&req(&[]), Some(&p), None).unwrap().session_id,
            "mine"
        );
        let e = resolve(&req(&[("session_id", "other")]), Some(&p), None).unwrap_err();
        assert_eq!(e.reason, RefuseReason::Forbidden);
    }

    #[test]
    fn a_drained_session_keeps_its_id_and_user() {
        let h = HandoffState {
            session_id: "drained".into(),
            uid: "carol".into(),
            samples: 0,
            utterances: 0,
            webhooks: Vec::new(),
            expires: 0,
            jti: "j".into(),
        };
        let who = resolve(&req(&[("session_id", "x"), ("uid", "bob")]), None, Some(&h)).unwrap();
        assert_eq!(
            (who.session_id.as_str(), who.uid.as_str()),
            ("drained", "carol")
        );
    }

    #[test]
    fn a_drained_state_continues_only_its_own_users_session() {
        let h = HandoffState {
            session_id: "drained".into(),
            uid: "carol".into(),
            samples: 0,
            utterances: 0,
            webhooks: Vec::new(),
            expires: u64::MAX,
            jti: "j1".into(),
        };
        let e = resolve(&req(&[]), Some(&principal("bob", None)), Some(&h)).unwrap_err();
        assert_eq!(e.reason, RefuseReason::Forbidden);
        let e = resolve(&req(&[]), Some(&principal("carol", Some("x"))), Some(&h)).unwrap_err();
        assert_eq!(e.reason, RefuseReason::Forbidden, "sid respected");
        assert!(resolve(&req(&[]), Some(&principal("carol", None)), Some(&h)).is_ok());
        let spent = SpentStates::new(4);
        spend(&spent, Some(&h)).unwrap();
        assert_eq!(
            spend(&spent, Some(&h)).unwrap_err().reason,
            RefuseReason::ResumeFailed
        );
    }

    #[test]
    fn bad_ids_and_full_users_are_refused() {
        let e = resolve(&req(&[("session_id", "a/b")]), None, None).unwrap_err();
        assert_eq!(e.reason, RefuseReason::InvalidSessionId);
        let users = UserSessions::default();
        let p = principal("dan", None);
        let slot = user_slot(&users, Some(&p), 1).unwrap();
        assert!(slot.is_some());
        let e = user_slot(&users, Some(&p), 1).unwrap_err();
        assert_eq!(e.reason, RefuseReason::UserOverCapacity);
        assert!(user_slot(&users, None, 1).unwrap().is_none());
    }
}

//! `prepare`: from an accepted `ConnectRequest` to everything a `Connection` runs with, as a
//! pipeline of named steps: admission, handoff, identity, consumer plan, bus record, session
//! config, registration, consumers.

use std::sync::Arc;

use voxgate_session::Session;

use super::driver::{Guards, Parts};
use super::frontends::Frontend;
use super::handoff::HandoffState;
use super::plan::{self, ConsumerPlan};
use super::refusal::{Refusal, RefuseReason};
use super::request::ConnectRequest;
use super::{admission, identity, session_config};
use crate::auth::Principal;
use crate::bus::session::{self as bus_session, BusSession, OpenError, Opening};
use crate::config::Config;
use crate::fanout::registry::{BuildCtx, Consumers};
use crate::fanout::subscribers::Hub;
use crate::fanout::webhook::{Target, WebhookHandle};
use crate::fanout::Notifier;
use crate::sessions::{ResumableEntry, ResumeSlot, SessionEntry};
use crate::shared::Shared;

/// Events consumers may queue for their session before further ones are dropped (counted).
const NOTICE_QUEUE: usize = 64;

/// Builds a connection's session and consumers, or says why not.
pub async fn prepare(
    shared: &Shared,
    req: &ConnectRequest,
    frontend: &mut dyn Frontend,
) -> Result<Parts, Refusal> {
    let cfg = &shared.cfg;
    let admitted = match frontend.take_admission() {
        Some(admitted) => admitted,
        None => admission::admit(shared, req)?,
    };
    let principal = admitted.principal.as_ref();
    let source = req
        .source
        .clone()
        .map_err(|e| Refusal::new(RefuseReason::UnsupportedEncoding, e))?;
    let handoff = handoff(cfg, req)?;
    let who = identity::resolve(req, principal, handoff.as_ref())?;
    let user_slot = identity::user_slot(&shared.users, principal, cfg.auth.max_sessions_per_user)?;
    // With a bus the state is spent there (deployment-wide; a bus outage burns nothing).
    match &shared.bus {
        Some(bus) => identity::spend_on_bus(bus, handoff.as_ref()).await?,
        None => identity::spend(&shared.spent_states, handoff.as_ref())?,
    }
    let plan = plan::choose(shared, req, principal, handoff.as_ref(), frontend).await?;
    let uid = plan.hook_uid.clone().unwrap_or(who.uid);
    let bus = open_bus(shared, &who.session_id, &uid, principal.is_some(), &plan).await?;
    let uid = bus.as_ref().map_or(uid, |b| b.record.uid.clone());
    let session_cfg = session_config::build(
        cfg,
        req,
        &who.session_id,
        source,
        frontend.supports_resume(),
        handoff.as_ref(),
        bus.as_ref().and_then(|b| b.continuation.as_ref()),
    );
    let session = Session::new(session_cfg.clone())
        .map_err(|e| Refusal::new(RefuseReason::InvalidParameters, e.to_string()))?;
    let live = register(shared, principal, &who.session_id, &uid, session_cfg.ack)?;
    let target = Target {
        session_id: who.session_id,
        uid,
    };
    let (notifier, notices) = Notifier::channel(NOTICE_QUEUE);
    let ctx = BuildCtx {
        cfg,
        target: &target,
        notifier: &notifier,
        client: shared.webhook_client(plan.from_hook),
        breakers: &shared.breakers,
    };
    let owner = principal.map_or("", |p| p.user.as_str());
    frontend.on_session(owner, &target);
    let continuation = frontend.recording_continuation();
    let recorder = plan
        .record
        .then(|| recorder(shared, owner, &target, continuation));
    let mut consumers = build_consumers(
        shared,
        &ctx,
        plan,
        frontend,
        bus,
        handoff.as_ref(),
        live.hub,
    );
    // After speech-to-text, so it hears the final transcripts they send back as they finish;
    // before the bus publisher, which is always last.
    if let Some(r) = recorder {
        consumers.push(r);
    }
    frontend.on_registered(consumers.hub());
    Ok(Parts {
        session,
        consumers,
        notices,
        resume: live.resume,
        guards: Guards {
            session: live.entry,
            resumable: live.resumable,
            user_slot,
            permit: admitted.permit,
        },
    })
}

/// A session registered with the instance: its hub (for subscribers), its entry in the session
/// map, and with acks its resume slot.
struct Live {
    hub: Arc<Hub>,
    entry: SessionEntry,
    resumable: Option<ResumableEntry>,
    resume: Option<ResumeSlot>,
}

/// Registers the session id in its owner's namespace (refused when it is live already) and, with
/// acks, its resume slot. The owner is the token's user (empty without tokens); the hub's owner,
/// who may watch it, is that user (the uid without tokens).
fn register(
    shared: &Shared,
    principal: Option<&Principal>,
    id: &str,
    uid: &str,
    ack: bool,
) -> Result<Live, Refusal> {
    let subs = &shared.cfg.subscribers;
    let owner = principal.map_or("", |p| p.user.as_str());
    let hub = Arc::new(Hub::new(
        subs.max_per_session,
        subs.queue_messages,
        principal.map_or(uid, |p| p.user.as_str()).to_owned(),
    ));
    let entry = shared
        .sessions
        .register(owner, id, hub.clone())
        .ok_or_else(|| {
            Refusal::new(
                RefuseReason::SessionIdInUse,
                format!("session {id:?} is already live"),
            )
        })?;
    let (resumable, resume) = match shared.cfg.server.resume_grace().filter(|_| ack) {
        Some(grace) => {
            let (entry, slot) = shared.resumable.register(owner, id, grace);
            (Some(entry), Some(slot))
        }
        None => (None, None),
    };
    Ok(Live {
        hub,
        entry,
        resumable,
        resume,
    })
}

/// The session's recorder, writing under its owner's namespace (the token's user).
fn recorder(
    shared: &Shared,
    owner: &str,
    target: &Target,
    continuation: Option<crate::fanout::recorder::Continuation>,
) -> Box<dyn crate::fanout::Consumer> {
    Box::new(crate::fanout::recorder::Recorder::spawn(
        Arc::new(shared.cfg.recording.clone()),
        shared.recordings.clone(),
        crate::fanout::recorder::RecordingTarget {
            owner: owner.to_owned(),
            session_id: target.session_id.clone(),
            uid: target.uid.clone(),
            continuation,
        },
    ))
}

/// A session drained from another instance, continued here (`resume_state=`).
fn handoff(cfg: &Config, req: &ConnectRequest) -> Result<Option<HandoffState>, Refusal> {
    match (&req.resume_state, &cfg.server.resume_secret) {
        (None, _) => Ok(None),
        (Some(_), None) => Err(Refusal::new(
            RefuseReason::ResumeFailed,
            "this instance has no server.resume_secret; cannot continue a drained session",
        )),
        (Some(token), Some(secret)) => HandoffState::verify(token, secret)
            .map(Some)
            .map_err(|why| Refusal::new(RefuseReason::ResumeFailed, why.to_string())),
    }
}

/// With a bus, the session's sinks are frozen in its record; a record that exists (another
/// gateway ran the session and went away) is continued from what the stream holds.
async fn open_bus(
    shared: &Shared,
    session_id: &str,
    uid: &str,
    authenticated: bool,
    plan: &ConsumerPlan,
) -> Result<Option<BusSession>, Refusal> {
    let Some(bus) = &shared.bus else {
        return Ok(None);
    };
    let opening = Opening {
        session_id,
        uid,
        authenticated,
        from_hook: plan.from_hook,
        webhooks: &plan.webhooks,
        stt: &plan.stt,
    };
    bus_session::open(bus, opening)
        .await
        .map(Some)
        .map_err(|e| {
            let reason = match &e {
                OpenError::Unavailable(_) => RefuseReason::BusUnavailable,
                OpenError::BatchTooLong(_) => RefuseReason::InvalidConsumer,
                OpenError::Forbidden(_) => RefuseReason::Forbidden,
                OpenError::Ended(_) => RefuseReason::SessionEnded,
            };
            Refusal::new(reason, e.to_string())
        })
}

/// The session's consumers in their order: audio webhooks (only those with a delay exist; with a
/// bus they are the bus publisher's), the frontend's own, speech-to-text, and the bus publisher
/// last.
fn build_consumers(
    shared: &Shared,
    ctx: &BuildCtx<'_>,
    plan: ConsumerPlan,
    frontend: &mut dyn Frontend,
    bus: Option<BusSession>,
    handoff: Option<&HandoffState>,
    hub: Arc<Hub>,
) -> Consumers {
    let mut consumers = Consumers::new(hub);
    let via_bus = bus.is_some();
    for w in plan.webhooks {
        if w.delay_seconds.is_none() || via_bus {
            continue;
        }
        let first_seq = handoff
            .and_then(|h| h.webhooks.iter().find(|(n, _)| *n == w.name))
            .map_or(0, |(_, seq)| *seq);
        let breaker = shared.breakers.get(&w.url);
        consumers.push(Box::new(WebhookHandle::spawn(
            w,
            ctx.target.clone(),
            ctx.client.clone(),
            breaker,
            first_seq,
        )));
    }
    for c in frontend.extra_consumers(ctx) {
        consumers.push(c);
    }

    // Lookback for speech-to-text: `SpeechStarted` reaches back by pre-roll + onset.
    let seg = &shared.cfg.segmenter;
    let lookback = seg.pre_roll_samples() + seg.min_speech_samples() + 512;
    let mut stt = Vec::new();
    crate::fanout::stt::build(
        crate::fanout::stt::Selection {
            backends: plan.stt,
            asked: &plan.stt_options,
            parties: &plan.stt_parties,
        },
        &shared.http,
        lookback,
        ctx.target,
        ctx.notifier,
        via_bus,
        &mut stt,
    );
    for c in stt {
        consumers.push(c);
    }
    if let (Some(b), Some(bus)) = (bus, &shared.bus) {
        consumers.set_last(Box::new(crate::bus::publish::BusPublisher::spawn(
            bus.clone(),
            b.subjects,
            Arc::new(b.record),
            b.continuation.unwrap_or_default(),
            ctx.notifier.clone(),
            b.created,
        )));
    }
    consumers
}

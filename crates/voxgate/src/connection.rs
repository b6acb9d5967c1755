//! One task per connection drives one `Session`: reads the socket, feeds the session, and
//! dispatches its outputs to the client writer and the consumers without ever awaiting a consumer.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures_util::{SinkExt, StreamExt};
use metrics::{counter, gauge};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{info, warn};
use voxgate_media::SourceFormat;
use voxgate_session::{
    CloseCode, ConsumerSummary, Input, Output, ServerEvent, Session, SessionConfig, UtteranceReason,
};

use crate::config::WebhookConfig;
use crate::fanout::subscribers::Hub;
use crate::fanout::webhook::{Target, WebhookHandle};
use crate::fanout::{Consumer, Offer};

/// Events consumers may queue for their session before further ones are dropped (counted).
const NOTICE_QUEUE: usize = 64;
use crate::frontend::{Action, Frontend, Listen, SeqHeader};
use crate::hook;
use crate::metrics as m;
use crate::server::AppState;

/// What the upgrade request carried.
pub struct ListenParams {
    /// `listen`, `twilio` or `omi` (a closed label set).
    pub endpoint: &'static str,
    pub query: HashMap<String, String>,
    pub token: Option<String>,
    pub peer: SocketAddr,
}

/// Omi consumers besides audio webhooks, from the hook (per user) or the config.
#[derive(Default)]
struct OmiTargets {
    transcript_webhook: Option<String>,
    conversation_webhook: Option<String>,
}

/// A refusal before the session starts: an `Error` event, then a close with a reason.
pub(crate) struct Refusal {
    code: u16,
    error: &'static str,
    message: String,
}

impl Refusal {
    pub(crate) fn new(code: u16, error: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            error,
            message: message.into(),
        }
    }
}

/// Maps the connect query to a source format. Containers are autodetected.
pub fn source_format(query: &HashMap<String, String>) -> Result<SourceFormat, String> {
    let num = |key: &str, default: u32| -> Result<u32, String> {
        match query.get(key) {
            None => Ok(default),
            Some(v) => v
                .parse::<u32>()
                .map_err(|_| format!("{key}={v:?} is not a number")),
        }
    };
    let encoding = query.get("encoding").map(|s| s.to_ascii_lowercase());
    let channels = || -> Result<u8, String> {
        let c = num("channels", 1)?;
        u8::try_from(c).map_err(|_| format!("channels={c} is out of range"))
    };
    match encoding.as_deref() {
        None | Some("" | "auto" | "webm" | "ogg" | "opus_container") => Ok(SourceFormat::Auto),
        Some(name) => match RAW_ENCODINGS.iter().find(|(names, ..)| names.contains(&name)) {
            Some((_, default_rate, make)) => Ok(make(num("sample_rate", *default_rate)?, channels()?)),
            None => Err(format!(
                "unsupported encoding {name:?}; use opus, linear16, float32, linear8, mulaw, alaw, or omit it for WebM/Ogg"
            )),
        },
    }
}

/// Raw encodings: the names a client may use, the default sample rate, and the format.
type MakeFormat = fn(u32, u8) -> SourceFormat;
const RAW_ENCODINGS: &[(&[&str], u32, MakeFormat)] = &[
    (&["opus"], 48_000, |sample_rate, channels| {
        SourceFormat::Opus {
            sample_rate,
            channels,
        }
    }),
    (
        &["linear16", "pcm_s16le", "pcm16"],
        16_000,
        |sample_rate, channels| SourceFormat::Linear16 {
            sample_rate,
            channels,
        },
    ),
    (
        &["float32", "linear32", "pcm_f32le"],
        16_000,
        |sample_rate, channels| SourceFormat::Float32 {
            sample_rate,
            channels,
        },
    ),
    (
        &["linear8", "pcm8", "pcm_u8"],
        8_000,
        |sample_rate, channels| SourceFormat::Linear8 {
            sample_rate,
            channels,
        },
    ),
    (
        &["mulaw", "ulaw", "pcm_mulaw"],
        8_000,
        |sample_rate, channels| SourceFormat::Mulaw {
            sample_rate,
            channels,
        },
    ),
    (&["alaw", "pcm_alaw"], 8_000, |sample_rate, channels| {
        SourceFormat::Alaw {
            sample_rate,
            channels,
        }
    }),
];

/// Device Opus with `seq=1`: each message starts with a 4-byte sequence number; `frame_ms`
/// (default 20) sizes the silence that conceals a lost packet.
fn seq_header(query: &HashMap<String, String>) -> Option<SeqHeader> {
    if !matches!(query.get("seq").map(String::as_str), Some("1" | "true")) {
        return None;
    }
    let frame_ms: u64 = query
        .get("frame_ms")
        .and_then(|v| v.parse().ok())
        .filter(|ms| (2..=120).contains(ms))
        .unwrap_or(20);
    Some(SeqHeader {
        frame_samples: frame_ms * 16,
        next: None,
    })
}

pub(crate) fn valid_session_id(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
}

/// Drives one `/v1/listen` connection from upgrade to close.
pub async fn run(state: Arc<AppState>, socket: WebSocket, params: ListenParams) {
    let (sink, stream) = socket.split();
    match prepare(&state, &params).await {
        Ok(prepared) => {
            let frontend = Box::new(Listen {
                seq: seq_header(&params.query),
            });
            drive(state, sink, stream, prepared, frontend, "listen").await
        }
        Err(refusal) => refuse(sink, stream, &params, refusal).await,
    }
}

pub(crate) async fn refuse(
    mut sink: WsSink,
    mut stream: WsStream,
    params: &ListenParams,
    refusal: Refusal,
) {
    counter!(m::SESSIONS_REJECTED, "reason" => refusal.error).increment(1);
    counter!(m::CLIENT_ERRORS, "code" => refusal.error).increment(1);
    counter!(m::CLOSES, "code" => refusal.code.to_string()).increment(1);
    info!(peer = %params.peer, error = refusal.error, message = %refusal.message, "connection refused");
    let event = ServerEvent::error(refusal.error, refusal.message.clone());
    // Send failures mean the client is already gone; the refusal is counted and logged above.
    let _ = sink.send(Message::Text(event.to_json().into())).await;
    let _ = sink
        .send(Message::Close(Some(CloseFrame {
            code: refusal.code,
            reason: truncate_reason(&refusal.message).into(),
        })))
        .await;
    await_peer_close(&mut stream).await;
}

/// After our Close frame, reads until the peer's Close (or a short timeout), so that closing the
/// TCP connection with unread client data does not reset it and lose the Close frame.
pub(crate) async fn await_peer_close(stream: &mut futures_util::stream::SplitStream<WebSocket>) {
    let _ = tokio::time::timeout(Duration::from_secs(3), async {
        loop {
            match stream.next().await {
                Some(Ok(Message::Close(_))) | None => break,
                Some(Ok(_)) => {}
                Some(Err(_)) => {
                    // The read side is unusable (e.g. an oversized message); linger briefly so
                    // the peer reads our Close before the connection is torn down.
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    break;
                }
            }
        }
    })
    .await;
}

pub(crate) struct Prepared {
    session: Session,
    consumers: Vec<Box<dyn Consumer>>,
    /// Events consumers send back (transcripts, backend trouble), bounded.
    notices: mpsc::Receiver<ServerEvent>,
    pub(crate) hub: Arc<Hub>,
    resume: Option<Resume>,
    _user_slot: Option<crate::auth::UserSlot>,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

pub(crate) async fn prepare(
    state: &Arc<AppState>,
    params: &ListenParams,
) -> Result<Prepared, Refusal> {
    let cfg = &state.cfg;
    if state.shutdown.is_cancelled() {
        return Err(Refusal::new(
            1013,
            "shutting_down",
            "server is shutting down; retry on another instance",
        ));
    }
    if let Err(retry) = state
        .rate
        .check(params.peer.ip(), std::time::Instant::now())
    {
        return Err(Refusal::new(
            1013,
            "rate_limited",
            format!(
                "too many new connections from this address; retry after {} ms",
                retry.as_millis().max(1)
            ),
        ));
    }
    let principal = state
        .auth
        .verify(params.token.as_deref())
        .map_err(|why| Refusal::new(1008, "unauthorized", why))?;
    let permit = state.permits.clone().try_acquire_owned().map_err(|_| {
        Refusal::new(
            1013,
            "over_capacity",
            format!(
                "server at capacity ({} sessions); retry later",
                cfg.server.max_sessions
            ),
        )
    })?;
    let source =
        source_format(&params.query).map_err(|e| Refusal::new(1003, "unsupported_encoding", e))?;
    // A session drained from another instance, continued here.
    let handoff = match (params.query.get("resume_state"), &cfg.server.resume_secret) {
        (None, _) => None,
        (Some(_), None) => {
            return Err(Refusal::new(
                1008,
                "resume_failed",
                "this instance has no server.resume_secret; cannot continue a drained session",
            ))
        }
        (Some(token), Some(secret)) => Some(
            crate::handoff::HandoffState::verify(token, secret)
                .map_err(|why| Refusal::new(1008, "resume_failed", why))?,
        ),
    };
    let session_id = match params.query.get("session_id") {
        _ if handoff.is_some() => handoff.as_ref().expect("checked").session_id.clone(),
        Some(id) if valid_session_id(id) => id.clone(),
        Some(_) => {
            return Err(Refusal::new(
                1008,
                "invalid_session_id",
                "session_id must be 1-128 characters of A-Z a-z 0-9 - _ . :",
            ))
        }
        None => match principal.as_ref().and_then(|p| p.session.clone()) {
            Some(sid) if valid_session_id(&sid) => sid,
            _ => uuid::Uuid::new_v4().to_string(),
        },
    };
    // A token bound to a session may only create that session; the token's user is the uid.
    let user_slot = match &principal {
        Some(p) => {
            if p.session.as_ref().is_some_and(|sid| sid != &session_id) {
                return Err(Refusal::new(
                    1008,
                    "forbidden",
                    "this token is bound to another session_id",
                ));
            }
            let max = cfg.auth.max_sessions_per_user;
            Some(state.users.acquire(&p.user, max).ok_or_else(|| {
                Refusal::new(
                    1013,
                    "user_over_capacity",
                    format!("user already has {max} live sessions; retry after one ends"),
                )
            })?)
        }
        None => None,
    };

    // Consumers: the configured default set, a named selection, or the on_connect hook's answer.
    let mut uid = match (&principal, &handoff) {
        (Some(p), _) => p.user.clone(),
        (None, Some(h)) => h.uid.clone(),
        (None, None) => params.query.get("uid").cloned().unwrap_or_default(),
    };
    let from_hook = cfg.on_connect.is_some();
    let omi = params.endpoint == "omi";
    let app = |url: &String, i: usize| {
        Arc::new(WebhookConfig::new(
            &format!("audio_app_{i}"),
            url,
            Some(cfg.omi.audio_app_delay_seconds),
        ))
    };
    let mut omi_targets = OmiTargets {
        transcript_webhook: cfg.omi.transcript_webhook.clone(),
        conversation_webhook: cfg.omi.conversation_webhook.clone(),
    };
    let mut hook_stt: Option<Vec<String>> = None;
    let mut webhook_cfgs: Vec<Arc<WebhookConfig>> = if let Some(h) = &handoff {
        let mut chosen = Vec::new();
        for (name, _) in &h.webhooks {
            let w = cfg
                .webhooks
                .iter()
                .find(|w| &w.name == name)
                .ok_or_else(|| {
                    Refusal::new(
                        1008,
                        "resume_failed",
                        format!("webhook {name:?} of the drained session is not configured here"),
                    )
                })?;
            chosen.push(Arc::new(w.clone()));
        }
        chosen
    } else if let Some(hook_cfg) = &cfg.on_connect {
        let answer = hook::on_connect(&state.http, hook_cfg, params, params.endpoint)
            .await
            .map_err(|e| Refusal::new(1011, "on_connect_failed", e))?;
        if !answer.allow {
            return Err(Refusal::new(
                1008,
                "rejected",
                answer
                    .reason
                    .unwrap_or_else(|| "rejected by on_connect hook".into()),
            ));
        }
        if let (Some(u), None) = (answer.uid, &principal) {
            uid = u;
        }
        hook_stt = answer.stt;
        // Per-user URLs come from outside: check them against the webhook policy.
        let mut urls: Vec<&String> = answer.webhooks.iter().map(|w| &w.url).collect();
        urls.extend(answer.audio_apps.iter());
        urls.extend(answer.transcript_webhook.iter());
        urls.extend(answer.conversation_webhook.iter());
        for url in urls {
            cfg.webhook_policy
                .check_url(url)
                .await
                .map_err(|why| Refusal::new(1008, "webhook_denied", why))?;
        }
        let mut errors = Vec::new();
        for (i, w) in answer.webhooks.iter().enumerate() {
            w.validate(&format!("on_connect.webhooks[{i}]"), &mut errors);
        }
        if !errors.is_empty() {
            return Err(Refusal::new(1011, "on_connect_invalid", errors.join("; ")));
        }
        if omi {
            omi_targets = OmiTargets {
                transcript_webhook: answer.transcript_webhook.clone(),
                conversation_webhook: answer.conversation_webhook.clone(),
            };
        }
        let mut list: Vec<Arc<WebhookConfig>> = answer.webhooks.into_iter().map(Arc::new).collect();
        if omi {
            list.extend(answer.audio_apps.iter().enumerate().map(|(i, u)| app(u, i)));
        }
        list
    } else if let Some(names) = params.query.get("consumers") {
        let mut chosen = Vec::new();
        for name in names.split(',').filter(|n| !n.is_empty()) {
            let w = cfg
                .webhooks
                .iter()
                .find(|w| w.name == name)
                .ok_or_else(|| {
                    Refusal::new(
                        1008,
                        "unknown_consumer",
                        format!("no consumer named {name:?}"),
                    )
                })?;
            chosen.push(Arc::new(w.clone()));
        }
        chosen
    } else {
        cfg.webhooks
            .iter()
            .filter(|w| w.default)
            .map(|w| Arc::new(w.clone()))
            .collect()
    };
    if let Some(allowed) = principal.as_ref().and_then(|p| p.consumers.as_ref()) {
        if let Some(w) = webhook_cfgs.iter().find(|w| !allowed.contains(&w.name)) {
            if params.query.contains_key("consumers") {
                return Err(Refusal::new(
                    1008,
                    "forbidden",
                    format!("this token may not use consumer {:?}", w.name),
                ));
            }
        }
        webhook_cfgs.retain(|w| allowed.contains(&w.name));
    }
    if omi && cfg.on_connect.is_none() {
        webhook_cfgs.extend(
            cfg.omi
                .audio_apps
                .iter()
                .enumerate()
                .map(|(i, u)| app(u, i)),
        );
    }

    // The hook's choice wins over the connect query's.
    let stt_backends = match &hook_stt {
        Some(names) => state.stt.select(Some(&names.join(","))),
        None => state.stt.select(params.query.get("stt")),
    }
    .map_err(|e| Refusal::new(1008, "unknown_stt", e))?;

    // With a bus, the session's sinks are frozen in its record; a record that exists (another
    // gateway ran the session and went away) is continued from what the stream holds.
    let bus_session = match &state.bus {
        None => None,
        Some(bus) => Some(
            bus_session(
                bus,
                &session_id,
                &uid,
                principal.is_some(),
                from_hook,
                &webhook_cfgs,
                &stt_backends,
            )
            .await?,
        ),
    };
    if let Some(b) = &bus_session {
        uid = b.record.uid.clone();
    }
    let mut session_cfg = SessionConfig::new(session_id.clone(), source);
    session_cfg.limits = cfg.limits();
    session_cfg.segmenter = cfg.segmenter();
    session_cfg.idle_timeout = cfg.idle_timeout();
    session_cfg.max_duration = cfg.max_session();
    let grace = cfg.server.resume_grace_seconds;
    let wants_resume = matches!(
        params.query.get("resumable").map(String::as_str),
        Some("true" | "1")
    );
    session_cfg.ack = wants_resume && grace > 0.0 && params.endpoint == "listen";
    // `fresh_recorder=true`: the client started a new recorder (a live microphone cannot resend
    // what it already sent), so nothing it sends is discarded; otherwise it resends from the start.
    let fresh = matches!(
        params.query.get("fresh_recorder").map(String::as_str),
        Some("true" | "1")
    );
    session_cfg.continue_at = handoff.as_ref().map(|h| voxgate_session::ContinuePoint {
        samples: h.samples,
        utterances: h.utterances,
        resend_from_start: !fresh,
    });
    if let Some(cont) = bus_session.as_ref().and_then(|b| b.continuation.as_ref()) {
        session_cfg.continue_at = Some(voxgate_session::ContinuePoint {
            samples: cont.samples(),
            utterances: cont.utterances,
            resend_from_start: !fresh,
        });
    }
    let session = Session::new(session_cfg.clone())
        .map_err(|e| Refusal::new(1008, "invalid_parameters", e.to_string()))?;

    let hub = Arc::new(Hub::new(
        cfg.subscribers.max_per_session,
        cfg.subscribers.queue_messages,
        uid.clone(),
    ));
    {
        let mut sessions = state
            .sessions
            .lock()
            .expect("session map lock is never poisoned");
        if sessions.contains_key(&session_id) {
            return Err(Refusal::new(
                1008,
                "session_id_in_use",
                format!("session {session_id:?} is already live"),
            ));
        }
        sessions.insert(session_id.clone(), hub.clone());
    }
    let resume = if session_cfg.ack {
        let token = uuid::Uuid::new_v4().simple().to_string();
        let (tx, rx) = mpsc::channel(1);
        state
            .resumable
            .lock()
            .expect("resumable map lock is never poisoned")
            .insert(session_id.clone(), (token.clone(), tx));
        Some(Resume {
            token,
            grace: Duration::from_secs_f64(grace),
            rx,
        })
    } else {
        None
    };
    // Only webhooks with a delay exist; absent delay = no consumer, no buffer.
    let (notifier, notices) = mpsc::channel(NOTICE_QUEUE);
    let mut consumers: Vec<Box<dyn Consumer>> = Vec::new();
    let target = Target {
        session_id: session_id.clone(),
        uid: uid.clone(),
    };
    let via_bus = bus_session.is_some();
    for w in webhook_cfgs
        .into_iter()
        .filter(|w| w.delay_seconds.is_some() && !via_bus)
    {
        let breaker = state.breakers.get(&w.url);
        let client = if from_hook {
            state.http_guarded.clone()
        } else {
            state.http.clone()
        };
        let first_seq = handoff
            .as_ref()
            .and_then(|h| h.webhooks.iter().find(|(n, _)| *n == w.name))
            .map_or(0, |(_, seq)| *seq);
        consumers.push(Box::new(WebhookHandle::spawn(
            w,
            target.clone(),
            client,
            breaker,
            first_seq,
        )));
    }
    if omi {
        crate::omi::consumers(
            state,
            &target,
            omi_targets.transcript_webhook,
            omi_targets.conversation_webhook,
            &notifier,
            if from_hook {
                &state.http_guarded
            } else {
                &state.http
            },
            &mut consumers,
        );
    }
    // Lookback for speech-to-text: `SpeechStarted` reaches back by pre-roll + onset.
    let lookback = (cfg.segmenter.pre_roll_ms + cfg.segmenter.min_speech_ms) * 16 + 512;
    crate::fanout::stt::build(
        stt_backends,
        &state.http,
        lookback,
        &target,
        &notifier,
        via_bus,
        &mut consumers,
    );
    // The bus publisher comes last: at close it still sees the others' last transcripts.
    if let (Some(b), Some(bus)) = (bus_session, &state.bus) {
        consumers.push(Box::new(crate::bus::publish::BusPublisher::spawn(
            bus.clone(),
            b.subjects,
            Arc::new(b.record),
            b.continuation.unwrap_or_default(),
            notifier.clone(),
            b.created,
        )));
    }
    drop(notifier); // consumers that talk back get a clone
    Ok(Prepared {
        session,
        consumers,
        notices,
        hub,
        resume,
        _permit: permit,
        _user_slot: user_slot,
    })
}

struct BusSession {
    subjects: crate::bus::Subjects,
    record: crate::bus::SessionRecord,
    /// Whether this gateway created the record (else it continues the session).
    created: bool,
    continuation: Option<crate::bus::publish::Continuation>,
}

/// Freezes a new session's sinks in the bus, or loads and continues an existing record.
async fn bus_session(
    bus: &crate::bus::Bus,
    session_id: &str,
    uid: &str,
    authenticated: bool,
    from_hook: bool,
    webhooks: &[Arc<WebhookConfig>],
    stt: &[Arc<crate::fanout::stt::Backend>],
) -> Result<BusSession, Refusal> {
    let unavailable = |e: crate::bus::BusError| {
        warn!(session = %session_id, error = %e, "bus unavailable at session start");
        Refusal::new(
            1013,
            "bus_unavailable",
            "the delivery bus is unavailable; retry later",
        )
    };
    let subjects = crate::bus::Subjects::new(&bus.cfg, session_id);
    let key = subjects.record_key();
    let audio: Vec<WebhookConfig> = webhooks
        .iter()
        .filter(|w| w.delay_seconds.is_some())
        .map(|w| (**w).clone())
        .collect();
    if let Some(w) = audio.iter().find(|w| {
        w.delay_seconds
            .is_some_and(|d| d > crate::bus::MAX_BATCH_SECONDS)
    }) {
        return Err(Refusal::new(
            1008,
            "invalid_consumer",
            format!(
                "webhook {:?}: delay_seconds must be <= {} with the delivery bus",
                w.name,
                crate::bus::MAX_BATCH_SECONDS
            ),
        ));
    }
    let record = crate::bus::SessionRecord {
        session_id: session_id.to_owned(),
        uid: uid.to_owned(),
        tenant: bus.cfg.tenant.clone(),
        audio,
        transcripts: stt
            .iter()
            .filter_map(|b| {
                Some(crate::bus::TranscriptTarget {
                    backend: b.cfg.name.clone(),
                    url: b.cfg.transcript_webhook.clone()?,
                    timeout_ms: b.cfg.timeout_ms,
                })
            })
            .collect(),
        from_hook,
        ended: false,
    };
    if bus
        .create_record(&key, &record)
        .await
        .map_err(unavailable)?
    {
        return Ok(BusSession {
            subjects,
            record,
            created: true,
            continuation: None,
        });
    }
    let existing = bus
        .record(&key)
        .await
        .map_err(unavailable)?
        .ok_or_else(|| unavailable(crate::bus::BusError::Nats("session record vanished".into())))?;
    // With tokens, only the session's own user may continue it (its audio goes to that user's
    // sinks).
    if authenticated && existing.uid != uid {
        return Err(Refusal::new(
            1008,
            "forbidden",
            format!("session {session_id:?} belongs to another user"),
        ));
    }
    if existing.ended {
        return Err(Refusal::new(
            1008,
            "session_ended",
            format!("session {session_id:?} already ended; use a new session_id"),
        ));
    }
    let cont = crate::bus::publish::Continuation::read(bus, &subjects, &existing)
        .await
        .map_err(unavailable)?;
    info!(session = %session_id, samples = cont.samples(), utterances = cont.utterances, "continuing a bus session started elsewhere");
    Ok(BusSession {
        subjects,
        record: existing,
        created: false,
        continuation: Some(cont),
    })
}

pub(crate) fn truncate_reason(reason: &str) -> String {
    // A close reason must fit in a control frame (123 bytes).
    let mut end = reason.len().min(120);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    reason[..end].to_owned()
}

pub(crate) type WsSink = futures_util::stream::SplitSink<WebSocket, Message>;
pub(crate) type WsStream = futures_util::stream::SplitStream<WebSocket>;

/// Applies a frontend's actions to the session.
fn apply(
    session: &mut Session,
    action: Action,
    ctx: &mut Dispatch<'_>,
) -> Result<(), voxgate_session::SessionError> {
    let now = Instant::now().into_std();
    match action {
        Action::Audio(data) => session.handle_input(Input::Audio { now, data: &data }),
        Action::Control(kind) => {
            let text = format!(r#"{{"type":"{kind}"}}"#);
            session.handle_input(Input::Text { now, text: &text })
        }
        Action::ControlText(text) => session.handle_input(Input::Text { now, text: &text }),
        Action::Silence(samples) => {
            counter!(m::GAP_SAMPLES).increment(samples);
            session.handle_input(Input::Silence { now, samples })
        }
        Action::Reply(msg) => {
            ctx.send(msg);
            Ok(())
        }
        Action::Notice(event) => {
            ctx.event(&event);
            Ok(())
        }
        Action::Violation {
            code,
            error,
            message,
        } => session.handle_input(Input::Violation {
            code,
            error,
            message: &message,
        }),
    }
}

/// Where session outputs go: the client writer (through the frontend) and the subscribers.
struct Dispatch<'a> {
    out_tx: &'a mpsc::Sender<Message>,
    frontend: &'a dyn Frontend,
    hub: &'a Hub,
    client_gone: bool,
    client_slow: bool,
}

impl Dispatch<'_> {
    fn send(&mut self, msg: Message) {
        if !self.client_gone && self.out_tx.try_send(msg).is_err() {
            self.client_slow = true;
        }
    }

    fn event(&mut self, event: &ServerEvent) {
        observe(event);
        self.hub.publish_event(&event.to_json());
        if let Some(msg) = self.frontend.render(event) {
            self.send(msg);
        }
    }
}

pub(crate) async fn drive(
    state: Arc<AppState>,
    sink: WsSink,
    mut stream: WsStream,
    prepared: Prepared,
    mut frontend: Box<dyn Frontend>,
    endpoint: &'static str,
) {
    let Prepared {
        mut session,
        mut consumers,
        mut notices,
        hub,
        resume,
        _permit,
        _user_slot,
    } = prepared;
    let consumers_want_audio = |c: &[Box<dyn Consumer>]| c.iter().any(|c| c.wants_audio());
    let id = session.id().to_owned();
    gauge!(m::SESSIONS_ACTIVE).increment(1.0);
    counter!(m::SESSIONS_TOTAL, "endpoint" => endpoint).increment(1);
    info!(session = %id, endpoint, consumers = consumers.len(), "session started");

    // The client writer: a bounded queue; a client that does not read its events is closed.
    // A resumed session hands the writer the new socket's sink.
    let (out_tx, mut out_rx) = mpsc::channel::<Message>(state.cfg.server.client_queue_messages);
    let (sink_tx, mut sink_rx) = mpsc::channel::<WsSink>(1);
    let writer = tokio::spawn(async move {
        let mut sink = Some(sink);
        loop {
            tokio::select! {
                biased;
                Some(new) = sink_rx.recv() => {
                    if let Some(mut old) = sink.replace(new) {
                        let _ = old.close().await;
                    }
                }
                msg = out_rx.recv() => {
                    let Some(msg) = msg else { break };
                    let is_close = matches!(msg, Message::Close(_));
                    if let Some(s) = sink.as_mut() {
                        if s.send(msg).await.is_err() {
                            sink = None; // gone; events wait for nobody until a resume
                        }
                    }
                    if is_close {
                        break;
                    }
                }
            }
        }
        if let Some(mut s) = sink {
            let _ = s.close().await;
        }
    });

    let now = || Instant::now().into_std();
    session.start(now());
    let shutdown = state.shutdown.clone();
    let mut format_label: &'static str = "";
    let mut counted_samples = 0u64;
    let mut actions: Vec<Action> = Vec::new();
    let mut client_gone = false;
    // After a resume, a container header in the first message means a new recorder.
    let mut check_restart = false;
    // Bytes a resumed client resends that the session already has.
    let mut skip_bytes = 0u64;
    // Message flood guard: one token bucket per connection.
    let flood = crate::auth::RateLimiter::new(state.cfg.server.max_messages_per_second);
    let flood_key = std::net::IpAddr::from([0, 0, 0, 0]);
    let mut resume = resume;
    if let Some(r) = &resume {
        let event = ServerEvent::Resumable {
            session_id: id.clone(),
            resume_token: r.token.clone(),
            grace_seconds: r.grace.as_secs_f64(),
        };
        if let Some(msg) = frontend.render(&event) {
            out_tx
                .try_send(msg)
                .expect("the client queue (capacity >= 1) is empty before the first event");
        }
    }
    let (code, reason, mut summary) = 'session: loop {
        let mut ctx = Dispatch {
            out_tx: &out_tx,
            frontend: frontend.as_ref(),
            hub: &hub,
            client_gone,
            client_slow: false,
        };
        while let Some(out) = session.poll_output() {
            match out {
                Output::Event(event) => {
                    if let ServerEvent::Started { format, .. } = &event {
                        format_label = session.format().map(|f| f.name()).unwrap_or("");
                        info!(session = %id, format = %format, "format detected");
                    }
                    for c in consumers.iter_mut() {
                        c.on_event(&event);
                    }
                    ctx.event(&event);
                }
                Output::Audio(chunk) => {
                    for c in consumers.iter_mut().filter(|c| c.wants_audio()) {
                        if let Offer::Dropped { first: true } = c.on_audio(&chunk) {
                            ctx.event(&ServerEvent::warning(
                                "consumer_dropping",
                                format!(
                                    "consumer {:?} is not keeping up; audio is being dropped",
                                    c.name()
                                ),
                            ));
                        }
                    }
                    hub.publish_audio(&chunk.pcm);
                }
                Output::Close {
                    code,
                    reason,
                    summary,
                } => break 'session (code, reason, summary),
            }
        }
        // Decoded audio is counted whether or not any consumer takes it.
        let decoded = session.stats().samples;
        if decoded > counted_samples {
            m::add_audio_samples(format_label, decoded - counted_samples);
            counted_samples = decoded;
        }
        if ctx.client_slow && !session.is_closed() {
            client_gone = true; // the writer queue is full; stop writing, but flush consumers
            warn!(session = %id, "client is not reading its events; closing");
            let _ = session.handle_input(Input::Violation {
                code: CloseCode::Policy,
                error: "client_too_slow",
                message: "client did not read its events; closing",
            });
            continue;
        }
        let deadline = session.poll_timeout();
        // Biased: input already waiting is read before an idle deadline can fire (an overloaded
        // server must not mistake its own lag for an idle client).
        let wake = tokio::select! {
            biased;
            () = shutdown.cancelled() => Wake::Shutdown,
            Some(event) = notices.recv() => Wake::Notice(event),
            Some(socket) = recv_reattach(&mut resume) => Wake::Reattach(Box::new(socket)),
            msg = stream.next() => match msg {
                Some(Ok(Message::Binary(data))) => Wake::Binary(data),
                Some(Ok(Message::Text(text))) => Wake::Text(text.as_str().to_owned()),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => Wake::Nothing,
                Some(Ok(Message::Close(_))) | None => Wake::Gone,
                Some(Err(e)) => Wake::Broken(e.to_string()),
            },
            () = sleep_until_opt(deadline) => Wake::Timeout,
        };
        // A resumable session waits for its client instead of closing when the socket drops.
        let wake = match wake {
            Wake::Gone | Wake::Broken(_) if resume.is_some() && !shutdown.is_cancelled() => {
                let r = resume.as_mut().expect("checked is_some");
                info!(session = %id, grace = ?r.grace, "client disconnected; waiting for a resume");
                tokio::select! {
                    Some(socket) = r.rx.recv() => Wake::Reattach(Box::new(socket)),
                    () = tokio::time::sleep(r.grace) => Wake::Gone,
                    () = shutdown.cancelled() => Wake::Shutdown,
                }
            }
            other => other,
        };
        let wake = match wake {
            Wake::Binary(_) | Wake::Text(_)
                if flood.check(flood_key, std::time::Instant::now()).is_err() =>
            {
                counter!(m::SESSIONS_REJECTED, "reason" => "message_flood").increment(1);
                Wake::Flood
            }
            other => other,
        };
        let result = match wake {
            Wake::Flood => {
                let message = format!(
                    "more than {} messages per second (server.max_messages_per_second)",
                    state.cfg.server.max_messages_per_second
                );
                session.handle_input(Input::Violation {
                    code: CloseCode::Policy,
                    error: "message_flood",
                    message: &message,
                })
            }
            Wake::Binary(mut data) => {
                counter!(m::BYTES_IN).increment(data.len() as u64);
                if skip_bytes > 0 {
                    // Exact duplicates of what was received before the reconnect.
                    let dup = skip_bytes.min(data.len() as u64);
                    skip_bytes -= dup;
                    counter!(m::RESUME_DUPLICATES).increment(dup);
                    data = data.slice(dup as usize..);
                    if data.is_empty() {
                        continue;
                    }
                }
                if std::mem::take(&mut check_restart)
                    && session.format().is_some()
                    && (data.starts_with(&[0x1A, 0x45, 0xDF, 0xA3]) || data.starts_with(b"OggS"))
                {
                    info!(session = %id, "resumed client restarted its recorder; decoding afresh");
                    if let Err(e) = session.restart_stream() {
                        warn!(session = %id, error = %e, "could not restart the decoder");
                    }
                }
                frontend.on_binary(data, &mut actions);
                Ok(())
            }
            Wake::Text(text) => {
                frontend.on_text(&text, &mut actions);
                Ok(())
            }
            Wake::Nothing => Ok(()),
            Wake::Gone => {
                client_gone = true;
                session.handle_input(Input::PeerClosed)
            }
            Wake::Broken(text) => {
                let (code, error) = if text.contains("too long")
                    || text.contains("too big")
                    || text.contains("Space limit")
                {
                    (CloseCode::TooBig, "message_too_large")
                } else {
                    (CloseCode::Policy, "protocol_error")
                };
                let message = if code == CloseCode::TooBig {
                    format!(
                        "message larger than server.max_message_bytes ({} bytes)",
                        state.cfg.server.max_message_bytes
                    )
                } else {
                    format!("WebSocket protocol error: {text}")
                };
                session.handle_input(Input::Violation {
                    code,
                    error,
                    message: &message,
                })
            }
            Wake::Timeout => session.handle_input(Input::Timeout { now: now() }),
            Wake::Shutdown => session.handle_input(Input::Shutdown),
            // The bus consumer's buffer overflowed: close with 1013 so the client retries.
            Wake::Notice(ServerEvent::Error { code, message }) if code == "bus_unavailable" => {
                session.handle_input(Input::Violation {
                    code: CloseCode::TryAgainLater,
                    error: "bus_unavailable",
                    message: &message,
                })
            }
            Wake::Notice(event) => {
                actions.push(Action::Notice(event));
                Ok(())
            }
            Wake::Reattach(reattach) => {
                let (socket, from) = *reattach;
                let (new_sink, new_stream) = socket.split();
                let have = session.bytes_in();
                skip_bytes = 0;
                match from {
                    Some(from) if from < have => skip_bytes = have - from,
                    Some(from) if from > have => actions.push(Action::Notice(ServerEvent::warning(
                        "resume_gap",
                        format!("resume_from {from} is past the {have} bytes received; {} bytes are missing", from - have),
                    ))),
                    _ => {}
                }
                stream = new_stream;
                if sink_tx.send(new_sink).await.is_err() {
                    warn!(session = %id, "client writer ended; the resumed socket gets no events");
                }
                check_restart = true;
                counter!(m::SESSIONS_TOTAL, "endpoint" => "resume").increment(1);
                info!(session = %id, bytes = session.bytes_in(), "session resumed");
                actions.push(Action::Notice(ServerEvent::Resumed {
                    session_id: id.clone(),
                    bytes: session.bytes_in(),
                    samples: session.stats().samples,
                }));
                Ok(())
            }
        };
        if let Err(e) = result {
            warn!(session = %id, error = %e, "session input refused");
        }
        let mut ctx = Dispatch {
            out_tx: &out_tx,
            frontend: frontend.as_ref(),
            hub: &hub,
            client_gone,
            client_slow: false,
        };
        if !actions.is_empty() {
            // A subscriber that wants audio may have joined since the last message.
            session.set_wants_audio(consumers_want_audio(&consumers) || hub.wants_audio());
        }
        for action in actions.drain(..) {
            if session.is_closed() {
                break;
            }
            if let Action::Notice(event) = &action {
                for c in consumers.iter_mut() {
                    c.on_event(event);
                }
            }
            if let Err(e) = apply(&mut session, action, &mut ctx) {
                warn!(session = %id, error = %e, "session input refused");
            }
        }
    };
    if resume.is_some() {
        state
            .resumable
            .lock()
            .expect("resumable map lock is never poisoned")
            .remove(&id);
    }

    if summary.samples_decoded > counted_samples {
        m::add_audio_samples(format_label, summary.samples_decoded - counted_samples);
    }
    // Flush consumers: everything accepted is delivered or counted as dropped.
    let flush = Duration::from_secs_f64(if state.shutdown.is_cancelled() {
        state.cfg.server.shutdown_grace_seconds * 0.8
    } else {
        state.cfg.server.close_flush_seconds
    });
    let deadline = Instant::now() + flush;
    let mut summaries: Vec<ConsumerSummary> = Vec::new();
    // In order: the last words of one consumer (e.g. final transcripts of speech-to-text) reach
    // the consumers after it (the bus publisher comes last), then subscribers and the client.
    let mut pending: std::collections::VecDeque<Box<dyn Consumer>> = consumers.into();
    let mut last_words = Vec::new();
    while let Some(mut c) = pending.pop_front() {
        c.on_close(code.as_u16());
        summaries.push(c.finish(deadline).await);
        while let Ok(event) = notices.try_recv() {
            for rest in pending.iter_mut() {
                rest.on_event(&event);
            }
            last_words.push(event);
        }
    }
    let mut ctx = Dispatch {
        out_tx: &out_tx,
        frontend: frontend.as_ref(),
        hub: &hub,
        client_gone,
        client_slow: false,
    };
    for event in &last_words {
        ctx.event(event);
    }
    summary.consumers = summaries;
    // A drained resumable session can continue on another instance of the deployment.
    let resume_state = match (&state.cfg.server.resume_secret, &resume) {
        (Some(secret), Some(r)) if code == CloseCode::GoingAway => Some(
            crate::handoff::HandoffState {
                session_id: id.clone(),
                uid: hub.owner().to_owned(),
                samples: summary.samples_decoded,
                utterances: summary.utterances,
                webhooks: summary
                    .consumers
                    .iter()
                    .filter(|c| c.kind == "webhook")
                    .map(|c| (c.name.clone(), c.next_seq))
                    .collect(),
                expires: 0,
            }
            .expiring_in(r.grace.as_secs_f64().max(60.0))
            .sign(secret),
        ),
        _ => None,
    };
    let closed = ServerEvent::Closed {
        session_id: id.clone(),
        code: code.as_u16(),
        reason: reason.clone(),
        summary: summary.clone(),
        resume_state,
    };
    hub.publish_event(&closed.to_json());
    hub.close();
    state
        .sessions
        .lock()
        .expect("session map lock is never poisoned")
        .remove(&id);
    if !client_gone {
        if let Some(msg) = frontend.render(&closed) {
            if out_tx.try_send(msg).is_err() {
                counter!(m::CLIENT_ERRORS, "code" => "closed_undelivered").increment(1);
                warn!(session = %id, "client event queue full; Closed not delivered to the client");
            }
        }
        // A full queue was counted just above; the writer still closes the socket when
        // `out_tx` drops, only without this code and reason.
        let _ = out_tx.try_send(Message::Close(Some(CloseFrame {
            code: code.as_u16(),
            reason: truncate_reason(&reason).into(),
        })));
    }
    drop(out_tx);
    let _ = tokio::time::timeout(Duration::from_secs(5), writer).await;
    if !client_gone {
        await_peer_close(&mut stream).await;
    }
    counter!(m::CLOSES, "code" => code.as_u16().to_string()).increment(1);
    gauge!(m::SESSIONS_ACTIVE).decrement(1.0);
    info!(session = %id, code = code.as_u16(), %reason, seconds = summary.seconds_decoded,
        decode_errors = summary.decode_errors, resyncs = summary.resyncs, "session closed");
}

/// A resumable session's token and the channel that brings it a reconnecting client's socket.
pub(crate) struct Resume {
    token: String,
    grace: Duration,
    rx: mpsc::Receiver<Reattach>,
}

/// A reconnecting client's socket and the stream byte its first message starts at (`None`:
/// where the server is, as `Resumed` says).
pub(crate) type Reattach = (WebSocket, Option<u64>);

/// What woke the connection task.
enum Wake {
    Binary(bytes::Bytes),
    Text(String),
    Nothing,
    Gone,
    Broken(String),
    Timeout,
    Shutdown,
    Notice(ServerEvent),
    Reattach(Box<Reattach>),
    /// Messages arrive faster than `server.max_messages_per_second`.
    Flood,
}

async fn recv_reattach(resume: &mut Option<Resume>) -> Option<Reattach> {
    match resume {
        Some(r) => r.rx.recv().await,
        None => std::future::pending().await,
    }
}

/// `/v1/listen?resume=<session_id>&resume_token=<token>`: hands the socket to the live session.
pub async fn resume(state: Arc<AppState>, socket: WebSocket, params: ListenParams) {
    let id = params.query.get("resume").cloned().unwrap_or_default();
    let token = params
        .query
        .get("resume_token")
        .cloned()
        .unwrap_or_default();
    let from = params
        .query
        .get("resume_from")
        .and_then(|v| v.parse::<u64>().ok());
    let target = {
        let map = state
            .resumable
            .lock()
            .expect("resumable map lock is never poisoned");
        map.get(&id)
            .filter(|(t, _)| constant_time_eq(t.as_bytes(), token.as_bytes()))
            .map(|(_, tx)| tx.clone())
    };
    let Some(tx) = target else {
        let (sink, stream) = socket.split();
        let refusal = Refusal::new(
            1008,
            "resume_failed",
            format!(
                "no resumable session {id:?} with that token (ended, expired or never resumable)"
            ),
        );
        return refuse(sink, stream, &params, refusal).await;
    };
    if let Err(e) = tx.send((socket, from)).await {
        let (sink, stream) = (e.0).0.split();
        let refusal = Refusal::new(1008, "resume_failed", "the session ended while resuming");
        refuse(sink, stream, &params, refusal).await;
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Metrics for events that matter to operators.
fn observe(event: &ServerEvent) {
    match event {
        ServerEvent::SpeechStarted { .. } => counter!(m::UTTERANCES).increment(1),
        ServerEvent::UtteranceEnd {
            reason: UtteranceReason::Limit,
            ..
        } => counter!(m::UTTERANCE_LIMIT).increment(1),
        ServerEvent::Warning { code, message } => match code.as_str() {
            "decode_error" => {
                counter!(m::DECODE_ERRORS).increment(1);
                warn!(%message, "decode error");
            }
            "stream_truncated" => info!(%message, "stream ended inside an element"),
            "decode_resynced" => {
                counter!(m::RESYNCS).increment(1);
                warn!(%message, "demuxer resynced");
            }
            _ => {}
        },
        ServerEvent::Error { code, message } => {
            counter!(m::CLIENT_ERRORS, "code" => code.clone()).increment(1);
            warn!(%code, %message, "error sent to client");
        }
        _ => {}
    }
}

async fn sleep_until_opt(deadline: Option<std::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(Instant::from_std(d)).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn encodings_map_to_formats_with_their_default_rates() {
        assert!(matches!(source_format(&q(&[])), Ok(SourceFormat::Auto)));
        assert!(matches!(
            source_format(&q(&[("encoding", "WEBM")])),
            Ok(SourceFormat::Auto)
        ));
        assert!(matches!(
            source_format(&q(&[("encoding", "opus")])),
            Ok(SourceFormat::Opus {
                sample_rate: 48_000,
                channels: 1
            })
        ));
        assert!(matches!(
            source_format(&q(&[("encoding", "pcm16"), ("channels", "2")])),
            Ok(SourceFormat::Linear16 {
                sample_rate: 16_000,
                channels: 2
            })
        ));
        assert!(matches!(
            source_format(&q(&[("encoding", "ulaw"), ("sample_rate", "16000")])),
            Ok(SourceFormat::Mulaw {
                sample_rate: 16_000,
                channels: 1
            })
        ));
        assert!(matches!(
            source_format(&q(&[("encoding", "pcm_alaw")])),
            Ok(SourceFormat::Alaw {
                sample_rate: 8_000,
                ..
            })
        ));
        let err = source_format(&q(&[("encoding", "mp3")])).unwrap_err();
        assert!(err.contains("unsupported encoding \"mp3\""), "{err}");
        let err = source_format(&q(&[("encoding", "linear16"), ("channels", "300")])).unwrap_err();
        assert!(err.contains("channels=300"), "{err}");
        let err =
            source_format(&q(&[("encoding", "linear16"), ("sample_rate", "fast")])).unwrap_err();
        assert!(err.contains("sample_rate"), "{err}");
    }
}

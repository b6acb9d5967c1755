//! `Shared`: what every connection of one gateway instance shares, each field with why it exists.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::fanout::webhook::Breakers;
use crate::metrics as m;
use crate::sessions::{ResumableRegistry, SessionRegistry, SpentStates};

/// State shared by every connection of the instance.
pub struct Shared {
    /// The validated config; never changes while running.
    pub cfg: Config,
    /// Renders `/metrics` (the recorder is installed once per process).
    pub metrics: PrometheusHandle,

    // --- admission: what a new connection must get past ---
    /// Verifies tokens (off on loopback by default, required elsewhere).
    pub auth: crate::auth::Authenticator,
    /// New connections per IP per second, so one address cannot monopolize admission.
    pub rate: crate::auth::RateLimiter,
    /// Live sessions per user, so one user cannot take every permit.
    pub users: crate::auth::UserSessions,
    /// One permit per live session (`server.max_sessions`): the memory bound of the instance.
    pub permits: Arc<Semaphore>,

    // --- registries: live sessions of this instance ---
    /// Session id -> subscriber hub: for `subscribe`, and to refuse a second live session id.
    pub sessions: SessionRegistry,
    /// Resumable sessions: their token and the channel that hands them a reconnecting socket.
    pub resumable: ResumableRegistry,
    /// Drained-session states already continued here (single use, `auth.spent_resume_states_max`).
    pub spent_states: SpentStates,

    // --- outbound: shared by every session's consumers ---
    /// For operator-configured URLs (config webhooks, STT backends): no redirects.
    pub http: reqwest::Client,
    /// For webhooks from the `on_connect` hook (URLs from outside): guarded DNS, no redirects.
    pub http_guarded: reqwest::Client,
    /// Per-endpoint circuit breakers, so a dead endpoint is not hammered by every session.
    pub breakers: Breakers,
    /// Speech-to-text backends: concurrency limits and health, shared by all sessions.
    pub stt: crate::fanout::stt::Registry,
    /// The delivery bus, when `[bus] url` is set.
    pub bus: Option<crate::bus::Bus>,
    /// Where recorded sessions go and are fetched from (`[recording]`).
    pub recordings: crate::recording::Store,
    /// Omi `audio_timeline=2` timelines kept between sockets (`omi.reconnect_*`).
    pub omi_timelines: Arc<crate::omi_timelines::ledger::Ledger>,

    // --- lifecycle ---
    /// Cancelled on SIGTERM/SIGINT: sessions drain (flush, `Reconnect`, close 1001).
    pub shutdown: CancellationToken,
    /// Every connection task, so shutdown can wait for their flush within the grace period.
    pub tracker: TaskTracker,
    /// `/readyz`: false once draining.
    pub ready: AtomicBool,
}

/// How long an outbound connection may take to open, and an idle pooled one is kept.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const POOL_IDLE: Duration = Duration::from_secs(30);

impl Shared {
    /// Builds the shared state: HTTP clients, auth, rate limits, STT registry, metrics recorder.
    pub fn new(
        cfg: Config,
        shutdown: CancellationToken,
        bus: Option<crate::bus::Bus>,
    ) -> anyhow::Result<Arc<Self>> {
        let client = || {
            reqwest::Client::builder()
                .connect_timeout(CONNECT_TIMEOUT)
                .pool_idle_timeout(POOL_IDLE)
                .redirect(reqwest::redirect::Policy::none())
        };
        let http = client().build()?;
        let http_guarded = crate::policy::guarded(client(), &cfg.webhook_policy).build()?;
        let recordings = crate::recording::Store::open(&cfg.recording)?;
        Ok(Arc::new(Self {
            auth: crate::auth::Authenticator::new(&cfg.auth, &cfg.server.listen),
            rate: crate::auth::RateLimiter::new(cfg.auth.connections_per_ip_per_second),
            users: crate::auth::UserSessions::default(),
            permits: Arc::new(Semaphore::new(cfg.server.max_sessions)),
            sessions: SessionRegistry::default(),
            resumable: ResumableRegistry::default(),
            spent_states: SpentStates::new(cfg.auth.spent_resume_states_max),
            stt: crate::fanout::stt::Registry::new(&cfg.stt),
            http,
            http_guarded,
            breakers: Breakers::new(cfg.webhook_policy.max_tracked_endpoints),
            bus,
            recordings,
            omi_timelines: Arc::new(crate::omi_timelines::ledger::Ledger::new(
                cfg.omi.reconnect_timelines_max,
                cfg.omi.reconnect(),
            )),
            metrics: m::install(),
            shutdown,
            tracker: TaskTracker::new(),
            ready: AtomicBool::new(true),
            cfg,
        }))
    }

    /// The client for a session's webhooks: guarded when their URLs came from the hook.
    pub fn webhook_client(&self, from_hook: bool) -> &reqwest::Client {
        if from_hook {
            &self.http_guarded
        } else {
            &self.http
        }
    }
}

//! The consumer plan: which audio webhooks and speech-to-text backends a session gets. One of four
//! sources decides the webhooks (a drained session's own, the `on_connect` hook's answer, the
//! query's `consumers=`, or the configured defaults), then a token's consumer list restricts
//! them. Everything but the hook call is pure.

use std::sync::Arc;

use super::frontends::Frontend;
use super::handoff::HandoffState;
use super::hook::{self, HookAnswer};
use super::refusal::{Refusal, RefuseReason};
use super::request::ConnectRequest;
use crate::auth::Principal;
use crate::config::{Config, OnConnectConfig, WebhookConfig};
use crate::fanout::stt::Backend;
use crate::shared::Shared;

/// What a session's consumers will be.
pub struct ConsumerPlan {
    /// Audio webhooks (those without a delay build no consumer).
    pub webhooks: Vec<Arc<WebhookConfig>>,
    pub stt: Vec<Arc<Backend>>,
    /// What the session asks of its speech-to-text backends (token claim, hook, then query).
    pub stt_options: crate::config::SttOptions,
    /// Whose speech each chosen backend transcribes (`parties=caller,agent,mix`; `None`: the
    /// mix, the default and all a session not split into parties has).
    pub stt_parties: Vec<Option<voxgate_session::Party>>,
    /// The user the hook named (only when no token names one).
    pub hook_uid: Option<String>,
    /// Whether the session is recorded: the token's `record` claim, else the hook's answer,
    /// else `recording.default`.
    pub record: bool,
    /// Whether an `on_connect` hook is configured: its URLs came from outside and are reached
    /// through the guarded client.
    pub from_hook: bool,
}

/// Chooses the plan; only the hook call awaits.
pub async fn choose(
    shared: &Shared,
    req: &ConnectRequest,
    principal: Option<&Principal>,
    handoff: Option<&HandoffState>,
    frontend: &mut dyn Frontend,
) -> Result<ConsumerPlan, Refusal> {
    let cfg = &shared.cfg;
    let mut hook_uid = None;
    let mut hook_stt = None;
    let mut hook_stt_options = None;
    let mut hook_record = None;
    let mut webhooks = match (handoff, &cfg.on_connect) {
        (Some(h), _) => from_handoff(cfg, h)?,
        (None, Some(hook_cfg)) => {
            let answer = ask_hook(shared, hook_cfg, req).await?;
            if principal.is_none() {
                hook_uid = answer.uid.clone();
            }
            hook_stt = answer.stt.clone();
            hook_stt_options = answer.stt_options.clone();
            hook_record = answer.record;
            let mut list: Vec<_> = answer.webhooks.iter().cloned().map(Arc::new).collect();
            list.extend(frontend.hook_webhooks(&answer, cfg));
            list
        }
        (None, None) => match &req.consumers {
            Some(names) => by_name(cfg, names, RefuseReason::UnknownConsumer, |name| {
                format!("no consumer named {name:?}")
            })?,
            None => defaults(cfg),
        },
    };
    restrict_to_token(&mut webhooks, principal, req.consumers.is_some())?;
    if cfg.on_connect.is_none() {
        webhooks.extend(frontend.config_webhooks(cfg));
    }
    // The hook's choice wins over the connect query's.
    let stt = match &hook_stt {
        Some(names) => shared.stt.select(Some(&names.join(","))),
        None => shared.stt.select(req.stt.as_ref()),
    }
    .map_err(|e| Refusal::new(RefuseReason::UnknownStt, e.to_string()))?;
    let stt_options = crate::fanout::stt::asked_options(
        principal.and_then(|p| p.stt.as_ref()),
        hook_stt_options.as_ref(),
        &req.stt_options,
    );
    crate::fanout::stt::check_options(&stt, &stt_options)
        .map_err(|why| Refusal::new(RefuseReason::InvalidParameters, why))?;
    let split = super::session_config::max_parties(cfg, req);
    let stt_parties = crate::fanout::stt::parties(req.raw_query.get("parties"), split)
        .map_err(|why| Refusal::new(RefuseReason::InvalidParameters, why))?;
    Ok(ConsumerPlan {
        webhooks,
        stt,
        stt_options,
        stt_parties,
        hook_uid,
        record: (principal.and_then(|p| p.record))
            .or(hook_record)
            .unwrap_or(cfg.recording.default),
        from_hook: cfg.on_connect.is_some(),
    })
}

/// A drained session continues with its own webhooks, which must be configured here too.
fn from_handoff(cfg: &Config, h: &HandoffState) -> Result<Vec<Arc<WebhookConfig>>, Refusal> {
    let names: Vec<String> = h.webhooks.iter().map(|(name, _)| name.clone()).collect();
    by_name(cfg, &names, RefuseReason::ResumeFailed, |name| {
        format!("webhook {name:?} of the drained session is not configured here")
    })
}

/// Configured webhooks by name, in the order asked; a missing name is refused.
fn by_name(
    cfg: &Config,
    names: &[String],
    missing: RefuseReason,
    why: impl Fn(&str) -> String,
) -> Result<Vec<Arc<WebhookConfig>>, Refusal> {
    names
        .iter()
        .map(|name| {
            cfg.webhooks
                .iter()
                .find(|w| &w.name == name)
                .map(|w| Arc::new(w.clone()))
                .ok_or_else(|| Refusal::new(missing, why(name)))
        })
        .collect()
}

/// The webhooks marked `default = true`.
fn defaults(cfg: &Config) -> Vec<Arc<WebhookConfig>> {
    cfg.webhooks
        .iter()
        .filter(|w| w.default)
        .map(|w| Arc::new(w.clone()))
        .collect()
}

/// A token with a consumer list keeps only those; asking for another by name is refused.
fn restrict_to_token(
    webhooks: &mut Vec<Arc<WebhookConfig>>,
    principal: Option<&Principal>,
    asked_by_name: bool,
) -> Result<(), Refusal> {
    let Some(allowed) = principal.and_then(|p| p.consumers.as_ref()) else {
        return Ok(());
    };
    if let Some(w) = webhooks.iter().find(|w| !allowed.contains(&w.name)) {
        if asked_by_name {
            return Err(Refusal::new(
                RefuseReason::Forbidden,
                format!("this token may not use consumer {:?}", w.name),
            ));
        }
    }
    webhooks.retain(|w| allowed.contains(&w.name));
    Ok(())
}

/// Asks the hook, then checks its answer: allowed, URLs within the webhook policy, valid
/// webhook settings.
async fn ask_hook(
    shared: &Shared,
    hook_cfg: &OnConnectConfig,
    req: &ConnectRequest,
) -> Result<HookAnswer, Refusal> {
    let answer = hook::on_connect(&shared.http, hook_cfg, req)
        .await
        .map_err(|e| Refusal::new(RefuseReason::OnConnectFailed, e.to_string()))?;
    if !answer.allow {
        let reason = answer.reason.clone();
        return Err(Refusal::new(
            RefuseReason::Rejected,
            reason.unwrap_or_else(|| "rejected by on_connect hook".into()),
        ));
    }
    let listed = answer.webhooks.len() + answer.audio_apps.len();
    if listed > hook_cfg.max_webhooks {
        let max = hook_cfg.max_webhooks;
        let why = format!(
            "the hook answer lists {listed} webhooks; at most {max} (on_connect.max_webhooks)"
        );
        return Err(Refusal::new(RefuseReason::OnConnectInvalid, why));
    }
    // Per-user URLs come from outside: check them against the webhook policy.
    let urls = (answer.webhooks.iter().map(|w| &w.url))
        .chain(&answer.audio_apps)
        .chain(&answer.transcript_webhook)
        .chain(&answer.conversation_webhook);
    for url in urls {
        shared
            .cfg
            .webhook_policy
            .check_url(url)
            .await
            .map_err(|why| Refusal::new(RefuseReason::WebhookDenied, why))?;
    }
    let mut errors = Vec::new();
    for (i, w) in answer.webhooks.iter().enumerate() {
        w.validate(&format!("on_connect.webhooks[{i}]"), &mut errors);
    }
    if !errors.is_empty() {
        return Err(Refusal::new(
            RefuseReason::OnConnectInvalid,
            errors.join("; "),
        ));
    }
    Ok(answer)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> Config {
        let mut cfg = Config::default();
        let mut a = WebhookConfig::new("a", "http://127.0.0.1:1/a", Some(0.0));
        a.default = true;
        let mut b = WebhookConfig::new("b", "http://127.0.0.1:1/b", Some(1.0));
        b.default = false;
        cfg.webhooks = vec![a, b];
        cfg
    }

    fn names(list: &[Arc<WebhookConfig>]) -> Vec<&str> {
        list.iter().map(|w| w.name.as_str()).collect()
    }

    fn token(consumers: Option<&[&str]>) -> Principal {
        Principal {
            user: "u".into(),
            session: None,
            sessions: Vec::new(),
            consumers: consumers.map(|c| c.iter().map(|s| s.to_string()).collect()),
            ..Principal::default()
        }
    }

    #[test]
    fn defaults_and_names_choose_configured_webhooks() {
        let cfg = cfg();
        assert_eq!(names(&defaults(&cfg)), ["a"]);
        let asked = ["b".to_owned(), "a".to_owned()];
        let chosen = by_name(&cfg, &asked, RefuseReason::UnknownConsumer, |n| n.into()).unwrap();
        assert_eq!(names(&chosen), ["b", "a"]);
        let e = by_name(
            &cfg,
            &["zz".to_owned()],
            RefuseReason::UnknownConsumer,
            |n| format!("no consumer named {n:?}"),
        )
        .unwrap_err();
        assert_eq!(e.reason, RefuseReason::UnknownConsumer);
        assert_eq!(e.message, "no consumer named \"zz\"");
    }

    #[test]
    fn a_drained_session_needs_its_webhooks_here() {
        let cfg = cfg();
        let mut h = HandoffState {
            session_id: "s".into(),
            uid: String::new(),
            samples: 0,
            utterances: 0,
            webhooks: vec![("b".into(), 4)],
            expires: 0,
            jti: "j".into(),
        };
        assert_eq!(names(&from_handoff(&cfg, &h).unwrap()), ["b"]);
        h.webhooks.push(("gone".into(), 1));
        let e = from_handoff(&cfg, &h).unwrap_err();
        assert_eq!(e.reason, RefuseReason::ResumeFailed);
    }

    #[test]
    fn a_token_restricts_the_webhooks_and_refuses_asking_for_others() {
        let cfg = cfg();
        let all = || {
            by_name(
                &cfg,
                &["a".into(), "b".into()],
                RefuseReason::UnknownConsumer,
                |n| n.into(),
            )
            .unwrap()
        };
        let only_a = token(Some(&["a"]));
        let mut list = all();
        restrict_to_token(&mut list, Some(&only_a), false).unwrap();
        assert_eq!(names(&list), ["a"]);
        let mut list = all();
        let e = restrict_to_token(&mut list, Some(&only_a), true).unwrap_err();
        assert_eq!(e.reason, RefuseReason::Forbidden);
        let mut list = all();
        restrict_to_token(&mut list, Some(&token(None)), true).unwrap();
        assert_eq!(names(&list), ["a", "b"], "no list: no restriction");
        restrict_to_token(&mut list, None, true).unwrap();
        assert_eq!(names(&list), ["a", "b"]);
    }
}

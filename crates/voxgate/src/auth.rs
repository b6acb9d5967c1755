//! Authentication and admission: JWT bearer tokens (HS256 or EdDSA) on every WebSocket endpoint
//! and on subscribe, per-user session caps and a per-IP connection rate limit.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use jsonwebtoken::{decode, Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};
use sha2::Digest;

/// When tokens are required.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// Off when listening on a loopback address, on otherwise.
    #[default]
    Auto,
    Off,
    Jwt,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    pub mode: AuthMode,
    /// Shared secret for HS256 tokens.
    pub hs256_secret: Option<String>,
    /// Ed25519 public key (PEM) for EdDSA tokens.
    pub ed25519_public_key_pem: Option<String>,
    /// Required `aud` claim. Default `voxgate`.
    pub audience: String,
    /// Clock skew allowed on `exp`. Default 30 s.
    pub leeway_seconds: u64,
    /// Live sessions per user (`sub`); beyond it, close 1013. Default 20.
    pub max_sessions_per_user: usize,
    /// New connections per second per client IP (burst twice that); beyond it, close 1013.
    /// Default 20.
    pub connections_per_ip_per_second: f64,
    /// Required `iss` claim. Default: none (any issuer).
    pub issuer: Option<String>,
    /// Longest token lifetime accepted: `exp - iat`, and `exp` no further ahead than this.
    /// Default: none (any lifetime).
    pub max_token_lifetime_seconds: Option<u64>,
    /// Drained-session `resume_state`s remembered as spent until they expire (single use).
    /// Past it, expired entries are pruned and, if none expired, the continuation is refused
    /// (`resume_failed`, fail closed) and counted. Default 100000 (about 60 s of states).
    pub spent_resume_states_max: usize,
    /// API keys as Deepgram clients send them (`Authorization: Token <key>`, or the browser
    /// subprotocol `token, <key>`), each mapped to a user with the same per-user limits as a
    /// token's `sub`. Only the SHA-256 of a key is configured. Default none.
    pub api_keys: Vec<ApiKey>,
}

/// One API key: `printf %s "$KEY" | sha256sum` gives `sha256`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKey {
    /// The user the key's sessions belong to.
    pub user: String,
    /// The key's SHA-256, 64 hex digits.
    pub sha256: String,
}

impl ApiKey {
    fn digest(&self) -> Option<[u8; 32]> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(&self.sha256, &mut out).ok()?;
        Some(out)
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            mode: AuthMode::Auto,
            hs256_secret: None,
            ed25519_public_key_pem: None,
            audience: "voxgate".into(),
            leeway_seconds: 30,
            max_sessions_per_user: 20,
            connections_per_ip_per_second: 20.0,
            issuer: None,
            max_token_lifetime_seconds: None,
            spent_resume_states_max: 100_000,
            api_keys: Vec::new(),
        }
    }
}

impl AuthConfig {
    /// Whether tokens are required when listening on `listen`.
    pub fn required(&self, listen: &str) -> bool {
        match self.mode {
            AuthMode::Off => false,
            AuthMode::Jwt => true,
            AuthMode::Auto => !listen
                .parse::<std::net::SocketAddr>()
                .map(|a| a.ip().is_loopback())
                .unwrap_or(false),
        }
    }

    pub fn validate(&self, listen: &str, errors: &mut Vec<String>) {
        if self.required(listen)
            && self.hs256_secret.is_none()
            && self.ed25519_public_key_pem.is_none()
            && self.api_keys.is_empty()
        {
            errors.push(format!(
                "auth: listening on {listen} requires tokens (auth.mode = {:?}); set auth.hs256_secret, auth.ed25519_public_key_pem or auth.api_keys, or auth.mode = \"off\" to run without authentication",
                self.mode
            ));
        }
        if let Some(s) = &self.hs256_secret {
            if s.len() < 16 {
                errors.push("auth.hs256_secret: use at least 16 bytes".into());
            }
        }
        if let Some(pem) = &self.ed25519_public_key_pem {
            if DecodingKey::from_ed_pem(pem.as_bytes()).is_err() {
                errors.push("auth.ed25519_public_key_pem: not an Ed25519 public key in PEM".into());
            }
        }
        if !(self.connections_per_ip_per_second.is_finite()
            && self.connections_per_ip_per_second > 0.0)
        {
            errors.push("auth.connections_per_ip_per_second: must be > 0".into());
        }
        if self.max_sessions_per_user == 0 {
            errors.push("auth.max_sessions_per_user: must be > 0".into());
        }
        if self.max_token_lifetime_seconds == Some(0) {
            errors.push("auth.max_token_lifetime_seconds: must be > 0 (or absent)".into());
        }
        if self.issuer.as_deref() == Some("") {
            errors.push("auth.issuer: must not be empty (or absent)".into());
        }
        for (i, k) in self.api_keys.iter().enumerate() {
            if k.user.is_empty() {
                errors.push(format!("auth.api_keys[{i}].user: must not be empty"));
            }
            if k.digest().is_none() {
                errors.push(format!("auth.api_keys[{i}].sha256: not 64 hex digits"));
            }
        }
        if self.spent_resume_states_max == 0 {
            errors.push("auth.spent_resume_states_max: must be > 0".into());
        }
    }
}

/// What a token grants.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct Claims {
    /// The user (not empty).
    pub sub: String,
    pub exp: u64,
    #[serde(default)]
    pub aud: Option<serde_json::Value>,
    /// Not valid before (unix seconds), checked with the leeway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    /// Issued at (unix seconds): with `auth.max_token_lifetime_seconds`, `exp - iat` is capped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    /// Issuer, required to equal `auth.issuer` when that is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    /// The one session this token may create or subscribe to.
    #[serde(default)]
    pub sid: Option<String>,
    /// Sessions this token may subscribe to.
    #[serde(default)]
    pub sessions: Vec<String>,
    /// The user who owns the sessions named in `sid` and `sessions` (absent: `sub`). Lets a
    /// monitoring token watch another user's session; it never lets a token create one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// Named consumers this token may use (absent: any).
    #[serde(default)]
    pub consumers: Option<Vec<String>>,
}

/// The claims read from a token: `Claims` plus the speech-to-text options claim (kept out of
/// `Claims` so that code building tokens needs no change).
#[derive(Deserialize)]
struct TokenClaims {
    #[serde(flatten)]
    base: Claims,
    /// Speech-to-text options for the token's sessions (`language`, `model`, `prompt`,
    /// `keyterms`), checked against each backend's allow-lists.
    #[serde(default)]
    stt: Option<crate::stt_options::SttOptions>,
    /// Whether the token's sessions are recorded (absent: the hook's or the config's choice).
    #[serde(default)]
    record: Option<bool>,
}

/// A verified caller.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Principal {
    pub user: String,
    pub session: Option<String>,
    pub sessions: Vec<String>,
    /// Owner of the sessions in `session` and `sessions` (`None`: `user`).
    pub owner: Option<String>,
    pub consumers: Option<Vec<String>>,
    /// The token's speech-to-text options claim (`stt`).
    pub stt: Option<crate::stt_options::SttOptions>,
    /// The token's recording claim (`record`).
    pub record: Option<bool>,
}

impl Principal {
    /// The owner of the sessions this token names (`sid`, `sessions`).
    pub fn grant_owner(&self) -> &str {
        self.owner.as_deref().unwrap_or(&self.user)
    }

    /// Whether the token names session `id` (in `sid` or `sessions`).
    pub fn names(&self, id: &str) -> bool {
        self.session.as_deref() == Some(id) || self.sessions.iter().any(|s| s == id)
    }

    /// May this caller subscribe to session `id` owned by `owner`? Its own user's sessions, and
    /// those its token names when they belong to the owner the token names (its own user
    /// unless the `owner` claim says otherwise).
    pub fn may_watch(&self, id: &str, owner: &str) -> bool {
        self.user == owner || (self.names(id) && self.grant_owner() == owner)
    }
}

/// Verifies tokens; `None` inside means authentication is off.
pub struct Authenticator {
    keys: Vec<(DecodingKey, Validation)>,
    /// API keys by their SHA-256: the user each belongs to.
    api_keys: HashMap<[u8; 32], String>,
    required: bool,
    max_lifetime: Option<u64>,
    leeway: u64,
}

impl Authenticator {
    pub fn new(cfg: &AuthConfig, listen: &str) -> Self {
        let validation = |alg| {
            let mut v = Validation::new(alg);
            v.set_audience(&[cfg.audience.as_str()]);
            v.leeway = cfg.leeway_seconds;
            v.validate_nbf = true;
            match &cfg.issuer {
                Some(iss) => {
                    v.set_issuer(&[iss.as_str()]);
                    v.set_required_spec_claims(&["exp", "aud", "sub", "iss"]);
                }
                None => v.set_required_spec_claims(&["exp", "aud", "sub"]),
            }
            v
        };
        let mut keys = Vec::new();
        if let Some(s) = &cfg.hs256_secret {
            keys.push((
                DecodingKey::from_secret(s.as_bytes()),
                validation(Algorithm::HS256),
            ));
        }
        if let Some(pem) = &cfg.ed25519_public_key_pem {
            if let Ok(k) = DecodingKey::from_ed_pem(pem.as_bytes()) {
                keys.push((k, validation(Algorithm::EdDSA)));
            }
        }
        let api_keys = cfg
            .api_keys
            .iter()
            .filter_map(|k| Some((k.digest()?, k.user.clone())))
            .collect();
        Self {
            keys,
            api_keys,
            required: cfg.required(listen),
            max_lifetime: cfg.max_token_lifetime_seconds,
            leeway: cfg.leeway_seconds,
        }
    }

    pub fn required(&self) -> bool {
        self.required
    }

    /// `Ok(None)` when auth is off; otherwise the principal or why the token was refused.
    pub fn verify(&self, token: Option<&str>) -> Result<Option<Principal>, String> {
        if !self.required {
            return Ok(None);
        }
        let token = token.ok_or("missing token (Authorization: Bearer or ?token=)")?;
        if let Some(user) = self.api_key_user(token) {
            return Ok(Some(Principal {
                user: user.to_owned(),
                ..Principal::default()
            }));
        }
        if self.keys.is_empty() {
            return Err("unknown API key".into());
        }
        let mut last = String::from("no verification key configured");
        for (key, validation) in &self.keys {
            match decode::<TokenClaims>(token, key, validation) {
                Ok(data) => {
                    let (stt, record) = (data.claims.stt, data.claims.record);
                    return self
                        .admit_claims(data.claims.base)
                        .map(|p| Some(Principal { stt, record, ..p }));
                }
                Err(e) => last = e.to_string(),
            }
        }
        Err(format!("invalid token: {last}"))
    }

    /// The user of a configured API key. The key is compared by its SHA-256 (a map lookup on a
    /// digest reveals nothing usable about the key).
    fn api_key_user(&self, key: &str) -> Option<&str> {
        if self.api_keys.is_empty() {
            return None;
        }
        let digest: [u8; 32] = sha2::Sha256::digest(key.as_bytes()).into();
        self.api_keys.get(&digest).map(String::as_str)
    }

    /// The checks `jsonwebtoken` does not make: a non-empty `sub`, the lifetime cap.
    fn admit_claims(&self, c: Claims) -> Result<Principal, String> {
        if c.sub.is_empty() {
            return Err("invalid token: empty sub".into());
        }
        if let Some(max) = self.max_lifetime {
            let now = jsonwebtoken::get_current_timestamp();
            let too_far = c.exp > now.saturating_add(max).saturating_add(self.leeway);
            let too_long = c.iat.is_some_and(|iat| c.exp.saturating_sub(iat) > max);
            if too_far || too_long {
                return Err(format!(
                    "invalid token: lifetime over auth.max_token_lifetime_seconds ({max} s)"
                ));
            }
        }
        Ok(Principal {
            user: c.sub,
            session: c.sid,
            sessions: c.sessions,
            owner: c.owner,
            consumers: c.consumers,
            stt: None,
            record: None,
        })
    }
}

/// Compares secrets in time independent of where they differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The token of `Authorization: Bearer <token>`.
pub fn bearer(headers: &axum::http::HeaderMap) -> Option<String> {
    let value = headers.get("authorization")?.to_str().ok()?;
    value.strip_prefix("Bearer ").map(str::to_owned)
}

/// One token bucket: refills at `per_second`, holds at most two seconds' worth (the burst).
#[derive(Debug, Clone, Copy)]
pub struct TokenBucket {
    per_second: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(per_second: f64, now: Instant) -> Self {
        Self {
            per_second,
            tokens: per_second * 2.0,
            last: now,
        }
    }

    fn refilled(&self, now: Instant) -> f64 {
        let burst = self.per_second * 2.0;
        (self.tokens + now.duration_since(self.last).as_secs_f64() * self.per_second).min(burst)
    }

    /// Takes one token: `Ok`, or `Err(retry_after)`.
    pub fn take(&mut self, now: Instant) -> Result<(), Duration> {
        self.tokens = self.refilled(now);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64(
                (1.0 - self.tokens) / self.per_second,
            ))
        }
    }

    /// Whether it would be full at `now` (an idle key that can be forgotten).
    fn is_full(&self, now: Instant) -> bool {
        self.refilled(now) >= self.per_second * 2.0
    }
}

/// Per-IP token buckets for the connection rate (bounded: stale entries are pruned, and past
/// `MAX_TRACKED` addresses new ones share one bucket).
pub struct RateLimiter {
    per_second: f64,
    buckets: Mutex<HashMap<IpAddr, TokenBucket>>,
}

const MAX_TRACKED: usize = 100_000;

impl RateLimiter {
    pub fn new(per_second: f64) -> Self {
        Self {
            per_second,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// `Ok` to admit, or `Err(retry_after)`.
    pub fn check(&self, ip: IpAddr, now: Instant) -> Result<(), Duration> {
        let mut map = self
            .buckets
            .lock()
            .expect("rate limiter lock is never poisoned");
        if map.len() >= MAX_TRACKED {
            map.retain(|_, b| !b.is_full(now));
        }
        let key = if map.len() >= MAX_TRACKED && !map.contains_key(&ip) {
            IpAddr::from([0, 0, 0, 0])
        } else {
            ip
        };
        map.entry(key)
            .or_insert_with(|| TokenBucket::new(self.per_second, now))
            .take(now)
    }
}

/// Live sessions per user; a guard releases its slot on drop.
#[derive(Default)]
pub struct UserSessions {
    counts: Arc<Mutex<HashMap<String, usize>>>,
}

#[derive(Debug)]
pub struct UserSlot {
    user: String,
    counts: Arc<Mutex<HashMap<String, usize>>>,
}

impl UserSessions {
    pub fn acquire(&self, user: &str, max: usize) -> Option<UserSlot> {
        let mut counts = self
            .counts
            .lock()
            .expect("user count lock is never poisoned");
        let n = counts.entry(user.to_owned()).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(UserSlot {
            user: user.to_owned(),
            counts: self.counts.clone(),
        })
    }
}

impl Drop for UserSlot {
    fn drop(&mut self) {
        let mut counts = self
            .counts
            .lock()
            .expect("user count lock is never poisoned");
        if let Some(n) = counts.get_mut(&self.user) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.user);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limiter_admits_a_burst_then_refuses_with_a_hint() {
        let rl = RateLimiter::new(2.0);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let t = Instant::now();
        for _ in 0..4 {
            rl.check(ip, t).unwrap();
        }
        let retry = rl.check(ip, t).unwrap_err();
        assert!(retry > Duration::ZERO && retry <= Duration::from_millis(500));
        rl.check(ip, t + Duration::from_secs(1)).unwrap();
        rl.check("10.0.0.2".parse().unwrap(), t).unwrap();
    }

    #[test]
    fn auto_mode_follows_the_listen_address() {
        let c = AuthConfig::default();
        assert!(!c.required("127.0.0.1:8080"));
        assert!(c.required("0.0.0.0:8080"));
        let mut errors = Vec::new();
        c.validate("0.0.0.0:8080", &mut errors);
        assert_eq!(errors.len(), 1, "{errors:?}");
    }

    #[test]
    fn user_slots_are_released() {
        let u = UserSessions::default();
        let a = u.acquire("ann", 1).unwrap();
        assert!(u.acquire("ann", 1).is_none());
        drop(a);
        assert!(u.acquire("ann", 1).is_some());
    }

    #[test]
    fn api_keys_are_known_by_their_digest_and_map_to_a_user() {
        let digest = hex::encode(sha2::Sha256::digest(b"dg-key-1"));
        let mut cfg = AuthConfig {
            mode: AuthMode::Jwt,
            api_keys: vec![ApiKey {
                user: "ann".into(),
                sha256: digest,
            }],
            ..AuthConfig::default()
        };
        let mut errors = Vec::new();
        cfg.validate("0.0.0.0:1", &mut errors);
        assert!(errors.is_empty(), "keys alone are enough: {errors:?}");
        let auth = Authenticator::new(&cfg, "0.0.0.0:1");
        let p = auth.verify(Some("dg-key-1")).unwrap().unwrap();
        assert_eq!(p.user, "ann");
        assert!(auth.verify(Some("dg-key-2")).is_err());
        cfg.api_keys[0].sha256 = "zz".into();
        cfg.validate("0.0.0.0:1", &mut errors);
        assert_eq!(errors, ["auth.api_keys[0].sha256: not 64 hex digits"]);
    }
}

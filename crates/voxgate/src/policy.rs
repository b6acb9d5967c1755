//! Where webhooks may point. URLs that come from the `on_connect` hook (per-user, so ultimately
//! from outside) may not reach loopback, link-local or private addresses unless the config
//! allows them; the check runs on the URL and again on every DNS answer at connect time, and
//! webhook requests never follow redirects.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct WebhookPolicy {
    /// Allow loopback, private, link-local and other non-public addresses. Default false.
    pub allow_private: bool,
    /// Hosts (names or IPs) always allowed, e.g. an internal sink.
    pub allow_hosts: Vec<String>,
    /// Hosts always refused.
    pub deny_hosts: Vec<String>,
}

/// True for addresses a stranger's webhook must not reach.
pub fn is_internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || (o[0] == 100 && (o[1] & 0xC0) == 64) // 100.64.0.0/10 shared address space
                || o[0] == 0
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_internal(IpAddr::V4(v4));
            }
            let s = v6.segments();
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s[0] & 0xFE00) == 0xFC00 // unique local
                || (s[0] & 0xFFC0) == 0xFE80 // link-local
        }
    }
}

impl WebhookPolicy {
    fn host_allowed(&self, host: &str) -> Option<bool> {
        if self.deny_hosts.iter().any(|h| h.eq_ignore_ascii_case(host)) {
            return Some(false);
        }
        if self
            .allow_hosts
            .iter()
            .any(|h| h.eq_ignore_ascii_case(host))
        {
            return Some(true);
        }
        None
    }

    pub fn ip_allowed(&self, ip: IpAddr) -> bool {
        match self.host_allowed(&ip.to_string()) {
            Some(v) => v,
            None => self.allow_private || !is_internal(ip),
        }
    }

    /// Checks a URL and what its host resolves to now.
    pub async fn check_url(&self, url: &str) -> Result<(), String> {
        let parsed = url::Url::parse(url).map_err(|e| format!("{url:?}: {e}"))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(format!("{url:?}: only http and https webhooks are allowed"));
        }
        let host = parsed
            .host_str()
            .ok_or_else(|| format!("{url:?}: no host"))?
            .trim_matches(|c| c == '[' || c == ']')
            .to_owned();
        match self.host_allowed(&host) {
            Some(true) => return Ok(()),
            Some(false) => return Err(format!("{host}: denied by webhook_policy.deny_hosts")),
            None => {}
        }
        if let Ok(ip) = host.parse::<IpAddr>() {
            return if self.ip_allowed(ip) {
                Ok(())
            } else {
                Err(format!(
                    "{host}: internal addresses are not allowed for webhooks"
                ))
            };
        }
        let port = parsed.port_or_known_default().unwrap_or(80);
        let addrs: Vec<SocketAddr> = tokio::time::timeout(
            std::time::Duration::from_secs(2),
            tokio::net::lookup_host((host.as_str(), port)),
        )
        .await
        .map_err(|_| format!("{host}: DNS lookup timed out"))?
        .map_err(|e| format!("{host}: {e}"))?
        .collect();
        if addrs.is_empty() || addrs.iter().any(|a| !self.ip_allowed(a.ip())) {
            return Err(format!(
                "{host}: resolves to an internal address; not allowed for webhooks"
            ));
        }
        Ok(())
    }
}

/// A DNS resolver that drops internal addresses, so a name that passed `check_url` cannot be
/// re-pointed at an internal address later (DNS rebinding).
pub struct GuardedResolver {
    pub policy: Arc<WebhookPolicy>,
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.policy.clone();
        let host = name.as_str().to_owned();
        Box::pin(async move {
            if policy.host_allowed(&host) == Some(false) {
                return Err(format!("{host}: denied by webhook policy").into());
            }
            let allowed_by_name = policy.host_allowed(&host) == Some(true);
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0))
                .await?
                .filter(|a| allowed_by_name || policy.ip_allowed(a.ip()))
                .collect();
            if addrs.is_empty() {
                return Err(format!("{host}: no allowed address").into());
            }
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn internal_targets_are_refused_unless_allowed() {
        let p = WebhookPolicy::default();
        for bad in [
            "http://127.0.0.1:9/x",
            "http://169.254.169.254/latest/meta-data",
            "http://10.1.2.3/",
            "http://[::1]:8080/",
            "http://[fe80::1]/",
            "http://localhost:9/",
            "ftp://example.com/",
        ] {
            assert!(p.check_url(bad).await.is_err(), "{bad} should be refused");
        }
        assert!(p.check_url("http://93.184.216.34/hook").await.is_ok());
        let allow = WebhookPolicy {
            allow_hosts: vec!["127.0.0.1".into()],
            ..WebhookPolicy::default()
        };
        assert!(allow.check_url("http://127.0.0.1:9/x").await.is_ok());
        let private = WebhookPolicy {
            allow_private: true,
            ..WebhookPolicy::default()
        };
        assert!(private.check_url("http://10.0.0.1/").await.is_ok());
    }
}

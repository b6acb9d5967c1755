//! Where webhooks may point. URLs that come from the `on_connect` hook (per-user, so ultimately
//! from outside) may not reach loopback, link-local or private addresses unless the config
//! allows them; the check runs on the URL and again on every DNS answer at connect time, and
//! webhook requests never follow redirects.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhookPolicy {
    /// Allow loopback, private, link-local and other non-public addresses. Default false.
    pub allow_private: bool,
    /// Hosts (names or IPs) always allowed, e.g. an internal sink.
    pub allow_hosts: Vec<String>,
    /// Hosts always refused.
    pub deny_hosts: Vec<String>,
    /// Webhook endpoints (URLs) whose circuit breaker is tracked. Default 10000.
    pub max_tracked_endpoints: usize,
}

impl Default for WebhookPolicy {
    fn default() -> Self {
        Self {
            allow_private: false,
            allow_hosts: Vec::new(),
            deny_hosts: Vec::new(),
            max_tracked_endpoints: 10_000,
        }
    }
}

/// True for addresses a stranger's webhook must not reach: everything that is not global
/// unicast. IPv6 forms that embed an IPv4 address (mapped, translated, compatible, NAT64
/// `64:ff9b::/96`, 6to4, Teredo) are judged by the IPv4 rules on what they embed; the local-use
/// NAT64 prefix `64:ff9b:1::/48` is internal whatever it embeds.
pub fn is_internal(ip: IpAddr) -> bool {
    match ip.to_canonical() {
        IpAddr::V4(v4) => v4_internal(v4),
        IpAddr::V6(v6) => v6_internal(v6),
    }
}

/// The IPv4 rules: private, loopback, link-local, shared (CGNAT), multicast, broadcast, and the
/// reserved blocks (`0/8`, `192.0.0/24`, TEST-NETs, `198.18/15` benchmarking, the 6to4 relay
/// `192.88.99/24`, `240/4`).
fn v4_internal(v4: Ipv4Addr) -> bool {
    let o = v4.octets();
    v4.is_loopback()
        || v4.is_private()
        || v4.is_link_local()
        || v4.is_multicast()
        || o[0] == 0
        || o[0] >= 240 // 240.0.0.0/4 reserved, and the broadcast address
        || (o[0] == 100 && (o[1] & 0xC0) == 64) // 100.64.0.0/10 shared address space
        || (o[0] == 198 && (o[1] & 0xFE) == 18) // 198.18.0.0/15 benchmarking
        || matches!((o[0], o[1], o[2]), (192, 0, 0 | 2) | (192, 88, 99) | (198, 51, 100) | (203, 0, 113))
}

fn v6_internal(v6: Ipv6Addr) -> bool {
    let s = v6.segments();
    if s[..3] == [0x64, 0xff9b, 1] {
        return true; // local-use NAT64: where it leads is the operator's network
    }
    let embedded = embedded_v4(v6);
    if !embedded.is_empty() {
        return embedded.into_iter().any(v4_internal);
    }
    (s[0] & 0xE000) != 0x2000 // outside 2000::/3 global unicast: ::1, fc00::/7, fe80::/10, fec0::/10, ff00::/8, 64:ff9b:1::/48
        || (s[0] == 0x2001 && s[1] == 0x0db8) // 2001:db8::/32 documentation
        || (s[0] == 0x3fff && s[1] < 0x1000) // 3fff::/20 documentation
        || (s[0] == 0x2001 && s[1] == 0x0002 && s[2] == 0) // 2001:2::/48 benchmarking
        || (s[0] == 0x2001 && (s[1] & 0xFFE0) == 0x0020) // 2001:20::/28 ORCHIDv2
}

/// The IPv4 addresses an IPv6 address embeds (empty for none).
pub fn embedded_v4(v6: Ipv6Addr) -> Vec<Ipv4Addr> {
    let s = v6.segments();
    let v4 = |hi: u16, lo: u16| Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo));
    let last = v4(s[6], s[7]);
    match s {
        // ::ffff:a.b.c.d mapped, ::ffff:0:a.b.c.d translated, ::a.b.c.d compatible (incl. :: and ::1)
        [0, 0, 0, 0, 0, 0xffff, ..] | [0, 0, 0, 0, 0xffff, 0, ..] | [0, 0, 0, 0, 0, 0, ..] => {
            vec![last]
        }
        // NAT64 well-known prefix 64:ff9b::/96, and local-use 64:ff9b:1::/48 (its /96 form)
        [0x64, 0xff9b, 0, 0, 0, 0, ..] | [0x64, 0xff9b, 1, ..] => vec![last],
        // 6to4 2002:AABB:CCDD::/48
        [0x2002, hi, lo, ..] => vec![v4(hi, lo)],
        // Teredo 2001:0:SERVER:flags:port:~CLIENT
        [0x2001, 0, server_hi, server_lo, .., client_hi, client_lo] => {
            vec![v4(server_hi, server_lo), v4(!client_hi, !client_lo)]
        }
        _ => Vec::new(),
    }
}

/// One `allow_hosts`/`deny_hosts` entry, parsed: an address, a CIDR block, or a host name
/// (lowercased, without a trailing dot).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostRule {
    Ip(IpAddr),
    Net(IpAddr, u8),
    Name(String),
}

impl HostRule {
    /// Parses an entry (`None`: a malformed CIDR block).
    pub fn parse(entry: &str) -> Option<Self> {
        let e = normalize_host(entry);
        if let Some((addr, bits)) = e.split_once('/') {
            let addr: IpAddr = addr.trim_matches(['[', ']']).parse().ok()?;
            let bits: u8 = bits.parse().ok()?;
            let max = if addr.is_ipv4() { 32 } else { 128 };
            return (bits <= max).then_some(Self::Net(addr, bits));
        }
        Some(match e.parse::<IpAddr>() {
            Ok(ip) => Self::Ip(ip.to_canonical()),
            Err(_) => Self::Name(e),
        })
    }

    fn matches_ip(&self, ip: IpAddr) -> bool {
        match *self {
            Self::Ip(rule) => rule == ip,
            Self::Net(net, bits) => in_net(ip, net, bits),
            Self::Name(_) => false,
        }
    }
}

/// A host as rules compare it: lowercase, no brackets, no trailing dot.
fn normalize_host(host: &str) -> String {
    host.trim()
        .trim_matches(['[', ']'])
        .trim_end_matches('.')
        .to_ascii_lowercase()
}

fn in_net(ip: IpAddr, net: IpAddr, bits: u8) -> bool {
    let prefix = |a: u128, b: u128, width: u32| {
        let shift = width - u32::from(bits);
        shift >= width || (a >> shift) == (b >> shift)
    };
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(b)) => prefix(u32::from(a).into(), u32::from(b).into(), 32),
        (IpAddr::V6(a), IpAddr::V6(b)) => prefix(a.into(), b.into(), 128),
        _ => false,
    }
}

/// The addresses `ip` stands for: itself (canonical) and every IPv4 address it embeds.
fn ip_forms(ip: IpAddr) -> Vec<IpAddr> {
    let ip = ip.to_canonical();
    let mut forms = vec![ip];
    if let IpAddr::V6(v6) = ip {
        forms.extend(embedded_v4(v6).into_iter().map(IpAddr::V4));
    }
    forms
}

/// What the host lists say about a host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Listed {
    Denied,
    Allowed,
    Neither,
}

impl WebhookPolicy {
    fn rules(list: &[String]) -> impl Iterator<Item = HostRule> + '_ {
        list.iter().filter_map(|e| HostRule::parse(e))
    }

    /// Malformed `allow_hosts`/`deny_hosts` entries, a zero cap.
    pub fn validate(&self, errors: &mut Vec<String>) {
        if self.max_tracked_endpoints == 0 {
            errors.push("webhook_policy.max_tracked_endpoints: must be > 0".into());
        }
        for (key, list) in [
            ("allow_hosts", &self.allow_hosts),
            ("deny_hosts", &self.deny_hosts),
        ] {
            for e in list.iter().filter(|e| HostRule::parse(e).is_none()) {
                errors.push(format!(
                    "webhook_policy.{key}: {e:?} is not an address, CIDR block or host name"
                ));
            }
        }
    }

    /// An address is denied when it, or any IPv4 address it embeds, is on `deny_hosts`; allowed
    /// when its canonical form is on `allow_hosts`.
    fn ip_listed(&self, ip: IpAddr) -> Listed {
        let forms = ip_forms(ip);
        if Self::rules(&self.deny_hosts).any(|r| forms.iter().any(|f| r.matches_ip(*f))) {
            Listed::Denied
        } else if Self::rules(&self.allow_hosts).any(|r| r.matches_ip(forms[0])) {
            Listed::Allowed
        } else {
            Listed::Neither
        }
    }

    /// A host (a name or an address literal) on the lists.
    fn host_listed(&self, host: &str) -> Listed {
        let host = normalize_host(host);
        if let Ok(ip) = host.parse::<IpAddr>() {
            return self.ip_listed(ip);
        }
        let named = |list: &[String]| Self::rules(list).any(|r| r == HostRule::Name(host.clone()));
        if named(&self.deny_hosts) {
            Listed::Denied
        } else if named(&self.allow_hosts) {
            Listed::Allowed
        } else {
            Listed::Neither
        }
    }

    pub fn ip_allowed(&self, ip: IpAddr) -> bool {
        match self.ip_listed(ip) {
            Listed::Denied => false,
            Listed::Allowed => true,
            Listed::Neither => self.allow_private || !is_internal(ip),
        }
    }

    /// Checks a URL and what its host resolves to now.
    pub async fn check_url(&self, url: &str) -> Result<(), String> {
        let parsed = url::Url::parse(url).map_err(|e| format!("{url:?}: {e}"))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(format!("{url:?}: only http and https webhooks are allowed"));
        }
        let host = normalize_host(
            parsed
                .host_str()
                .ok_or_else(|| format!("{url:?}: no host"))?,
        );
        match self.host_listed(&host) {
            Listed::Allowed => return Ok(()),
            Listed::Denied => return Err(format!("{host}: denied by webhook_policy.deny_hosts")),
            Listed::Neither => {}
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

/// A client builder for URLs from outside: every name resolves through `GuardedResolver`, and
/// no environment proxy is used (a proxy would resolve names past the resolver).
pub fn guarded(builder: reqwest::ClientBuilder, policy: &WebhookPolicy) -> reqwest::ClientBuilder {
    builder.no_proxy().dns_resolver(Arc::new(GuardedResolver {
        policy: Arc::new(policy.clone()),
    }))
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
            let listed = policy.host_listed(&host);
            if listed == Listed::Denied {
                return Err(format!("{host}: denied by webhook policy").into());
            }
            let allowed_by_name = listed == Listed::Allowed;
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0))
                .await?
                .filter(|a| {
                    let ip = a.ip();
                    policy.ip_listed(ip) != Listed::Denied
                        && (allowed_by_name || policy.ip_allowed(ip))
                })
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

#[cfg(test)]
mod form_tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn every_ipv4_embedding_form_is_judged_by_what_it_embeds() {
        for (form, internal) in [
            ("::ffff:127.0.0.1", true),           // mapped
            ("::ffff:0:10.0.0.1", true),          // translated
            ("::127.0.0.1", true),                // compatible
            ("::a9fe:a9fe", true),                // compatible 169.254.169.254
            ("64:ff9b::a9fe:a9fe", true),         // NAT64 well-known
            ("64:ff9b::a00:5", true),             // NAT64 -> 10.0.0.5
            ("64:ff9b::808:808", false),          // NAT64 -> 8.8.8.8
            ("64:ff9b:1::808:808", true),         // local-use NAT64: internal whatever it embeds
            ("2002:a9fe:a9fe::", true),           // 6to4 169.254.169.254
            ("2002:808:808::1", false),           // 6to4 8.8.8.8
            ("2001:0:a00:1::f7f7:f7f7", true),    // Teredo server 10.0.0.1
            ("2001:0:808:808::80ff:fefe", true),  // Teredo client ~80ff:fefe = 127.0.1.1
            ("2001:0:808:808::f7f7:f7f7", false), // Teredo 8.8.8.8 / 8.8.8.8
        ] {
            assert_eq!(is_internal(ip(form)), internal, "{form}");
        }
    }

    #[test]
    fn only_global_unicast_v6_and_public_v4_are_external() {
        for bad in [
            "::",
            "::1",
            "fc00::1",
            "fd00:ec2::254",
            "fe80::1",
            "fec0::1",
            "ff02::1",
            "2001:db8::1",
            "3fff::1",
            "100::1",
        ] {
            assert!(is_internal(ip(bad)), "{bad}");
        }
        for bad in [
            "0.0.0.0",
            "0.1.2.3",
            "10.0.0.1",
            "100.100.100.200",
            "127.0.0.1",
            "169.254.169.254",
            "172.16.0.1",
            "192.0.0.8",
            "192.0.2.1",
            "192.88.99.1",
            "192.168.1.1",
            "198.18.0.1",
            "198.19.255.255",
            "198.51.100.1",
            "203.0.113.9",
            "224.0.0.1",
            "240.0.0.1",
            "255.255.255.255",
        ] {
            assert!(is_internal(ip(bad)), "{bad}");
        }
        for good in [
            "93.184.216.34",
            "8.8.8.8",
            "198.20.0.1",
            "2606:4700::1111",
            "2a00:1450::1",
        ] {
            assert!(!is_internal(ip(good)), "{good}");
        }
    }

    #[test]
    fn host_lists_compare_parsed_addresses_blocks_and_names() {
        let p = WebhookPolicy {
            allow_private: true,
            allow_hosts: vec![],
            deny_hosts: vec![
                "127.0.0.1".into(),
                "10.0.0.0/8".into(),
                "Metadata.Internal.".into(),
                "[fd00::1]".into(),
            ],
            ..WebhookPolicy::default()
        };
        for denied in [
            "127.0.0.1",
            "::ffff:127.0.0.1",
            "::ffff:7f00:1",
            "::127.0.0.1",
            "64:ff9b::7f00:1",
            "2002:7f00:1::",
            "10.9.8.7",
            "::ffff:10.1.1.1",
            "fd00:0::1",
        ] {
            assert_eq!(p.host_listed(denied), Listed::Denied, "{denied}");
            assert!(!p.ip_allowed(ip(denied)), "{denied}");
        }
        assert_eq!(p.host_listed("metadata.internal"), Listed::Denied);
        assert_eq!(p.host_listed("METADATA.internal."), Listed::Denied);
        assert!(p.ip_allowed(ip("127.0.0.2")), "allow_private");
        let allow = WebhookPolicy {
            allow_hosts: vec!["127.0.0.2".into(), "sink.local".into()],
            ..WebhookPolicy::default()
        };
        assert!(allow.ip_allowed(ip("::ffff:127.0.0.2")), "canonical form");
        assert_eq!(allow.host_listed("Sink.Local."), Listed::Allowed);
        assert!(!allow.ip_allowed(ip("127.0.0.3")));
        let mut errors = Vec::new();
        WebhookPolicy {
            deny_hosts: vec!["10.0.0.0/33".into(), "x/y".into()],
            ..WebhookPolicy::default()
        }
        .validate(&mut errors);
        assert_eq!(errors.len(), 2, "{errors:?}");
    }

    #[tokio::test]
    async fn urls_with_embedded_internal_addresses_are_refused() {
        let p = WebhookPolicy::default();
        for bad in [
            "http://[::127.0.0.1]/",
            "http://[::a9fe:a9fe]/",
            "http://[64:ff9b::a9fe:a9fe]/",
            "http://[64:ff9b:1::a00:1]/",
            "http://[2002:a9fe:a9fe::]/",
            "http://[fec0::1]/",
            "http://198.18.0.1/",
            "http://240.0.0.1/",
        ] {
            assert!(p.check_url(bad).await.is_err(), "{bad}");
        }
        assert!(p.check_url("http://[64:ff9b::808:808]/").await.is_ok());
    }
}

//! Trusted proxies: which TCP peers may name the client (`X-Forwarded-For`, `Forwarded: for=`),
//! and the client address they name. From any other peer these headers are ignored, so a client
//! cannot pick the address its per-IP limits are keyed on.

use std::net::{IpAddr, SocketAddr};

use axum::http::HeaderMap;
use ipnet::IpNet;

/// The headers a reverse proxy adds; with `auth.mode = "auto"` on loopback they mean a proxy
/// publishes a gateway that has authentication off.
pub const FORWARDING_HEADERS: [&str; 3] = ["forwarded", "x-forwarded-for", "x-real-ip"];

/// An IP address or CIDR (`10.0.0.0/8`, `::1`).
pub fn parse_net(text: &str) -> Option<IpNet> {
    let text = text.trim();
    text.parse::<IpNet>()
        .ok()
        .or_else(|| text.parse::<IpAddr>().ok().map(IpNet::from))
}

/// Whether a request carries any forwarding header.
pub fn is_forwarded(headers: &HeaderMap) -> bool {
    FORWARDING_HEADERS.iter().any(|h| headers.contains_key(*h))
}

/// The configured trusted proxies.
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies {
    nets: Vec<IpNet>,
}

impl TrustedProxies {
    /// Parses the configured entries (validated at load; unparsable ones are skipped).
    pub fn new(entries: &[String]) -> Self {
        Self {
            nets: entries.iter().filter_map(|e| parse_net(e)).collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.nets.is_empty()
    }

    pub fn trusts(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.nets.iter().any(|n| n.contains(&ip))
    }

    /// The client of a request from `peer`: when `peer` is trusted, the rightmost forwarded
    /// address that is not itself a trusted proxy (`X-Forwarded-For`, else `Forwarded`);
    /// otherwise, or when the headers name nobody usable, `peer` itself.
    pub fn client(&self, peer: SocketAddr, headers: &HeaderMap) -> SocketAddr {
        if !self.trusts(peer.ip()) {
            return peer;
        }
        let mut chain = forwarded_for(headers, "x-forwarded-for", parse_xff);
        if chain.is_empty() {
            chain = forwarded_for(headers, "forwarded", parse_forwarded);
        }
        let mut client = peer.ip();
        for hop in chain.iter().rev() {
            match hop {
                Some(ip) => {
                    client = *ip;
                    if !self.trusts(*ip) {
                        break;
                    }
                }
                // An entry we cannot read (`unknown`, an obfuscated name): stop at the last
                // address we could; anything further left is the client's own claim.
                None => break,
            }
        }
        SocketAddr::new(canonical(client), peer.port())
    }
}

/// IPv4-mapped IPv6 (`::ffff:a.b.c.d`) as the IPv4 address it is.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Every hop of every instance of header `name`, in order; `None` for an unreadable hop.
fn forwarded_for(
    headers: &HeaderMap,
    name: &str,
    parse: fn(&str, &mut Vec<Option<IpAddr>>),
) -> Vec<Option<IpAddr>> {
    let mut hops = Vec::new();
    for value in headers.get_all(name) {
        match value.to_str() {
            Ok(text) => parse(text, &mut hops),
            Err(_) => hops.push(None),
        }
    }
    hops
}

/// `X-Forwarded-For: client, proxy1, proxy2`.
fn parse_xff(text: &str, hops: &mut Vec<Option<IpAddr>>) {
    hops.extend(text.split(',').map(|h| parse_node(h.trim())));
}

/// `Forwarded: for=192.0.2.60;proto=http, for="[2001:db8::1]:4711"` (RFC 7239).
fn parse_forwarded(text: &str, hops: &mut Vec<Option<IpAddr>>) {
    for element in text.split(',') {
        let node = element.split(';').find_map(|pair| {
            let (k, v) = pair.trim().split_once('=')?;
            k.trim().eq_ignore_ascii_case("for").then(|| v.trim())
        });
        if let Some(node) = node {
            hops.push(parse_node(node.trim_matches('"')));
        }
    }
}

/// `1.2.3.4`, `1.2.3.4:80`, `2001:db8::1`, `[2001:db8::1]:80`.
fn parse_node(node: &str) -> Option<IpAddr> {
    if let Ok(ip) = node.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Ok(addr) = node.parse::<SocketAddr>() {
        return Some(addr.ip());
    }
    node.strip_prefix('[')?.split(']').next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn only_trusted_peers_name_the_client_and_the_rightmost_untrusted_hop_wins() {
        let p = TrustedProxies::new(&["10.0.0.0/8".into(), "127.0.0.1".into()]);
        let proxy: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let stranger: SocketAddr = "203.0.113.9:5000".parse().unwrap();
        let xff = headers(&[("x-forwarded-for", "1.1.1.1, 198.51.100.7, 10.1.2.3")]);
        assert_eq!(p.client(proxy, &xff).ip().to_string(), "198.51.100.7");
        assert_eq!(p.client(stranger, &xff), stranger, "headers ignored");
        let fwd = headers(&[(
            "forwarded",
            "for=1.1.1.1, for=\"[2001:db8::1]:4711\";proto=https",
        )]);
        assert_eq!(p.client(proxy, &fwd).ip().to_string(), "2001:db8::1");
        let all_trusted = headers(&[("x-forwarded-for", "10.9.9.9")]);
        assert_eq!(p.client(proxy, &all_trusted).ip().to_string(), "10.9.9.9");
        let garbage = headers(&[("x-forwarded-for", "1.1.1.1, unknown")]);
        assert_eq!(p.client(proxy, &garbage), proxy);
        assert!(parse_net("::ffff:0:0/96").is_some() && parse_net("nope").is_none());
        assert!(p.trusts("::ffff:127.0.0.1".parse().unwrap()));
    }
}

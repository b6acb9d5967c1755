//! Open-connection caps, enforced at accept: a global cap (`server.max_connections`) and a
//! per-client-IP cap (`server.max_connections_per_ip`, IPv6 keyed by /64). A `ConnSlot` is owned
//! by the connection's IO, so an upgraded WebSocket keeps its slot for its whole life.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use metrics::gauge;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::metrics as m;

/// Why a connection was refused (the `reason` label of `voxgate_connections_refused_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    MaxConnections,
    MaxConnectionsPerIp,
}

impl Refused {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::MaxConnections => "max_connections",
            Self::MaxConnectionsPerIp => "max_connections_per_ip",
        }
    }
}

type Counts = Arc<Mutex<HashMap<IpAddr, usize>>>;

/// The caps and the open connections per client key (an entry per key with open connections,
/// so the map holds at most `max_connections` entries).
pub struct ConnLimits {
    global: Arc<Semaphore>,
    per_ip: Counts,
    max_per_ip: usize,
}

/// One client key's share of the per-IP cap; released on drop.
pub struct IpSlot {
    key: IpAddr,
    counts: Counts,
}

/// What an open connection holds: its global permit, its peer's per-IP slot (unless the peer is
/// a trusted proxy), and the slot of the client a trusted proxy named for the current request.
pub struct ConnSlot {
    _permit: OwnedSemaphorePermit,
    _peer: Option<IpSlot>,
    pub forwarded: Arc<Mutex<Option<IpSlot>>>,
}

impl ConnLimits {
    pub fn new(max_connections: usize, max_per_ip: usize) -> Self {
        Self {
            global: Arc::new(Semaphore::new(max_connections)),
            per_ip: Arc::default(),
            max_per_ip,
        }
    }

    /// Admits a new connection from `peer`; `per_ip = false` for a trusted proxy (its clients
    /// are counted per request, by the address it names).
    pub fn admit(&self, peer: IpAddr, per_ip: bool) -> Result<ConnSlot, Refused> {
        let permit = self
            .global
            .clone()
            .try_acquire_owned()
            .map_err(|_| Refused::MaxConnections)?;
        let peer = if per_ip {
            Some(self.ip_slot(peer)?)
        } else {
            None
        };
        gauge!(m::CONNECTIONS_OPEN).increment(1.0);
        Ok(ConnSlot {
            _permit: permit,
            _peer: peer,
            forwarded: Arc::default(),
        })
    }

    /// One more open connection for client `ip`, or `MaxConnectionsPerIp`.
    pub fn ip_slot(&self, ip: IpAddr) -> Result<IpSlot, Refused> {
        let key = ip_key(ip);
        let mut counts = self
            .per_ip
            .lock()
            .expect("per-IP count lock is never poisoned");
        let n = counts.entry(key).or_insert(0);
        if *n >= self.max_per_ip {
            return Err(Refused::MaxConnectionsPerIp);
        }
        *n += 1;
        Ok(IpSlot {
            key,
            counts: self.per_ip.clone(),
        })
    }

    /// Client keys with open connections (for tests and debugging).
    pub fn tracked(&self) -> usize {
        self.per_ip.lock().map_or(0, |c| c.len())
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        gauge!(m::CONNECTIONS_OPEN).decrement(1.0);
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut counts = self
            .counts
            .lock()
            .expect("per-IP count lock is never poisoned");
        if let Some(n) = counts.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.key);
            }
        }
    }
}

/// The key a client is counted under: its IPv4 address, or its IPv6 /64 (one subscriber line
/// usually has a whole /64, so per-address keys would not limit anyone).
fn ip_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        },
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_are_enforced_and_released_per_key() {
        let l = ConnLimits::new(3, 2);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let s1 = l.admit(a, true).unwrap();
        let _s2 = l.admit(a, true).unwrap();
        assert_eq!(l.admit(a, true).err(), Some(Refused::MaxConnectionsPerIp));
        drop(s1);
        let _s3 = l.admit(a, true).unwrap();
        let b: IpAddr = "2001:db8::1".parse().unwrap();
        let c: IpAddr = "2001:db8::2".parse().unwrap();
        assert_eq!(ip_key(b), ip_key(c), "one /64");
        let _b1 = l.admit(b, true).unwrap();
        let d: IpAddr = "2001:db9::1".parse().unwrap();
        assert_eq!(l.admit(d, true).err(), Some(Refused::MaxConnections));
        assert_eq!(l.tracked(), 2);
    }
}

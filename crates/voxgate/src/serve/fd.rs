//! The descriptor budget: the soft `RLIMIT_NOFILE` is raised to the hard limit at start, and
//! `server.max_connections` is clamped (with a loud warning) to what fits beside the
//! descriptors the process needs for everything else (outbound HTTP, the bus, logs).

use tracing::{error, info};

/// Descriptors kept for everything but inbound connections: a quarter of the limit, at least 64.
pub fn reserved(limit: u64) -> u64 {
    (limit / 4).max(64)
}

/// Raises the soft descriptor limit to the hard one; returns the soft limit now in force.
#[cfg(unix)]
pub fn raise_nofile_limit() -> std::io::Result<u64> {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass; no other memory is touched.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let before = rl.rlim_cur;
    // Some systems report an infinite hard limit that setrlimit then refuses; cap it.
    let target = if rl.rlim_max == libc::RLIM_INFINITY {
        1 << 20
    } else {
        rl.rlim_max
    };
    if before < target {
        rl.rlim_cur = target;
        // SAFETY: setrlimit reads the struct we pass; no other memory is touched.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &rl) } != 0 {
            return Ok(before);
        }
    }
    Ok(rl.rlim_cur.max(before))
}

#[cfg(not(unix))]
pub fn raise_nofile_limit() -> std::io::Result<u64> {
    Ok(u64::MAX)
}

/// `max_connections` as it fits the descriptor limit: raises the limit, logs it, and clamps
/// (logging an error) when the configured cap does not fit.
pub fn fit_connections(max_connections: usize) -> usize {
    let limit = match raise_nofile_limit() {
        Ok(limit) => limit,
        Err(e) => {
            error!(error = %e, "could not read the descriptor limit; connection cap unchecked");
            return max_connections;
        }
    };
    let usable = limit.saturating_sub(reserved(limit)).max(1);
    info!(
        nofile = limit,
        usable_for_connections = usable,
        "descriptor limit"
    );
    if max_connections as u64 > usable {
        error!(
            configured = max_connections,
            clamped_to = usable,
            nofile = limit,
            "server.max_connections does not fit the descriptor limit (RLIMIT_NOFILE); \
             clamping it: raise the hard limit (e.g. LimitNOFILE=) or lower max_connections"
        );
        return usable as usize;
    }
    max_connections
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limit_is_raised_and_a_cap_that_cannot_fit_is_clamped() {
        let limit = raise_nofile_limit().unwrap();
        assert!(limit >= 64);
        let fits = fit_connections(1);
        assert_eq!(fits, 1);
        let clamped = fit_connections(usize::MAX);
        assert_eq!(clamped as u64, limit - reserved(limit));
    }
}

//! Admission: whether a new connection may start a session at all, checked in a fixed order
//! (cheapest and most general first): shutdown, per-IP connection rate, token, capacity permit.

use tokio::sync::OwnedSemaphorePermit;

use super::refusal::{Refusal, RefuseReason};
use super::request::ConnectRequest;
use crate::auth::Principal;
use crate::shared::Shared;

/// A connection that got in: who it is (when tokens are on) and its capacity permit.
pub struct Admitted {
    pub principal: Option<Principal>,
    pub permit: OwnedSemaphorePermit,
}

/// Admits or refuses a connection.
pub fn admit(shared: &Shared, req: &ConnectRequest) -> Result<Admitted, Refusal> {
    open(shared)?;
    rate(shared, req)?;
    let principal = verify(shared, req)?;
    let permit = permit(shared)?;
    Ok(Admitted { principal, permit })
}

/// Step 1: the server is not draining.
pub fn open(shared: &Shared) -> Result<(), Refusal> {
    if shared.shutdown.is_cancelled() {
        return Err(Refusal::new(
            RefuseReason::ShuttingDown,
            "server is shutting down; retry on another instance",
        ));
    }
    Ok(())
}

/// Step 2: the client's address is within its connection rate.
pub fn rate(shared: &Shared, req: &ConnectRequest) -> Result<(), Refusal> {
    shared
        .rate
        .check(req.peer.ip(), std::time::Instant::now())
        .map_err(|retry| {
            Refusal::new(
                RefuseReason::RateLimited,
                format!(
                    "too many new connections from this address; retry after {} ms",
                    retry.as_millis().max(1)
                ),
            )
        })
}

/// Step 3: the token, when tokens are on.
pub fn verify(shared: &Shared, req: &ConnectRequest) -> Result<Option<Principal>, Refusal> {
    shared
        .auth
        .verify(req.token.as_deref())
        .map_err(|why| Refusal::new(RefuseReason::Unauthorized, why))
}

/// Step 4: one of the instance's session permits.
pub fn permit(shared: &Shared) -> Result<OwnedSemaphorePermit, Refusal> {
    shared.permits.clone().try_acquire_owned().map_err(|_| {
        Refusal::new(
            RefuseReason::OverCapacity,
            format!(
                "server at capacity ({} sessions); retry later",
                shared.cfg.server.max_sessions
            ),
        )
    })
}

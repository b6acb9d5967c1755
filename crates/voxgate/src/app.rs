//! The gateway application: builds the shared state (after connecting the bus, when there is
//! one), composes the routes, serves until shutdown, then drains sessions within the grace period.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::Config;
use crate::serve::ServeOptions;
use crate::shared::Shared;

/// Every route of the gateway.
pub fn router(shared: Arc<Shared>) -> Router {
    crate::ingest::routes()
        .merge(crate::admin::routes())
        .route(
            "/v1/sessions/{id}/subscribe",
            get(crate::subscribe::subscribe),
        )
        .route(
            "/v1/sessions/{id}/recording",
            get(crate::recording_http::wav),
        )
        .route(
            "/v1/sessions/{id}/recording/events",
            get(crate::recording_http::events),
        )
        .with_state(shared)
}

/// Connects the delivery bus when `[bus] url` is set.
async fn connect_bus(cfg: &Config) -> anyhow::Result<Option<crate::bus::Bus>> {
    let Some(url) = &cfg.bus.url else {
        return Ok(None);
    };
    info!(%url, "connecting to the delivery bus");
    Ok(Some(
        crate::bus::Bus::connect(&cfg.bus, "voxgate-gateway").await?,
    ))
}

/// Serves until `shutdown` is cancelled, then drains sessions within the grace period.
pub async fn run(
    cfg: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let grace = cfg.server.shutdown_grace();
    let bus = connect_bus(&cfg).await?;
    let shared = Shared::new(cfg, shutdown.clone(), bus)?;
    let opts = ServeOptions::from_config(&shared.cfg)?;
    info!(addr = %listener.local_addr()?, tls = opts.tls.is_some(), max_connections = opts.max_connections,
        process_memory_bound = shared.cfg.process_memory_bound(), "voxgate listening");
    let stop = shutdown.clone();
    let draining = shared.clone();
    tokio::spawn(async move {
        stop.cancelled().await;
        draining.ready.store(false, Ordering::SeqCst);
        info!("shutdown: no longer accepting; flushing sessions");
    });
    if let Some(audiosocket) = crate::ingest::audiosocket::bind(&shared).await? {
        tokio::spawn(crate::ingest::audiosocket::serve(
            audiosocket,
            shared.clone(),
        ));
    }
    crate::serve::serve(listener, router(shared.clone()), opts, shutdown).await;
    shared.tracker.close();
    if tokio::time::timeout(grace, shared.tracker.wait())
        .await
        .is_err()
    {
        warn!(
            remaining = shared.tracker.len(),
            "shutdown grace period over; exiting with sessions still flushing"
        );
    }
    info!("voxgate stopped");
    Ok(())
}

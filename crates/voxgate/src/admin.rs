//! Operator endpoints: the browser page, `/livez`, `/readyz` and `/metrics`.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use metrics::gauge;

use crate::metrics as m;
use crate::shared::Shared;

pub fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/", get(index))
        .route("/metrics", get(metrics_page))
        .route("/livez", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
}

async fn index() -> Html<&'static str> {
    Html(include_str!("../assets/index.html"))
}

async fn readyz(State(shared): State<Arc<Shared>>) -> Response {
    // With a bus, a gateway that cannot reach it takes no new sessions (their audio could only
    // fill bounded buffers): the load balancer sends them to one that can.
    let bus_up = shared.bus.as_ref().is_none_or(|b| b.is_connected());
    if let Some(bus) = &shared.bus {
        gauge!(m::BUS_CONNECTED).set(if bus.is_connected() { 1.0 } else { 0.0 });
    }
    if !bus_up {
        return (StatusCode::SERVICE_UNAVAILABLE, "bus disconnected").into_response();
    }
    if shared.ready.load(Ordering::SeqCst) && !shared.shutdown.is_cancelled() {
        // Detail lines (speech-to-text backend health) follow; a failing backend degrades
        // transcripts, not ingest, so it does not make the instance unready.
        let mut body = String::from("ready");
        for line in shared.stt.health_lines() {
            body.push('\n');
            body.push_str(&line);
        }
        (StatusCode::OK, body).into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down").into_response()
    }
}

async fn metrics_page(State(shared): State<Arc<Shared>>) -> Response {
    (
        [("content-type", "text/plain; version=0.0.4")],
        m::render(&shared.metrics),
    )
        .into_response()
}

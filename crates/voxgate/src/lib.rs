//! voxgate: the server and CLI around the sans-IO cores.
//!
//! Layers, with dependencies pointing one way (`app` → `ingest` → `fanout`/`bus` → `config`):
//! - `ingest`: an upgraded socket → frontend → `ConnectRequest` → prepared session → `Connection`;
//! - `fanout`: the consumers a session fans out to, each with its bounded queue;
//! - `bus`: the NATS JetStream publisher and the `voxgate deliver` worker;
//! - `recording`: recordings in object storage (layout, store, reading one back as a WAV);
//! - `app`, `admin`, `subscribe`, `shared`, `shutdown`: the process around them;
//! - `cli`: the subcommands besides `serve`.

pub mod admin;
pub mod app;
pub mod auth;
pub mod bus;
pub mod cli;
pub mod config;
pub mod fanout;
#[doc(hidden)]
pub mod fuzzing;
pub mod ingest;
pub mod metrics;
pub mod omi_timelines;
pub mod policy;
pub mod proxy;
pub mod recording;
pub mod recording_http;
pub mod serve;
pub mod sessions;
pub mod shared;
pub mod shutdown;
pub mod stt_options;
pub mod subscribe;

/// The old path of the fan-out layer (kept for integration tests and embedders).
pub use fanout as consumers;

/// The old path of the gateway's entry point (kept for integration tests and embedders).
pub mod server {
    pub use crate::app::{router, run};
}

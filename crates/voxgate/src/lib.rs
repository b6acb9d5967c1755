//! voxgate: the server and CLI around the sans-IO cores.

pub mod auth;
pub mod bus;
pub mod cli;
pub mod config;
pub mod connection;
pub mod fanout;
pub mod frontend;
pub mod handoff;
pub mod hook;
pub mod metrics;
pub mod omi;
pub mod policy;
pub mod server;
pub mod twilio;

/// The old path of the fan-out layer (kept for integration tests and embedders).
pub use fanout as consumers;

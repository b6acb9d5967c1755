//! Omi's `audio_timeline=2` timelines, below `ingest` so the instance's shared state can keep
//! them between sockets: `timeline` places each frame and applies the replay rules (pure),
//! `ledger` keeps timelines between a socket and its reconnect (bounded, expiring).

pub mod ledger;
pub mod timeline;

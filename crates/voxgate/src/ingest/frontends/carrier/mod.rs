//! Phone carriers and PBXs besides Twilio, by protocol family: `json` (SignalWire, Telnyx,
//! Plivo, Exotel: JSON events with base64 audio, one table row each in `spec`) and `l16`
//! (Vonage, jambonz, FreeSWITCH audio fork: a JSON description, then binary L16), and Asterisk's
//! `audiosocket` (type/length frames over TCP) and `asterisk_ws` (`chan_websocket`'s control
//! events, served by `l16`); what they
//! share is in `call`.

pub mod asterisk_ws;
pub mod audiosocket;
pub mod call;
pub mod json;
pub mod l16;
pub mod reorder;
pub mod spec;
pub mod start;

use super::Accept;
use crate::ingest::client::{WsSink, WsStream};
use crate::ingest::request::{Carrier, ConnectRequest};
use crate::shared::Shared;

/// Accepts a connection on a carrier's WebSocket path.
pub async fn accept(
    shared: &Shared,
    sink: &mut WsSink,
    stream: &mut WsStream,
    req: ConnectRequest,
    carrier: Carrier,
) -> Accept {
    match spec::json_spec(carrier) {
        Some(spec) => json::accept(shared, sink, stream, req, spec).await,
        None => l16::accept(shared, sink, stream, req, carrier).await,
    }
}

//! Deepgram's live API on `/v1/listen`, for clients written against Deepgram (its SDKs,
//! Pipecat, LiveKit): their query parameters, control messages and auth in, Deepgram's message
//! shapes out, with any voxgate backend behind it.

pub mod render;

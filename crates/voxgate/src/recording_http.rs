//! `GET /v1/sessions/{id}/recording` (one WAV, streamed from the chunks) and
//! `GET /v1/sessions/{id}/recording/events` (JSON lines, then the summary). Tokens as for
//! subscribing (`Authorization: Bearer` or `?token=`): a token reads its own user's
//! recordings, and those its `sid`/`sessions` name in its grant owner's namespace. Unknown and
//! forbidden recordings get the same 404. (Beside `recording`, which the fan-out layer uses:
//! this module needs `Shared`.)

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use metrics::counter;
use tracing::warn;

use crate::auth::bearer;
use crate::metrics::RECORDING_FETCHES;
use crate::recording::assemble::{self, FetchError};
use crate::recording::layout::SessionKeys;
use crate::recording::Store;
use crate::shared::Shared;

/// What a fetch asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    Wav,
    Events,
}

pub async fn wav(
    State(state): State<Arc<Shared>>,
    Path(id): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    fetch(&state, &id, &query, &headers, Part::Wav).await
}

pub async fn events(
    State(state): State<Arc<Shared>>,
    Path(id): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    fetch(&state, &id, &query, &headers, Part::Events).await
}

fn outcome(label: &'static str) {
    counter!(RECORDING_FETCHES, "outcome" => label).increment(1);
}

async fn fetch(
    state: &Shared,
    id: &str,
    query: &HashMap<String, String>,
    headers: &HeaderMap,
    part: Part,
) -> Response {
    let token = bearer(headers).or_else(|| query.get("token").cloned());
    let principal = match state.auth.verify(token.as_deref()) {
        Ok(p) => p,
        Err(why) => {
            outcome("unauthorized");
            return (StatusCode::UNAUTHORIZED, why).into_response();
        }
    };
    let store = &state.recordings;
    // Its own user's namespace first, then the grant owner's for sessions the token names.
    let mut owners = vec![principal.as_ref().map_or("", |p| p.user.as_str())];
    if let Some(p) = principal.as_ref().filter(|p| p.names(id)) {
        owners.push(p.grant_owner());
    }
    for owner in owners {
        let keys = SessionKeys::new(&store.prefix, owner, id);
        match read(store, &keys, part, &state.cfg.recording.keys).await {
            Err(FetchError::NotFound) => continue,
            Err(e @ (FetchError::NoKey | FetchError::Decrypt(_))) => {
                outcome("decrypt_failed");
                tracing::error!(session = %id, error = %e, "recording fetch cannot decrypt");
                return (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response();
            }
            Err(e) => {
                outcome("failed");
                warn!(session = %id, error = %e, "recording fetch failed");
                return (StatusCode::BAD_GATEWAY, e.to_string()).into_response();
            }
            Ok(resp) => {
                outcome("ok");
                return resp;
            }
        }
    }
    outcome("not_found");
    (
        StatusCode::NOT_FOUND,
        format!("no recording of session {id:?} that this token may read"),
    )
        .into_response()
}

async fn read(
    store: &Store,
    keys: &SessionKeys,
    part: Part,
    user_keys: &std::collections::BTreeMap<String, String>,
) -> Result<Response, FetchError> {
    match part {
        Part::Wav => {
            let key = assemble::user_key(store, keys, user_keys).await;
            let wav = assemble::wav(store, keys, key).await?;
            Ok((
                [
                    (header::CONTENT_TYPE, "audio/wav".to_owned()),
                    (header::CONTENT_LENGTH, wav.bytes.to_string()),
                ],
                Body::from_stream(wav.body),
            )
                .into_response())
        }
        Part::Events => {
            let lines = assemble::events(store, keys).await?;
            Ok(([(header::CONTENT_TYPE, "application/x-ndjson")], lines).into_response())
        }
    }
}

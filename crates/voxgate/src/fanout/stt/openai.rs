//! OpenAI-compatible transcription: `POST {url}/v1/audio/transcriptions`, multipart with
//! `file` (a 16 kHz mono PCM16 WAV of the utterance), `model`, optional `language` and `prompt`,
//! `response_format=json`; the answer is `{"text": "..."}`. Served by OpenAI, faster-whisper
//! servers (speaches), whisper.cpp's server with `--inference-path /v1/audio/transcriptions`,
//! vLLM and others.

use std::time::Duration;

use metrics::counter;
use reqwest::multipart::{Form, Part};
use tracing::debug;

use super::error::SttError;
use crate::config::{SessionStt, SttConfig};
use crate::fanout::contract::wav_bytes;
use crate::fanout::http::{classify_status, no_answer, HttpOutcome, NoAnswer};
use crate::fanout::retry::{with_retries, Attempt};
use crate::metrics::STT_REQUESTS;

/// The endpoint for a base URL (a full endpoint URL is used as it is).
pub fn endpoint(url: &str) -> String {
    let base = url.trim_end_matches('/');
    if base.ends_with("/audio/transcriptions") {
        base.to_owned()
    } else if base.ends_with("/v1") {
        format!("{base}/audio/transcriptions")
    } else {
        format!("{base}/v1/audio/transcriptions")
    }
}

#[derive(serde::Deserialize)]
struct Answer {
    text: String,
}

/// One utterance, with retries; the error says why it was given up.
pub async fn transcribe(
    client: &reqwest::Client,
    cfg: &SttConfig,
    opts: &SessionStt,
    pcm: &[i16],
) -> Result<String, SttError> {
    let wav = bytes::Bytes::from(wav_bytes(pcm));
    let url = endpoint(&cfg.url);
    let wav = &wav;
    let url = url.as_str();
    with_retries(&cfg.retry_policy(), move |attempt| async move {
        let outcome = request(client, cfg, opts, url, wav).await;
        let name = cfg.name.clone();
        match outcome {
            Ok(text) => {
                counter!(STT_REQUESTS, "backend" => name, "outcome" => "success").increment(1);
                Attempt::Done(text)
            }
            Err((label, retry, error)) => {
                debug!(stt = %name, attempt, %error, "transcription attempt failed");
                counter!(STT_REQUESTS, "backend" => name, "outcome" => label).increment(1);
                if retry {
                    Attempt::Retry(error)
                } else {
                    Attempt::Fatal(error)
                }
            }
        }
    })
    .await
}

/// One attempt: the text, or the `outcome` label, whether to retry, and the error.
async fn request(
    client: &reqwest::Client,
    cfg: &SttConfig,
    opts: &SessionStt,
    url: &str,
    wav: &bytes::Bytes,
) -> Result<String, (&'static str, bool, SttError)> {
    let mut form = Form::new()
        .part(
            "file",
            Part::bytes(wav.to_vec())
                .file_name("utterance.wav")
                .mime_str("audio/wav")
                .expect("audio/wav is a valid MIME type"),
        )
        .text(
            "model",
            opts.model.clone().unwrap_or_else(|| "whisper-1".into()),
        )
        .text("response_format", "json");
    if let Some(language) = &opts.language {
        form = form.text("language", language.clone());
    }
    if let Some(prompt) = opts.openai_prompt() {
        form = form.text("prompt", prompt);
    }
    let mut req = client
        .post(url)
        .timeout(Duration::from_millis(cfg.timeout_ms))
        .multipart(form);
    if let Some(key) = &cfg.api_key {
        req = req.bearer_auth(key);
    }
    let resp = req.send().await.map_err(|e| match no_answer(e) {
        NoAnswer::Timeout(_) => ("timeout", true, SttError::Timeout),
        NoAnswer::Transport(e) => ("transport_error", true, SttError::Transport(e)),
    })?;
    let status = resp.status();
    let retry = match classify_status(status) {
        HttpOutcome::Delivered => {
            return match resp.json::<Answer>().await {
                Ok(a) => Ok(a.text.trim().to_owned()),
                Err(e) => Err(("bad_answer", false, SttError::BadAnswer(e))),
            };
        }
        outcome => matches!(outcome, HttpOutcome::Retry(_)),
    };
    let body: String = resp
        .text()
        .await
        .unwrap_or_default()
        .chars()
        .take(200)
        .collect();
    Err(("http_error", retry, SttError::Status { status, body }))
}

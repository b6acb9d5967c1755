//! A recording read back: its audio objects listed (only their names are kept), then streamed
//! in sample order as one WAV, one object at a time. Missing ranges (audio the recorder
//! dropped) are silence, so the WAV keeps the session's timeline; overlaps (a chunk written
//! twice under different cuts) keep the first bytes. Memory stays at one object's stream
//! buffer however long the session.

use bytes::Bytes;
use futures_util::stream::{self, BoxStream, StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{GetOptions, ObjectStore};

use super::crypt::{CryptError, Key};
use super::layout::{audio_range, SessionKeys};
use super::Store;

/// Most audio objects one recording may list (10 s chunks: over 27 hours).
pub const MAX_CHUNKS: usize = 10_000;
/// Most event objects read for one recording.
pub const MAX_EVENT_OBJECTS: usize = 100_000;
/// Silence is sent in blocks of this many bytes.
const SILENCE_BLOCK: usize = 64 * 1024;

/// Why a recording cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("no recording of that session")]
    NotFound,
    #[error("the recording has more than {MAX_CHUNKS} audio objects")]
    TooMany,
    #[error("recording store: {0}")]
    Store(#[from] object_store::Error),
    #[error("the recording is encrypted and no key is configured for its user")]
    NoKey,
    #[error(transparent)]
    Decrypt(#[from] CryptError),
}

/// One audio object: samples `[start, end)` at `path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    pub start: u64,
    pub end: u64,
    pub path: Path,
    /// Sealed with the user's key (`.pcm.enc`).
    pub encrypted: bool,
}

/// The audio objects of a recording in sample order (names that are not sample ranges are
/// skipped).
pub async fn list_chunks(store: &Store, keys: &SessionKeys) -> Result<Vec<Chunk>, FetchError> {
    let mut listing = store.inner.list(Some(&keys.audio_dir()));
    let mut chunks = Vec::new();
    while let Some(meta) = listing.try_next().await? {
        if let Some((start, end)) = audio_range(&meta.location) {
            if chunks.len() == MAX_CHUNKS {
                return Err(FetchError::TooMany);
            }
            chunks.push(Chunk {
                start,
                end,
                encrypted: meta.location.as_ref().ends_with(".enc"),
                path: meta.location,
            });
        }
    }
    chunks.sort_by_key(|c| (c.start, c.end));
    Ok(chunks)
}

/// What to stream from each chunk: `(skip bytes at its start, silence before it)`, keeping
/// the first bytes of overlaps. Returns the plan and the total samples.
pub fn plan(chunks: &[Chunk]) -> (Vec<(u64, u64)>, u64) {
    let mut pos = 0u64;
    let mut out = Vec::with_capacity(chunks.len());
    for c in chunks {
        let silence = c.start.saturating_sub(pos);
        let skip = pos.saturating_sub(c.start).min(c.end - c.start);
        out.push((skip * 2, silence));
        pos = pos.max(c.end);
    }
    (out, pos)
}

/// The 44-byte header of a PCM16 16 kHz mono WAV of `samples` samples.
pub fn wav_header(samples: u64) -> [u8; 44] {
    let data = u32::try_from(samples * 2).unwrap_or(u32::MAX - 36);
    let mut h = [0u8; 44];
    let rate = voxgate_session::SAMPLE_RATE;
    let parts: [&[u8]; 13] = [
        b"RIFF",
        &(36 + data).to_le_bytes(),
        b"WAVEfmt ",
        &16u32.to_le_bytes(),
        &1u16.to_le_bytes(),
        &1u16.to_le_bytes(),
        &rate.to_le_bytes(),
        &(rate * 2).to_le_bytes(),
        &2u16.to_le_bytes(),
        &16u16.to_le_bytes(),
        b"data",
        &data.to_le_bytes(),
        &[],
    ];
    let mut at = 0;
    for p in parts {
        h[at..at + p.len()].copy_from_slice(p);
        at += p.len();
    }
    h
}

/// A recording as one WAV: its length in bytes and its bytes as a stream.
pub struct Wav {
    pub bytes: u64,
    pub body: BoxStream<'static, Result<Bytes, FetchError>>,
}

/// Opens session `keys` as one WAV; `NotFound` when it has no audio. Encrypted chunks are
/// opened with `key`: without one, or when the first does not open, this fails before any byte
/// is sent (a wrong key fails loudly, not as a WAV of noise).
pub async fn wav(store: &Store, keys: &SessionKeys, key: Option<Key>) -> Result<Wav, FetchError> {
    let chunks = list_chunks(store, keys).await?;
    if chunks.is_empty() {
        return Err(FetchError::NotFound);
    }
    if let Some(first) = chunks.iter().find(|c| c.encrypted) {
        let key = key.as_ref().ok_or(FetchError::NoKey)?;
        let sealed = store.inner.get_opts(&first.path, GetOptions::new()).await?;
        key.open(&sealed.bytes().await?)?;
    }
    let (plan, samples) = plan(&chunks);
    let header = stream::once(async move { Ok(Bytes::copy_from_slice(&wav_header(samples))) });
    let inner = store.inner.clone();
    let parts = stream::iter(chunks.into_iter().zip(plan)).flat_map(move |(c, (skip, gap))| {
        let audio = chunk_bytes(inner.clone(), c, skip, key.clone());
        silence(gap).chain(audio).boxed()
    });
    Ok(Wav {
        bytes: 44 + samples * 2,
        body: header.chain(parts).boxed(),
    })
}

/// The key of the recording's user (its summary's `uid`) among `keys` (`recording.keys`);
/// `None` when there is no summary yet, no key for the user, or no keys at all.
pub async fn user_key(
    store: &Store,
    session: &SessionKeys,
    keys: &std::collections::BTreeMap<String, String>,
) -> Option<Key> {
    if keys.is_empty() {
        return None;
    }
    let path = session.summary();
    let got = store.inner.get_opts(&path, GetOptions::new());
    let summary: serde_json::Value =
        serde_json::from_slice(&got.await.ok()?.bytes().await.ok()?).ok()?;
    let hex = keys.get(summary.get("uid")?.as_str()?)?;
    Key::from_hex(hex).ok()
}

/// `samples` of silence in bounded blocks.
fn silence(samples: u64) -> BoxStream<'static, Result<Bytes, FetchError>> {
    let mut left = samples * 2;
    stream::iter(std::iter::from_fn(move || {
        let n = left.min(SILENCE_BLOCK as u64) as usize;
        left -= n as u64;
        (n > 0).then(|| Ok(Bytes::from(vec![0u8; n])))
    }))
    .boxed()
}

/// One chunk's bytes past its first `skip`, exactly `(end - start) * 2 - skip` of them: a short
/// object is padded with silence, a long one cut.
fn chunk_bytes(
    store: std::sync::Arc<dyn ObjectStore>,
    c: Chunk,
    skip: u64,
    key: Option<Key>,
) -> BoxStream<'static, Result<Bytes, FetchError>> {
    let want = (c.end - c.start) * 2 - skip;
    let fetch = async move {
        let got = store.get_opts(&c.path, GetOptions::new()).await?;
        // A sealed object opens whole (its tag is at its end): one chunk in memory.
        let raw = match (c.encrypted, key) {
            (false, _) => got.into_stream().map_err(FetchError::from).boxed(),
            (true, None) => return Err(FetchError::NoKey),
            (true, Some(key)) => {
                let plain = Bytes::from(key.open(&got.bytes().await?)?);
                stream::once(std::future::ready(Ok(plain))).boxed()
            }
        };
        // Whole objects are read (a range past a short object's end is an error on some
        // stores): the first `skip` bytes are dropped here, and at most `want` kept.
        let (mut to_skip, mut left) = (skip, want);
        let body = raw.map_ok(move |b| {
            let from = to_skip.min(b.len() as u64) as usize;
            to_skip -= from as u64;
            let keep = left.min((b.len() - from) as u64) as usize;
            left -= keep as u64;
            b.slice(from..from + keep)
        });
        Ok::<_, FetchError>(body)
    };
    let counted = stream::once(fetch).try_flatten();
    // Pad a short object: count what came, then add the rest as silence.
    let seen = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let seen2 = seen.clone();
    let body = counted.inspect_ok(move |b| {
        seen2.fetch_add(b.len() as u64, std::sync::atomic::Ordering::Relaxed);
    });
    let pad = stream::once(async move {
        let got = seen.load(std::sync::atomic::Ordering::Relaxed);
        Ok(Bytes::from(vec![0u8; want.saturating_sub(got) as usize]))
    })
    .try_filter(|b| std::future::ready(!b.is_empty()));
    body.chain(pad).boxed()
}

/// Every event line of the recording in order, then its summary (when written) as one last
/// line `{"type":"RecordingSummary",...}`.
pub async fn events(store: &Store, keys: &SessionKeys) -> Result<Vec<u8>, FetchError> {
    let mut listing = store.inner.list(Some(&keys.events_dir()));
    let mut paths = Vec::new();
    while let Some(meta) = listing.try_next().await? {
        if paths.len() == MAX_EVENT_OBJECTS {
            return Err(FetchError::TooMany);
        }
        paths.push(meta.location);
    }
    paths.sort();
    let mut out = Vec::new();
    for p in &paths {
        out.extend_from_slice(
            &store
                .inner
                .get_opts(p, GetOptions::new())
                .await?
                .bytes()
                .await?,
        );
    }
    match store
        .inner
        .get_opts(&keys.summary(), GetOptions::new())
        .await
    {
        Ok(s) => {
            out.extend_from_slice(&s.bytes().await?);
            out.push(b'\n');
        }
        Err(object_store::Error::NotFound { .. }) if !paths.is_empty() => {}
        Err(object_store::Error::NotFound { .. }) => return Err(FetchError::NotFound),
        Err(e) => return Err(e.into()),
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(start: u64, end: u64) -> Chunk {
        Chunk {
            start,
            end,
            path: Path::from("x"),
            encrypted: false,
        }
    }

    #[test]
    fn gaps_are_silence_and_overlaps_keep_the_first_bytes() {
        let (p, total) = plan(&[chunk(0, 100), chunk(150, 200), chunk(180, 300)]);
        assert_eq!(p, [(0, 0), (0, 50), (40, 0)]);
        assert_eq!(total, 300);
        let (p, total) = plan(&[chunk(0, 100), chunk(0, 100)]);
        assert_eq!(p, [(0, 0), (200, 0)], "an exact duplicate adds nothing");
        assert_eq!(total, 100);
    }

    #[test]
    fn the_header_is_a_16k_mono_pcm16_wav() {
        let h = wav_header(16_000);
        let reader =
            hound::WavReader::new(std::io::Cursor::new([&h[..], &vec![0u8; 32_000]].concat()))
                .unwrap();
        let spec = reader.spec();
        assert_eq!(
            (spec.sample_rate, spec.channels, spec.bits_per_sample),
            (16_000, 1, 16)
        );
        assert_eq!(reader.len(), 16_000);
    }

    #[tokio::test]
    async fn a_recording_streams_as_one_wav_in_sample_order() {
        let store = Store {
            inner: std::sync::Arc::new(object_store::memory::InMemory::new()),
            prefix: Path::default(),
        };
        let keys = SessionKeys::new(&store.prefix, "", "s");
        let put = |start: u64, end: u64, v: i16| {
            let pcm: Vec<u8> = (start..end).flat_map(|_| v.to_le_bytes()).collect();
            let (inner, path) = (store.inner.clone(), keys.audio(start, end));
            async move { inner.put(&path, pcm.into()).await.unwrap() }
        };
        use object_store::ObjectStoreExt;
        put(10, 20, 2).await;
        put(0, 10, 1).await;
        put(30, 40, 4).await;
        let got = wav(&store, &keys, None).await.unwrap();
        assert_eq!(got.bytes, 44 + 80);
        let parts: Vec<Bytes> = got.body.try_collect().await.unwrap();
        let bytes = parts.concat();
        assert_eq!(bytes.len() as u64, got.bytes);
        let samples: Vec<i16> = bytes[44..]
            .chunks(2)
            .map(|b| i16::from_le_bytes([b[0], b[1]]))
            .collect();
        let want: Vec<i16> = [1; 10]
            .into_iter()
            .chain([2; 10])
            .chain([0; 10])
            .chain([4; 10])
            .collect();
        assert_eq!(samples, want);
        let none = SessionKeys::new(&store.prefix, "", "other");
        assert!(matches!(
            wav(&store, &none, None).await,
            Err(FetchError::NotFound)
        ));
    }
}

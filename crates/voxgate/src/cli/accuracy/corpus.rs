//! The corpus items the accuracy report streams: every browser capture (sent as its recorded
//! messages at their recorded spacing) and the source speech as raw PCM, each with its text and
//! the WAV a backend is given directly.

use std::path::{Path, PathBuf};

use anyhow::Context;

/// How an item reaches the gateway.
pub enum Feed {
    /// The capture's messages with their receive times (ms).
    Capture(Vec<(f64, Vec<u8>)>),
    /// 16 kHz mono PCM16, sent as `encoding=linear16` in 100 ms messages.
    Pcm(Vec<i16>),
}

/// One corpus item.
pub struct Item {
    pub name: String,
    /// The spoken text.
    pub reference: String,
    pub feed: Feed,
    /// The same speech as 16 kHz mono PCM16 (a capture's reference decode), for the backend's
    /// own result.
    pub wav: Vec<i16>,
}

/// Every item of the corpus at `dir` whose name contains one of `only` (all when empty).
pub fn items(dir: &Path, only: &[String]) -> anyhow::Result<Vec<Item>> {
    let keep = |name: &str| only.is_empty() || only.iter().any(|o| name.contains(o.as_str()));
    let mut out = Vec::new();
    let mut indexes: Vec<PathBuf> = std::fs::read_dir(dir.join("captures"))
        .with_context(|| format!("reading {}", dir.join("captures").display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.to_string_lossy().ends_with(".index.json"))
        .collect();
    indexes.sort();
    for index in indexes {
        let stem = index
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".index.json"))
            .unwrap_or_default()
            .to_owned();
        if keep(&stem) {
            out.push(capture(dir, &stem, &index)?);
        }
    }
    for text in ["short", "medium", "long"] {
        let wav = dir.join(format!("source/{text}.wav"));
        let name = format!("{text}.wav (linear16)");
        if wav.exists() && keep(&name) {
            let pcm = read_wav(&wav)?;
            out.push(Item {
                name,
                reference: reference(dir, text)?,
                feed: Feed::Pcm(pcm.clone()),
                wav: pcm,
            });
        }
    }
    Ok(out)
}

/// The text a capture speaks: `short`, `medium` or `long` in its name.
fn text_of(stem: &str) -> anyhow::Result<&'static str> {
    ["short", "medium", "long"]
        .into_iter()
        .find(|t| stem.contains(t))
        .with_context(|| format!("capture {stem} names no corpus text"))
}

fn reference(dir: &Path, text: &str) -> anyhow::Result<String> {
    let path = dir.join(format!("source/{text}.txt"));
    std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
}

fn capture(dir: &Path, stem: &str, index: &Path) -> anyhow::Result<Item> {
    let idx: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(index)?)?;
    let data_file = idx["data_file"]
        .as_str()
        .context("index without data_file")?;
    let data = std::fs::read(dir.join("captures").join(data_file))?;
    let mut messages = Vec::new();
    for m in idx["messages"]
        .as_array()
        .context("index without messages")?
    {
        let at = m["t_recv_ms"].as_f64().unwrap_or(0.0);
        let o = m["offset"].as_u64().context("message offset")? as usize;
        let l = m["length"].as_u64().context("message length")? as usize;
        let bytes = data
            .get(o..o + l)
            .context("message outside the data file")?;
        messages.push((at, bytes.to_vec()));
    }
    let wav = read_wav(&dir.join(format!("captures/{stem}.decoded-16k.wav")))?;
    Ok(Item {
        name: stem.to_owned(),
        reference: reference(dir, text_of(stem)?)?,
        feed: Feed::Capture(messages),
        wav,
    })
}

/// A 16 kHz mono PCM16 WAV's samples.
fn read_wav(path: &Path) -> anyhow::Result<Vec<i16>> {
    let mut r =
        hound::WavReader::open(path).with_context(|| format!("opening {}", path.display()))?;
    let spec = r.spec();
    anyhow::ensure!(
        spec.sample_rate == 16_000 && spec.channels == 1 && spec.bits_per_sample == 16,
        "{} is not 16 kHz mono PCM16",
        path.display()
    );
    Ok(r.samples::<i16>().collect::<Result<_, _>>()?)
}

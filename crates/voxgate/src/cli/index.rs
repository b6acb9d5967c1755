//! Capture indexes (`capture-index/1`): the WebSocket message boundaries of a recording.

use std::path::Path;

use serde::Deserialize;

#[derive(Debug, Deserialize)]
struct IndexFile {
    format: String,
    messages: Vec<Entry>,
}

#[derive(Debug, Deserialize)]
struct Entry {
    offset: u64,
    length: u64,
    #[serde(default)]
    t_recv_ms: Option<f64>,
}

/// One message: byte range in the data file and, when known, its receive time.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Message {
    pub offset: usize,
    pub length: usize,
    pub t_ms: Option<f64>,
}

/// Reads an index and checks that it tiles a file of `total` bytes.
pub fn load(path: &Path, total: usize) -> anyhow::Result<Vec<Message>> {
    let text = std::fs::read_to_string(path)?;
    let file: IndexFile = serde_json::from_str(&text)?;
    anyhow::ensure!(
        file.format == "capture-index/1",
        "{}: format {:?} is not capture-index/1",
        path.display(),
        file.format
    );
    let mut next = 0usize;
    let mut out = Vec::with_capacity(file.messages.len());
    for (i, e) in file.messages.iter().enumerate() {
        let offset = usize::try_from(e.offset)?;
        let length = usize::try_from(e.length)?;
        anyhow::ensure!(
            offset == next && offset.checked_add(length).is_some_and(|end| end <= total),
            "{}: message {i} does not continue the previous one inside the data file",
            path.display()
        );
        next = offset + length;
        out.push(Message {
            offset,
            length,
            t_ms: e.t_recv_ms,
        });
    }
    anyhow::ensure!(
        next == total,
        "{}: messages cover {next} of {total} bytes",
        path.display()
    );
    Ok(out)
}

/// Fixed-size chunks over `total` bytes.
pub fn fixed(total: usize, chunk: usize) -> Vec<Message> {
    let chunk = chunk.max(1);
    (0..total)
        .step_by(chunk)
        .map(|offset| Message {
            offset,
            length: chunk.min(total - offset),
            t_ms: None,
        })
        .collect()
}

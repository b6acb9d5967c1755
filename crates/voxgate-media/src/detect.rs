//! Container sniffing for `SourceFormat::Auto`.
//!
//! Looks at the first bytes only (waiting across chunks for up to 8 of them): EBML magic means
//! WebM/Matroska, `OggS` means Ogg. Anything else is refused with a message naming what was
//! seen, so a client that sends MP4 or WAV learns why.

/// Bytes needed to name every format recognised here.
pub const SNIFF_LEN: usize = 12;

/// Result of looking at the stream's first bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Sniff {
    /// Need more bytes to decide.
    NeedMore,
    /// EBML magic `1A 45 DF A3`.
    Webm,
    /// `OggS` capture pattern.
    Ogg,
    /// Something else, described for the client.
    Unsupported(String),
}

/// Classifies the start of a stream. With `eof`, decides on whatever is there.
pub fn sniff(head: &[u8], eof: bool) -> Sniff {
    const EBML: [u8; 4] = [0x1A, 0x45, 0xDF, 0xA3];
    if head.starts_with(&EBML) {
        return Sniff::Webm;
    }
    if head.starts_with(b"OggS") {
        return Sniff::Ogg;
    }
    let could_be_magic = EBML.starts_with(head) || b"OggS".starts_with(head);
    // A magic prefix decides at 4 bytes; naming a refused format (ftyp, RIFF/WAVE) needs 12.
    if !eof && (could_be_magic || head.len() < SNIFF_LEN) {
        return Sniff::NeedMore;
    }
    let what = if head.len() >= 8 && &head[4..8] == b"ftyp" {
        "MP4 (ftyp) container; send WebM or Ogg Opus".to_owned()
    } else if head.starts_with(b"RIFF") && head.len() >= 12 && &head[8..12] == b"WAVE" {
        "WAV (RIFF) container; send WebM or Ogg Opus, or raw PCM with encoding=linear16".to_owned()
    } else if head.starts_with(b"ID3")
        || (head.len() >= 2 && head[0] == 0xFF && head[1] & 0xE0 == 0xE0)
    {
        "MP3 audio; send WebM or Ogg Opus".to_owned()
    } else if head.starts_with(b"fLaC") {
        "FLAC audio; send WebM or Ogg Opus".to_owned()
    } else if head.first().is_some_and(|&b| b == b'{' || b == b'[') {
        "text/JSON data on the audio channel; send WebM or Ogg Opus".to_owned()
    } else {
        let hex: Vec<String> = head.iter().take(8).map(|b| format!("{b:02x}")).collect();
        format!(
            "unrecognised bytes {} (expected WebM or Ogg Opus)",
            if hex.is_empty() {
                "(empty stream)".to_owned()
            } else {
                hex.join(" ")
            }
        )
    };
    Sniff::Unsupported(what)
}

//! Whisper's vocabulary (`vocabulary.txt`, one token per line in GPT-2's byte-level form) and
//! the special tokens the decoder needs. Only token-to-text is needed (the prompt is special
//! tokens alone), so this is a table lookup, not a tokenizer.

use std::collections::HashMap;

/// Token texts and the special token ids.
pub struct Vocab {
    /// Each token's bytes (empty for special tokens).
    bytes: Vec<Vec<u8>>,
    /// `<|endoftext|>`: the end of the transcript, and the first special token.
    pub eot: u32,
    pub sot: u32,
    pub no_timestamps: u32,
    /// `<|nospeech|>` or, in older vocabularies, `<|nocaptions|>`.
    pub no_speech: Option<u32>,
}

/// Why the vocabulary could not be used.
#[derive(Debug, thiserror::Error)]
#[error("vocabulary.txt has no {0} token")]
pub struct MissingToken(&'static str);

/// GPT-2's byte-level alphabet: the character each byte is written as.
fn byte_chars() -> HashMap<char, u8> {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut next = 256u32;
    (0..=255u8)
        .map(|b| {
            let c = if printable(b) {
                b as u32
            } else {
                next += 1;
                next - 1
            };
            (char::from_u32(c).expect("below 0x200 is a char"), b)
        })
        .collect()
}

impl Vocab {
    pub fn parse(text: &str) -> Result<Self, MissingToken> {
        let chars = byte_chars();
        let lines: Vec<&str> = text.lines().collect();
        let find = |tok: &str| lines.iter().position(|l| *l == tok).map(|i| i as u32);
        let eot = find("<|endoftext|>").ok_or(MissingToken("<|endoftext|>"))?;
        let bytes = lines
            .iter()
            .enumerate()
            .map(|(i, l)| {
                if i as u32 >= eot {
                    Vec::new()
                } else {
                    l.chars().filter_map(|c| chars.get(&c).copied()).collect()
                }
            })
            .collect();
        Ok(Self {
            bytes,
            eot,
            sot: find("<|startoftranscript|>").ok_or(MissingToken("<|startoftranscript|>"))?,
            no_timestamps: find("<|notimestamps|>").ok_or(MissingToken("<|notimestamps|>"))?,
            no_speech: find("<|nospeech|>").or_else(|| find("<|nocaptions|>")),
        })
    }

    /// The text of `tokens` (special tokens say nothing), trimmed.
    pub fn text(&self, tokens: &[u32]) -> String {
        let bytes: Vec<u8> = tokens
            .iter()
            .filter_map(|&t| self.bytes.get(t as usize))
            .flatten()
            .copied()
            .collect();
        String::from_utf8_lossy(&bytes).trim().to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_level_tokens_become_text() {
        // "Ġ" is how GPT-2 writes a space; "Ã©" the two bytes of "é".
        let v = Vocab::parse(
            "Hello\nĠworld\nĠcaf\nÃ©\n<|endoftext|>\n<|startoftranscript|>\n<|notimestamps|>",
        )
        .unwrap();
        assert_eq!(v.text(&[0, 1, 2, 3, 4, 5]), "Hello world café");
        assert_eq!(
            (v.eot, v.sot, v.no_timestamps, v.no_speech),
            (4, 5, 6, None)
        );
        assert!(Vocab::parse("a\nb").is_err());
    }
}

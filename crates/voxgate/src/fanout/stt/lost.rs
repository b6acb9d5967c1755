//! The `stt_lost` warning's text: one producer (`lost_message`, used by every backend) and its
//! reader (`lost_utterances`), so the two cannot drift apart.

/// The `stt_lost` warning's text; `lost_utterances` reads it back (frontends whose protocol
/// answers per utterance, like Deepgram's and OpenAI's, release exactly those).
pub fn lost_message(backend: &str, utterances: &[u64], why: &str) -> String {
    format!("speech-to-text backend {backend:?} gave no final result for utterance(s) {utterances:?} ({why})")
}

/// The utterances an `stt_lost` warning's text names (empty when it names none).
pub fn lost_utterances(message: &str) -> Vec<u64> {
    let Some((_, rest)) = message.split_once("utterance(s) [") else {
        return Vec::new();
    };
    let list = rest.split(']').next().unwrap_or("");
    list.split(',')
        .filter_map(|n| n.trim().parse().ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lost_utterances_are_read_back_from_the_warning() {
        let text = lost_message("a [b]", &[3, 14], "socket closed");
        assert_eq!(lost_utterances(&text), [3, 14]);
        assert!(lost_utterances("something else").is_empty());
    }
}

//! Word error rate: (substitutions + deletions + insertions) / reference words, over words
//! normalised to lower case without punctuation (hyphens split words, digits stay).

/// The words of `text`, normalised.
pub fn words(text: &str) -> Vec<String> {
    text.to_lowercase()
        .chars()
        .map(|c| match c {
            '-' | '\u{2014}' | '\u{2013}' => ' ',
            c if c.is_alphanumeric() || c == '\'' || c.is_whitespace() => c,
            _ => ' ',
        })
        .collect::<String>()
        .split_whitespace()
        .map(|w| w.trim_matches('\'').to_owned())
        .filter(|w| !w.is_empty())
        .collect()
}

/// The word error rate of `hypothesis` against `reference` (0 for two empty texts).
pub fn wer(reference: &str, hypothesis: &str) -> f64 {
    let r = words(reference);
    let h = words(hypothesis);
    if r.is_empty() {
        return if h.is_empty() { 0.0 } else { 1.0 };
    }
    // One row of the Levenshtein table at a time.
    let mut prev: Vec<usize> = (0..=h.len()).collect();
    for (i, rw) in r.iter().enumerate() {
        let mut row = vec![i + 1; h.len() + 1];
        for (j, hw) in h.iter().enumerate() {
            let sub = prev[j] + usize::from(rw != hw);
            row[j + 1] = sub.min(prev[j + 1] + 1).min(row[j] + 1);
        }
        prev = row;
    }
    prev[h.len()] as f64 / r.len() as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises_case_and_punctuation() {
        assert_eq!(
            words("The North-Wind, and the Sun's cloak!"),
            ["the", "north", "wind", "and", "the", "sun's", "cloak"]
        );
    }

    #[test]
    fn counts_substitutions_deletions_and_insertions() {
        let r = "the quick brown fox jumps";
        assert_eq!(wer(r, "The quick brown fox jumps."), 0.0);
        assert_eq!(wer(r, "the quick brown fox jump"), 0.2, "one substitution");
        assert_eq!(wer(r, "quick brown fox jumps"), 0.2, "one deletion");
        assert_eq!(
            wer(r, "the quick brown fox jumps high"),
            0.2,
            "one insertion"
        );
        assert_eq!(wer(r, ""), 1.0);
        assert_eq!(wer("", ""), 0.0);
    }
}

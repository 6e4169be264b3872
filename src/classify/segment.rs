//! Splitting a text into sentences for classification, and folding the sentences' probabilities
//! back into one answer per text.

/// At most this many segments per text; longer texts are cut into this many runs of sentences.
const MAX_SEGMENTS: usize = 32;
/// Sentences shorter than this many words join their neighbour ("Great!" stays, "Ok." joins).
const MIN_WORDS: usize = 3;

/// Sentences of `text`: split after `.`, `!`, `?` (and `…`) followed by whitespace, and at line
/// breaks; very short pieces join the previous sentence. Never empty for a non-empty text.
pub fn sentences(text: &str) -> Vec<String> {
    let mut pieces: Vec<String> = Vec::new();
    let mut current = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        let boundary = c == '\n'
            || (matches!(c, '.' | '!' | '?' | '…')
                && chars.peek().is_none_or(|n| n.is_whitespace()));
        if c != '\n' {
            current.push(c);
        }
        if boundary {
            push_piece(&mut pieces, &mut current);
        }
    }
    push_piece(&mut pieces, &mut current);
    if pieces.is_empty() {
        return vec![text.to_string()];
    }
    if pieces.len() > MAX_SEGMENTS {
        let per = pieces.len().div_ceil(MAX_SEGMENTS);
        pieces = pieces.chunks(per).map(|c| c.join(" ")).collect();
    }
    pieces
}

fn push_piece(pieces: &mut Vec<String>, current: &mut String) {
    let piece = current.trim();
    if !piece.is_empty() {
        let words = piece.split_whitespace().count();
        match pieces.last_mut() {
            Some(last) if words < MIN_WORDS && !ends_with_exclamation(piece) => {
                last.push(' ');
                last.push_str(piece);
            }
            _ => pieces.push(piece.to_string()),
        }
    }
    current.clear();
}

fn ends_with_exclamation(piece: &str) -> bool {
    piece.ends_with('!')
}

/// One text's probabilities: the mean of its sentences'. (Weighting each sentence by its polarity,
/// 1 - p(neutral), scored no better on the review-style set or the tweets, so the plain mean stays.)
pub fn mean(per_sentence: &[Vec<f32>]) -> Vec<f32> {
    let labels = per_sentence.first().map_or(0, Vec::len);
    let mut sum = vec![0f32; labels];
    for p in per_sentence {
        for (s, x) in sum.iter_mut().zip(p) {
            *s += x;
        }
    }
    let n = per_sentence.len().max(1) as f32;
    sum.iter().map(|s| s / n).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn texts_split_into_sentences_and_short_ones_join() {
        assert_eq!(
            sentences("It arrived late. Ok. The screen is cracked!\nNever again"),
            vec!["It arrived late. Ok.", "The screen is cracked! Never again"]
        );
        assert_eq!(sentences("Version 2.5 is out"), vec!["Version 2.5 is out"]);
        assert_eq!(sentences("Great!"), vec!["Great!"]);
        assert_eq!(sentences("   "), vec!["   "]);
    }

    #[test]
    fn a_very_long_text_is_capped_in_segments() {
        let text = "This is one sentence. ".repeat(500);
        let parts = sentences(&text);
        assert!(parts.len() <= MAX_SEGMENTS);
        assert_eq!(parts.join(" ").split_whitespace().count(), 2000);
    }

    #[test]
    fn sentence_probabilities_are_averaged() {
        let p = mean(&[vec![0.2, 0.8], vec![0.6, 0.4]]);
        assert!(
            (p[0] - 0.4).abs() < 1e-6 && (p[1] - 0.6).abs() < 1e-6,
            "{p:?}"
        );
    }
}

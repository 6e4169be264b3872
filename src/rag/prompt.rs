//! The prompt that grounds an answer in the retrieved chunks: numbered sources, and instructions to
//! answer only from them, to say so when they do not hold the answer, and to cite by number.

use crate::llm::ChatMessage;
use crate::store::Hit;

/// Longest excerpt returned to clients, in characters.
pub const EXCERPT_CHARS: usize = 500;

/// Short, because every token of the prompt is prefilled before the first token of the answer.
const INSTRUCTIONS: &str = "Answer the question using only the numbered sources below. \
If they do not contain the answer, say plainly that the documents do not say; do not guess. \
Cite the sources you use like [1].";

/// Context budget, in the chat model's tokens, for a local model: with the instructions and the
/// question, prompts of 250-270 tokens, whose first answer token comes after 0.6-0.8 s on 2 cores
/// (benches/rag_ttft.py).
pub const LOCAL_CONTEXT_TOKENS: usize = 160;
/// ... for an upstream model (counted at 4 characters a token: its tokenizer is not known here).
pub const UPSTREAM_CONTEXT_TOKENS: usize = 1500;

/// At most [`EXCERPT_CHARS`] characters of a chunk, cut at a character boundary, `…` when cut.
pub fn excerpt(text: &str) -> String {
    let text = text.trim();
    if text.chars().count() <= EXCERPT_CHARS {
        return text.to_string();
    }
    let mut cut: String = text.chars().take(EXCERPT_CHARS - 1).collect();
    cut.push('…');
    cut
}

/// The sentences (and list items) of a chunk, in order.
fn sentences(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    for line in text.lines() {
        let mut start = 0;
        let bytes = line.as_bytes();
        for (i, c) in line.char_indices() {
            let end = i + c.len_utf8();
            // A full stop followed by a space (not "1.9" or "e.g.x") ends a sentence.
            if matches!(c, '.' | '!' | '?') && bytes.get(end).is_none_or(|b| *b == b' ') {
                out.push(line[start..end].trim());
                start = end;
            }
        }
        out.push(line[start..].trim());
    }
    out.retain(|s| !s.is_empty() && !s.starts_with('#'));
    out
}

/// Lower-cased words of four or more letters, cut to five (a crude stem), and every token with a
/// digit: what a sentence shares with a question.
fn terms(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| w.len() >= 4 || w.chars().any(|c| c.is_ascii_digit()))
        .map(|w| w.to_lowercase().chars().take(5).collect())
        .collect()
}

/// The passages of each hit given to the model: sentences ranked by the question's words they
/// hold, taken a round at a time across the hits (each hit's best sentence first, best hit first)
/// until `budget` tokens (as `count` measures them) are used; each hit's passages stay in text order.
pub fn passages(
    question: &str,
    hits: &[Hit],
    budget: usize,
    count: &dyn Fn(&str) -> usize,
) -> Vec<Vec<String>> {
    let wanted = terms(question);
    let ranked: Vec<Vec<(usize, &str)>> = hits
        .iter()
        .map(|hit| {
            let mut list: Vec<(usize, usize, &str)> = sentences(&hit.text)
                .into_iter()
                .enumerate()
                .map(|(i, s)| {
                    let own = terms(s);
                    let shared = wanted.iter().filter(|w| own.contains(w)).count();
                    (shared, i, s)
                })
                .collect();
            // Most shared words first; ties in text order.
            list.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
            list.into_iter().map(|(_, i, s)| (i, s)).collect()
        })
        .collect();
    let mut chosen: Vec<Vec<(usize, &str)>> = vec![Vec::new(); hits.len()];
    let mut used = 0;
    let rounds = ranked.iter().map(Vec::len).max().unwrap_or(0);
    for round in 0..rounds {
        for (hit, list) in ranked.iter().enumerate() {
            if let Some(&(i, s)) = list.get(round) {
                let cost = count(s) + 1;
                if used + cost <= budget {
                    used += cost;
                    chosen[hit].push((i, s));
                }
            }
        }
    }
    chosen
        .into_iter()
        .map(|mut list| {
            list.sort_by_key(|(i, _)| *i);
            list.into_iter().map(|(_, s)| s.to_string()).collect()
        })
        .collect()
}

/// The system message with the numbered sources (each its title and its passages), then the
/// question.
pub fn messages(question: &str, hits: &[Hit], passages: &[Vec<String>]) -> Vec<ChatMessage> {
    let mut system = String::from(INSTRUCTIONS);
    system.push_str("\n\nSources:");
    for (i, (hit, passages)) in hits.iter().zip(passages).enumerate() {
        system.push_str(&format!(
            "\n[{}] {}: {}",
            i + 1,
            hit.title,
            passages.join(" ")
        ));
    }
    vec![
        ChatMessage::new("system", &system),
        ChatMessage::new("user", question),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn excerpts_are_capped_in_characters() {
        let long = "é".repeat(600);
        let cut = excerpt(&long);
        assert_eq!(cut.chars().count(), EXCERPT_CHARS);
        assert!(cut.ends_with('…'));
        assert_eq!(excerpt(" short "), "short");
    }

    fn hit(text: &str) -> Hit {
        Hit {
            chunk_id: 1,
            document_id: 1,
            title: "T".into(),
            text: text.into(),
            score: 1.0,
        }
    }

    #[test]
    fn passages_are_the_sentences_that_share_the_question_s_words_within_the_budget() {
        let words = |s: &str| s.split_whitespace().count();
        let hits = [
            hit(
                "# Stove\n\nThe stove weighs 310 g. Boil time is 3 minutes for 1 litre. Keep it dry.",
            ),
            hit("Unrelated filler text about tents. Another sentence here."),
        ];
        let chosen = passages("How long to boil a litre?", &hits, 12, &words);
        // The boiling sentence first (8 words + 1), then the other hit's first sentence does not
        // fit beside it, nor does anything else.
        assert_eq!(chosen[0], ["Boil time is 3 minutes for 1 litre."]);
        assert!(chosen[1].is_empty(), "{chosen:?}");
        let all = passages("How long to boil a litre?", &hits, 1000, &words);
        assert_eq!(all[0].len(), 3, "{all:?}");
        assert_eq!(all[0][0], "The stove weighs 310 g.", "text order kept");
    }
}

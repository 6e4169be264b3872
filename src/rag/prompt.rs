//! The prompt that grounds an answer in the retrieved chunks: numbered sources, and instructions to
//! answer only from them, to say so when they do not hold the answer, and to cite by number.

use crate::llm::ChatMessage;
use crate::store::Hit;

/// Longest excerpt returned to clients, in characters.
pub const EXCERPT_CHARS: usize = 500;

const INSTRUCTIONS: &str = "You answer questions using only the numbered sources below. \
If the sources do not contain the answer, say that the documents do not contain it; do not guess. \
Cite the sources you use by their number in square brackets, like [1].";

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

/// The system message with the numbered sources, then the question.
pub fn messages(question: &str, hits: &[Hit]) -> Vec<ChatMessage> {
    let mut system = String::from(INSTRUCTIONS);
    system.push_str("\n\nSources:\n");
    for (i, hit) in hits.iter().enumerate() {
        system.push_str(&format!(
            "\n[{}] {}\n{}\n",
            i + 1,
            hit.title,
            hit.text.trim()
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
}

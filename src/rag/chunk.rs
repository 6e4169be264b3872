//! Token-aware chunking with overlap: text-splitter cuts at the largest semantic unit (paragraph,
//! sentence, word) that keeps a chunk within the embedding model's token budget, counted by the
//! model's own tokenizer.

use text_splitter::{ChunkConfig, ChunkSizer, TextSplitter};
use tokenizers::Tokenizer;

/// Most tokens per chunk. MiniLM reads 256 tokens ([CLS] and [SEP] included); a little under that
/// leaves room for the special tokens and keeps chunks focused enough to rank well.
pub const CHUNK_TOKENS: usize = 200;
/// Tokens shared by neighbouring chunks, so that a sentence cut at a border is whole in one of them.
pub const OVERLAP_TOKENS: usize = 32;

/// A piece of a document, with its character offsets in it.
#[derive(Debug, Clone, PartialEq)]
pub struct Piece {
    pub text: String,
    pub start: usize,
    pub end: usize,
}

/// Counts tokens without special tokens, truncation or padding.
#[derive(Clone)]
struct Tokens(Tokenizer);

impl ChunkSizer for Tokens {
    fn size(&self, chunk: &str) -> usize {
        self.0
            .encode(chunk, false)
            .map_or(chunk.len(), |e| e.get_ids().len())
    }
}

pub struct Chunker {
    splitter: TextSplitter<Tokens>,
    tokens: Tokens,
}

impl Chunker {
    /// A chunker sized by the tokenizer in `tokenizer.json`, at most `max_tokens` per chunk.
    pub fn from_file(tokenizer: &std::path::Path, max_tokens: usize) -> anyhow::Result<Self> {
        let mut tokenizer = Tokenizer::from_file(tokenizer)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", tokenizer.display()))?;
        tokenizer
            .with_truncation(None)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        tokenizer.with_padding(None);
        Self::new(tokenizer, max_tokens)
    }

    pub fn new(tokenizer: Tokenizer, max_tokens: usize) -> anyhow::Result<Self> {
        let capacity = max_tokens.clamp(16, CHUNK_TOKENS);
        let tokens = Tokens(tokenizer);
        let config = ChunkConfig::new(capacity)
            .with_sizer(tokens.clone())
            .with_overlap(OVERLAP_TOKENS.min(capacity / 4))?;
        Ok(Self {
            splitter: TextSplitter::new(config),
            tokens,
        })
    }

    /// Tokens in `text`, as the chunker counts them.
    pub fn count(&self, text: &str) -> usize {
        self.tokens.size(text)
    }

    pub fn split(&self, text: &str) -> Vec<Piece> {
        self.splitter
            .chunk_char_indices(text)
            .map(|c| Piece {
                text: c.chunk.to_string(),
                start: c.char_offset,
                end: c.char_offset + c.chunk.chars().count(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn minilm() -> Chunker {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("models/all-MiniLM-L6-v2/tokenizer.json");
        Chunker::from_file(&path, 254).expect("models/fetch provides MiniLM's tokenizer")
    }

    #[test]
    fn chunks_fit_the_budget_overlap_and_point_back_into_the_text() {
        let chunker = minilm();
        let text: String = (0..120)
            .map(|i| {
                format!(
                    "Sentence number {i} talks about topic {} in some détail. ",
                    i % 7
                )
            })
            .collect();
        let pieces = chunker.split(&text);
        assert!(pieces.len() > 2, "{}", pieces.len());
        let chars: Vec<char> = text.chars().collect();
        for piece in &pieces {
            assert!(chunker.count(&piece.text) <= CHUNK_TOKENS);
            let slice: String = chars[piece.start..piece.end].iter().collect();
            assert_eq!(slice, piece.text);
        }
        // Overlap: each chunk starts before the previous one ends.
        for pair in pieces.windows(2) {
            assert!(pair[1].start < pair[0].end, "{pair:?}");
        }
    }
}

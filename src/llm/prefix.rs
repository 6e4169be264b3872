//! The prompt-prefix cache: the KV caches of the last few finished sequences, keyed by their tokens.
//! Chat prompts start alike (the system prompt, earlier turns of the same conversation), and a
//! cached prefix is computed already: a new prompt copies the longest shared one and prefills only
//! the rest, which is most of the time to first token on a prompt of a few dozen tokens.

use super::KvCache;

/// Keeps at most `max_bytes` of KV state. SmolLM2 needs 46 KB per token (30 layers × keys and
/// values × 192 floats), so the default 64 MB holds about 1,400 tokens: a handful of conversations.
pub struct PrefixCache {
    /// Oldest first; a hit moves an entry to the back.
    entries: Vec<(Vec<u32>, KvCache)>,
    max_bytes: usize,
}

/// What a lookup found: a cache holding the first `reused` tokens of the prompt.
pub struct Hit {
    pub cache: KvCache,
    pub reused: usize,
}

impl PrefixCache {
    pub fn new(max_bytes: usize) -> Self {
        Self {
            entries: Vec::new(),
            max_bytes,
        }
    }

    /// A copy of the longest cached prefix of `prompt`, leaving at least its last token to be run
    /// (its logits are what the first answer token is sampled from). `None` without a useful one.
    pub fn lookup(&mut self, prompt: &[u32]) -> Option<Hit> {
        let limit = prompt.len().saturating_sub(1);
        let (index, shared) = self
            .entries
            .iter()
            .enumerate()
            .map(|(i, (tokens, _))| {
                let shared = tokens
                    .iter()
                    .zip(prompt)
                    .take_while(|(a, b)| a == b)
                    .count();
                (i, shared.min(limit))
            })
            .max_by_key(|(_, shared)| *shared)?;
        if shared == 0 {
            return None;
        }
        let entry = self.entries.remove(index);
        let cache = entry.1.prefix(shared);
        self.entries.push(entry);
        Some(Hit {
            cache,
            reused: shared,
        })
    }

    /// Keeps the cache of a finished sequence whose first `cache.len()` tokens are `tokens`.
    /// Entries it extends are dropped (it answers every lookup they would), then the oldest go
    /// until the total fits.
    pub fn insert(&mut self, mut tokens: Vec<u32>, mut cache: KvCache) {
        tokens.truncate(cache.len());
        cache.truncate(tokens.len());
        cache.shrink_to_fit();
        if tokens.is_empty() || cache.bytes() > self.max_bytes {
            return;
        }
        self.entries
            .retain(|(old, _)| !(old.len() <= tokens.len() && tokens.starts_with(old)));
        if self.entries.iter().any(|(old, _)| old.starts_with(&tokens)) {
            return;
        }
        self.entries.push((tokens, cache));
        while self.bytes() > self.max_bytes {
            self.entries.remove(0);
        }
    }

    pub fn bytes(&self) -> usize {
        self.entries.iter().map(|(_, c)| c.bytes()).sum()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

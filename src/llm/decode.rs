//! What happens to one sequence between two forward passes: the repeat penalty, sampling, end of
//! turn, stop strings, `max_tokens`, and which text is safe to hand out. Kept apart from the
//! forward pass so that the single-sequence `generate` and the batching engine behave the same.

use tokenizers::Tokenizer;

use super::LlmError;
use super::sampler::{Sampler, Sampling};

#[derive(Debug, Clone)]
pub struct GenerationParams {
    pub max_tokens: usize,
    /// `None` or 0: greedy.
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    /// The same seed gives the same text; `None` draws one.
    pub seed: Option<u64>,
    /// Divides the logits of tokens seen in the last `repeat_last_n` (prompt included); 1.0
    /// turns it off, the default as in llama.cpp's server and OpenAI's API. On by default it
    /// penalised the words of the question itself: "What is the capital of France?" was answered
    /// "L'Étoile: Paris, la Ciampère..." instead of "The capital of France is Paris."
    pub repeat_penalty: f32,
    pub repeat_last_n: usize,
    /// Generation stops before any of these; they are not part of the answer.
    pub stop: Vec<String>,
}

impl Default for GenerationParams {
    fn default() -> Self {
        Self {
            max_tokens: 256,
            temperature: None,
            top_p: None,
            seed: None,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            stop: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// End of turn or a stop string.
    Stop,
    /// `max_tokens` reached.
    Length,
    /// The consumer asked to stop (a client went away).
    Cancelled,
}

#[derive(Debug, Clone)]
pub struct Generation {
    pub text: String,
    pub finish_reason: FinishReason,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Time the request waited for a generation slot before its prompt ran (zero upstream).
    pub queued: std::time::Duration,
}

/// The outcome of one step.
#[derive(Debug)]
pub(crate) enum Step {
    /// `token` was sampled: feed it to the model next. `delta` is the text that became safe to
    /// hand out (possibly empty: a stop string may still be forming, or a character is split).
    Token { token: u32, delta: String },
    /// The answer is complete; `finish` gives the rest of the text and the totals.
    Finished(FinishReason),
}

pub(crate) struct Decoder {
    params: GenerationParams,
    sampler: Sampler,
    /// The step's logits after the repeat penalty, and the distinct tokens it applies to
    /// (unused when it is off).
    penalized: Vec<f32>,
    recent: Vec<u32>,
    /// Prompt and answer so far, for the repeat penalty.
    context: Vec<u32>,
    prompt_tokens: usize,
    generated: Vec<u32>,
    /// The answer's text; its first `committed` bytes are final.
    text: String,
    committed: usize,
    /// `generated[prefix..read]` are the last tokens of the committed text, decoded again with
    /// each new token for context; `generated[read..]` are not committed yet.
    prefix: usize,
    read: usize,
    /// Bytes of `text` handed out.
    emitted: usize,
    /// Text not yet handed out: the tail that could still become a stop string waits.
    hold: usize,
}

impl Decoder {
    pub fn new(params: GenerationParams, prompt: &[u32]) -> Self {
        // Below this a temperature is greedy decoding (as vLLM's sampling epsilon): dividing the
        // logits by a denormal such as 5e-324 overflows them to infinities.
        const GREEDY_BELOW: f64 = 1e-5;
        let sampling = match params.temperature.filter(|t| *t >= GREEDY_BELOW) {
            None => Sampling::Greedy,
            Some(temperature) => Sampling::Draw {
                temperature: temperature as f32,
                top_p: params.top_p.map_or(1.0, |p| p as f32),
            },
        };
        let seed = params.seed.unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64)
        });
        let hold = params.stop.iter().map(String::len).max().unwrap_or(1) - 1;
        Self {
            sampler: Sampler::new(sampling, seed),
            penalized: Vec::new(),
            recent: Vec::new(),
            params,
            context: prompt.to_vec(),
            prompt_tokens: prompt.len(),
            generated: Vec::new(),
            text: String::new(),
            committed: 0,
            prefix: 0,
            read: 0,
            emitted: 0,
            hold,
        }
    }

    /// Prompt and answer tokens so far; the last one is not in the model's cache yet.
    pub fn tokens(&self) -> &[u32] {
        &self.context
    }

    /// `max_tokens` reached: no forward pass is needed for the next step, it ends the answer.
    pub fn exhausted(&self) -> bool {
        self.generated.len() >= self.params.max_tokens
    }

    /// Picks the next token from the logits after the last one.
    pub fn step(
        &mut self,
        tokenizer: &Tokenizer,
        end_of_turn: &[u32],
        logits: &[f32],
    ) -> Result<Step, LlmError> {
        if self.exhausted() {
            return Ok(Step::Finished(FinishReason::Length));
        }
        let next = if self.params.repeat_penalty == 1.0 {
            self.sampler.sample(logits)
        } else {
            let n = self.context.len();
            self.recent.clear();
            self.recent
                .extend_from_slice(&self.context[n.saturating_sub(self.params.repeat_last_n)..]);
            self.recent.sort_unstable();
            self.recent.dedup();
            self.penalized.clear();
            self.penalized.extend_from_slice(logits);
            for &token in &self.recent {
                if let Some(logit) = self.penalized.get_mut(token as usize) {
                    // As llama.cpp and candle: a penalty makes a seen token less likely
                    // whichever the sign of its logit.
                    if *logit >= 0.0 {
                        *logit /= self.params.repeat_penalty;
                    } else {
                        *logit *= self.params.repeat_penalty;
                    }
                }
            }
            self.sampler.sample(&self.penalized)
        };
        if end_of_turn.contains(&next) {
            return Ok(Step::Finished(FinishReason::Stop));
        }
        self.generated.push(next);
        self.context.push(next);
        let before = self.committed;
        self.detokenize(tokenizer)?;
        // A stop string not found before ends in the text this token changed.
        let from = char_floor(&self.text, before.saturating_sub(self.hold));
        if let Some(at) = self
            .params
            .stop
            .iter()
            .filter_map(|s| self.text[from..].find(s.as_str()))
            .min()
        {
            self.text.truncate(from + at);
            return Ok(Step::Finished(FinishReason::Stop));
        }
        // A multi-byte character split across tokens decodes as U+FFFD until it is whole.
        let end = char_floor(
            &self.text,
            if self.text.ends_with('\u{FFFD}') {
                self.emitted
            } else {
                self.text.len().saturating_sub(self.hold).max(self.emitted)
            },
        );
        // Text already handed out stays handed out, even if a whole-answer decode (see
        // `detokenize`) changed it.
        let start = char_floor(&self.text, self.emitted.min(end));
        let delta = self.text[start..end].to_string();
        self.emitted = end.max(self.emitted);
        Ok(Step::Token { token: next, delta })
    }

    /// Brings `text` up to the answer's tokens, decoding only the last few: the tokens from
    /// `prefix` on, less the text of those before `read` (as text-generation-inference does), so
    /// that a tokenizer that reads a token differently at the start of a text still gives the
    /// text of the whole answer. A character split across tokens decodes as U+FFFD until it is
    /// whole: that text stays uncommitted and is decoded again with the next token.
    fn detokenize(&mut self, tokenizer: &Tokenizer) -> Result<(), LlmError> {
        let decode = |ids: &[u32]| {
            tokenizer
                .decode(ids, true)
                .map_err(|e| LlmError::Tokenizer(e.to_string()))
        };
        let known = decode(&self.generated[self.prefix..self.read])?;
        let window = decode(&self.generated[self.prefix..])?;
        self.text.truncate(self.committed);
        let Some(new) = window
            .get(known.len()..)
            .filter(|_| window.starts_with(&known))
        else {
            // The window no longer extends the text before it: decode the whole answer. Text
            // handed out before is not taken back.
            self.text = decode(&self.generated)?;
            self.commit();
            return Ok(());
        };
        self.text.push_str(new);
        if !new.is_empty() && !new.ends_with('\u{FFFD}') {
            self.commit();
        }
        Ok(())
    }

    fn commit(&mut self) {
        self.committed = self.text.len();
        self.prefix = self.read;
        self.read = self.generated.len();
    }

    /// The text still held back (unless the consumer went away), and the whole answer.
    pub fn finish(self, finish_reason: FinishReason) -> (Option<String>, Generation) {
        let start = char_floor(&self.text, self.emitted);
        let tail = (finish_reason != FinishReason::Cancelled && start < self.text.len())
            .then(|| self.text[start..].to_string());
        let generation = Generation {
            text: self.text,
            finish_reason,
            prompt_tokens: self.prompt_tokens,
            completion_tokens: self.generated.len(),
            queued: std::time::Duration::ZERO,
        };
        (tail, generation)
    }
}

/// The largest character boundary of `text` at or before byte `at` (its length if `at` is past it).
fn char_floor(text: &str, at: usize) -> usize {
    (0..=at.min(text.len()))
        .rev()
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::gguf_tokenizer::tokenizer_from_gguf;
    use candle_core::quantized::gguf_file::Content;

    const GGUF: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/models/SmolLM2-135M-Instruct/SmolLM2-135M-Instruct.Q4_1.gguf"
    );

    fn tokenizer() -> Tokenizer {
        let mut file = std::fs::File::open(GGUF).expect("run models/fetch");
        tokenizer_from_gguf(&Content::read(&mut file).unwrap()).unwrap()
    }

    /// Feeds `ids` through a greedy decoder, one one-hot row of logits a step, and returns the
    /// text it handed out, piece by piece, and the answer it ended with.
    fn replay(tokenizer: &Tokenizer, ids: &[u32], stop: &[&str]) -> (String, String) {
        let params = GenerationParams {
            max_tokens: ids.len(),
            stop: stop.iter().map(|s| s.to_string()).collect(),
            ..GenerationParams::default()
        };
        let mut decoder = Decoder::new(params, &[1, 2, 3]);
        let mut logits = vec![0.0; tokenizer.get_vocab_size(true)];
        let mut streamed = String::new();
        let mut finish = FinishReason::Length;
        for &id in ids {
            logits[id as usize] = 1.0;
            match decoder.step(tokenizer, &[], &logits).unwrap() {
                Step::Token { token, delta } => {
                    assert_eq!(token, id);
                    streamed.push_str(&delta);
                }
                Step::Finished(reason) => {
                    finish = reason;
                    break;
                }
            }
            logits[id as usize] = 0.0;
        }
        let (tail, generation) = decoder.finish(finish);
        streamed.push_str(&tail.unwrap_or_default());
        assert_eq!(streamed, generation.text);
        (streamed, generation.text)
    }

    #[test]
    fn the_text_decoded_token_by_token_is_the_text_of_all_the_tokens() {
        let tokenizer = tokenizer();
        // Accents, CJK and an emoji span several tokens each; the spaces and newlines test the
        // tokens that read differently at the start of a text.
        let text = "Café au lait, naïve façade — 日本語のテキスト 🙂🚀!\n\n  Indented   spaces\tand a tab. "
            .repeat(20);
        let ids = tokenizer
            .encode(text.as_str(), false)
            .unwrap()
            .get_ids()
            .to_vec();
        assert!(ids.len() > 600, "{} tokens", ids.len());
        let (streamed, _) = replay(&tokenizer, &ids, &[]);
        assert_eq!(streamed, tokenizer.decode(&ids, true).unwrap());
        assert_eq!(streamed, text);
        // Cut after every token: a character split across tokens is handed out once whole.
        for cut in 1..40 {
            let (streamed, _) = replay(&tokenizer, &ids[..cut], &[]);
            assert_eq!(
                streamed,
                tokenizer.decode(&ids[..cut], true).unwrap(),
                "{cut}"
            );
        }
    }

    #[test]
    fn a_stop_string_ends_the_text_before_it_wherever_it_falls() {
        let tokenizer = tokenizer();
        let text = "One two three. Stop here 🚀 and never reach this. Stop again.".repeat(3);
        let ids = tokenizer
            .encode(text.as_str(), false)
            .unwrap()
            .get_ids()
            .to_vec();
        for stop in ["Stop here", "🚀", "this. St", "."] {
            let (streamed, answer) = replay(&tokenizer, &ids, &[stop]);
            assert_eq!(answer, text[..text.find(stop).unwrap()], "{stop}");
            assert_eq!(streamed, answer);
        }
    }
}

//! A `tokenizers` tokenizer built from a GGUF file's metadata (BPE vocabulary and merges, special
//! tokens, the pre-tokenizer named by `tokenizer.ggml.pre`). candle's own `TokenizerFromGguf` adds
//! a prefix space that SmolLM2 does not have; this one matches transformers' GGUF converter
//! (../shared/FINDINGS.md) and llama.cpp's tokenizer.

use candle_core::quantized::gguf_file::{Content, Value};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer};

use super::LlmError;

/// GGUF token types that are special (3: control, 4: user-defined).
const SPECIAL_TYPES: [i32; 2] = [3, 4];

/// How Qwen2 splits text before BPE (its tokenizer.json's `Split` pattern, llama.cpp's `qwen2`
/// pre-tokenizer): contractions, words with one leading non-letter, single digits, punctuation
/// runs with their line ends, line ends, and spaces.
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The pre-tokenizer for `tokenizer.ggml.pre`.
fn pre_tokenizer(pre: Option<&str>) -> Result<Vec<PreTokenizerWrapper>, LlmError> {
    match pre {
        Some("qwen2") => {
            let split = Split::new(
                SplitPattern::Regex(QWEN2_SPLIT.into()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|e| LlmError::Tokenizer(e.to_string()))?;
            Ok(vec![
                split.into(),
                ByteLevel::new(false, false, false).into(),
            ])
        }
        // SmolLM2 (`smollm`) and GPT-2-like vocabularies: digits one by one, then GPT-2's split.
        _ => Ok(vec![
            Digits::new(true).into(),
            ByteLevel::new(false, true, true).into(),
        ]),
    }
}

fn strings(content: &Content, key: &str) -> Result<Vec<String>, LlmError> {
    match content.metadata.get(key) {
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.clone()),
                _ => Err(LlmError::Load(format!("{key} holds a non-string"))),
            })
            .collect(),
        _ => Err(LlmError::Load(format!("the GGUF metadata has no {key}"))),
    }
}

pub fn tokenizer_from_gguf(content: &Content) -> Result<Tokenizer, LlmError> {
    let model = content
        .metadata
        .get("tokenizer.ggml.model")
        .and_then(|v| v.to_string().ok())
        .map(String::as_str);
    if model != Some("gpt2") {
        return Err(LlmError::Load(format!(
            "tokenizer.ggml.model {model:?} is not supported (byte-level BPE, `gpt2`, is)"
        )));
    }
    let tokens = strings(content, "tokenizer.ggml.tokens")?;
    let merges: Vec<(String, String)> = strings(content, "tokenizer.ggml.merges")?
        .into_iter()
        .filter_map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
        })
        .collect();
    let types: Vec<i32> = match content.metadata.get("tokenizer.ggml.token_type") {
        Some(Value::Array(items)) => items.iter().map(|v| v.to_i32().unwrap_or(1)).collect(),
        _ => vec![1; tokens.len()],
    };
    // tokenizers' own map type (ahash).
    let vocab: ahash::AHashMap<String, u32> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| LlmError::Tokenizer(e.to_string()))?;
    let mut tokenizer = Tokenizer::new(bpe);
    let pre = content
        .metadata
        .get("tokenizer.ggml.pre")
        .and_then(|v| v.to_string().ok())
        .map(String::as_str);
    tokenizer.with_pre_tokenizer(Some(Sequence::new(pre_tokenizer(pre)?)));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
    let special: Vec<AddedToken> = tokens
        .iter()
        .zip(&types)
        .filter(|(_, t)| SPECIAL_TYPES.contains(t))
        .map(|(token, _)| AddedToken::from(token.clone(), true))
        .collect();
    tokenizer
        .add_special_tokens(special)
        .map_err(|e| LlmError::Tokenizer(e.to_string()))?;
    Ok(tokenizer)
}

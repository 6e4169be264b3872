//! The qwen2 architecture on our forward pass, against candle's `quantized_qwen2::ModelWeights` on
//! a tiny random Qwen2 GGUF in a Qwen2.5 Q4_K_M file's formats (tests/fixtures/make_tiny_qwen2.py):
//! the same logits within the quantisation noise; bit-identical logits alone, batched and from a
//! cached prefix; llama.cpp's token ids; the chat template's ChatML with its default system prompt.

mod common;

use common::argmax;

use std::sync::OnceLock;

use aitier::llm::{Architecture, ChatMessage, Input, Isa, KvCache, Llama, LocalModel};
use candle_core::quantized::gguf_file::Content;
use candle_core::{Device, Tensor};
use candle_transformers::models::quantized_qwen2::ModelWeights;

const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/qwen2/tiny-qwen2.gguf"
);
const TOKENS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/qwen2/tiny-qwen2.tokens.json"
);

struct Models {
    ours: Llama,
    scalar: Llama,
    chat: LocalModel,
}

fn models() -> &'static Models {
    static MODELS: OnceLock<Models> = OnceLock::new();
    MODELS.get_or_init(|| {
        let mut reader = std::fs::File::open(FIXTURE).unwrap();
        let content = Content::read(&mut reader).unwrap();
        let ours = Llama::from_gguf(&content, &mut reader, Isa::detect()).unwrap();
        let scalar = Llama::from_gguf(&content, &mut reader, Isa::Scalar).unwrap();
        let chat = LocalModel::load(std::path::Path::new(FIXTURE)).unwrap();
        eprintln!("kernels: {:?}", Isa::detect());
        Models { ours, scalar, chat }
    })
}

fn prompt(question: &str) -> Vec<u32> {
    models()
        .chat
        .prompt_tokens(&[ChatMessage::new("user", question)])
        .unwrap()
}

/// candle's greedy tokens after `prompt`, and its logits before each of them and after the last.
fn candle_greedy(prompt: &[u32], steps: usize) -> (Vec<u32>, Vec<Vec<f32>>) {
    let mut reader = std::fs::File::open(FIXTURE).unwrap();
    let content = Content::read(&mut reader).unwrap();
    let mut model = ModelWeights::from_gguf(content, &mut reader, &Device::Cpu).unwrap();
    let mut run = |ids: &[u32], pos: usize| -> Vec<f32> {
        let input = Tensor::new(ids, &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let out = model.forward(&input, pos).unwrap();
        out.flatten_all().unwrap().to_vec1().unwrap()
    };
    let mut all = vec![run(prompt, 0)];
    let mut tokens = Vec::new();
    for i in 0..steps {
        let next = argmax(all.last().unwrap());
        tokens.push(next);
        all.push(run(&[next], prompt.len() + i));
    }
    (tokens, all)
}

/// Ours, the same way.
fn our_logits(model: &Llama, prompt: &[u32], tokens: &[u32]) -> Vec<Vec<f32>> {
    let mut cache = model.new_cache();
    let mut step = |ids: &[u32]| {
        model
            .forward(&mut [Input {
                cache: &mut cache,
                tokens: ids,
            }])
            .unwrap()
    };
    let mut all = vec![step(prompt)];
    for t in tokens {
        all.push(step(&[*t]));
    }
    all
}

/// The largest difference between two logit vectors, as a share of the spread of `reference`.
fn relative_diff(ours: &[f32], reference: &[f32]) -> f32 {
    assert_eq!(ours.len(), reference.len());
    let spread = reference.iter().copied().fold(f32::NEG_INFINITY, f32::max)
        - reference.iter().copied().fold(f32::INFINITY, f32::min);
    let diff = ours
        .iter()
        .zip(reference)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    diff / spread
}

const QUESTIONS: [&str; 3] = [
    "What is the capital of France?",
    "fn main() { let x = 2026; }",
    "It's raining, isn't it?",
];

#[test]
fn the_model_is_read_as_qwen2() {
    let c = models().ours.config();
    assert_eq!(c.arch, Architecture::Qwen2);
    assert_eq!(
        (c.n_layer, c.dim, c.n_head, c.n_kv_head, c.ffn_dim),
        (2, 256, 4, 2, 256)
    );
}

#[test]
fn our_forward_matches_candles_quantized_qwen2() {
    let mut worst = 0f32;
    for question in QUESTIONS {
        let prompt = prompt(question);
        // Teacher forcing on the tokens candle picks greedily.
        let (tokens, theirs) = candle_greedy(&prompt, 8);
        for (name, ours) in [("simd", &models().ours), ("scalar", &models().scalar)] {
            let ours = our_logits(ours, &prompt, &tokens);
            for (step, (a, b)) in ours.iter().zip(&theirs).enumerate() {
                let diff = relative_diff(a, b);
                worst = worst.max(diff);
                // Both quantise activations to 8 bits (candle to Q8_K, we per block of 32), and
                // our Q6_K weights are requantised to Q8_0: up to 0.038 of the spread here. Leaving
                // out the q/k/v biases gives 0.10, rotating interleaved pairs 0.115.
                assert!(diff < 0.05, "{name}, {question:?}, step {step}: {diff}");
            }
        }
    }
    eprintln!("largest difference: {:.4} of the logits' spread", worst);
}

#[test]
fn batched_and_cached_passes_give_the_logits_of_one_sequence_alone() {
    let ours = &models().ours;
    let prompts: Vec<Vec<u32>> = QUESTIONS.iter().map(|q| prompt(q)).collect();
    let alone: Vec<Vec<Vec<f32>>> = prompts
        .iter()
        .map(|p| our_logits(ours, p, &[10, 20]))
        .collect();
    // Each prompt prefilled on its own, then two steps of all three together.
    let mut caches: Vec<KvCache> = prompts.iter().map(|_| ours.new_cache()).collect();
    for (cache, p) in caches.iter_mut().zip(&prompts) {
        ours.forward(&mut [Input { cache, tokens: p }]).unwrap();
    }
    let vocab = ours.config().vocab;
    for (step, token) in [10u32, 20].iter().enumerate() {
        let mut inputs: Vec<Input> = caches
            .iter_mut()
            .map(|cache| Input {
                cache,
                tokens: std::slice::from_ref(token),
            })
            .collect();
        let logits = ours.forward(&mut inputs).unwrap();
        for (i, row) in logits.chunks_exact(vocab).enumerate() {
            assert_eq!(row, &alone[i][step + 1][..], "sequence {i}, step {step}");
        }
    }
    // The second prompt after the cached system prompt of the first.
    let shared = prompts[0]
        .iter()
        .zip(&prompts[1])
        .take_while(|(a, b)| a == b)
        .count();
    assert!(shared > 5, "the system prompt is shared: {shared}");
    let mut warm = ours.new_cache();
    ours.forward(&mut [Input {
        cache: &mut warm,
        tokens: &prompts[0],
    }])
    .unwrap();
    let mut reused = warm.prefix(shared);
    let logits = ours
        .forward(&mut [Input {
            cache: &mut reused,
            tokens: &prompts[1][shared..],
        }])
        .unwrap();
    assert_eq!(logits, alone[1][0]);
}

#[test]
fn the_tokenizer_gives_llama_cpps_ids() {
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(TOKENS).unwrap()).unwrap();
    let cases = reference["cases"].as_array().unwrap();
    assert!(cases.len() >= 10);
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let expected: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
        let ours = models().chat.tokens(text).unwrap();
        assert_eq!(ours, expected, "{text:?} ({})", reference["reference"]);
        let back = models().chat.tokenizer().decode(&ours, false).unwrap();
        assert_eq!(back, text);
    }
}

#[test]
fn the_chat_template_is_chatml_with_its_default_system_prompt() {
    let chat = &models().chat;
    // The server's default system message, unless the conversation has one...
    let user = chat.prompt(&[ChatMessage::new("user", "Hi")]).unwrap();
    assert_eq!(
        user,
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
    // ...and without it, the template's own.
    let mut own = LocalModel::load(std::path::Path::new(FIXTURE)).unwrap();
    own.set_system_prompt(None);
    assert_eq!(
        own.prompt(&[ChatMessage::new("user", "Hi")]).unwrap(),
        "<|im_start|>system\nYou are a tiny test model.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
    let system = chat
        .prompt(&[
            ChatMessage::new("system", "Be brief."),
            ChatMessage::new("user", "Hi"),
        ])
        .unwrap();
    assert!(system.starts_with("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"));
    // The template's special tokens are single tokens, and <|im_end|> ends a turn.
    let ids = chat
        .prompt_tokens(&[ChatMessage::new("user", "Hi")])
        .unwrap();
    let im_start = chat.tokenizer().token_to_id("<|im_start|>").unwrap();
    assert_eq!(ids[0], im_start);
    assert_eq!(ids.iter().filter(|&&t| t == im_start).count(), 3);
}

//! Our llama forward pass against candle's `quantized_llama::ModelWeights` on the real SmolLM2
//! weights: the same logits within a small tolerance and the same greedy text; and the same logits,
//! bit for bit, whether a sequence runs alone, in a batch with others at other positions, from a
//! cached prefix, or a token at a time.

mod common;

use common::{GGUF, argmax};

use std::sync::OnceLock;

use aitier::llm::{Input, Isa, KvCache, Llama, LocalModel};
use candle_core::quantized::gguf_file::Content;
use candle_core::{Device, Tensor};
use candle_transformers::models::quantized_llama::ModelWeights;

const PROMPTS: [&str; 3] = [
    "What is the capital of France? Answer in one sentence.",
    "Write a haiku about the sea.",
    "List three uses of a paperclip.",
];

struct Models {
    /// Our forward pass as served: on the fastest kernels this CPU has.
    ours: Llama,
    /// The same on the portable scalar kernels.
    scalar: Llama,
    candle: ModelWeights,
    chat: LocalModel,
}

fn models() -> &'static Models {
    static MODELS: OnceLock<Models> = OnceLock::new();
    MODELS.get_or_init(|| {
        let path = std::path::Path::new(GGUF);
        assert!(path.is_file(), "{GGUF} is missing: run models/fetch");
        let mut reader = std::fs::File::open(path).unwrap();
        let content = Content::read(&mut reader).unwrap();
        let ours = Llama::from_gguf(&content, &mut reader, Isa::detect()).unwrap();
        let scalar = Llama::from_gguf(&content, &mut reader, Isa::Scalar).unwrap();
        let candle = ModelWeights::from_gguf(content, &mut reader, &Device::Cpu).unwrap();
        let chat = LocalModel::load(path).unwrap();
        eprintln!("kernels: {:?}", Isa::detect());
        Models {
            ours,
            scalar,
            candle,
            chat,
        }
    })
}

fn prompt_ids(question: &str) -> Vec<u32> {
    let chat = &models().chat;
    let prompt = chat
        .prompt(&[aitier::llm::ChatMessage::new("user", question)])
        .unwrap();
    chat.tokenizer()
        .encode(prompt, false)
        .unwrap()
        .get_ids()
        .to_vec()
}

fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exp: Vec<f32> = logits.iter().map(|v| (v - max).exp()).collect();
    let sum: f32 = exp.iter().sum();
    exp.iter().map(|e| e / sum).collect()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Greedy decoding with candle's model: `(tokens, logits at each step)`.
fn candle_greedy(prompt: &[u32], steps: usize) -> (Vec<u32>, Vec<Vec<f32>>) {
    let mut model = models().candle.clone();
    let input = Tensor::new(prompt, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let mut logits: Vec<f32> = model
        .forward(&input, 0)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec1()
        .unwrap();
    let (mut tokens, mut all) = (Vec::new(), Vec::new());
    for _ in 0..steps {
        let next = argmax(&logits);
        tokens.push(next);
        all.push(logits);
        let input = Tensor::new(&[next], &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let pos = prompt.len() + tokens.len() - 1;
        logits = model
            .forward(&input, pos)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec1()
            .unwrap();
    }
    (tokens, all)
}

fn our_greedy(ours: &Llama, prompt: &[u32], steps: usize) -> (Vec<u32>, Vec<Vec<f32>>) {
    let mut cache = ours.new_cache();
    let mut logits = ours
        .forward(&mut [Input {
            cache: &mut cache,
            tokens: prompt,
        }])
        .unwrap();
    let (mut tokens, mut all) = (Vec::new(), Vec::new());
    for _ in 0..steps {
        let next = argmax(&logits);
        tokens.push(next);
        all.push(logits);
        logits = ours
            .forward(&mut [Input {
                cache: &mut cache,
                tokens: &[next],
            }])
            .unwrap();
    }
    (tokens, all)
}

/// How far below candle's best logit candle puts the token we would pick.
fn regret(ours: &[f32], theirs: &[f32]) -> f32 {
    theirs[argmax(theirs) as usize] - theirs[argmax(ours) as usize]
}

/// Our logits for `prompt` followed by each of `tokens` (teacher forcing).
fn our_logits(ours: &Llama, prompt: &[u32], tokens: &[u32]) -> Vec<Vec<f32>> {
    let mut cache = ours.new_cache();
    let mut all = vec![
        ours.forward(&mut [Input {
            cache: &mut cache,
            tokens: prompt,
        }])
        .unwrap(),
    ];
    for t in &tokens[..tokens.len() - 1] {
        all.push(
            ours.forward(&mut [Input {
                cache: &mut cache,
                tokens: &[*t],
            }])
            .unwrap(),
        );
    }
    all
}

#[test]
fn our_forward_matches_candles_logits_and_greedy_text() {
    // A prompt without near-ties: the same greedy text, token for token.
    let prompt = prompt_ids(PROMPTS[0]);
    let (theirs, _) = candle_greedy(&prompt, 24);
    let (ours, _) = our_greedy(&models().ours, &prompt, 24);
    let text = models().chat.tokenizer().decode(&ours, true).unwrap();
    assert_eq!(ours, theirs, "{text}");
    assert!(text.contains("Paris"), "{text}");
    // Every prompt, fed candle's greedy tokens: the same distribution at each step, and the same
    // top token unless candle's own top two are within rounding noise of each other (the logits
    // differ by up to ≈1 at the extremes of the vocabulary, a few tenths near the top).
    for question in PROMPTS {
        let prompt = prompt_ids(question);
        let (tokens, theirs) = candle_greedy(&prompt, 24);
        let ours = our_logits(&models().ours, &prompt, &tokens);
        for (step, (a, b)) in ours.iter().zip(&theirs).enumerate() {
            let diff = max_abs_diff(&softmax(a), &softmax(b));
            // Both quantise activations to 8 bits before every matmul but sum in different
            // orders: a one-ulp difference can flip a rounding and grow through 30 layers.
            assert!(diff < 0.15, "{question}, step {step}: max |Δp| = {diff}");
            assert!(
                regret(a, b) < 0.5,
                "{question}, step {step}: top token {} vs {} ({} below)",
                argmax(a),
                argmax(b),
                regret(a, b)
            );
        }
    }
}

#[test]
fn a_batched_step_gives_each_sequence_its_own_logits() {
    let ours = &models().ours;
    let prompts: Vec<Vec<u32>> = PROMPTS.iter().map(|q| prompt_ids(q)).collect();
    // Each sequence alone: its prompt, then two greedy tokens.
    let alone: Vec<(Vec<u32>, Vec<Vec<f32>>)> =
        prompts.iter().map(|p| our_greedy(ours, p, 3)).collect();
    // All together, each at its own position: prompts prefilled separately, then batched steps.
    let mut caches: Vec<KvCache> = prompts.iter().map(|_| ours.new_cache()).collect();
    let mut next: Vec<u32> = caches
        .iter_mut()
        .zip(&prompts)
        .map(|(cache, p)| argmax(&ours.forward(&mut [Input { cache, tokens: p }]).unwrap()))
        .collect();
    for step in 1..3 {
        let fed = next.clone();
        let mut inputs: Vec<Input> = caches
            .iter_mut()
            .zip(&fed)
            .map(|(cache, t)| Input {
                cache,
                tokens: std::slice::from_ref(t),
            })
            .collect();
        let logits = ours.forward(&mut inputs).unwrap();
        let vocab = ours.config().vocab;
        for (i, row) in logits.chunks_exact(vocab).enumerate() {
            assert_eq!(row, &alone[i].1[step][..], "sequence {i}, step {step}");
            next[i] = argmax(row);
            assert_eq!(next[i], alone[i].0[step]);
        }
    }
}

#[test]
fn a_cached_prefix_gives_the_logits_of_a_cold_prefill() {
    let ours = &models().ours;
    let first = prompt_ids(PROMPTS[0]);
    let second = prompt_ids(PROMPTS[1]);
    let shared = first
        .iter()
        .zip(&second)
        .take_while(|(a, b)| a == b)
        .count();
    assert!(shared > 10, "the system prompt is shared: {shared}");
    let mut warm = ours.new_cache();
    ours.forward(&mut [Input {
        cache: &mut warm,
        tokens: &first,
    }])
    .unwrap();
    warm.truncate(shared);
    let mut copy = warm.prefix(shared);
    let reused = ours
        .forward(&mut [Input {
            cache: &mut copy,
            tokens: &second[shared..],
        }])
        .unwrap();
    let mut cold = ours.new_cache();
    let fresh = ours
        .forward(&mut [Input {
            cache: &mut cold,
            tokens: &second,
        }])
        .unwrap();
    // Each prompt token is computed the same way with or without the cached prefix.
    assert_eq!(reused, fresh);
    assert_eq!(copy.len(), second.len());
}

/// The portable kernels sum in another order than the SIMD ones: fed the same tokens, their
/// next-token distributions stay within rounding of each other on the real model.
#[test]
fn the_scalar_kernels_agree_with_the_simd_ones_on_the_real_model() {
    let (ours, scalar) = (&models().ours, &models().scalar);
    let (mut agree, mut steps, mut worst) = (0, 0, 0f32);
    for question in PROMPTS {
        let prompt = prompt_ids(question);
        let (tokens, reference) = our_greedy(ours, &prompt, 12);
        let got = our_logits(scalar, &prompt, &tokens);
        for ((token, expected), logits) in tokens.iter().zip(&reference).zip(&got) {
            worst = worst.max(max_abs_diff(&softmax(logits), &softmax(expected)));
            agree += usize::from(argmax(logits) == *token);
            steps += 1;
        }
    }
    eprintln!(
        "scalar vs {:?}: top-1 {agree}/{steps}, max |Δp| {worst}",
        Isa::detect()
    );
    assert!(agree * 10 >= steps * 9, "top-1 agreement {agree}/{steps}");
    assert!(worst < 0.15, "max |Δp| = {worst}");
}

/// A long prompt prefilled in two pieces gives the same bits as the same tokens one at a time.
#[test]
fn a_long_prompt_prefilled_at_once_matches_one_token_at_a_time() {
    let ours = &models().ours;
    let text =
        "The keeper climbed the stairs of the old lighthouse and watched the sea. ".repeat(20);
    let tokens = prompt_ids(&text);
    assert!(tokens.len() > 300, "{}", tokens.len());
    let (head, tail) = tokens.split_at(20);
    let mut blocks = ours.new_cache();
    ours.forward(&mut [Input {
        cache: &mut blocks,
        tokens: head,
    }])
    .unwrap();
    let at_once = ours
        .forward(&mut [Input {
            cache: &mut blocks,
            tokens: tail,
        }])
        .unwrap();
    let mut loops = ours.new_cache();
    let mut one_by_one = Vec::new();
    for t in &tokens {
        one_by_one = ours
            .forward(&mut [Input {
                cache: &mut loops,
                tokens: &[*t],
            }])
            .unwrap();
    }
    assert_eq!(at_once, one_by_one);
}

/// The matmuls split their columns over the compute threads; each column is computed the same way
/// on any thread, so the logits are the same bits with one thread or two.
#[test]
fn two_compute_threads_give_the_same_logits_as_one() {
    let path = std::path::Path::new(GGUF);
    let mut reader = std::fs::File::open(path).unwrap();
    let content = Content::read(&mut reader).unwrap();
    let mut two = Llama::from_gguf(&content, &mut reader, Isa::detect()).unwrap();
    two.set_threads(2);
    assert_eq!(two.threads(), 2);
    let prompt = prompt_ids(PROMPTS[2]);
    let (tokens, one_thread) = our_greedy(&models().ours, &prompt, 6);
    let (again, two_threads) = our_greedy(&two, &prompt, 6);
    assert_eq!(tokens, again);
    assert_eq!(one_thread, two_threads);
}

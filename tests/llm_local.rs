//! The local GGUF chat model (SmolLM2-135M-Instruct from models/fetch): tokenizer, template and
//! generation on the real weights.

mod common;

use common::GGUF;

use std::ops::ControlFlow;
use std::sync::OnceLock;

use aitier::llm::{ChatMessage, FinishReason, GenerationParams, LocalModel};

fn model() -> &'static LocalModel {
    static MODEL: OnceLock<LocalModel> = OnceLock::new();
    MODEL.get_or_init(|| {
        assert!(
            std::path::Path::new(GGUF).is_file(),
            "{GGUF} is missing: run models/fetch"
        );
        LocalModel::load(std::path::Path::new(GGUF)).unwrap()
    })
}

fn ask(question: &str) -> Vec<ChatMessage> {
    vec![ChatMessage::new("user", question)]
}

#[test]
fn the_tokenizer_from_the_gguf_matches_transformers() {
    let ids = |text: &str| {
        model()
            .tokenizer()
            .encode(text, false)
            .unwrap()
            .get_ids()
            .to_vec()
    };
    assert_eq!(
        ids("<|im_start|>user\nHi<|im_end|>\n"),
        [1, 4093, 198, 26843, 2, 198]
    );
    // Digits are split one by one, and there is no prefix space.
    let digits = ids("2024");
    assert_eq!(digits.len(), 4, "{digits:?}");
    let text = "Héllo, wörld! 12 apples.";
    let back = model().tokenizer().decode(&ids(text), true).unwrap();
    assert_eq!(back, text);
}

#[test]
fn the_chat_template_is_the_models_own() {
    let mut model = LocalModel::load(std::path::Path::new(GGUF)).unwrap();
    // A conversation without a system message gets the default one...
    assert_eq!(
        model.prompt(&ask("Hi")).unwrap(),
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
    // ...a conversation with one keeps its own...
    let own = [
        ChatMessage::new("system", "Be brief."),
        ChatMessage::new("user", "Hi"),
    ];
    assert_eq!(
        model.prompt(&own).unwrap(),
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
    // ...and without a default, the template adds SmolLM2's.
    model.set_system_prompt(None);
    assert_eq!(
        model.prompt(&ask("Hi")).unwrap(),
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
}

#[test]
fn greedy_decoding_knows_the_capital_of_france_and_ends_its_turn() {
    let mut streamed = String::new();
    let answer = model()
        .generate(
            // The README's first chat request, as a new user sends it.
            &ask("What is the capital of France?"),
            &GenerationParams {
                max_tokens: 64,
                ..Default::default()
            },
            |delta| {
                streamed.push_str(delta);
                ControlFlow::Continue(())
            },
        )
        .unwrap();
    assert_eq!(answer.text, "The capital of France is Paris.", "{answer:?}");
    assert_eq!(streamed, answer.text);
    assert_eq!(answer.finish_reason, FinishReason::Stop, "{answer:?}");
    assert!(answer.completion_tokens < 64 && answer.prompt_tokens > 10);
}

#[test]
fn the_same_seed_gives_the_same_text() {
    let params = GenerationParams {
        max_tokens: 24,
        temperature: Some(0.9),
        top_p: Some(0.95),
        seed: Some(7),
        ..Default::default()
    };
    let run = |p: &GenerationParams| {
        model()
            .generate(&ask("Tell me about the sea."), p, |_| {
                ControlFlow::Continue(())
            })
            .unwrap()
            .text
    };
    assert_eq!(run(&params), run(&params));
    let other = GenerationParams {
        seed: Some(8),
        ..params.clone()
    };
    assert_ne!(run(&params), run(&other));
}

#[test]
fn max_tokens_and_stop_strings_end_the_answer() {
    let short = model()
        .generate(
            &ask("Write a long story about a lighthouse."),
            &GenerationParams {
                max_tokens: 5,
                ..Default::default()
            },
            |_| ControlFlow::Continue(()),
        )
        .unwrap();
    assert_eq!(
        (short.completion_tokens, short.finish_reason),
        (5, FinishReason::Length)
    );

    let mut streamed = String::new();
    let stopped = model()
        .generate(
            // The README's first chat request, as a new user sends it.
            &ask("What is the capital of France?"),
            &GenerationParams {
                max_tokens: 64,
                stop: vec!["Paris".into()],
                ..Default::default()
            },
            |delta| {
                streamed.push_str(delta);
                ControlFlow::Continue(())
            },
        )
        .unwrap();
    assert_eq!(stopped.finish_reason, FinishReason::Stop);
    assert!(
        !stopped.text.contains("Paris") && !streamed.contains("Paris"),
        "{stopped:?}"
    );
    assert_eq!(streamed, stopped.text);
}

#[test]
fn a_consumer_that_stops_stops_the_generation_within_a_token() {
    let mut calls = 0;
    let answer = model()
        .generate(
            &ask("Write a long story about a lighthouse."),
            &GenerationParams {
                max_tokens: 200,
                ..Default::default()
            },
            |_| {
                calls += 1;
                if calls == 3 {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            },
        )
        .unwrap();
    assert_eq!(answer.finish_reason, FinishReason::Cancelled);
    assert_eq!((calls, answer.completion_tokens), (3, 3));
}

#[test]
fn a_conversation_longer_than_the_context_is_refused() {
    let long = "word ".repeat(9000);
    let err = model()
        .generate(&ask(&long), &GenerationParams::default(), |_| {
            ControlFlow::Continue(())
        })
        .unwrap_err();
    assert!(err.to_string().contains("exceeds the context"), "{err}");
}

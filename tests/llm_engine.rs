//! The batching engine behind `ChatService` on the real SmolLM2 model: a shared prompt prefix is
//! not prefilled twice, concurrent requests share decode steps yet answer exactly as they would
//! alone, and a reader that goes away cancels its sequence.

mod common;

use common::GGUF;

use std::ops::ControlFlow;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use aitier::llm::{ChatEvent, ChatMessage, ChatService, Generation, GenerationParams, LocalModel};

fn load() -> LocalModel {
    let path = std::path::Path::new(GGUF);
    assert!(path.is_file(), "{GGUF} is missing: run models/fetch");
    LocalModel::load(path).unwrap()
}

fn service(concurrent: usize) -> ChatService {
    ChatService::new("smollm2".into(), load(), concurrent, 8)
}

fn conversation(system: &str, question: &str) -> Vec<ChatMessage> {
    vec![
        ChatMessage::new("system", system),
        ChatMessage::new("user", question),
    ]
}

fn greedy(max_tokens: usize) -> GenerationParams {
    GenerationParams {
        max_tokens,
        ..Default::default()
    }
}

/// The streamed text and the final totals of one request.
async fn answer(
    chat: &ChatService,
    messages: Vec<ChatMessage>,
    params: GenerationParams,
) -> (String, Generation) {
    let admission = chat.admit().expect("a free place");
    let mut rx = chat.stream(admission, messages, params);
    let mut text = String::new();
    while let Some(event) = rx.recv().await {
        match event {
            ChatEvent::Queued => {}
            ChatEvent::Delta(delta) => text.push_str(&delta),
            ChatEvent::Done(generation) => return (text, generation),
            ChatEvent::Error(e) => panic!("{e}"),
        }
    }
    panic!("the stream ended without a done event");
}

const SYSTEM: &str = "You are a concise assistant for a lighthouse museum. Answer in at most two sentences, plainly, without lists.";

#[tokio::test(flavor = "multi_thread")]
async fn a_second_prompt_sharing_the_system_prompt_prefills_only_what_differs() {
    let chat = service(2);
    let first = conversation(SYSTEM, "Who kept the lighthouse?");
    let second = conversation(SYSTEM, "What is a Fresnel lens?");
    let cold = chat
        .model()
        .generate(&second, &greedy(40), |_| ControlFlow::Continue(()))
        .unwrap();

    answer(&chat, first.clone(), greedy(8)).await;
    let stats = chat.stats();
    let prefilled = stats.prefilled_tokens.load(Ordering::SeqCst);
    assert_eq!(stats.reused_tokens.load(Ordering::SeqCst), 0);
    assert_eq!(prefilled as usize, chat.check(&first, 8).unwrap());

    let (streamed, warm) = answer(&chat, second.clone(), greedy(40)).await;
    let reused = stats.reused_tokens.load(Ordering::SeqCst) as usize;
    let prompt = chat.check(&second, 40).unwrap();
    assert!(
        reused > 25,
        "the system prompt's tokens are reused: {reused}"
    );
    assert_eq!(
        stats.prefilled_tokens.load(Ordering::SeqCst) as usize - prefilled as usize,
        prompt - reused
    );
    assert_eq!(warm.text, cold.text);
    assert_eq!(streamed, warm.text);
    assert_eq!(warm.prompt_tokens, prompt);

    // The very same conversation again: all but its last token come from the cache.
    answer(&chat, second, greedy(4)).await;
    assert_eq!(
        stats.reused_tokens.load(Ordering::SeqCst) as usize - reused,
        prompt - 1
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_requests_share_decode_steps_and_answer_as_they_would_alone() {
    let chat = service(4);
    let questions = [
        "What is the capital of France?",
        "Name a primary colour.",
        "What does a lighthouse keeper do?",
        "Write one sentence about the sea.",
    ];
    let alone: Vec<String> = questions
        .iter()
        .map(|q| {
            chat.model()
                .generate(&conversation(SYSTEM, q), &greedy(32), |_| {
                    ControlFlow::Continue(())
                })
                .unwrap()
                .text
        })
        .collect();
    let together = futures::future::join_all(
        questions
            .iter()
            .map(|q| answer(&chat, conversation(SYSTEM, q), greedy(32))),
    )
    .await;
    for ((streamed, generation), alone) in together.iter().zip(&alone) {
        assert_eq!(&generation.text, alone);
        assert_eq!(streamed, alone);
    }
    let stats = chat.stats();
    let (steps, advanced) = (
        stats.steps.load(Ordering::SeqCst),
        stats.stepped_sequences.load(Ordering::SeqCst),
    );
    assert!(
        advanced as f64 / steps as f64 > 2.0,
        "the sequences were decoded together: {advanced} sequence-steps in {steps} steps"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reader_that_goes_away_leaves_the_batch() {
    let chat = service(2);
    let admission = chat.admit().unwrap();
    let mut rx = chat.stream(
        admission,
        conversation(SYSTEM, "Write a very long story about a lighthouse keeper."),
        greedy(2000),
    );
    while !matches!(rx.recv().await, Some(ChatEvent::Delta(_))) {}
    assert_eq!(chat.active(), 1);
    drop(rx);
    let deadline = Instant::now() + Duration::from_secs(10);
    while chat.active() > 0 {
        assert!(Instant::now() < deadline, "the sequence went on");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // No step runs for it any more.
    let steps = chat.stats().steps.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(chat.stats().steps.load(Ordering::SeqCst), steps);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_long_prompt_is_prefilled_in_chunks_and_answers_as_in_one_go() {
    let chat = service(2);
    let long = "The keeper climbed the stairs of the old lighthouse and watched the sea. "
        .repeat(20)
        + "What did the keeper watch?";
    let messages = conversation(SYSTEM, &long);
    let whole = chat
        .model()
        .generate(&messages, &greedy(24), |_| ControlFlow::Continue(()))
        .unwrap();
    let (streamed, chunked) = answer(&chat, messages, greedy(24)).await;
    // More than one chunk of 256 tokens.
    assert!(chunked.prompt_tokens > 300, "{}", chunked.prompt_tokens);
    assert_eq!(
        chat.stats().prefilled_tokens.load(Ordering::SeqCst) as usize,
        chunked.prompt_tokens
    );
    assert_eq!(chunked.text, whole.text);
    assert_eq!(streamed, chunked.text);
}

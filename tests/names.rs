//! Model names over real HTTP: aliases (`--model-aliases`) answer for the real chat and embedding
//! models on every surface, and `POST /api/tokenize` counts what those models read.

mod common;

use aitier::config::{Cli, Command};
use clap::Parser;
use serde_json::{Value, json};

const CHAT: &str = "SmolLM2-135M-Instruct";
const EMBED: &str = "all-MiniLM-L6-v2";

async fn server() -> common::TestServer {
    common::spawn(&[
        "--chat-model",
        common::GGUF,
        "--model-aliases",
        "gpt-4o-mini=SmolLM2-135M-Instruct,text-embedding-3-small=all-MiniLM-L6-v2",
    ])
    .await
}

#[tokio::test]
async fn an_openai_model_name_is_answered_by_the_local_model_it_aliases() {
    let server = server().await;
    let (status, completion) = server
        .post(
            "/v1/chat/completions",
            &json!({"model": "gpt-4o-mini", "max_tokens": 4,
                    "messages": [{"role": "user", "content": "Say hi."}]}),
        )
        .await;
    assert_eq!(status, 200, "{completion}");
    // The answer names the model that answered.
    assert_eq!(completion["model"], CHAT);
    assert!(completion["usage"]["completion_tokens"].as_u64().unwrap() >= 1);

    let stream = server
        .client
        .post(server.url("/api/chat/stream"))
        .json(&json!({"model": "gpt-4o-mini", "max_tokens": 3,
                      "messages": [{"role": "user", "content": "Hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    let events = common::events(&stream.text().await.unwrap());
    assert_eq!(events.last().unwrap()["type"], "done", "{events:?}");

    let (status, embedded) = server
        .post(
            "/v1/embeddings",
            &json!({"model": "text-embedding-3-small", "input": ["one", "two"]}),
        )
        .await;
    assert_eq!(status, 200, "{embedded}");
    assert_eq!(embedded["data"].as_array().unwrap().len(), 2);
    let direct = server.embed(&["one"]).await;
    let via_alias: Vec<f32> =
        serde_json::from_value(embedded["data"][0]["embedding"].clone()).unwrap();
    assert!(common::cosine(&direct[0], &via_alias) > 0.9999);

    // Names that are neither a model nor an alias still get 404.
    let (status, body) = server
        .post(
            "/v1/chat/completions",
            &json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "Hi"}]}),
        )
        .await;
    assert_eq!(status, 404, "{body}");

    let models: Value = server
        .client
        .get(server.url("/v1/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let cards = models["data"].as_array().unwrap();
    let card = |id: &str| cards.iter().find(|c| c["id"] == id).cloned();
    assert_eq!(card("gpt-4o-mini").unwrap()["alias_of"], CHAT);
    assert_eq!(card("text-embedding-3-small").unwrap()["alias_of"], EMBED);
    assert!(card(CHAT).unwrap().get("alias_of").is_none());
}

#[tokio::test]
async fn an_alias_of_a_model_the_server_lacks_stops_start_up() {
    for (aliases, expected) in [
        ("gpt-4o-mini=Llama-3-8B", "does not serve"),
        (
            "all-MiniLM-L6-v2=SmolLM2-135M-Instruct",
            "already the name of a served model",
        ),
        ("gpt-4o-mini", "alias=model"),
    ] {
        let argv = [
            "aitier",
            "--port",
            "0",
            "--embedding-model",
            common::MINILM,
            "--chat-model",
            common::GGUF,
            "--database-url",
            "sqlite::memory:",
            "--model-aliases",
            aliases,
        ];
        let Command::Serve(args) = Cli::try_parse_from(argv).unwrap().into_command() else {
            unreachable!()
        };
        let error = aitier::server::bind(&args)
            .await
            .err()
            .unwrap_or_else(|| panic!("{aliases} was accepted"))
            .to_string();
        assert!(error.contains(expected), "{aliases}: {error}");
    }
}

#[tokio::test]
async fn tokenize_counts_what_the_models_read() {
    let server = server().await;
    let messages = json!([
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "What is the capital of France?"}
    ]);
    // A conversation counts as the prompt a chat request sends: the same as its usage.
    let (status, counted) = server
        .post("/api/tokenize", &json!({"messages": messages}))
        .await;
    assert_eq!(status, 200, "{counted}");
    assert_eq!(counted["model"], CHAT);
    let (status, completion) = server
        .post(
            "/v1/chat/completions",
            &json!({"model": CHAT, "max_tokens": 2, "messages": messages}),
        )
        .await;
    assert_eq!(status, 200, "{completion}");
    assert_eq!(counted["count"], completion["usage"]["prompt_tokens"]);
    assert_eq!(counted["limit"], 8192);
    assert!(counted.get("ids").is_none());

    // A bare text has no template around it: fewer tokens, and the ids on request.
    let (status, text) = server
        .post(
            "/api/tokenize",
            &json!({"model": "gpt-4o-mini", "text": "What is the capital of France?", "return_ids": true}),
        )
        .await;
    assert_eq!(status, 200, "{text}");
    let ids = text["ids"].as_array().unwrap();
    assert_eq!(text["count"].as_u64().unwrap() as usize, ids.len());
    assert!(ids.len() >= 5 && ids.len() < counted["count"].as_u64().unwrap() as usize);

    // The embedding model counts as /api/embed reads: special tokens in, cut at its limit.
    let long = "word ".repeat(2000);
    for (sentence, truncated) in [("The cat sat on the mat.", false), (long.as_str(), true)] {
        let (status, counted) = server
            .post(
                "/api/tokenize",
                &json!({"model": "text-embedding-3-small", "text": sentence}),
            )
            .await;
        assert_eq!(status, 200, "{counted}");
        assert_eq!(counted["model"], EMBED);
        assert_eq!(counted["truncated"], truncated);
        let (status, embedded) = server
            .post("/api/embed", &json!({"texts": [sentence]}))
            .await;
        assert_eq!(status, 200, "{embedded}");
        assert_eq!(counted["count"], embedded["usage"]["prompt_tokens"]);
        if truncated {
            assert_eq!(counted["count"], counted["limit"]);
        }
    }
}

#[tokio::test]
async fn tokenize_refuses_what_it_cannot_count() {
    let server = server().await;
    for (request, status, loc) in [
        (
            json!({"text": "a", "messages": [{"role": "user", "content": "a"}]}),
            422,
            json!(["body"]),
        ),
        (json!({"model": CHAT}), 422, json!(["body"])),
        (json!({"text": ""}), 422, json!(["body", "text"])),
        (
            json!({"model": EMBED, "messages": [{"role": "user", "content": "a"}]}),
            422,
            json!(["body", "messages"]),
        ),
        (json!({"model": "gpt-4", "text": "a"}), 404, Value::Null),
    ] {
        let (got, body) = server.post("/api/tokenize", &request).await;
        assert_eq!(got, status, "{request}: {body}");
        if status == 422 {
            assert_eq!(body["detail"][0]["loc"], loc, "{request}: {body}");
        } else {
            assert!(body["detail"].as_str().unwrap().contains("gpt-4"), "{body}");
        }
    }
}

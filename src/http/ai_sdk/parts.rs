//! The AI SDK's UI message stream protocol v1, written from our chat events: `start`, the sources
//! (`source-document` parts and one `data-sources` part), `text-start`, `text-delta`…,
//! `text-end`, `finish` (or `error`), then `data: [DONE]`. The SDK checks every part against its
//! schema and fails the stream on a part it does not know, so only these are ever sent.

use axum::response::sse::Event;
use futures::Stream;
use serde::Serialize;
use serde_json::json;
use utoipa::ToSchema;
use utoipa::openapi::{ObjectBuilder, RefOr, Schema, Type};

use super::super::chat::{Source, public_message};
use crate::llm::{ChatEvent, ChatStream, FinishReason};

/// One part of the stream, sent as `data: {json}`.
#[derive(Debug, Serialize, ToSchema)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum UiStreamPart {
    /// The assistant message begins.
    Start {
        #[serde(rename = "messageId")]
        message_id: String,
    },
    /// A source of the answer (RAG): `sourceId` is its number n, cited as `[n]`.
    SourceDocument {
        #[serde(rename = "sourceId")]
        source_id: String,
        #[serde(rename = "mediaType")]
        media_type: String,
        title: String,
    },
    /// The sources in full (RAG): ids, titles, excerpts, scores; number n is the n-th.
    DataSources { data: Vec<Source> },
    /// The answer's text part begins.
    TextStart { id: String },
    /// The next piece of the answer.
    TextDelta { id: String, delta: String },
    /// The answer's text part is complete.
    TextEnd { id: String },
    /// The message is complete: `stop` or `length`; the usage and the model in `messageMetadata`.
    Finish {
        #[serde(rename = "finishReason")]
        finish_reason: String,
        #[serde(rename = "messageMetadata")]
        #[schema(value_type = Object)]
        message_metadata: serde_json::Value,
    },
    /// Generation failed after the stream started.
    Error {
        #[serde(rename = "errorText")]
        error_text: String,
    },
}

/// One Server-Sent Event of the stream: `data` is a JSON-encoded [`UiStreamPart`], or `[DONE]`.
#[derive(Debug, ToSchema)]
#[allow(dead_code)] // a schema only: the events are written by axum's `Event`
pub struct UiStreamSse {
    #[schema(schema_with = part_data)]
    data: String,
}

fn part_data() -> RefOr<Schema> {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .content_media_type("application/json")
        .content_schema(Some(utoipa::openapi::Ref::from_schema_name("UiStreamPart")))
        .into()
}

/// The id of the answer's one text part.
const TEXT: &str = "text-0";

fn part(p: &UiStreamPart) -> Event {
    Event::default().json_data(p).unwrap_or_else(|_| {
        Event::default().data(r#"{"type":"error","errorText":"unserialisable part"}"#)
    })
}

/// The whole stream: the opening parts, then one or more parts per chat event, then `[DONE]`
/// after `finish` or `error`.
pub fn encode(
    sources: Vec<Source>,
    model: String,
    events: ChatStream,
) -> impl Stream<Item = Event> + Send {
    let mut opening = vec![part(&UiStreamPart::Start {
        message_id: format!("msg-{}", uuid::Uuid::new_v4().simple()),
    })];
    opening.extend(sources.iter().enumerate().map(|(i, s)| {
        part(&UiStreamPart::SourceDocument {
            source_id: (i + 1).to_string(),
            media_type: "text/plain".into(),
            title: s.title.clone(),
        })
    }));
    if !sources.is_empty() {
        opening.push(part(&UiStreamPart::DataSources { data: sources }));
    }
    opening.push(part(&UiStreamPart::TextStart { id: TEXT.into() }));
    let rest = futures::stream::unfold(Some(events), move |events| {
        let model = model.clone();
        async move {
            let mut events = events?;
            let Some(event) = events.recv().await else {
                // The generation went away without a last event: say so rather than hang up.
                let parts = vec![
                    part(&UiStreamPart::Error {
                        error_text: "The answer ended unexpectedly".into(),
                    }),
                    Event::default().data("[DONE]"),
                ];
                return Some((parts, None));
            };
            let (parts, last) = translate(event, &model);
            Some((parts, (!last).then_some(events)))
        }
    });
    futures::StreamExt::flat_map(
        futures::StreamExt::chain(futures::stream::iter([opening]), rest),
        futures::stream::iter,
    )
}

/// The parts for one chat event, and whether it was the last.
fn translate(event: ChatEvent, model: &str) -> (Vec<Event>, bool) {
    let done = || Event::default().data("[DONE]");
    match event {
        ChatEvent::Queued => (vec![Event::default().comment("queued")], false),
        ChatEvent::Delta(delta) => (
            vec![part(&UiStreamPart::TextDelta {
                id: TEXT.into(),
                delta,
            })],
            false,
        ),
        ChatEvent::Done(g) => {
            let finish_reason = match g.finish_reason {
                FinishReason::Stop => "stop",
                FinishReason::Length => "length",
                FinishReason::Cancelled => "other",
            };
            let finish = UiStreamPart::Finish {
                finish_reason: finish_reason.into(),
                message_metadata: json!({
                    "model": model,
                    "usage": {"prompt_tokens": g.prompt_tokens, "completion_tokens": g.completion_tokens},
                }),
            };
            (
                vec![
                    part(&UiStreamPart::TextEnd { id: TEXT.into() }),
                    part(&finish),
                    done(),
                ],
                true,
            )
        }
        ChatEvent::Error(message) => (
            vec![
                part(&UiStreamPart::Error {
                    error_text: public_message(&message),
                }),
                done(),
            ],
            true,
        ),
    }
}

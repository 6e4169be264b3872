//! aitier: an AI middle tier in one binary. Embeddings today; classification, streamed chat and RAG
//! join the same rooms.

pub mod aliases;
pub mod auth;
pub mod classify;
pub mod commands;
pub mod config;
pub mod http;
pub mod inference;
pub mod llm;
pub mod rag;
pub mod secret;
pub mod server;
pub mod state;
pub mod store;
pub mod telemetry;

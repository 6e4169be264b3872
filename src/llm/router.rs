//! Which provider answers a request for a model name: a local model for its own name (the first
//! one for no name), the upstream for the names configured for it, the upstream's default when
//! there is no local model. One router for every route that generates (`/api/chat/stream`,
//! `/v1/chat/completions`, `/api/rag/query`), so a name means the same everywhere.

use std::sync::Arc;

use super::{ChatProvider, ChatService, Upstream};

/// A local model as the router sees it.
pub enum Local<'a> {
    /// Configured under this name, still loading.
    Loading(&'a str),
    Ready(&'a str, Arc<ChatService>),
}

impl Local<'_> {
    fn name(&self) -> &str {
        match self {
            Self::Loading(name) | Self::Ready(name, _) => name,
        }
    }
}

/// The provider chosen for a request, and the model name it is asked for.
pub struct Route {
    pub provider: Arc<dyn ChatProvider>,
    pub model: String,
    /// Whether the upstream answers.
    pub upstream: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("This server has no chat model (--chat-model none) and no upstream")]
    NoProvider,
    /// Only an upstream, and it has no default model: the request must name one.
    #[error("Field required: this server has no local chat model, name an upstream model")]
    ModelRequired,
    #[error("Unknown model '{model}'; this server chats with {served}")]
    Unknown { model: String, served: String },
    /// The local model was asked for and is still loading.
    #[error("Model {0} is loading; retry after 1 s")]
    Loading(String),
}

/// Routes `model` (none: the default, the first local model) to its provider.
pub fn route(
    model: Option<&str>,
    locals: Vec<Local<'_>>,
    upstream: Option<&Arc<Upstream>>,
) -> Result<Route, RouteError> {
    let mut locals = locals;
    let picked = match model {
        None => (!locals.is_empty()).then_some(0),
        Some(m) => locals.iter().position(|l| l.name() == m),
    };
    if let Some(i) = picked {
        return match locals.swap_remove(i) {
            Local::Ready(name, service) => Ok(Route {
                provider: service,
                model: name.to_string(),
                upstream: false,
            }),
            Local::Loading(name) => Err(RouteError::Loading(name.to_string())),
        };
    }
    match (model, upstream) {
        (Some(m), Some(up)) if up.serves(m) => Ok(Route {
            provider: up.clone(),
            model: m.to_string(),
            upstream: true,
        }),
        (None, Some(up)) => match up.default_model() {
            Some(m) => Ok(Route {
                provider: up.clone(),
                model: m.to_string(),
                upstream: true,
            }),
            None => Err(RouteError::ModelRequired),
        },
        (Some(m), up) if up.is_some() || !locals.is_empty() => Err(RouteError::Unknown {
            model: m.to_string(),
            served: if locals.is_empty() {
                "no local model".to_string()
            } else {
                let names: Vec<String> = locals.iter().map(|l| format!("'{}'", l.name())).collect();
                names.join(", ")
            },
        }),
        _ => Err(RouteError::NoProvider),
    }
}

//! Which provider answers a request for a model name: the local model for its own name (or no
//! name), the upstream for the names configured for it, the upstream's default when there is no
//! local model. One router for every route that generates (`/api/chat/stream`,
//! `/v1/chat/completions`, `/api/rag/query`), so a name means the same everywhere.

use std::sync::Arc;

use super::{ChatProvider, ChatService, Upstream};

/// The local model as the router sees it.
pub enum Local<'a> {
    /// Chat is turned off (`--chat-model none`).
    Off,
    /// Configured under this name, still loading.
    Loading(&'a str),
    Ready(&'a str, Arc<ChatService>),
}

impl Local<'_> {
    fn name(&self) -> Option<&str> {
        match self {
            Self::Off => None,
            Self::Loading(name) | Self::Ready(name, _) => Some(name),
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

/// Routes `model` (none: the default) to its provider.
pub fn route(
    model: Option<&str>,
    local: Local<'_>,
    upstream: Option<&Arc<Upstream>>,
) -> Result<Route, RouteError> {
    let to_local = match (model, local.name()) {
        (None, Some(_)) => true,
        (Some(m), Some(name)) => m == name,
        _ => false,
    };
    if to_local {
        return match local {
            Local::Ready(name, service) => Ok(Route {
                provider: service,
                model: name.to_string(),
                upstream: false,
            }),
            Local::Loading(name) => Err(RouteError::Loading(name.to_string())),
            Local::Off => Err(RouteError::NoProvider),
        };
    }
    let served = local
        .name()
        .map_or("no local model".to_string(), |n| format!("'{n}'"));
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
        (_, None) if local.name().is_none() => Err(RouteError::NoProvider),
        (Some(m), _) => Err(RouteError::Unknown {
            model: m.to_string(),
            served,
        }),
        (None, None) => Err(RouteError::NoProvider),
    }
}

//! The access check in front of every route: an API key from `Authorization: Bearer` or
//! `X-API-Key`, the scope the route needs, and who the caller is (for rate limits). Open paths and
//! CORS preflights pass without a key. Refusals use FastAPI's shape, or OpenAI's under `/v1`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderName, Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use super::openai::OpenAiError;
use crate::auth::{ApiKeys, KeyId, Scope};
use crate::config::ServeArgs;

const X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// Who is calling: the key it presented, or its address when the server asks for no key. Rate
/// limits are counted per caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Caller {
    Key(KeyId),
    Address(IpAddr),
}

/// The access configuration, built once from the flags.
pub struct Access {
    keys: Option<ApiKeys>,
    open: Vec<String>,
    /// Take the client's address from the last `X-Forwarded-For` entry (the one the nearest proxy
    /// appended, which a client cannot forge) instead of the TCP peer.
    trust_forwarded_for: bool,
}

impl Access {
    /// Reads the keys (a file when `@PATH`); the error never quotes a key.
    pub fn from_args(args: &ServeArgs) -> Result<Self, String> {
        let keys = match &args.api_keys {
            Some(spec) => Some(ApiKeys::parse(spec.expose())?),
            None => None,
        };
        Ok(Self {
            keys,
            open: args
                .open_paths
                .iter()
                .map(|p| match p.trim() {
                    // The root alone: trimmed like the others it would open every path.
                    "/" => "/".to_string(),
                    p => p.trim_end_matches('/').to_string(),
                })
                .filter(|p| !p.is_empty())
                .collect(),
            trust_forwarded_for: args.trust_forwarded_for,
        })
    }

    pub fn keys(&self) -> Option<&ApiKeys> {
        self.keys.as_ref()
    }

    pub fn open_paths(&self) -> &[String] {
        &self.open
    }

    /// Whether `path` is one of the open paths or below one (`/` opens only itself).
    pub fn is_open(&self, path: &str) -> bool {
        self.open.iter().any(|open| {
            if open == "/" {
                return path == "/";
            }
            path.strip_prefix(open.as_str())
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
        })
    }

    fn address(&self, req: &Request) -> IpAddr {
        let forwarded = self
            .trust_forwarded_for
            .then(|| forwarded_for(req.headers()))
            .flatten();
        forwarded
            .or_else(|| {
                req.extensions()
                    .get::<ConnectInfo<SocketAddr>>()
                    .map(|c| c.0.ip())
            })
            .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED))
    }
}

fn forwarded_for(headers: &HeaderMap) -> Option<IpAddr> {
    let last = headers.get_all(&X_FORWARDED_FOR).iter().next_back()?;
    last.to_str().ok()?.rsplit(',').next()?.trim().parse().ok()
}

/// The scope a request needs: writing documents needs `write`, the operator's routes `admin`,
/// everything else `read`.
pub fn required_scope(method: &Method, path: &str) -> Scope {
    if path == "/metrics" {
        Scope::Admin
    } else if *method == Method::DELETE
        || (*method == Method::POST && path.trim_end_matches('/') == "/api/rag/documents")
    {
        Scope::Write
    } else {
        Scope::Read
    }
}

/// The key a request presents, from `Authorization: Bearer KEY` or `X-API-Key: KEY`.
fn presented(headers: &HeaderMap) -> Option<&str> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.trim().split_once(' ')?;
            scheme
                .eq_ignore_ascii_case("bearer")
                .then_some(token.trim())
        });
    bearer.or_else(|| headers.get(&X_API_KEY).and_then(|v| v.to_str().ok()))
}

/// Checks the key and scope and records the [`Caller`] in the request's extensions (not for open
/// paths and preflights).
pub async fn check(State(access): State<Arc<Access>>, mut req: Request, next: Next) -> Response {
    let path = req.uri().path().to_string();
    let preflight = req.method() == Method::OPTIONS
        && req
            .headers()
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
    // Open paths and preflights carry no caller: nothing is asked of them, nothing is counted.
    if preflight || access.is_open(&path) {
        return next.run(req).await;
    }
    let caller = match access.keys() {
        None => Caller::Address(access.address(&req)),
        Some(keys) => {
            let Some(id) = presented(req.headers()).and_then(|k| keys.find(k)) else {
                let why = if presented(req.headers()).is_some() {
                    "Invalid API key"
                } else {
                    "Not authenticated: send an API key as `Authorization: Bearer KEY` or `X-API-Key: KEY`"
                };
                return refuse(&path, ApiError::Unauthorized(why.into()));
            };
            let scope = required_scope(req.method(), &path);
            if !keys.allows(id, scope) {
                return refuse(
                    &path,
                    ApiError::Forbidden(format!(
                        "This API key lacks the '{}' scope this route needs",
                        scope.as_str()
                    )),
                );
            }
            Caller::Key(id)
        }
    };
    req.extensions_mut().insert(caller);
    next.run(req).await
}

/// An error in the shape of the route's surface: OpenAI's under `/v1`, FastAPI's elsewhere.
pub fn refuse(path: &str, error: ApiError) -> Response {
    if path.starts_with("/v1/") || path == "/v1" {
        OpenAiError::from(error).into_response()
    } else {
        error.into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_need_write_and_metrics_needs_admin() {
        assert_eq!(
            required_scope(&Method::POST, "/api/rag/documents"),
            Scope::Write
        );
        assert_eq!(
            required_scope(&Method::DELETE, "/api/rag/documents/3"),
            Scope::Write
        );
        assert_eq!(
            required_scope(&Method::GET, "/api/rag/documents"),
            Scope::Read
        );
        assert_eq!(
            required_scope(&Method::POST, "/api/rag/search"),
            Scope::Read
        );
        assert_eq!(required_scope(&Method::GET, "/metrics"), Scope::Admin);
    }

    #[test]
    fn bearer_wins_over_x_api_key_and_the_scheme_is_case_insensitive() {
        let mut headers = HeaderMap::new();
        headers.insert(X_API_KEY, "from-header".parse().unwrap());
        assert_eq!(presented(&headers), Some("from-header"));
        headers.insert(header::AUTHORIZATION, "bearer from-bearer".parse().unwrap());
        assert_eq!(presented(&headers), Some("from-bearer"));
    }

    #[test]
    fn the_root_entry_opens_the_page_and_nothing_below_it() {
        let access = Access {
            keys: None,
            open: vec!["/".into(), "/docs".into()],
            trust_forwarded_for: false,
        };
        assert!(access.is_open("/"));
        assert!(access.is_open("/docs/index.html"));
        assert!(!access.is_open("/api/embed"));
        assert!(!access.is_open("/v1/models"));
    }

    #[test]
    fn the_last_forwarded_address_is_the_proxys_view() {
        let mut headers = HeaderMap::new();
        headers.insert(X_FORWARDED_FOR, "1.2.3.4, 10.0.0.7".parse().unwrap());
        assert_eq!(forwarded_for(&headers), Some("10.0.0.7".parse().unwrap()));
    }
}

//! `GET /`: the page a person opens in a browser to try the server — streamed chat, sentiment,
//! documents and answers grounded in them. It is `web/index.html`, embedded in the binary: no CDN,
//! no build step, works offline. Its one inline script and one inline style are allowed by their
//! hashes in a `Content-Security-Policy` that forbids every other script.

use std::sync::LazyLock;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderName, HeaderValue, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use base64::Engine;
use sha2::{Digest, Sha256};

use crate::state::AppState;

/// The page. Kept out of the OpenAPI document, like `/docs`: it is for people, not clients.
pub const INDEX: &str = include_str!("../../web/index.html");

/// Where the page learns the embedding model's name, to leave it out of the chat model picker
/// (`/v1/models` lists it beside the chat models). Outside the script, so its hash holds.
const EMBEDDING_MODEL_SLOT: &str = "{{embedding_model}}";

pub fn router() -> Router<AppState> {
    Router::new().route("/", get(index))
}

/// The policy: nothing from elsewhere, and of inline code only the page's own script and style.
static CSP: LazyLock<HeaderValue> = LazyLock::new(|| {
    let hashes = |tag: &str| {
        inline_blocks(INDEX, tag)
            .into_iter()
            .map(|block| {
                let digest = Sha256::digest(block.as_bytes());
                format!(
                    " 'sha256-{}'",
                    base64::engine::general_purpose::STANDARD.encode(digest)
                )
            })
            .collect::<String>()
    };
    let policy = format!(
        "default-src 'self'; script-src{}; style-src{}; img-src 'self' data:; object-src 'none'; \
         base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        hashes("script"),
        hashes("style"),
    );
    HeaderValue::from_str(&policy).expect("a policy of ASCII")
});

/// The text of every `<tag>…</tag>` element, as the browser hashes it.
fn inline_blocks<'a>(html: &'a str, tag: &str) -> Vec<&'a str> {
    let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
    html.split(open.as_str())
        .skip(1)
        .filter_map(|rest| rest.split_once(close.as_str()).map(|(inner, _)| inner))
        .collect()
}

async fn index(State(state): State<AppState>) -> Response {
    let page = INDEX.replace(EMBEDDING_MODEL_SLOT, &escape(state.embeddings.name()));
    (
        [
            (header::CONTENT_SECURITY_POLICY, CSP.clone()),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
            (
                header::REFERRER_POLICY,
                HeaderValue::from_static("no-referrer"),
            ),
            // The page is small and changes with the binary: always revalidate.
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            (
                HeaderName::from_static("x-frame-options"),
                HeaderValue::from_static("DENY"),
            ),
        ],
        Html(page),
    )
        .into_response()
}

/// Escapes text for an HTML attribute value.
fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('"', "&quot;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_has_one_inline_script_and_one_inline_style_and_a_slot_for_the_model() {
        assert_eq!(inline_blocks(INDEX, "script").len(), 1);
        assert_eq!(inline_blocks(INDEX, "style").len(), 1);
        assert!(INDEX.contains(EMBEDDING_MODEL_SLOT));
        // Outside the script: a name put in its place must not change the script's hash.
        let script = inline_blocks(INDEX, "script")[0];
        assert!(!script.contains(EMBEDDING_MODEL_SLOT));
    }

    #[test]
    fn the_policy_names_a_hash_for_the_script_and_the_style_and_no_unsafe_inline() {
        let policy = CSP.to_str().unwrap();
        assert!(policy.starts_with("default-src 'self';"), "{policy}");
        assert_eq!(policy.matches("'sha256-").count(), 2, "{policy}");
        assert!(!policy.contains("unsafe"), "{policy}");
    }

    #[test]
    fn a_model_name_cannot_break_out_of_its_attribute() {
        assert_eq!(escape(r#"a"><script>&"#), "a&quot;&gt;&lt;script&gt;&amp;");
    }
}

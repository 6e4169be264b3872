//! The page at `/` over real HTTP: the embedded HTML with a policy that forbids remote scripts,
//! served without a key when the API needs one. What it does in a browser: tests/browser.

mod common;

use base64::Engine;
use sha2::{Digest, Sha256};

const KEY: &str = "page-test-key-0123456789";

async fn get(server: &common::TestServer, path: &str) -> reqwest::Response {
    server.client.get(server.url(path)).send().await.unwrap()
}

#[tokio::test]
async fn the_page_is_served_as_html_with_a_policy_that_forbids_remote_scripts() {
    let server = common::spawn(&[]).await;
    let response = get(&server, "/").await;
    assert_eq!(response.status(), 200);
    let headers = response.headers().clone();
    assert_eq!(headers["content-type"], "text/html; charset=utf-8");
    assert_eq!(headers["x-content-type-options"], "nosniff");
    let policy = headers["content-security-policy"]
        .to_str()
        .unwrap()
        .to_string();
    let html = response.text().await.unwrap();

    assert!(html.starts_with("<!doctype html>"), "{}", &html[..80]);
    for part in [
        "id=\"chat-form\"",
        "id=\"sentiment-form\"",
        "id=\"ask-form\"",
    ] {
        assert!(html.contains(part), "{part} is missing");
    }
    // The embedding model's name is filled in, so the page can leave it out of the chat picker.
    assert!(
        html.contains(r#"<meta name="aitier-embedding-model" content="all-MiniLM-L6-v2">"#),
        "the embedding model's name is not in the page"
    );
    // Nothing is loaded from elsewhere.
    assert!(
        !html.contains("src=\"http"),
        "the page loads a remote resource"
    );
    assert!(
        !html.contains("<script src"),
        "the page loads a script file"
    );

    let directives: Vec<&str> = policy.split(';').map(str::trim).collect();
    assert!(directives.contains(&"default-src 'self'"), "{policy}");
    assert!(!policy.contains("unsafe-inline"), "{policy}");
    assert!(!policy.contains("http"), "{policy}");
    // The inline script runs only because the policy names its hash.
    let script = html
        .split_once("<script>")
        .and_then(|(_, rest)| rest.split_once("</script>"))
        .map(|(script, _)| script)
        .expect("an inline script");
    let hash = base64::engine::general_purpose::STANDARD.encode(Sha256::digest(script));
    let script_src = directives
        .iter()
        .find(|d| d.starts_with("script-src "))
        .expect("a script-src directive");
    assert_eq!(*script_src, format!("script-src 'sha256-{hash}'"));
}

#[tokio::test]
async fn the_page_needs_no_key_when_the_api_does_and_opens_nothing_else() {
    let server = common::spawn(&["--api-keys", KEY]).await;
    assert_eq!(get(&server, "/").await.status(), 200);
    // `/` is open, the routes the page calls are not.
    for path in ["/v1/models", "/api/rag/collections", "/nowhere"] {
        assert_eq!(get(&server, path).await.status(), 401, "{path}");
    }
    let models = server
        .client
        .get(server.url("/v1/models"))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(models.status(), 200);
}

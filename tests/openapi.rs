//! The committed `openapi.json` is what the code generates, and carries FastAPI's error schemas.

#[test]
fn the_committed_openapi_json_matches_the_code() {
    let generated = aitier::http::openapi().to_pretty_json().unwrap() + "\n";
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.json");
    let committed = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        committed == generated,
        "openapi.json is stale: regenerate it with `cargo run -- openapi > openapi.json`"
    );
}

#[test]
fn the_spec_documents_fastapis_error_schemas_and_every_route() {
    let spec = serde_json::to_value(aitier::http::openapi()).unwrap();
    let schemas = &spec["components"]["schemas"];
    assert!(schemas.get("HTTPValidationError").is_some());
    assert!(schemas.get("ValidationError").is_some());
    for path in ["/api/embed", "/v1/embeddings", "/health", "/health/ready"] {
        assert!(spec["paths"].get(path).is_some(), "{path} is undocumented");
    }
    assert_eq!(
        spec["paths"]["/api/embed"]["post"]["responses"]["503"]["headers"]["Retry-After"]["schema"]
            ["type"],
        "integer"
    );
}

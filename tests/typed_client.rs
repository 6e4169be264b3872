//! The typed client path of tests/clients/live.ts, live: openapi-fetch requests typed from
//! openapi.json, every route's answer checked by the zod schemas generated from the same document,
//! the SSE routes read with eventsource-parser. tests/all compiles it (`npm run types`).

mod common;

#[tokio::test]
async fn every_route_answers_what_the_generated_zod_schemas_accept() {
    let build = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/clients/build/live.js");
    assert!(
        std::path::Path::new(build).is_file(),
        "{build} is missing: tests/all builds it (`npm run --prefix tests/clients types`)"
    );
    let server = common::spawn(&["--chat-model", common::GGUF]).await;
    common::node("build/live.js", "openapi-fetch", vec![server.base.clone()]).await;
}

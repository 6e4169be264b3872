//! Touches to the OpenAPI document that apply to many routes at once: the API-key security
//! schemes, and the refusals every guarded route or body-reading route can answer (401, 403, 413,
//! 429, 504), each in its surface's error shape.

use utoipa::openapi::path::Operation;
use utoipa::openapi::schema::{ObjectBuilder, Type};
use utoipa::openapi::security::{
    ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme,
};
use utoipa::openapi::{ContentBuilder, HeaderBuilder, OpenApi, Ref, ResponseBuilder};

use crate::config::DEFAULT_OPEN_PATHS;

/// Declares both ways to send a key (generated clients then send the header) and what every
/// route may answer besides its own responses.
pub fn secure(doc: &mut OpenApi) {
    let components = doc.components.get_or_insert_with(Default::default);
    components.add_security_scheme(
        "bearer",
        SecurityScheme::Http(
            HttpBuilder::new()
                .scheme(HttpAuthScheme::Bearer)
                .description(Some(
                    "An API key from AITIER_API_KEYS, as OpenAI SDKs send theirs",
                ))
                .build(),
        ),
    );
    components.add_security_scheme(
        "api_key",
        SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
            "X-API-Key",
            "An API key from AITIER_API_KEYS",
        ))),
    );
    doc.security = Some(vec![
        SecurityRequirement::new("bearer", Vec::<String>::new()),
        SecurityRequirement::new("api_key", Vec::<String>::new()),
    ]);
    let open: Vec<&str> = DEFAULT_OPEN_PATHS.split(',').collect();
    for (path, item) in doc.paths.paths.iter_mut() {
        let openai = path.starts_with("/v1/");
        let is_open = open.contains(&path.as_str());
        for operation in [&mut item.get, &mut item.post, &mut item.delete]
            .into_iter()
            .flatten()
        {
            timeout(operation, openai);
            if is_open {
                // An empty requirement: no key needed.
                operation.security = Some(vec![SecurityRequirement::default()]);
                continue;
            }
            refusals(operation, openai);
        }
    }
}

fn with_body(openai: bool, description: &str) -> ResponseBuilder {
    let body = if openai {
        "OpenAiErrorBody"
    } else {
        "HttpError"
    };
    ResponseBuilder::new().description(description).content(
        "application/json",
        ContentBuilder::new()
            .schema(Some(Ref::from_schema_name(body)))
            .build(),
    )
}

/// Every route answers within `--request-timeout-secs` or with a 504 (streams once their headers
/// are out are not cut).
fn timeout(operation: &mut Operation, openai: bool) {
    operation
        .responses
        .responses
        .entry("504".into())
        .or_insert_with(|| {
            with_body(
                openai,
                "The response did not start within the server's time limit",
            )
            .build()
            .into()
        });
}

fn refusals(operation: &mut Operation, openai: bool) {
    let with_body = |description: &str| with_body(openai, description);
    let responses = &mut operation.responses.responses;
    responses.entry("401".into()).or_insert_with(|| {
        with_body("No valid API key (when the server has keys)")
            .header(
                "WWW-Authenticate",
                HeaderBuilder::new()
                    .schema(Some(ObjectBuilder::new().schema_type(Type::String)))
                    .description(Some("`Bearer realm=\"aitier\"`"))
                    .build(),
            )
            .build()
            .into()
    });
    responses.entry("403".into()).or_insert_with(|| {
        with_body("The API key lacks the scope this route needs")
            .build()
            .into()
    });
    responses.entry("429".into()).or_insert_with(|| {
        with_body("The caller's rate limit is spent: retry after `Retry-After` seconds")
            .header(
                "Retry-After",
                HeaderBuilder::new()
                    .schema(Some(ObjectBuilder::new().schema_type(Type::Integer)))
                    .description(Some("Seconds to wait before retrying"))
                    .build(),
            )
            .build()
            .into()
    });
    if operation.request_body.is_some() {
        responses.entry("413".into()).or_insert_with(|| {
            with_body("The body is larger than the configured limit")
                .build()
                .into()
        });
    }
}

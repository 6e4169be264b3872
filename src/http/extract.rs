//! The JSON body extractor: content type, size limit, decoding with the path of the offending field,
//! then the request's own range checks; every failure in FastAPI's 422 shape (or 413).

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{StatusCode, header};
use serde::Deserialize;
use serde::de::DeserializeOwned;

use super::error::{ApiError, LocItem, ValidationError};

/// Range checks a request makes after decoding (pydantic's `Field(min_length=..)` and friends).
pub trait Validate {
    fn validate(&self) -> Vec<ValidationError>;
}

/// The configured body limit, put in each request's extensions so that a 413 can name it.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimit(pub usize);

/// A JSON body decoded and validated; rejections use FastAPI's error shapes.
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    S: Send + Sync,
    T: DeserializeOwned + Validate,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        parse_body(req, state).await.map(Self)
    }
}

pub async fn parse_body<S, T>(req: Request, state: &S) -> Result<T, ApiError>
where
    S: Send + Sync,
    T: DeserializeOwned + Validate,
{
    if !is_json(&req) {
        return Err(ApiError::validation(
            vec!["body".into()],
            "Expected a JSON body with Content-Type: application/json",
            "model_attributes_type",
        ));
    }
    let limit = req.extensions().get::<BodyLimit>().map_or(0, |l| l.0);
    let bytes =
        Bytes::from_request(req, state)
            .await
            .map_err(|rejection| match rejection.status() {
                StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge { limit },
                _ => ApiError::validation(
                    vec!["body".into()],
                    format!("Could not read the request body: {rejection}"),
                    "body_read_error",
                ),
            })?;
    let value: T = decode(&bytes)?;
    let problems = value.validate();
    if problems.is_empty() {
        Ok(value)
    } else {
        Err(ApiError::Validation(problems))
    }
}

fn is_json(req: &Request) -> bool {
    let Some(content_type) = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let essence = content_type.split(';').next().unwrap_or("").trim();
    let essence = essence.to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// Decodes JSON, reporting where it failed as a FastAPI `loc`.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    // serde lets a struct be read from a JSON array too; a request body must be an object.
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(
            match serde_json::from_slice::<serde::de::IgnoredAny>(bytes) {
                Err(e) => ApiError::validation(
                    vec!["body".into()],
                    format!("JSON decode error: {e}"),
                    "json_invalid",
                ),
                Ok(_) => ApiError::validation(
                    vec!["body".into()],
                    "Input should be a valid dictionary or object to extract fields from",
                    "model_attributes_type",
                ),
            },
        );
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let mut loc: Vec<LocItem> = vec!["body".into()];
        let inner = e.inner();
        if inner.is_syntax() || inner.is_eof() {
            return ApiError::validation(
                loc,
                format!("JSON decode error: {inner}"),
                "json_invalid",
            );
        }
        for segment in e.path().iter() {
            match segment {
                serde_path_to_error::Segment::Seq { index } => loc.push((*index).into()),
                serde_path_to_error::Segment::Map { key } => loc.push(key.as_str().into()),
                serde_path_to_error::Segment::Enum { variant } => loc.push(variant.as_str().into()),
                serde_path_to_error::Segment::Unknown => {}
            }
        }
        let (msg, kind) = describe(inner, &mut loc);
        ApiError::validation(loc, msg, &kind)
    })?;
    de.end().map_err(|e| {
        ApiError::validation(
            vec!["body".into()],
            format!("JSON decode error: {e}"),
            "json_invalid",
        )
    })?;
    Ok(value)
}

/// Turns serde's message into pydantic's wording and type code.
fn describe(err: &serde_json::Error, loc: &mut Vec<LocItem>) -> (String, String) {
    let raw = err.to_string();
    // serde_json appends " at line L column C"; the loc already says where.
    let text = raw.split(" at line ").next().unwrap_or(&raw).to_string();
    if let Some(field) = text
        .strip_prefix("missing field `")
        .and_then(|r| r.strip_suffix('`'))
    {
        loc.push(field.into());
        return ("Field required".into(), "missing".into());
    }
    if text.starts_with("invalid type") || text.starts_with("data did not match") {
        let expected = text.split("expected ").nth(1).unwrap_or("");
        let (kind, msg) = if expected.contains("a string") {
            ("string_type", "Input should be a valid string".to_string())
        } else if expected.contains("sequence") {
            ("list_type", "Input should be a valid list".to_string())
        } else if expected.contains("a boolean") {
            ("bool_type", "Input should be a valid boolean".to_string())
        } else if expected.contains("integer") || expected.starts_with("u") {
            ("int_type", "Input should be a valid integer".to_string())
        } else if expected.contains("struct") || expected.contains("map") {
            (
                "model_attributes_type",
                "Input should be a valid dictionary or object to extract fields from".to_string(),
            )
        } else {
            ("type_error", format!("Input should be {expected}"))
        };
        return (msg, kind.into());
    }
    (capitalize(&text), "value_error".into())
}

fn capitalize(s: &str) -> String {
    let mut chars = s.chars();
    chars
        .next()
        .map(|c| c.to_uppercase().chain(chars).collect())
        .unwrap_or_default()
}

/// An integer field that also accepts a JSON number with no fractional part (`3.0`), as JSON Schema
/// and pydantic do.
pub fn integral<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: TryFrom<u64>,
{
    use serde::de::Error;
    let value = serde_json::Number::deserialize(deserializer)?;
    let whole = value.as_u64().or_else(|| {
        value
            .as_f64()
            .filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f <= u64::MAX as f64)
            .map(|f| f as u64)
    });
    whole.and_then(|n| T::try_from(n).ok()).ok_or_else(|| {
        D::Error::custom(format!(
            "invalid type: {value}, expected a non-negative integer"
        ))
    })
}

/// [`integral`] for optional fields.
pub fn integral_opt<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: TryFrom<u64>,
{
    let value: Option<serde_json::Number> = Option::deserialize(deserializer)?;
    value
        .map(|n| integral(n).map_err(serde::de::Error::custom))
        .transpose()
}

/// `["body", ..rest]`: where a field of the JSON body is.
pub fn body<I: Clone + Into<LocItem>>(rest: &[I]) -> Vec<LocItem> {
    std::iter::once(LocItem::from("body"))
        .chain(rest.iter().cloned().map(Into::into))
        .collect()
}

/// A whole number that must lie in `min..=max`; the message names the field (the last key of
/// `loc`).
pub fn check_range(loc: Vec<LocItem>, value: u64, min: u64, max: u64) -> Option<ValidationError> {
    if (min..=max).contains(&value) {
        return None;
    }
    let name = match loc.last() {
        Some(LocItem::Key(key)) => key.clone(),
        _ => "value".into(),
    };
    Some(ValidationError::new(
        loc,
        format!("{name} should be between {min} and {max}"),
        "value_error",
    ))
}

/// Pydantic's `min_length`/`max_length` on a list.
pub fn check_list(loc: &[LocItem], len: usize, min: usize, max: usize) -> Option<ValidationError> {
    let plural = |n: usize| if n == 1 { "item" } else { "items" };
    if len < min {
        Some(ValidationError::new(
            loc.to_vec(),
            format!(
                "List should have at least {min} {} after validation, not {len}",
                plural(min)
            ),
            "too_short",
        ))
    } else if len > max {
        Some(ValidationError::new(
            loc.to_vec(),
            format!(
                "List should have at most {max} {} after validation, not {len}",
                plural(max)
            ),
            "too_long",
        ))
    } else {
        None
    }
}

/// Pydantic's `min_length`/`max_length` on a string, counted in characters as JSON Schema does.
pub fn check_text(
    loc: Vec<LocItem>,
    text: &str,
    min: usize,
    max: usize,
) -> Option<ValidationError> {
    let chars = text.chars().count();
    let plural = |n: usize| if n == 1 { "character" } else { "characters" };
    if chars < min {
        Some(ValidationError::new(
            loc,
            format!("String should have at least {min} {}", plural(min)),
            "string_too_short",
        ))
    } else if chars > max {
        Some(ValidationError::new(
            loc,
            format!("String should have at most {max} {}", plural(max)),
            "string_too_long",
        ))
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[allow(dead_code)]
    struct Req {
        texts: Vec<String>,
        #[serde(default)]
        normalize: Option<bool>,
    }

    fn loc_and_type(body: &str) -> (serde_json::Value, String) {
        match decode::<Req>(body.as_bytes()) {
            Err(ApiError::Validation(items)) => (
                serde_json::to_value(&items[0].loc).unwrap(),
                items[0].kind.clone(),
            ),
            other => panic!("expected a validation error, got {other:?}"),
        }
    }

    #[test]
    fn decoding_errors_point_at_the_offending_field() {
        let (loc, kind) = loc_and_type(r#"{"texts": ["a", 5]}"#);
        assert_eq!(loc, serde_json::json!(["body", "texts", 1]));
        assert_eq!(kind, "string_type");
        let (loc, kind) = loc_and_type(r#"{}"#);
        assert_eq!(loc, serde_json::json!(["body", "texts"]));
        assert_eq!(kind, "missing");
        let (loc, kind) = loc_and_type(r#"{"texts": "a"}"#);
        assert_eq!(loc, serde_json::json!(["body", "texts"]));
        assert_eq!(kind, "list_type");
        let (_, kind) = loc_and_type(r#"{"texts": ["a"], "normalize": "yes"}"#);
        assert_eq!(kind, "bool_type");
        let (loc, kind) = loc_and_type(r#"[1]"#);
        assert_eq!(loc, serde_json::json!(["body"]));
        assert_eq!(kind, "model_attributes_type");
        let (_, kind) = loc_and_type(r#"{"texts": ["#);
        assert_eq!(kind, "json_invalid");
        let (_, kind) = loc_and_type(r#"{"texts": []} trailing"#);
        assert_eq!(kind, "json_invalid");
    }

    #[test]
    fn string_length_counts_characters_not_bytes() {
        assert!(check_text(vec![], "ééé", 1, 3).is_none());
        assert!(check_text(vec![], "éééé", 1, 3).is_some());
    }
}

//! OpenAI chat fields this server does not implement (structured output, tools, log
//! probabilities): declared in the schema with the one value that means "off", and answered with
//! a 422 naming the field for anything else, instead of being ignored.

use serde_json::{Value, json};
use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, OneOfBuilder, Type};

use crate::http::ValidationError;

/// `value` or null.
fn nullable(value: ObjectBuilder) -> OneOfBuilder {
    OneOfBuilder::new()
        .item(value)
        .item(ObjectBuilder::new().schema_type(Type::Null))
}

pub fn text_format() -> OneOfBuilder {
    nullable(
        ObjectBuilder::new()
            .schema_type(Type::Object)
            .property(
                "type",
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .enum_values(Some(["text"])),
            )
            .required("type"),
    )
}

pub fn no_list() -> OneOfBuilder {
    OneOfBuilder::new()
        .item(
            ArrayBuilder::new()
                .items(ObjectBuilder::new().schema_type(Type::Object))
                .max_items(Some(0)),
        )
        .item(ObjectBuilder::new().schema_type(Type::Null))
}

pub fn only_none() -> OneOfBuilder {
    nullable(
        ObjectBuilder::new()
            .schema_type(Type::String)
            .enum_values(Some(["none"])),
    )
}

pub fn only_false() -> OneOfBuilder {
    nullable(
        ObjectBuilder::new()
            .schema_type(Type::Boolean)
            .enum_values(Some([false])),
    )
}

pub fn only_zero() -> OneOfBuilder {
    nullable(
        ObjectBuilder::new()
            .schema_type(Type::Integer)
            .enum_values(Some([0])),
    )
}

/// What each field may hold besides null, and why anything else is refused.
fn rule(field: &str) -> (Value, &'static str) {
    match field {
        "response_format" => (
            json!({"type": "text"}),
            "only {\"type\": \"text\"} is supported: this server cannot constrain output to JSON",
        ),
        "tools" | "functions" => (json!([]), "tool calling is not supported by this server"),
        "tool_choice" | "function_call" => (
            json!("none"),
            "tool calling is not supported by this server",
        ),
        "logprobs" => (
            json!(false),
            "log probabilities are not supported by this server",
        ),
        _ => (
            json!(0),
            "log probabilities are not supported by this server",
        ),
    }
}

/// One 422 item per field that asks for something unsupported.
pub fn check(fields: &[(&str, &Option<Value>)]) -> Vec<ValidationError> {
    fields
        .iter()
        .filter_map(|(field, value)| {
            let value = value.as_ref().filter(|v| !v.is_null())?;
            let (allowed, why) = rule(field);
            // The schema leaves other keys of `response_format` open: only its `type` counts.
            let fine = *value == allowed
                || (allowed == json!(0) && value.as_f64() == Some(0.0))
                || (*field == "response_format" && value.get("type") == Some(&json!("text")));
            (!fine).then(|| {
                ValidationError::new(
                    vec!["body".into(), (*field).into()],
                    format!("{field} is not supported: {why}"),
                    "unsupported",
                )
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_off_values_pass_and_anything_else_names_the_field() {
        let off = [
            Some(json!({"type": "text"})),
            Some(json!([])),
            Some(json!("none")),
            Some(json!(false)),
            Some(json!(0)),
            None,
            Some(Value::Null),
        ];
        let names = [
            "response_format",
            "tools",
            "tool_choice",
            "logprobs",
            "top_logprobs",
        ];
        for (name, value) in names.iter().zip(&off) {
            assert!(check(&[(name, value)]).is_empty(), "{name}");
        }
        let extra = Some(json!({"type": "text", "strict": true}));
        assert!(check(&[("response_format", &extra)]).is_empty());
        let on = Some(json!({"type": "json_object"}));
        let problems = check(&[("response_format", &on)]);
        assert_eq!(problems.len(), 1);
        assert!(problems[0].msg.starts_with("response_format"));
        let tools = Some(json!([{"type": "function", "function": {"name": "f"}}]));
        assert_eq!(check(&[("tools", &tools)]).len(), 1);
        assert_eq!(check(&[("logprobs", &Some(json!(true)))]).len(), 1);
    }
}

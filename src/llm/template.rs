//! The model's own chat template (`tokenizer.chat_template`), rendered with minijinja the way
//! transformers renders it with Jinja2 (trim_blocks, lstrip_blocks).

use minijinja::{Environment, ErrorKind, context};
use serde::Serialize;

use super::LlmError;

#[derive(Debug, Clone, Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: &str, content: &str) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

pub struct ChatTemplate {
    env: Environment<'static>,
    bos: String,
    eos: String,
}

impl ChatTemplate {
    pub fn new(source: String, bos: String, eos: String) -> Result<Self, LlmError> {
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| LlmError::Template(e.to_string()))?;
        env.set_syntax(syntax);
        env.add_function(
            "raise_exception",
            |message: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
            },
        );
        env.add_template_owned("chat", source)
            .map_err(|e| LlmError::Template(e.to_string()))?;
        Ok(Self { env, bos, eos })
    }

    /// The prompt for `messages`, ending with the assistant's turn opened.
    pub fn render(&self, messages: &[ChatMessage]) -> Result<String, LlmError> {
        self.env
            .get_template("chat")
            .and_then(|t| {
                t.render(context! {
                    messages => minijinja::Value::from(minijinja::value::Serde(messages)),
                    add_generation_prompt => true,
                    bos_token => &self.bos,
                    eos_token => &self.eos,
                })
            })
            .map_err(|e| LlmError::Template(e.to_string()))
    }
}

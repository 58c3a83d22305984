//! Chat templates: the Jinja template of `tokenizer_config.json` (`chat_template`, written there
//! by `affq import` for GGUF models too), rendered by minijinja as Hugging Face's
//! `apply_chat_template` renders it (docs/decode.md §4): blocks trimmed and left-stripped,
//! `messages`, `add_generation_prompt`, the special tokens and `raise_exception` in scope, and
//! Python's string methods (`.strip()`, `.startswith()`, …) through minijinja-contrib.

use crate::error::{Error, Result};
use serde::Serialize;
use std::path::{Path, PathBuf};

/// One turn of a conversation.
#[derive(Debug, Clone, Serialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// A model's chat template and the special tokens it refers to.
pub struct ChatTemplate {
    source: String,
    bos_token: String,
    eos_token: String,
    path: PathBuf,
}

/// A special token of `tokenizer_config.json`: a string or `{"content": …}`.
pub(crate) fn token_str(v: Option<&serde_json::Value>) -> String {
    match v {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(serde_json::Value::Object(o)) => o
            .get("content")
            .and_then(|c| c.as_str())
            .unwrap_or_default()
            .to_string(),
        _ => String::new(),
    }
}

impl ChatTemplate {
    /// The template of `tokenizer_config.json` at `path`: its `chat_template` string, or the
    /// entry named `default` of a list of named templates.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::format(path, e.to_string()))?;
        let source = match json.get("chat_template") {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(serde_json::Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template")?.as_str())
                .map(str::to_string)
                .ok_or_else(|| {
                    Error::format(path, "`chat_template` lists no template named `default`")
                })?,
            _ => {
                return Err(Error::format(
                    path,
                    "no `chat_template`: --chat needs the model's chat template",
                ))
            }
        };
        let t = ChatTemplate {
            source,
            bos_token: token_str(json.get("bos_token")),
            eos_token: token_str(json.get("eos_token")),
            path: path.to_path_buf(),
        };
        // Fail on a template minijinja cannot parse before any model is loaded.
        t.environment()?;
        Ok(t)
    }

    /// A template from its source (tests, and models whose template comes from elsewhere).
    pub fn from_source(source: &str, bos_token: &str, eos_token: &str) -> Result<Self> {
        let t = ChatTemplate {
            source: source.to_string(),
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
            path: PathBuf::from("<chat template>"),
        };
        t.environment()?;
        Ok(t)
    }

    fn err(&self, e: minijinja::Error) -> Error {
        let mut msg = format!("chat template: {e}");
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            msg.push_str(&format!(": {s}"));
            src = s.source();
        }
        Error::format(&self.path, msg)
    }

    fn environment(&self) -> Result<minijinja::Environment<'_>> {
        let mut env = minijinja::Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| self.err(e))?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_template("chat", &self.source)
            .map_err(|e| self.err(e))?;
        Ok(env)
    }

    /// The prompt text of `messages`, ending with the assistant's turn opened when
    /// `add_generation_prompt`.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let env = self.environment()?;
        let tmpl = env.get_template("chat").map_err(|e| self.err(e))?;
        tmpl.render(minijinja::context! {
            messages => minijinja::Value::from(minijinja::value::Serde(messages)),
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        })
        .map_err(|e| self.err(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trims_blocks_like_transformers() {
        // With trim_blocks/lstrip_blocks a block tag on its own line leaves no blank line.
        let t = ChatTemplate::from_source(
            "{% for m in messages %}\n  {{ m.role }}: {{ m.content.strip() }}\n{% endfor %}",
            "",
            "",
        )
        .unwrap();
        let msgs = [Message {
            role: "user".into(),
            content: "  hi ".into(),
        }];
        assert_eq!(t.render(&msgs, false).unwrap(), "  user: hi\n");
    }

    #[test]
    fn raise_exception_is_an_error() {
        let t =
            ChatTemplate::from_source("{{ raise_exception('no system role') }}", "", "").unwrap();
        let e = t.render(&[], false).unwrap_err().to_string();
        assert!(e.contains("no system role"), "{e}");
    }
}

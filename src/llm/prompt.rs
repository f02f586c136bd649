//! The prompt template: a documented, editable text file (`assets/llm_prompt.txt` is the
//! default, embedded in the binary) rendered into chat messages for one caption.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::Serialize;

/// The default template, `assets/llm_prompt.txt`; its header comment documents the format.
pub const DEFAULT_TEMPLATE: &str = include_str!("../../assets/llm_prompt.txt");

const CAPTION: &str = "{caption}";
const N: &str = "{n}";

/// One chat message, as the chat-completions API takes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Message {
    pub role: &'static str,
    pub content: String,
}

impl Message {
    pub fn system(content: String) -> Self {
        Self {
            role: "system",
            content,
        }
    }
    pub fn user(content: String) -> Self {
        Self {
            role: "user",
            content,
        }
    }
    pub fn assistant(content: String) -> Self {
        Self {
            role: "assistant",
            content,
        }
    }
}

/// A parsed template: an optional system message and the user message, with placeholders.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptTemplate {
    system: Option<String>,
    user: String,
}

impl PromptTemplate {
    /// Parses template text: `#` lines are comments, a `---` line splits system from user.
    pub fn parse(text: &str) -> Result<Self> {
        let lines: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
        let (system, user) = match lines.iter().position(|l| l.trim_end() == "---") {
            Some(at) => (Some(lines[..at].join("\n")), lines[at + 1..].join("\n")),
            None => (None, lines.join("\n")),
        };
        let system = system
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty());
        let user = user.trim().to_string();
        if user.is_empty() {
            bail!("the prompt template has no user message");
        }
        let all = format!("{}\n{user}", system.as_deref().unwrap_or(""));
        for placeholder in [CAPTION, N] {
            if !all.contains(placeholder) {
                bail!("the prompt template lacks the placeholder {placeholder}");
            }
        }
        Ok(Self { system, user })
    }

    /// The default template, or the file given with `--prompt-template`.
    pub fn load(file: Option<&Path>) -> Result<Self> {
        match file {
            None => Self::parse(DEFAULT_TEMPLATE).context("the built-in prompt template"),
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading the prompt template {}", path.display()))?;
                Self::parse(&text)
                    .with_context(|| format!("in the prompt template {}", path.display()))
            }
        }
    }

    /// The messages that ask for `n` paraphrases of `caption`.
    pub fn messages(&self, caption: &str, n: usize) -> Vec<Message> {
        // `{n}` first: a caption that itself contains "{n}" must stay as written.
        let fill = |t: &str| t.replace(N, &n.to_string()).replace(CAPTION, caption);
        let mut out = Vec::with_capacity(2);
        if let Some(system) = &self.system {
            out.push(Message::system(fill(system)));
        }
        out.push(Message::user(fill(&self.user)));
        out
    }

    /// A stable text identity of the template, recorded in the progress file so that a resumed
    /// run can warn when the prompt changed under it.
    pub fn identity(&self) -> String {
        format!(
            "{}\n---\n{}",
            self.system.as_deref().unwrap_or(""),
            self.user
        )
    }
}

/// The follow-up sent after an unusable answer (the conversation keeps the bad answer).
pub fn reask(reason: &str, caption: &str, n: usize) -> Message {
    Message::user(format!(
        "That answer was not usable: {reason}. Answer again with only a JSON array of exactly \
         {n} strings, each a different paraphrase of: \"{caption}\""
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_template_renders_system_and_user() {
        let t = PromptTemplate::load(None).unwrap();
        let m = t.messages("is red and {n} longer", 3);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].role, "system");
        assert!(!m[0].content.contains('#'), "comments must be dropped");
        assert_eq!(m[1].role, "user");
        assert!(m[1].content.contains("\"is red and {n} longer\""));
        assert!(m[1].content.contains("Write 3 paraphrases"));
        assert!(!m[1].content.contains("{caption}"));
    }

    #[test]
    fn template_without_separator_is_user_only() {
        let t = PromptTemplate::parse("# c\nGive {n} of <<{caption}>>\n").unwrap();
        let m = t.messages("x", 2);
        assert_eq!(m, vec![Message::user("Give 2 of <<x>>".into())]);
    }

    #[test]
    fn template_missing_placeholder_is_an_error() {
        let e = PromptTemplate::parse("sys\n---\nparaphrase {caption}").unwrap_err();
        assert!(e.to_string().contains("{n}"), "{e}");
        assert!(PromptTemplate::parse("# only comments\n---\n").is_err());
    }
}

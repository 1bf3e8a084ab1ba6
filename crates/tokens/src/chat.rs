//! Chat templates rendered natively, the way vLLM's chat endpoint renders them.
//!
//! vLLM first normalises the OpenAI messages (`parse_chat_messages`): each
//! message keeps `role`, its content (text parts joined with `\n` for
//! templates that expect a string, or `[{type: "text", text}]` parts for
//! templates that loop over `message['content']`), `tool_calls` (arguments
//! parsed from JSON strings), `reasoning`, `tool_call_id`, `name`. Then
//! transformers' `apply_chat_template` renders the template with Jinja2's
//! `ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)` plus
//! `loopcontrols`, a `raise_exception` global, a `strftime_now` global, its
//! own `tojson` filter, and a context of `messages`, `tools`, `documents`,
//! `add_generation_prompt`, the special-token strings (`bos_token`, ...) and
//! the request's `chat_template_kwargs`. [`ChatTemplate`] does the same with
//! minijinja; Python string and dict methods (`.strip()`, `.startswith()`,
//! `.items()`) come from minijinja-contrib's pycompat callback.
//!
//! Known difference from Python: map key order follows the
//! `serde_json::Value` given, which is sorted unless serde_json's
//! `preserve_order` feature is on, while Python keeps the request's order. It
//! matters only to templates that `tojson` or `.items()` a whole object (tool
//! schemas) whose keys the client did not send sorted; a binary that needs
//! it enables `serde_json/preserve_order` (cargo unifies the feature).

use minijinja::value::Value;
use minijinja::{Environment, Error, ErrorKind};
use serde_json::Value as Json;

use super::TokensError;
use super::pyjson::{self, py_strip};

const TEMPLATE_NAME: &str = "chat_template";

/// Bounds on one render. A chat template is code from a model directory
/// (or a request's `chat_template_kwargs` steering it); without bounds a
/// loop (`range` nested in `range`) spins a thread for hours and a repeat
/// (`x * n` in a loop) builds gigabytes. Each render stops with
/// [`TokensError::Limit`] (or a minijinja `OutOfFuel` error) at the first
/// bound it crosses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChatLimits {
    /// minijinja fuel per render: one per instruction plus one per 64 bytes
    /// produced. 20M is ~40x what a 10,000-message chat of 16 MiB needs
    /// (~60 instructions a message plus its bytes) and stops a runaway
    /// template within about a second on one core (a debug build: a few).
    pub fuel: u64,
    /// Largest rendered prompt: 32 MiB, twice the default body cap (the
    /// template adds headers around the message text, never that much).
    pub max_output_bytes: usize,
    /// Most messages in one conversation.
    pub max_messages: usize,
    /// Most bytes of message JSON strings (content, names, tool calls).
    pub max_input_bytes: usize,
}

impl Default for ChatLimits {
    fn default() -> Self {
        ChatLimits {
            fuel: 20_000_000,
            max_output_bytes: 32 << 20,
            max_messages: 10_000,
            max_input_bytes: 16 << 20,
        }
    }
}

/// How message content reaches the template (vLLM's
/// `--chat-template-content-format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ContentFormat {
    /// Detect from the template, as vLLM does: `openai` when it loops over a
    /// message's `content`, `string` otherwise.
    #[default]
    Auto,
    /// Content is one string; text parts are joined with `\n`.
    String,
    /// Content is a list of `{"type": "text", "text": ...}` parts.
    OpenAi,
}

/// Per-request rendering options (the chat request's fields vLLM forwards).
#[derive(Debug, Clone)]
pub struct ChatOptions {
    /// Append the assistant header so the model starts answering. vLLM's
    /// default is `true`.
    pub add_generation_prompt: bool,
    /// Leave the last (assistant) message open instead of closing it.
    pub continue_final_message: bool,
    /// The request's `tools` (passed as `tools`, `none` when absent).
    pub tools: Option<Json>,
    /// The request's `documents` (`none` when absent).
    pub documents: Option<Json>,
    /// The request's `chat_template_kwargs`, merged into the context over the
    /// special-token strings (as transformers does).
    pub template_kwargs: serde_json::Map<String, Json>,
    /// Overrides the template's detected content format.
    pub content_format: ContentFormat,
}

impl Default for ChatOptions {
    fn default() -> Self {
        Self {
            add_generation_prompt: true,
            continue_final_message: false,
            tools: None,
            documents: None,
            template_kwargs: serde_json::Map::new(),
            content_format: ContentFormat::Auto,
        }
    }
}

/// A compiled `chat_template` plus the special-token strings its context
/// carries. Cheap to share (`Send + Sync`); rendering takes `&self`.
pub struct ChatTemplate {
    env: Environment<'static>,
    limits: ChatLimits,
    /// The detected format (`String` or `OpenAi`, never `Auto`).
    detected: ContentFormat,
    /// `bos_token`, `eos_token`, ... as transformers' `special_tokens_map`.
    special_tokens: Vec<(String, Value)>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("detected", &self.detected)
            .field("special_tokens", &self.special_tokens)
            .finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Compiles `source`. `special_tokens` are the context's string variables
    /// (`("bos_token", "<|begin_of_text|>")`, ...).
    pub fn new(source: &str, special_tokens: &[(String, Json)]) -> Result<Self, TokensError> {
        Self::with_limits(source, special_tokens, ChatLimits::default())
    }

    /// [`Self::new`] with explicit render bounds.
    pub fn with_limits(
        source: &str,
        special_tokens: &[(String, Json)],
        limits: ChatLimits,
    ) -> Result<Self, TokensError> {
        let mut env = Environment::new();
        env.set_fuel(Some(limits.fuel));
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()?,
        );
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_filter("tojson", pyjson::tojson);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", |format: String| {
            pyjson::strftime_now(&format)
        });
        env.add_template_owned(TEMPLATE_NAME, rewrite_generation_tags(source))?;
        Ok(Self {
            env,
            limits,
            detected: detect_content_format(source),
            special_tokens: special_tokens
                .iter()
                .map(|(k, v)| (k.clone(), json_to_value(v)))
                .collect(),
        })
    }

    /// The content format detected from the template source.
    pub fn content_format(&self) -> ContentFormat {
        self.detected
    }

    /// Renders the conversation to the prompt text vLLM would tokenize.
    pub fn render(&self, messages: &[Json], opts: &ChatOptions) -> Result<String, TokensError> {
        if opts.continue_final_message && opts.add_generation_prompt {
            return Err(TokensError::Messages(
                "continue_final_message and add_generation_prompt are mutually exclusive".into(),
            ));
        }
        if messages.len() > self.limits.max_messages {
            return Err(TokensError::Limit(format!(
                "{} messages, more than {}",
                messages.len(),
                self.limits.max_messages
            )));
        }
        if !strings_within(messages, self.limits.max_input_bytes) {
            return Err(TokensError::Limit(format!(
                "message text over {} bytes",
                self.limits.max_input_bytes
            )));
        }
        let format = match opts.content_format {
            ContentFormat::Auto => self.detected,
            f => f,
        };
        let conversation = messages
            .iter()
            .map(|m| normalize_message(m, format))
            .collect::<Result<Vec<_>, _>>()?;
        let final_text = match (opts.continue_final_message, conversation.last()) {
            (true, Some(last)) => Some(final_message_text(last)?),
            (true, None) => return Err(TokensError::Messages("no message to continue".into())),
            _ => None,
        };

        let mut ctx: Vec<(String, Value)> = self.special_tokens.clone();
        ctx.extend(
            opts.template_kwargs
                .iter()
                .map(|(k, v)| (k.clone(), json_to_value(v))),
        );
        let opt = |v: &Option<Json>| v.as_ref().map_or(Value::from(()), json_to_value);
        ctx.push(("messages".into(), Value::from(conversation)));
        ctx.push(("tools".into(), opt(&opts.tools)));
        ctx.push(("documents".into(), opt(&opts.documents)));
        ctx.push((
            "add_generation_prompt".into(),
            Value::from(opts.add_generation_prompt),
        ));
        let mut out = Capped {
            buf: Vec::new(),
            max: self.limits.max_output_bytes,
            overflowed: false,
        };
        let rendered = self
            .env
            .get_template(TEMPLATE_NAME)?
            .render_captured_to(Value::from_pairs(ctx), &mut out);
        if out.overflowed {
            return Err(TokensError::Limit(format!(
                "rendered prompt over {} bytes",
                out.max
            )));
        }
        drop(rendered?);
        let rendered = String::from_utf8(out.buf)
            .map_err(|_| TokensError::Messages("rendered prompt is not UTF-8".into()))?;
        match final_text {
            Some(text) => cut_after_final_message(rendered, &text),
            None => Ok(rendered),
        }
    }
}

/// The render's output, refusing to grow past `max` (the write that would
/// fails, which ends the render, and sets `overflowed`).
struct Capped {
    buf: Vec<u8>,
    max: usize,
    overflowed: bool,
}

impl std::io::Write for Capped {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if self.buf.len().saturating_add(data.len()) > self.max {
            self.overflowed = true;
            return Err(std::io::Error::other("rendered prompt too large"));
        }
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Whether the strings inside `messages` total at most `limit` bytes.
fn strings_within(messages: &[Json], limit: usize) -> bool {
    fn walk(v: &Json, left: &mut usize) -> bool {
        match v {
            Json::String(s) => match left.checked_sub(s.len()) {
                Some(l) => {
                    *left = l;
                    true
                }
                None => false,
            },
            Json::Array(a) => a.iter().all(|v| walk(v, left)),
            Json::Object(o) => o.values().all(|v| walk(v, left)),
            _ => true,
        }
    }
    let mut left = limit;
    messages.iter().all(|m| walk(m, &mut left))
}

fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// serde_json -> minijinja, keeping integers integral (`1` stays `1`, not
/// `1.0`, so `tojson` and arithmetic behave as in Python).
pub(crate) fn json_to_value(v: &Json) -> Value {
    match v {
        Json::Null => Value::from(()),
        Json::Bool(b) => Value::from(*b),
        Json::Number(n) => match (n.as_u64(), n.as_i64(), n.as_f64()) {
            (Some(u), _, _) => Value::from(u),
            (None, Some(i), _) => Value::from(i),
            (None, None, Some(f)) => Value::from(f),
            _ => Value::from(()),
        },
        Json::String(s) => Value::from(s.as_str()),
        Json::Array(items) => Value::from(items.iter().map(json_to_value).collect::<Vec<_>>()),
        Json::Object(map) => {
            Value::from_pairs(map.iter().map(|(k, v)| (k.as_str(), json_to_value(v))))
        }
    }
}

/// One OpenAI message -> vLLM's `ConversationMessage` (see the module doc).
fn normalize_message(msg: &Json, format: ContentFormat) -> Result<Value, TokensError> {
    let bad = |why: &str| TokensError::Messages(why.to_string());
    let obj = msg
        .as_object()
        .ok_or_else(|| bad("a message must be an object"))?;
    let role = obj
        .get("role")
        .and_then(Json::as_str)
        .ok_or_else(|| bad("a message needs a string role"))?;
    let texts = content_texts(obj.get("content"))?;
    let content = if format == ContentFormat::OpenAi {
        Value::from(
            texts
                .iter()
                .map(|t| {
                    Value::from_pairs([("type", Value::from("text")), ("text", Value::from(*t))])
                })
                .collect::<Vec<_>>(),
        )
    } else {
        Value::from(texts.join("\n"))
    };
    let mut out: Vec<(&str, Value)> = vec![("role", Value::from(role)), ("content", content)];
    match role {
        "assistant" => {
            let calls = obj.get("tool_calls").filter(|c| !c.is_null());
            if let Some(calls) = calls.map(normalize_tool_calls).transpose()?.flatten() {
                out.push(("tool_calls", calls));
            }
            if let Some(r) = obj.get("reasoning").filter(|r| !r.is_null()) {
                out.push(("reasoning", json_to_value(r)));
                out.push(("reasoning_content", json_to_value(r)));
            }
        }
        "tool" => {
            if let Some(id) = obj.get("tool_call_id") {
                out.push(("tool_call_id", json_to_value(id)));
            }
        }
        _ => {}
    }
    if let Some(name) = obj.get("name").filter(|n| n.is_string()) {
        out.push(("name", json_to_value(name)));
    }
    if role == "developer" {
        out.push((
            "tools",
            obj.get("tools").map_or(Value::from(()), json_to_value),
        ));
    }
    Ok(Value::from_pairs(out))
}

/// The text of a message's content: a string, or the text of each text-like
/// part (parts whose text is null are skipped, as vLLM does).
fn content_texts(content: Option<&Json>) -> Result<Vec<&str>, TokensError> {
    let parts = match content {
        None | Some(Json::Null) => return Ok(Vec::new()),
        Some(Json::String(s)) => return Ok(vec![s.as_str()]),
        Some(Json::Array(parts)) => parts,
        Some(_) => {
            return Err(TokensError::Messages(
                "content must be a string or a list".into(),
            ));
        }
    };
    let mut texts = Vec::with_capacity(parts.len());
    for part in parts {
        let (kind, field) = match part {
            Json::String(s) => {
                texts.push(s.as_str());
                continue;
            }
            Json::Object(p) => match p.get("type").and_then(Json::as_str) {
                Some(t @ ("text" | "input_text" | "output_text")) => (t, p.get("text")),
                Some(t @ "refusal") => (t, p.get("refusal")),
                Some(t @ "thinking") => (t, p.get("thinking")),
                Some(other) => {
                    return Err(TokensError::Messages(format!(
                        "content part type {other:?} is not supported (text only)"
                    )));
                }
                None => return Err(TokensError::Messages("content part without type".into())),
            },
            _ => {
                return Err(TokensError::Messages(
                    "content part must be an object".into(),
                ));
            }
        };
        match field {
            None | Some(Json::Null) => {}
            Some(Json::String(s)) => texts.push(s.as_str()),
            Some(_) => {
                return Err(TokensError::Messages(format!(
                    "{kind} part must hold a string"
                )));
            }
        }
    }
    Ok(texts)
}

/// vLLM's `_postprocess_messages`: an empty list disappears; each call's
/// `function.arguments` JSON string becomes an object (`{}` when empty).
fn normalize_tool_calls(calls: &Json) -> Result<Option<Value>, TokensError> {
    let Some(list) = calls.as_array() else {
        return Ok(Some(json_to_value(calls)));
    };
    if list.is_empty() {
        return Ok(None);
    }
    let mut out = Vec::with_capacity(list.len());
    for call in list {
        let mut call = call
            .as_object()
            .cloned()
            .ok_or_else(|| TokensError::Messages("tool_calls entries must be objects".into()))?;
        if let Some(Json::Object(function)) = call.get_mut("function") {
            let args = match function.get("arguments") {
                Some(Json::String(s)) if !s.is_empty() => serde_json::from_str(s).map_err(|e| {
                    TokensError::Messages(format!("tool call arguments are not JSON: {e}"))
                })?,
                Some(v) if truthy(v) => v.clone(),
                _ => Json::Object(serde_json::Map::new()),
            };
            function.insert("arguments".into(), args);
        }
        out.push(json_to_value(&Json::Object(call)));
    }
    Ok(Some(Value::from(out)))
}

fn truthy(v: &Json) -> bool {
    match v {
        Json::Null => false,
        Json::Bool(b) => *b,
        Json::Number(n) => n.as_f64() != Some(0.0),
        Json::String(s) => !s.is_empty(),
        Json::Array(a) => !a.is_empty(),
        Json::Object(o) => !o.is_empty(),
    }
}

/// transformers' `continue_final_message`: the last message's text (the last
/// text part when content is a list).
fn final_message_text(last: &Value) -> Result<String, TokensError> {
    let content = last.get_attr("content").unwrap_or_default();
    if let Some(s) = content.as_str() {
        return Ok(s.to_string());
    }
    let parts: Vec<Value> = content
        .try_iter()
        .map(|it| it.collect())
        .unwrap_or_default();
    parts
        .iter()
        .rev()
        .find_map(|p| {
            p.get_attr("text")
                .ok()
                .and_then(|t| t.as_str().map(str::to_string))
        })
        .ok_or_else(|| TokensError::Messages("continue_final_message: no text to continue".into()))
}

/// Cuts the rendered chat right after the final message's text, exactly as
/// transformers does (keeping its leading/trailing-space rule).
fn cut_after_final_message(rendered: String, final_msg: &str) -> Result<String, TokensError> {
    let stripped = py_strip(final_msg);
    let loc = rendered.rfind(stripped).ok_or_else(|| {
        TokensError::Messages(
            "continue_final_message: the final message does not appear in the rendered chat".into(),
        )
    })?;
    let lstripped = final_msg.trim_start_matches(pyjson::is_py_space);
    let end = if rendered.get(loc..loc + lstripped.len()) == Some(final_msg) {
        loc + lstripped.len()
    } else {
        loc + stripped.len()
    };
    let mut rendered = rendered;
    rendered.truncate(end);
    Ok(rendered)
}

/// transformers' `{% generation %}...{% endgeneration %}` (assistant-mask
/// tracking) renders its body unchanged; minijinja has no such tag, so it
/// becomes `{% if true %}...{% endif %}` with the same whitespace control.
fn rewrite_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(start) = rest.find("{%") {
        let Some(len) = rest[start..].find("%}") else {
            break;
        };
        let tag = &rest[start + 2..start + len];
        let inner = tag
            .trim_start_matches(['-', '+'])
            .trim_end_matches(['-', '+'])
            .trim();
        out.push_str(&rest[..start]);
        let replacement = match inner {
            "generation" => Some("if true"),
            "endgeneration" => Some("endif"),
            _ => None,
        };
        match replacement {
            Some(new) => {
                out.push_str("{%");
                out.push_str(&tag.replacen(inner, new, 1));
                out.push_str("%}");
            }
            None => out.push_str(&rest[start..start + len + 2]),
        }
        rest = &rest[start + len + 2..];
    }
    out.push_str(rest);
    out
}

/// vLLM's content-format detection, approximated on the source text: the
/// template is `openai` when a `{% for %}` iterates over `X['content']` /
/// `X.content`, or over a variable `{% set %}` from one.
fn detect_content_format(source: &str) -> ContentFormat {
    let tags: Vec<&str> = source
        .split("{%")
        .skip(1)
        .filter_map(|s| s.split_once("%}").map(|(t, _)| t))
        .map(|t| {
            t.trim_start_matches(['-', '+'])
                .trim_end_matches(['-', '+'])
                .trim()
        })
        .collect();
    let mut content_vars: Vec<&str> = Vec::new();
    for tag in &tags {
        if let Some((name, expr)) = tag.strip_prefix("set ").and_then(|r| r.split_once('='))
            && is_content_access(expr)
        {
            content_vars.push(name.trim());
        }
    }
    let loops_over_content = tags.iter().any(|tag| {
        let Some((_, iter)) = tag.strip_prefix("for ").and_then(|r| r.split_once(" in ")) else {
            return false;
        };
        let iter = iter.split(" if ").next().unwrap_or(iter);
        let iter = iter.split(" recursive").next().unwrap_or(iter);
        is_content_access(iter) || content_vars.contains(&base_expr(iter))
    });
    if loops_over_content {
        ContentFormat::OpenAi
    } else {
        ContentFormat::String
    }
}

/// The expression without trailing filters or slices: `m['content'][1:] | x`
/// -> `m['content']`.
fn base_expr(expr: &str) -> &str {
    let mut e = expr.split('|').next().unwrap_or(expr).trim();
    while e.ends_with(']') {
        match e.rfind('[') {
            Some(i) if e[i..].contains(':') => e = e[..i].trim_end(),
            _ => break,
        }
    }
    e
}

fn is_content_access(expr: &str) -> bool {
    let e = base_expr(expr);
    e.ends_with("['content']") || e.ends_with("[\"content\"]") || e.ends_with(".content")
}

#[cfg(test)]
mod tests;

//! OpenAI-compatible request bodies -> [`RouteRequest`]: the first stage of
//! the read path.
//!
//! Envoy hands the scorer the raw body of `/v1/completions` and
//! `/v1/chat/completions` requests. Only the fields that change where a
//! request should go are read (`model`, the prompt or messages, `cache_salt`,
//! `chat_template_kwargs`); everything else is skipped without being
//! materialised, so a multi-megabyte body costs one pass of `serde_json`.
//! A body that is not a request at all is a [`ParseError`], which the
//! ext_proc front end answers with 400; anything that parses routes.

use crate::decide::{Prompt, RouteRequest};
use serde::Deserialize;
use serde::de::{self, Deserializer, IgnoredAny, SeqAccess, Visitor};
use serde_json::{Map, Value};
use std::fmt;

/// Which OpenAI API a body belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiKind {
    /// `/v1/completions`: `prompt`.
    Completions,
    /// `/v1/chat/completions`: `messages`.
    ChatCompletions,
}

impl ApiKind {
    /// The API a `:path` names, if it names one (query string ignored).
    pub fn from_path(path: &str) -> Option<Self> {
        let path = path.split(['?', '#']).next().unwrap_or(path);
        let path = path.trim_end_matches('/');
        if path.ends_with("/chat/completions") {
            Some(Self::ChatCompletions)
        } else if path.ends_with("/completions") {
            Some(Self::Completions)
        } else {
            None
        }
    }
}

/// Why a body is not a routable request (a 400 for the client).
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    /// Not JSON, not an object, or a field of the wrong type; serde's message
    /// names the field position, which is what a client needs to fix it.
    #[error("invalid request body: {0}")]
    Json(#[from] serde_json::Error),
    #[error("`model` is required")]
    MissingModel,
    #[error("`prompt` is required for /v1/completions")]
    MissingPrompt,
    #[error("`messages` is required for /v1/chat/completions")]
    MissingMessages,
    #[error("either `prompt` or `messages` is required")]
    MissingPromptOrMessages,
    #[error("`messages[{index}]`: {problem}")]
    BadMessage { index: usize, problem: &'static str },
}

/// Parses a buffered body. `path` is the request's `:path`; without one (or
/// with a path naming neither API) the body's fields decide.
pub fn parse(body: &[u8], path: Option<&str>) -> Result<RouteRequest, ParseError> {
    let raw: RawBody = serde_json::from_slice(body)?;
    let model = raw.model.ok_or(ParseError::MissingModel)?;
    let kind = match path.and_then(ApiKind::from_path) {
        Some(kind) => kind,
        None if raw.messages.is_some() => ApiKind::ChatCompletions,
        None if raw.prompt.is_some() => ApiKind::Completions,
        None => return Err(ParseError::MissingPromptOrMessages),
    };
    let prompt = match kind {
        ApiKind::Completions => raw.prompt.ok_or(ParseError::MissingPrompt)?.0,
        ApiKind::ChatCompletions => Prompt::Chat(check_messages(
            raw.messages.ok_or(ParseError::MissingMessages)?,
        )?),
    };
    Ok(RouteRequest {
        model,
        prompt,
        cache_salt: raw.cache_salt,
        chat_template_kwargs: raw.chat_template_kwargs.map(Value::Object),
        request_id: None,
    })
}

/// The request a body-less call (e.g. `GET /v1/models`) routes as: no model,
/// no prompt, so the router picks by load.
pub fn unknown_prompt(request_id: Option<String>) -> RouteRequest {
    RouteRequest {
        model: String::new(),
        prompt: Prompt::Text(String::new()),
        cache_salt: None,
        chat_template_kwargs: None,
        request_id,
    }
}

/// The fields routing reads. Unknown fields are skipped by serde.
#[derive(Deserialize)]
struct RawBody {
    model: Option<String>,
    prompt: Option<RawPrompt>,
    /// Objects; their keys are checked by [`check_messages`] so the chat
    /// template sees the messages exactly as the client sent them.
    messages: Option<Vec<Map<String, Value>>>,
    cache_salt: Option<String>,
    chat_template_kwargs: Option<Map<String, Value>>,
}

/// Each message needs a string `role`; `content`, when present, is a string,
/// a list of part objects, or null (assistant tool calls).
fn check_messages(messages: Vec<Map<String, Value>>) -> Result<Vec<Value>, ParseError> {
    let bad = |index, problem| ParseError::BadMessage { index, problem };
    messages
        .into_iter()
        .enumerate()
        .map(|(index, message)| {
            if !matches!(message.get("role"), Some(Value::String(_))) {
                return Err(bad(index, "`role` must be a string"));
            }
            match message.get("content") {
                None | Some(Value::Null | Value::String(_)) => {}
                Some(Value::Array(parts)) if parts.iter().all(Value::is_object) => {}
                Some(_) => {
                    return Err(bad(index, "`content` must be a string or a list of parts"));
                }
            }
            Ok(Value::Object(message))
        })
        .collect()
}

/// `prompt` in any of the shapes `/v1/completions` accepts: a string, a list
/// of strings, a list of token ids, or a list of token-id lists. A batch
/// routes by its first prompt; the rest is skipped (but must still be JSON).
struct RawPrompt(Prompt);

impl<'de> Deserialize<'de> for RawPrompt {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(PromptVisitor).map(RawPrompt)
    }
}

struct PromptVisitor;

impl<'de> Visitor<'de> for PromptVisitor {
    type Value = Prompt;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string, a list of strings, a list of token ids or a list of token-id lists")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Prompt, E> {
        Ok(Prompt::Text(v.to_owned()))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Prompt, E> {
        Ok(Prompt::Text(v))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Prompt, A::Error> {
        let first: PromptItem = seq
            .next_element()?
            .ok_or_else(|| de::Error::invalid_length(0, &"a non-empty prompt list"))?;
        let prompt = match first {
            PromptItem::Token(id) => {
                let mut ids = Vec::with_capacity(seq.size_hint().unwrap_or(0) + 1);
                ids.push(id);
                while let Some(TokenId(id)) = seq.next_element()? {
                    ids.push(id);
                }
                return Ok(Prompt::TokenIds(ids));
            }
            PromptItem::Text(text) => Prompt::Text(text),
            PromptItem::Ids(ids) => Prompt::TokenIds(ids),
        };
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(prompt)
    }
}

/// The first element of a `prompt` list decides what the list is.
enum PromptItem {
    Text(String),
    Token(u32),
    Ids(Vec<u32>),
}

impl<'de> Deserialize<'de> for PromptItem {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(PromptItemVisitor)
    }
}

struct PromptItemVisitor;

impl<'de> Visitor<'de> for PromptItemVisitor {
    type Value = PromptItem;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string, a token id or a list of token ids")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<PromptItem, E> {
        Ok(PromptItem::Text(v.to_owned()))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<PromptItem, E> {
        Ok(PromptItem::Text(v))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<PromptItem, E> {
        token_id(v).map(PromptItem::Token)
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<PromptItem, E> {
        Err(E::invalid_value(
            de::Unexpected::Signed(v),
            &"a token id (0..2^32)",
        ))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<PromptItem, A::Error> {
        Vec::<u32>::deserialize(de::value::SeqAccessDeserializer::new(seq)).map(PromptItem::Ids)
    }
}

/// One token id of a flat id list (negative or > u32 is a type error).
struct TokenId(u32);

impl<'de> Deserialize<'de> for TokenId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        u32::deserialize(deserializer).map(TokenId)
    }
}

fn token_id<E: de::Error>(v: u64) -> Result<u32, E> {
    u32::try_from(v)
        .map_err(|_| E::invalid_value(de::Unexpected::Unsigned(v), &"a token id (0..2^32)"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ok(body: Value, path: Option<&str>) -> RouteRequest {
        parse(body.to_string().as_bytes(), path).expect("parses")
    }

    fn err(body: &[u8], path: Option<&str>) -> ParseError {
        parse(body, path).expect_err("must not parse")
    }

    #[test]
    fn completion_prompt_shapes() {
        let text = ok(
            json!({"model": "m", "prompt": "hi"}),
            Some("/v1/completions"),
        );
        assert_eq!(text.prompt, Prompt::Text("hi".into()));
        assert_eq!(text.model, "m");
        let one = ok(json!({"model": "m", "prompt": ["hi", "there"]}), None);
        assert_eq!(one.prompt, Prompt::Text("hi".into()));
        let ids = ok(json!({"model": "m", "prompt": [1, 2, 4294967295u64]}), None);
        assert_eq!(ids.prompt, Prompt::TokenIds(vec![1, 2, u32::MAX]));
        let nested = ok(json!({"model": "m", "prompt": [[7, 8], [9]]}), None);
        assert_eq!(nested.prompt, Prompt::TokenIds(vec![7, 8]));
    }

    #[test]
    fn chat_messages_and_extras() {
        let body = json!({
            "model": "m",
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "hi"}]},
                {"role": "assistant", "content": null, "tool_calls": []}
            ],
            "cache_salt": "s1",
            "chat_template_kwargs": {"enable_thinking": false},
            "stream": true
        });
        let r = ok(body.clone(), Some("/v1/chat/completions?x=1"));
        let Prompt::Chat(messages) = &r.prompt else {
            panic!("chat expected")
        };
        assert_eq!(messages.len(), 3);
        assert_eq!(messages[1], body["messages"][1]);
        assert_eq!(r.cache_salt.as_deref(), Some("s1"));
        assert_eq!(
            r.chat_template_kwargs,
            Some(json!({"enable_thinking": false}))
        );
    }

    #[test]
    fn path_decides_over_fields() {
        let both =
            json!({"model": "m", "prompt": "p", "messages": [{"role": "user", "content": "c"}]});
        assert!(matches!(
            ok(both.clone(), Some("/v1/completions")).prompt,
            Prompt::Text(_)
        ));
        assert!(matches!(
            ok(both.clone(), Some("/v1/chat/completions")).prompt,
            Prompt::Chat(_)
        ));
        assert!(matches!(ok(both, None).prompt, Prompt::Chat(_)));
        let prompt_only = json!({"model": "m", "prompt": "p"}).to_string();
        assert!(matches!(
            err(prompt_only.as_bytes(), Some("/v1/chat/completions")),
            ParseError::MissingMessages
        ));
        let chat_only = json!({"model": "m", "messages": []}).to_string();
        assert!(matches!(
            err(chat_only.as_bytes(), Some("/v1/completions/")),
            ParseError::MissingPrompt
        ));
        assert_eq!(ApiKind::from_path("/v1/models"), None);
    }

    #[test]
    fn rejects_what_is_not_a_request() {
        assert!(matches!(err(b"not json", None), ParseError::Json(_)));
        assert!(matches!(err(b"[1,2]", None), ParseError::Json(_)));
        assert!(matches!(
            err(br#"{"prompt": "p"}"#, None),
            ParseError::MissingModel
        ));
        assert!(matches!(
            err(br#"{"model": null, "prompt": "p"}"#, None),
            ParseError::MissingModel
        ));
        assert!(matches!(
            err(br#"{"model": "m"}"#, None),
            ParseError::MissingPromptOrMessages
        ));
        for wrong in [
            r#"{"model": 3, "prompt": "p"}"#,
            r#"{"model": "m", "prompt": 3}"#,
            r#"{"model": "m", "prompt": []}"#,
            r#"{"model": "m", "prompt": [1, "a"]}"#,
            r#"{"model": "m", "prompt": [-1]}"#,
            r#"{"model": "m", "prompt": [4294967296]}"#,
            r#"{"model": "m", "prompt": [[1, -2]]}"#,
            r#"{"model": "m", "prompt": [{"a": 1}]}"#,
            r#"{"model": "m", "messages": "hi"}"#,
            r#"{"model": "m", "messages": ["hi"]}"#,
            r#"{"model": "m", "prompt": "p", "cache_salt": 1}"#,
            r#"{"model": "m", "prompt": "p", "chat_template_kwargs": []}"#,
            r#"{"model": "m", "prompt": "p""#,
        ] {
            assert!(
                matches!(err(wrong.as_bytes(), None), ParseError::Json(_)),
                "{wrong}"
            );
        }
        assert!(matches!(
            err(br#"{"model": "m", "messages": [{"content": "x"}]}"#, None),
            ParseError::BadMessage { index: 0, .. }
        ));
        assert!(matches!(
            err(br#"{"model": "m", "messages": [{"role": "user", "content": "x"}, {"role": "user", "content": 5}]}"#, None),
            ParseError::BadMessage { index: 1, .. }
        ));
    }

    #[test]
    fn large_prompt_parses() {
        let text = "tok ".repeat(1 << 20);
        let r = ok(
            json!({"model": "m", "prompt": text}),
            Some("/v1/completions"),
        );
        assert_eq!(r.prompt, Prompt::Text(text));
        let ids: Vec<u32> = (0..200_000).collect();
        let r = ok(json!({"model": "m", "prompt": ids}), None);
        assert_eq!(r.prompt, Prompt::TokenIds(ids));
    }
}

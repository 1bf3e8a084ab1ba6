//! A pod's OpenAI-compatible HTTP API, shaped like vLLM's where a router or
//! a load-test client can tell: `/v1/completions`, `/v1/chat/completions`
//! (streaming or not), `/v1/models`, `/health`, `/metrics`.
//!
//! A request is tokenized like vLLM (completions with special tokens, chats
//! through the model's template, both with `kvroute_tokens`, on the
//! blocking pool: a 10k-token prompt takes milliseconds), hashed, checked
//! against the cache size, then submitted to the engine. A non-streaming
//! response is sent when the engine finishes the request; a streaming one
//! sends its first chunk when the step that produced the first token ends,
//! then one chunk per token as steps end. The generated text is a fixed
//! word per position (the engine's token ids mean nothing to a reader),
//! and every request generates exactly its `max_tokens`
//! (`finish_reason: "length"`, as vLLM with `ignore_eos`).

use super::tracker::Progress;
use super::{POD_HEADER, Pod, lock};
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use kvroute_sim::request::SimRequest;
use kvroute_tokens::ChatOptions;
use serde_json::{Value, json};
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// vLLM's default `max_tokens` for completions (OpenAI's legacy default);
/// chats use it too, since a simulated request must end.
const DEFAULT_MAX_TOKENS: u32 = 16;

/// Request bodies up to this size (a 10k-token prompt is ~40 KB; long
/// chats with tools stay far below).
const MAX_BODY_BYTES: usize = 16 << 20;

/// SSE chunks buffered for a slow client before the stream task waits.
const STREAM_BUFFER: usize = 64;

pub fn router(pod: Arc<Pod>) -> Router {
    let pod_header = HeaderValue::from_str(&pod.id).unwrap_or(HeaderValue::from_static("invalid"));
    Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(pod)
        .layer(axum::middleware::map_response_with_state(
            pod_header,
            add_pod_header,
        ))
}

async fn add_pod_header(State(value): State<HeaderValue>, mut res: Response) -> Response {
    res.headers_mut()
        .insert(HeaderName::from_static(POD_HEADER), value);
    res
}

/// An OpenAI-style error response (vLLM's `ErrorResponse`).
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let kind = match self.status {
            StatusCode::BAD_REQUEST => "BadRequestError",
            StatusCode::NOT_FOUND => "NotFoundError",
            _ => "InternalServerError",
        };
        let body = json!({"error": {
            "message": self.message,
            "type": kind,
            "param": null,
            "code": self.status.as_u16(),
        }});
        (self.status, axum::Json(body)).into_response()
    }
}

/// The two endpoints' differences in request and response shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Completion,
    Chat,
}

/// What to tokenize.
enum Input {
    Text(String),
    Ids(Vec<u32>),
    Chat(Vec<Value>, ChatOptions),
}

/// The fields both endpoints share.
struct Common {
    max_tokens: u32,
    stream: bool,
    include_usage: bool,
}

fn parse_body(body: &[u8]) -> Result<serde_json::Map<String, Value>, ApiError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(ApiError::bad_request(
            "the request body must be a JSON object",
        )),
        Err(e) => Err(ApiError::bad_request(format!("invalid JSON body: {e}"))),
    }
}

fn check_model(pod: &Pod, req: &serde_json::Map<String, Value>) -> Result<(), ApiError> {
    match req.get("model") {
        // vLLM serves its model when the request names none.
        None | Some(Value::Null) => Ok(()),
        Some(Value::String(m)) if *m == pod.model => Ok(()),
        Some(other) => Err(ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!(
                "The model `{}` does not exist.",
                other
                    .as_str()
                    .map_or_else(|| other.to_string(), str::to_owned)
            ),
        }),
    }
}

fn common(req: &serde_json::Map<String, Value>, keys: &[&str]) -> Result<Common, ApiError> {
    let mut max_tokens = DEFAULT_MAX_TOKENS;
    // The first key present wins (chat: `max_completion_tokens` over the
    // deprecated `max_tokens`, as vLLM).
    if let Some((key, v)) = keys
        .iter()
        .find_map(|k| req.get(*k).filter(|v| !v.is_null()).map(|v| (k, v)))
    {
        max_tokens = v
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .filter(|n| *n >= 1)
            .ok_or_else(|| {
                ApiError::bad_request(format!("`{key}` must be a positive integer, got {v}"))
            })?;
    }
    let flag = |v: Option<&Value>, name: &str| match v {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(other) => Err(ApiError::bad_request(format!(
            "`{name}` must be a boolean, got {other}"
        ))),
    };
    let stream = flag(req.get("stream"), "stream")?;
    let include_usage = match req.get("stream_options") {
        Some(Value::Object(o)) => flag(o.get("include_usage"), "stream_options.include_usage")?,
        _ => false,
    };
    Ok(Common {
        max_tokens,
        stream,
        include_usage,
    })
}

fn token_ids(items: &[Value]) -> Option<Vec<u32>> {
    items
        .iter()
        .map(|v| v.as_u64().and_then(|n| u32::try_from(n).ok()))
        .collect()
}

async fn completions(State(pod): State<Arc<Pod>>, body: Bytes) -> Result<Response, ApiError> {
    let mut req = parse_body(&body)?;
    check_model(&pod, &req)?;
    let c = common(&req, &["max_tokens"])?;
    let input = match req.remove("prompt") {
        Some(Value::String(s)) => Input::Text(s),
        Some(Value::Array(mut items)) => match items.as_mut_slice() {
            // One prompt in a list: `["text"]` or `[[ids]]`.
            [Value::String(s)] => Input::Text(std::mem::take(s)),
            [Value::Array(ids)] => Input::Ids(
                token_ids(ids).ok_or_else(|| ApiError::bad_request("invalid token ids"))?,
            ),
            _ => Input::Ids(token_ids(&items).ok_or_else(|| {
                ApiError::bad_request(
                    "`prompt` must be a string or a list of token ids (one prompt per request)",
                )
            })?),
        },
        _ => {
            return Err(ApiError::bad_request(
                "`prompt` must be a string or a list of token ids",
            ));
        }
    };
    generate(pod, Kind::Completion, input, c).await
}

async fn chat_completions(State(pod): State<Arc<Pod>>, body: Bytes) -> Result<Response, ApiError> {
    let mut req = parse_body(&body)?;
    check_model(&pod, &req)?;
    let c = common(&req, &["max_completion_tokens", "max_tokens"])?;
    let Some(Value::Array(messages)) = req.remove("messages") else {
        return Err(ApiError::bad_request("`messages` must be a list"));
    };
    let flag =
        |name: &str, default: bool| req.get(name).and_then(Value::as_bool).unwrap_or(default);
    let options = ChatOptions {
        add_generation_prompt: flag("add_generation_prompt", true),
        continue_final_message: flag("continue_final_message", false),
        tools: req.get("tools").filter(|v| !v.is_null()).cloned(),
        documents: req.get("documents").filter(|v| !v.is_null()).cloned(),
        template_kwargs: match req.remove("chat_template_kwargs") {
            Some(Value::Object(m)) => m,
            _ => serde_json::Map::new(),
        },
        ..ChatOptions::default()
    };
    generate(pod, Kind::Chat, Input::Chat(messages, options), c).await
}

/// Tokenizes, submits and answers one request.
async fn generate(
    pod: Arc<Pod>,
    kind: Kind,
    input: Input,
    c: Common,
) -> Result<Response, ApiError> {
    let id = pod.next_id.fetch_add(1, Relaxed);
    let (tokenizer, scheme) = (pod.tokenizer.clone(), pod.scheme.clone());
    let arrival = pod.clock.now();
    let output_len = c.max_tokens;
    let built = tokio::task::spawn_blocking(move || {
        let tokens = match input {
            Input::Ids(ids) => ids,
            Input::Text(text) => tokenizer.encode_completion(&text)?,
            Input::Chat(messages, options) => tokenizer.encode_chat(&messages, &options)?,
        };
        Ok::<_, kvroute_tokens::TokensError>(SimRequest::new(
            id, arrival, tokens, output_len, None, &scheme,
        ))
    })
    .await;
    let req = match built {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return Err(ApiError::bad_request(e.to_string())),
        Err(e) => {
            return Err(ApiError {
                status: StatusCode::INTERNAL_SERVER_ERROR,
                message: format!("tokenization failed: {e}"),
            });
        }
    };
    let prompt_tokens = req.prompt_len();
    if prompt_tokens == 0 {
        return Err(ApiError::bad_request("the prompt is empty"));
    }
    // The engine refuses what its cache could never hold (vLLM's max
    // model length check); say so before submitting.
    let kv_tokens = prompt_tokens + output_len as usize - 1;
    if kv_tokens.div_ceil(pod.block_size) > pod.capacity_blocks {
        return Err(ApiError::bad_request(format!(
            "This model's maximum context length is {} tokens. However, you requested {} tokens ({} in the prompt, {} in the completion).",
            pod.capacity_blocks * pod.block_size,
            prompt_tokens + output_len as usize,
            prompt_tokens,
            output_len
        )));
    }
    let (tx, mut rx) = mpsc::unbounded_channel();
    {
        let mut core = lock(&pod.core);
        core.tracker.insert(id, output_len, tx);
        core.engine.submit(pod.clock.now(), &req);
    }
    pod.wake.notify_one();

    let answer = Answer {
        id: match kind {
            Kind::Completion => format!("cmpl-{}-{id}", pod.index),
            Kind::Chat => format!("chatcmpl-{}-{id}", pod.index),
        },
        kind,
        model: pod.model.clone(),
        created: pod.created,
        prompt_tokens,
        completion_tokens: output_len as usize,
    };
    if !c.stream {
        loop {
            match rx.recv().await {
                Some(Progress::Step { finished: true, .. }) => {
                    return Ok(axum::Json(answer.whole()).into_response());
                }
                Some(Progress::Step { .. }) => {}
                Some(Progress::Rejected) => return Err(rejected()),
                None => return Err(stopped()),
            }
        }
    }
    // The response (headers included) leaves with the first token, so a
    // refusal can still be a 400.
    let first = match rx.recv().await {
        Some(Progress::Step { tokens, finished }) => (tokens, finished),
        Some(Progress::Rejected) => return Err(rejected()),
        None => return Err(stopped()),
    };
    let (body_tx, body_rx) = mpsc::channel::<Result<Bytes, Infallible>>(STREAM_BUFFER);
    tokio::spawn(async move {
        let mut sent = 0usize;
        let mut step = Some(first);
        while let Some((tokens, finished)) = step {
            let mut text = String::new();
            for k in 0..tokens as usize {
                let last = finished && k + 1 == tokens as usize;
                text.push_str(&sse(&answer.chunk(sent, last)));
                sent += 1;
            }
            if finished {
                if c.include_usage {
                    text.push_str(&sse(&answer.usage_chunk()));
                }
                text.push_str("data: [DONE]\n\n");
            }
            if body_tx.send(Ok(Bytes::from(text))).await.is_err() || finished {
                // The client left (the engine still runs the request), or
                // the stream is complete.
                return;
            }
            step = match rx.recv().await {
                Some(Progress::Step { tokens, finished }) => Some((tokens, finished)),
                // Not after a first token; the fleet stopping ends it too.
                Some(Progress::Rejected) | None => None,
            };
        }
    });
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/event-stream; charset=utf-8")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(ReceiverStream::new(body_rx)))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response()))
}

fn rejected() -> ApiError {
    ApiError::bad_request("the prompt does not fit the KV cache")
}

fn stopped() -> ApiError {
    ApiError {
        status: StatusCode::SERVICE_UNAVAILABLE,
        message: "the engine stopped".into(),
    }
}

fn sse(chunk: &Value) -> String {
    format!("data: {chunk}\n\n")
}

/// A few words the simulated model "says", one per generated token.
const WORDS: [&str; 8] = [
    " the",
    " cached",
    " prefix",
    " routes",
    " to",
    " this",
    " simulated",
    " pod",
];

/// The text of the `position`-th generated token.
fn token_text(position: usize) -> &'static str {
    WORDS[position % WORDS.len()]
}

/// What a response says about its request.
struct Answer {
    id: String,
    kind: Kind,
    model: String,
    created: u64,
    prompt_tokens: usize,
    completion_tokens: usize,
}

impl Answer {
    fn usage(&self) -> Value {
        json!({
            "prompt_tokens": self.prompt_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "completion_tokens": self.completion_tokens,
        })
    }

    fn whole(&self) -> Value {
        let text: String = (0..self.completion_tokens).map(token_text).collect();
        let choice = match self.kind {
            Kind::Completion => json!({
                "index": 0, "text": text, "logprobs": null,
                "finish_reason": "length", "stop_reason": null,
            }),
            Kind::Chat => json!({
                "index": 0, "message": {"role": "assistant", "content": text},
                "logprobs": null, "finish_reason": "length", "stop_reason": null,
            }),
        };
        json!({
            "id": self.id,
            "object": match self.kind {
                Kind::Completion => "text_completion",
                Kind::Chat => "chat.completion",
            },
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": self.usage(),
        })
    }

    fn object(&self) -> &'static str {
        match self.kind {
            Kind::Completion => "text_completion",
            Kind::Chat => "chat.completion.chunk",
        }
    }

    /// The chunk of token `position`; the last carries the finish reason.
    fn chunk(&self, position: usize, last: bool) -> Value {
        let finish = if last { json!("length") } else { Value::Null };
        let text = token_text(position);
        let choice = match self.kind {
            Kind::Completion => json!({
                "index": 0, "text": text, "logprobs": null,
                "finish_reason": finish, "stop_reason": null,
            }),
            Kind::Chat => {
                // The role comes with the first token (vLLM sends it in an
                // empty chunk before any token; here nothing leaves before
                // the first token, so a client's first chunk is its TTFT).
                let delta = if position == 0 {
                    json!({"role": "assistant", "content": text})
                } else {
                    json!({"content": text})
                };
                json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish})
            }
        };
        json!({
            "id": self.id, "object": self.object(), "created": self.created,
            "model": self.model, "choices": [choice],
        })
    }

    /// `stream_options.include_usage`'s last chunk.
    fn usage_chunk(&self) -> Value {
        json!({
            "id": self.id, "object": self.object(), "created": self.created,
            "model": self.model, "choices": [], "usage": self.usage(),
        })
    }
}

async fn models(State(pod): State<Arc<Pod>>) -> Response {
    axum::Json(json!({
        "object": "list",
        "data": [{
            "id": pod.model,
            "object": "model",
            "created": pod.created,
            "owned_by": "vllm",
            "root": pod.model,
            "parent": null,
            "max_model_len": pod.capacity_blocks * pod.block_size,
        }],
    }))
    .into_response()
}

async fn health() -> StatusCode {
    StatusCode::OK
}

async fn metrics(State(pod): State<Arc<Pod>>) -> Response {
    let text = lock(&pod.core).engine.render_metrics();
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

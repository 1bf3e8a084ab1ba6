//! The seam between the protocol front ends (Envoy ext_proc, the HTTP API,
//! llm-d's indexer API) and the routing logic: a front end turns a request
//! into a [`RouteRequest`], asks a [`Decide`] implementation for a
//! [`Decision`], reports the response's first byte (the prompt's prefill is
//! done) and when the routed request finished, so in-flight counts stay true.

use std::future::Future;

/// What the prompt is, as the OpenAI-compatible body gave it.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    /// `/v1/completions` `prompt` as text (a list of one text is the same).
    Text(String),
    /// `/v1/completions` `prompt` as token ids.
    TokenIds(Vec<u32>),
    /// `/v1/chat/completions` `messages`, kept as JSON for the chat template.
    Chat(Vec<serde_json::Value>),
}

/// A request to route.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteRequest {
    /// `model` of the body: a base model or a LoRA adapter name.
    pub model: String,
    pub prompt: Prompt,
    /// vLLM's `cache_salt` (keys block 0 differently).
    pub cache_salt: Option<String>,
    /// Extra chat-template arguments (`chat_template_kwargs`), if any.
    pub chat_template_kwargs: Option<serde_json::Value>,
    /// `x-request-id` when the client or Envoy set one, for logs.
    pub request_id: Option<String>,
}

/// The chosen endpoint (`ip:port`) and why, for metrics and logs.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub endpoint: String,
    /// Low-cardinality label for metrics and logs. kvroute's router fills it
    /// from [`crate::reason::Reason::as_label`] (`prefix`, `load`, or a
    /// [`crate::reason::Fallback`] such as `index_unavailable`); other
    /// implementations (test doubles, benches) name their own.
    pub reason: &'static str,
    /// What the decision charged to the endpoint's pending prefill, if
    /// anything: released by [`Decide::prefill_done`] or
    /// [`Decide::finished`], whichever runs first.
    pub charge: Option<Charge>,
}

/// A pending-prefill charge: `tokens` uncached prompt tokens, identified by
/// `ticket` so that releasing it twice releases nothing the second time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Charge {
    pub ticket: u64,
    pub tokens: u64,
}

/// Why no endpoint could be chosen at all (the only failure a front end
/// turns into an error response: 503).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DecideError {
    #[error("no candidate endpoint")]
    NoCandidates,
}

/// The routing logic as the front ends see it.
pub trait Decide: Send + Sync + 'static {
    /// Picks an endpoint among `subset` when Envoy sent a subset hint (a list
    /// of `ip:port`), else among all configured candidates. Never fails for
    /// reasons other than "no candidate": index, tokenizer or model problems
    /// degrade to load-based picking.
    fn decide(
        &self,
        request: RouteRequest,
        subset: Option<Vec<String>>,
    ) -> impl Future<Output = Result<Decision, DecideError>> + Send;

    /// The first byte of the response body passed: the engine finished the
    /// prompt's prefill (a streamed response's first token), so the
    /// decision's prefill charge no longer delays other requests there.
    /// Front ends call it at most once per decision, before `finished`; an
    /// implementation must tolerate `finished` without it. The default does
    /// nothing (implementations that charge nothing).
    fn prefill_done(&self, decision: &Decision) {
        let _ = decision;
    }

    /// The request `decision` routed finished (response complete, stream
    /// reset, or client gone): release its in-flight slot, and its prefill
    /// charge unless [`Self::prefill_done`] released it. Called exactly once
    /// per successful `decide`.
    fn finished(&self, decision: &Decision);
}

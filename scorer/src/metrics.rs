//! The scorer's metric names, in one place, all prefixed `kvroute_scorer_`.
//! Recorded through the `metrics` facade (free when no recorder is
//! installed, as in unit tests); the binary's `/metrics` renders them for
//! Prometheus. Label values come from typed enums where they are a fixed set
//! ([`crate::reason::Reason`], [`crate::ext_proc::Outcome`]).

// Routing (`route.rs`).

/// Decisions, by `reason` (`prefix`, `load`, or a fallback reason).
pub const DECISIONS: &str = "kvroute_scorer_decisions_total";
/// Decisions that routed by load because the prefix was unknown, by `reason`
/// ([`crate::reason::Fallback`]).
pub const FALLBACKS: &str = "kvroute_scorer_fallbacks_total";
/// Index lookup latency in seconds (timed-out lookups included).
pub const LOOKUP_SECONDS: &str = "kvroute_scorer_lookup_seconds";
/// Prompt -> block keys (tokenization, pool wait or remote call included).
pub const TOKENIZE_SECONDS: &str = "kvroute_scorer_tokenize_seconds";
/// Full blocks of each tokenized prompt.
pub const PROMPT_BLOCKS: &str = "kvroute_scorer_prompt_blocks";
/// The deepest cached prefix among a decision's candidates, in blocks.
pub const MATCHED_BLOCKS: &str = "kvroute_scorer_matched_blocks";
/// Decisions whose endpoint's prefix was longer pending (requests this
/// replica routed there still computing it) than in the index.
pub const PENDING_PREFIX_PICKS: &str = "kvroute_scorer_pending_prefix_picks_total";
/// Decisions whose prompt was not recorded as pending because the records
/// held `--pending-prefix-max-blocks` keys already.
pub const PENDING_PREFIX_SKIPPED: &str = "kvroute_scorer_pending_prefix_skipped_total";

// Tokenization (`tokenize/`).

/// Requests by tokenization `path`: `ids`, `cached`, `pool`, `remote`.
pub const TOKENIZE_PATHS: &str = "kvroute_scorer_tokenize_path_total";
/// vLLM `/tokenize` calls by `outcome`: `cache_hit`, `ok`, or an error label.
pub const REMOTE_TOKENIZE: &str = "kvroute_scorer_remote_tokenize_total";
/// Round-trip time of answered vLLM `/tokenize` requests, in seconds.
pub const REMOTE_TOKENIZE_SECONDS: &str = "kvroute_scorer_remote_tokenize_seconds";
/// `/tokenize` misses that waited for a request already asking for the same body.
pub const REMOTE_TOKENIZE_JOINED: &str = "kvroute_scorer_remote_tokenize_joined_total";

// Front ends.

/// ext_proc requests by how the picker answered them (`outcome`).
pub const REQUESTS: &str = "kvroute_scorer_requests_total";
/// ext_proc: end of request body (or headers-only request) -> routing
/// headers sent, in seconds.
pub const DECISION_SECONDS: &str = "kvroute_scorer_decision_seconds";
/// ext_proc error responses the client got from the picker instead of a
/// pod, by HTTP `code`.
pub const IMMEDIATE_RESPONSES: &str = "kvroute_scorer_immediate_responses_total";
/// llm-d's `GetPodScores` calls by `outcome` (`ok` or an error label).
pub const INDEXER_API_REQUESTS: &str = "kvroute_scorer_indexer_api_requests_total";

// Background (`background.rs`).

/// vLLM `/metrics` scrapes that failed or timed out.
pub const SCRAPE_FAILURES: &str = "kvroute_scorer_scrape_failures_total";
/// Endpoints going out of (`to="down"`: unreachable scrapes in a row) and
/// back into (`to="up"`) the candidate set.
pub const ENDPOINT_TRANSITIONS: &str = "kvroute_scorer_endpoint_transitions_total";
/// Endpoints down now (out of the candidates until they answer).
pub const ENDPOINTS_DOWN: &str = "kvroute_scorer_endpoints_down";
/// Decisions made while every candidate was down (routed among all of
/// them by load, never "no endpoint").
pub const ALL_CANDIDATES_DOWN: &str = "kvroute_scorer_all_candidates_down_total";
/// Endpoints an API caller named (`/v1/score` `endpoints`, `GetPodScores`
/// `pod_identifiers`) that are not candidates, so remote tokenization did
/// not dial them, by `api` (`score`, `indexer`).
pub const DIAL_REJECTED: &str = "kvroute_scorer_dial_rejected_total";
/// Lookups that covered only the first `--max-lookup-blocks` of a prompt.
pub const LOOKUPS_CAPPED: &str = "kvroute_scorer_lookups_capped_total";
/// ext_proc requests routed by load without buffering their body (all
/// streams' buffers at `--max-buffered-bytes`); also counted as routed.
pub const UNBUFFERED: &str = "kvroute_scorer_unbuffered_requests_total";

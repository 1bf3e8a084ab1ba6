//! Workload 3: multi-turn chat sessions whose context grows each turn.
//! Turn k sends the shared system prompt, every earlier user message and
//! answer, then a new user message, so its prompt extends turn k-1's prompt
//! and answer (the prefix a pod that served the session has cached).
//!
//! The answers re-sent as text are fixed prose of the turn's output length.
//! The simulated engine decodes other token ids than that text's, so what
//! turn k can reuse on the pod that served turn k-1 is turn k-1's prompt,
//! not the answer's blocks: as with real clients, whose re-sent answer text
//! seldom re-tokenizes to exactly the ids the model emitted.
//!
//! Arrivals are open loop: sessions start as a Poisson process at
//! `rate / mean turns`, so requests arrive at about `rate`; a session's
//! next turn comes after a response allowance (1 s + 30 ms per answer token,
//! so the answer it re-sends would have finished on a reasonably loaded
//! pod) plus an exponential think time. `session` is the session id.

use rand::Rng;

use super::text::TextGen;
use super::{Body, Message, SimTokenizer, WorkloadError, WorkloadRequest, WorkloadSpec};

pub(super) const REQUESTS: usize = 2_000;
/// Tokens of the system prompt all sessions share.
pub(super) const SYSTEM_TOKENS: usize = 300;
/// Turns per session, uniform (the last session is cut to fit `requests`).
pub(super) const TURNS: std::ops::RangeInclusive<usize> = 2..=10;
/// Tokens of a session's first user message (it brings the task), uniform.
pub(super) const FIRST_USER_TOKENS: std::ops::RangeInclusive<usize> = 200..=600;
/// Tokens of later user messages, uniform.
pub(super) const USER_TOKENS: std::ops::RangeInclusive<usize> = 30..=200;
/// Answer tokens (= the re-sent answer text's tokens), uniform.
pub(super) const OUTPUT_TOKENS: std::ops::RangeInclusive<u32> = 100..=400;
/// Mean think time between an answer and the next turn, seconds.
pub(super) const THINK_SECONDS: f64 = 15.0;
/// Response allowance before a next turn: fixed part and per answer token.
const RESPONSE_BASE_SECONDS: f64 = 1.0;
const RESPONSE_PER_TOKEN_SECONDS: f64 = 0.03;

pub(super) fn generate(
    spec: &WorkloadSpec,
    tok: &SimTokenizer,
) -> Result<Vec<WorkloadRequest>, WorkloadError> {
    let words = TextGen::new(tok);
    let mut rng = spec.content_rng();
    let mut times = spec.arrival_rng();
    let total = spec.size(REQUESTS);
    let mean_turns = (*TURNS.start() + *TURNS.end()) as f64 / 2.0;
    let session_rate = spec.rate / mean_turns;
    let system = words.prose(&mut rng, SYSTEM_TOKENS);
    let mut out = Vec::with_capacity(total);
    let mut start = 0.0;
    let mut session = 0u64;
    while out.len() < total {
        start += super::exp_gap(&mut times, session_rate);
        let turns = rng.random_range(TURNS).min(total - out.len());
        let mut messages = vec![Message::new("system", system.clone())];
        let mut at = start;
        for turn in 0..turns {
            let n = if turn == 0 {
                rng.random_range(FIRST_USER_TOKENS)
            } else {
                rng.random_range(USER_TOKENS)
            };
            // The first message's serial makes sessions diverge right after
            // the system prompt; later turns are prose.
            let user = if turn == 0 {
                words.tagged(session, &mut rng, n)
            } else {
                words.prose(&mut rng, n)
            };
            messages.push(Message::new("user", user));
            let output_len = rng.random_range(OUTPUT_TOKENS);
            out.push(WorkloadRequest {
                arrival: at,
                tokens: tok.encode_chat(&messages)?,
                body: Body::Chat {
                    messages: messages.clone(),
                },
                output_len,
                session: Some(session),
            });
            messages.push(Message::new(
                "assistant",
                words.prose(&mut rng, output_len as usize),
            ));
            at += RESPONSE_BASE_SECONDS
                + RESPONSE_PER_TOKEN_SECONDS * f64::from(output_len)
                + super::exp_gap(&mut times, 1.0 / THINK_SECONDS);
        }
        session += 1;
    }
    // Sessions overlap in time: order by arrival (stable, so a session's
    // turns keep their order even at equal times).
    out.sort_by(|a, b| a.arrival.total_cmp(&b.arrival));
    Ok(out)
}

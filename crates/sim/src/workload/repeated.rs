//! Workload 1, the seed's test: one chat prompt of about 1,000 tokens sent
//! again and again (the published run: 4,776 requests, 87.4% prefix-cache
//! hit rate, 99.91% of them on one pod). Nothing varies but the arrival
//! times, so it measures how a policy concentrates or spreads identical
//! work.

use super::text::TextGen;
use super::{Body, Message, SimTokenizer, WorkloadError, WorkloadRequest, WorkloadSpec};

/// Requests by default: the seed's run.
pub(super) const REQUESTS: usize = 4_776;
/// Prompt tokens in all: BOS, the user header (3), the message, `<|eot_id|>`
/// and the assistant header (3) are 8 of them.
pub(super) const PROMPT_TOKENS: usize = 1_000;
/// Tokens generated per request.
pub(super) const OUTPUT_TOKENS: u32 = 100;

pub(super) fn generate(
    spec: &WorkloadSpec,
    tok: &SimTokenizer,
) -> Result<Vec<WorkloadRequest>, WorkloadError> {
    let words = TextGen::new(tok);
    let mut rng = spec.content_rng();
    let messages = vec![Message::new(
        "user",
        words.prose(&mut rng, PROMPT_TOKENS - 8),
    )];
    let tokens = tok.encode_chat(&messages)?;
    let arrivals = super::poisson_arrivals(&mut spec.arrival_rng(), spec.size(REQUESTS), spec.rate);
    Ok(arrivals
        .into_iter()
        .map(|arrival| WorkloadRequest {
            arrival,
            body: Body::Chat {
                messages: messages.clone(),
            },
            tokens: tokens.clone(),
            output_len: OUTPUT_TOKENS,
            session: None,
        })
        .collect())
}

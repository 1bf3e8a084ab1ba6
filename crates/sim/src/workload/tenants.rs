//! Workload 2: tenants sharing a handful of long system prompts. Each
//! request is a chat whose system message is its tenant's prompt and whose
//! user message is its own (a serial naming the request, then prose), so
//! two requests of one tenant share exactly the tokens up to the user
//! message's first word, and two tenants share nothing (their prompts start
//! with different serials). Tenant popularity is Zipf: a few tenants carry
//! most of the traffic, which is what makes affinity and load balance pull
//! in different directions. `session` is the tenant id.

use rand::Rng;

use super::text::TextGen;
use super::{Body, Message, SimTokenizer, WorkloadError, WorkloadRequest, WorkloadSpec, Zipf};

pub(super) const REQUESTS: usize = 2_000;
pub(super) const TENANTS: usize = 8;
/// Tokens of each tenant's system prompt text.
pub(super) const SYSTEM_TOKENS: usize = 2_000;
/// Tokens of each user message, uniform.
pub(super) const USER_TOKENS: std::ops::RangeInclusive<usize> = 100..=300;
pub(super) const OUTPUT_TOKENS: std::ops::RangeInclusive<u32> = 100..=300;
/// Zipf exponent of tenant popularity (tenant 0 gets ~37% of requests).
pub(super) const POPULARITY: f64 = 1.0;

pub(super) fn generate(
    spec: &WorkloadSpec,
    tok: &SimTokenizer,
) -> Result<Vec<WorkloadRequest>, WorkloadError> {
    let words = TextGen::new(tok);
    let mut rng = spec.content_rng();
    let systems: Vec<String> = (0..TENANTS)
        .map(|t| words.tagged(t as u64, &mut rng, SYSTEM_TOKENS))
        .collect();
    let zipf = Zipf::new(TENANTS, POPULARITY);
    let arrivals = super::poisson_arrivals(&mut spec.arrival_rng(), spec.size(REQUESTS), spec.rate);
    arrivals
        .into_iter()
        .enumerate()
        .map(|(i, arrival)| {
            let tenant = zipf.sample(&mut rng);
            let n = rng.random_range(USER_TOKENS);
            let messages = vec![
                Message::new("system", systems[tenant].clone()),
                Message::new("user", words.tagged(i as u64, &mut rng, n)),
            ];
            let output_len = rng.random_range(OUTPUT_TOKENS);
            Ok(WorkloadRequest {
                arrival,
                tokens: tok.encode_chat(&messages)?,
                body: Body::Chat { messages },
                output_len,
                session: Some(tenant as u64),
            })
        })
        .collect()
}

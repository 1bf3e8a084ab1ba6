//! Workload 6: prompts that share nothing, not even a first block, so no
//! policy can gain from the cache and any routing cost shows as pure loss.
//! Completions (no chat template): each prompt is BOS followed by a serial
//! naming the request, which makes the first block differ, then prose.

use rand::Rng;

use super::text::TextGen;
use super::{Body, SimTokenizer, WorkloadError, WorkloadRequest, WorkloadSpec};

pub(super) const REQUESTS: usize = 2_000;
/// Prompt text tokens (BOS not counted), uniform.
pub(super) const PROMPT_TOKENS: std::ops::RangeInclusive<usize> = 200..=2_000;
/// Tokens generated, uniform.
pub(super) const OUTPUT_TOKENS: std::ops::RangeInclusive<u32> = 50..=300;

pub(super) fn generate(
    spec: &WorkloadSpec,
    tok: &SimTokenizer,
) -> Result<Vec<WorkloadRequest>, WorkloadError> {
    let words = TextGen::new(tok);
    let mut rng = spec.content_rng();
    let arrivals = super::poisson_arrivals(&mut spec.arrival_rng(), spec.size(REQUESTS), spec.rate);
    arrivals
        .into_iter()
        .enumerate()
        .map(|(i, arrival)| {
            let n = rng.random_range(PROMPT_TOKENS);
            let prompt = words.tagged(i as u64, &mut rng, n);
            let output_len = rng.random_range(OUTPUT_TOKENS);
            Ok(WorkloadRequest {
                arrival,
                tokens: tok.encode_completion(&prompt)?,
                body: Body::Completion { prompt },
                output_len,
                session: None,
            })
        })
        .collect()
}

//! Workload 5: the shape of llm-d's published precise prefix-cache routing
//! benchmark (inference-perf's `shared_prefix` data: 150 groups, each a
//! 6,000-token shared prefix followed by one of 5 questions of 1,200
//! tokens, 1,000 output tokens, completions API, Poisson load stages).
//!
//! Each of the 750 prompts is BOS, its group's prefix, then its question;
//! prefixes and questions start with serials, so groups diverge at their
//! first token and a group's questions right after the prefix. Requests
//! walk through the 750 prompts in passes, each pass a fresh shuffle (so
//! every prompt recurs once per pass, as inference-perf cycles its
//! prompts).
//!
//! The rate ramps up as llm-d's run did: a warm-up pass of 750 requests at
//! the base rate (15/s there), then the published ladder of 16 stages from
//! 3/s to 60/s, each stage's request count proportional to its published
//! rate x duration, all rates scaled by `rate / 15`. The default 2,250
//! requests is the warm-up plus two passes spread over the ladder;
//! `requests = 17,084` at rate 15 reproduces the published schedule's
//! expected counts (750 + 16,334). `session` is the group id.

use rand::Rng;
use rand::seq::SliceRandom;

use super::text::TextGen;
use super::{Body, SimTokenizer, WorkloadError, WorkloadRequest, WorkloadSpec};

pub(super) const GROUPS: usize = 150;
pub(super) const QUESTIONS_PER_GROUP: usize = 5;
pub(super) const PREFIX_TOKENS: usize = 6_000;
pub(super) const QUESTION_TOKENS: usize = 1_200;
pub(super) const OUTPUT_TOKENS: u32 = 1_000;
pub(super) const REQUESTS: usize = 3 * GROUPS * QUESTIONS_PER_GROUP;
/// llm-d's warm-up rate, the base the ladder is scaled by.
pub(super) const BASE_RATE: f64 = 15.0;
/// llm-d's ladder after the warm-up: (requests/s, seconds).
const LADDER: [(f64, f64); 16] = [
    (3.0, 20.0),
    (10.0, 20.0),
    (15.0, 20.0),
    (20.0, 38.0),
    (22.0, 34.0),
    (25.0, 30.0),
    (30.0, 25.0),
    (35.0, 21.0),
    (40.0, 38.0),
    (43.0, 36.0),
    (46.0, 33.0),
    (49.0, 30.0),
    (52.0, 29.0),
    (55.0, 27.0),
    (57.0, 26.0),
    (60.0, 25.0),
];

pub(super) fn generate(
    spec: &WorkloadSpec,
    tok: &SimTokenizer,
) -> Result<Vec<WorkloadRequest>, WorkloadError> {
    let words = TextGen::new(tok);
    let mut rng = spec.content_rng();
    let set = GROUPS * QUESTIONS_PER_GROUP;
    let mut prompts = Vec::with_capacity(set);
    for g in 0..GROUPS {
        let prefix = words.tagged(g as u64, &mut rng, PREFIX_TOKENS);
        for q in 0..QUESTIONS_PER_GROUP {
            let question = words.tagged(
                (g * QUESTIONS_PER_GROUP + q) as u64,
                &mut rng,
                QUESTION_TOKENS,
            );
            let prompt = format!("{prefix} {question}");
            let tokens = tok.encode_completion(&prompt)?;
            prompts.push((prompt, tokens));
        }
    }
    let n = spec.size(REQUESTS);
    let arrivals = ramp_arrivals(&mut spec.arrival_rng(), n, spec.rate / BASE_RATE);
    let mut order: Vec<usize> = Vec::with_capacity(n);
    while order.len() < n {
        let mut pass: Vec<usize> = (0..set).collect();
        pass.shuffle(&mut rng);
        order.extend(pass);
    }
    Ok(arrivals
        .into_iter()
        .zip(order)
        .map(|(arrival, p)| {
            let (prompt, tokens) = &prompts[p];
            WorkloadRequest {
                arrival,
                body: Body::Completion {
                    prompt: prompt.clone(),
                },
                tokens: tokens.clone(),
                output_len: OUTPUT_TOKENS,
                session: Some((p / QUESTIONS_PER_GROUP) as u64),
            }
        })
        .collect())
}

/// Requests per ladder stage for `n` requests after the warm-up: shares of
/// rate x duration, rounded by largest remainder so they sum to `n`.
pub(super) fn stage_counts(n: usize) -> [usize; LADDER.len()] {
    let weights = LADDER.map(|(r, d)| r * d);
    let total: f64 = weights.iter().sum();
    let exact = weights.map(|w| w / total * n as f64);
    let mut counts = exact.map(|x| x.floor() as usize);
    let mut left = n - counts.iter().sum::<usize>();
    let mut by_remainder: Vec<usize> = (0..LADDER.len()).collect();
    by_remainder.sort_by(|&a, &b| {
        let (ra, rb) = (exact[a].fract(), exact[b].fract());
        rb.total_cmp(&ra).then(a.cmp(&b))
    });
    for &i in &by_remainder {
        if left == 0 {
            break;
        }
        counts[i] += 1;
        left -= 1;
    }
    counts
}

/// The rate of each arrival: the warm-up pass at the base rate, then the
/// ladder's stages; all multiplied by `scale`.
pub(super) fn stage_rates(n: usize, scale: f64) -> Vec<f64> {
    let warm = n.min(GROUPS * QUESTIONS_PER_GROUP);
    let mut rates = vec![BASE_RATE * scale; warm];
    for (count, (rate, _)) in stage_counts(n - warm).into_iter().zip(LADDER) {
        rates.extend(std::iter::repeat_n(rate * scale, count));
    }
    rates
}

fn ramp_arrivals(rng: &mut impl Rng, n: usize, scale: f64) -> Vec<f64> {
    let mut t = 0.0;
    stage_rates(n, scale)
        .into_iter()
        .map(|rate| {
            t += super::exp_gap(rng, rate);
            t
        })
        .collect()
}

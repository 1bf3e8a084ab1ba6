//! Picking: blend each candidate's prefix score with its load and choose.
//!
//! The blend is llm-d's weighted sum of [0, 1] terms (prefix 2 : queue 1 :
//! KV usage 1 by default, the weights of llm-d's precise-prefix-cache-aware
//! guide, scheduler v0.8.0-rc.1), plus two terms for what the scorers count
//! themselves: scraped queue lengths lag by a scrape interval, so under a
//! burst they cannot stop one hot prefix from piling every request onto one
//! pod, while router-counted load moves with every decision.
//!
//! - *In flight*: requests sent to the pod and not finished,
//!   `1 - min(n, S) / S` with `S` the in-flight scale (`--in-flight-scale`,
//!   default 8): a tie-break among lightly loaded pods. Past a few requests
//!   per pod the prefill backlog below says more (a pod decoding 50 short
//!   answers is not busy for the next prompt the way one prefilling a
//!   long one is), so the term bottoms out early and leaves the ranking to
//!   it. With scale 64 (it was the saturation limit) the multi-turn
//!   workload's hit rate fell from 79.2% to 78.7% and its TTFT p90 rose
//!   from 20.6 to 23.7 ms (sim, 8 pods); the RAG workload's p90 at 16 pods
//!   from 14.0 to 29.3 ms; Mooncake moved within 1-3% either way.
//! - *Prefill backlog* (`tokens`): a request count says nothing of size; a
//!   pod with one 100k-token prefill queued is busy for seconds, one with a
//!   1k-token request for milliseconds. The term is the headroom of the
//!   pod's estimated time to this request's first token,
//!   `b = (F + U) / R` seconds, below a horizon `H`:
//!   `tokens = 1 - min(b, H) / H`, where `F` is the uncached prompt tokens
//!   of requests the scorers sent there whose first response byte has not
//!   passed yet (charged at the decision, released at that byte or at the
//!   end), `U` this request's tokens not cached there (prompt minus cached
//!   blocks x block size) and `R` one pod's prefill rate
//!   (`--prefill-tokens-per-s`). `U` makes the term reward a cached prefix
//!   by the prefill it saves, in the same unit as the backlog it competes
//!   with: llm-d's token-load scorer ranks pods by the same `F + U`
//!   (llm-d/llm-d PR #2071, guides/precise-prefix-cache-routing), but only
//!   among the pods holding most of the prompt; here it is one more term of
//!   the blend, so a long enough backlog outweighs any prefix.
//!
//! Defaults, from the fleet simulator (`kvroute-loadtest sim`, Mooncake
//! trace of ~15k-token prompts, 8 and 16 pods at 1x, 2x and 4x its rate):
//! `R` = 35k tokens/s (Llama-3.1-8B on one H100, the simulated engine),
//! `H` = 2 s and weight 4, so one second of backlog costs 2, as much as a
//! full prefix match. At 4x, horizon 4 s (1 s = 1) gave TTFT p90 1.06 s /
//! 806 ms on 8 / 16 pods, 2 s gave 1.05 s / 773 ms, 1 s 1.20 s / 795 ms
//! (the term saturates on every loaded pod and stops ranking them); weight
//! 8 at 4 s 1.05 s / 795 ms. Without the term (weight 0, the old blend):
//! 1.64 s / 929 ms.
//!
//! On top of the blend, a hard limit: a pod whose in-flight or waiting count
//! reached its configured limit is *saturated* and only chosen when every
//! candidate is. That is what spreads a hot prefix once its pod is loaded,
//! regardless of how large the prefix term is. The in-flight limit
//! (`--max-in-flight`, default 256, vLLM's default `max_num_seqs` below
//! H100-class GPUs) is a running-batch bound, not a queue one: requests in
//! flight are mostly decoding, and vLLM batches hundreds of them. At 64,
//! llm-d's precise-routing workload (1,000-token answers, ~75 running per
//! pod at its peak rate) saturated every pod holding a group's prefix and
//! sent the group's next requests to pods without it: hit rate 85.6%
//! against the oracle's 88.9%, TTFT p90 206 ms against 55 ms (sim, 16
//! pods). Queueing shows in the scraped waiting count (`--max-waiting`).
//! Ties are broken uniformly at random (a caller-supplied random source
//! keeps tests and benches seeded).

/// Weights of the blended terms (not normalised: llm-d's convention).
#[derive(Debug, Clone, PartialEq)]
pub struct PickWeights {
    pub prefix: f64,
    pub queue: f64,
    pub kv_usage: f64,
    pub in_flight: f64,
    /// Prefill backlog: router-counted uncached prompt tokens in flight plus
    /// this request's uncached tokens (see the module doc).
    pub tokens: f64,
}

impl Default for PickWeights {
    fn default() -> Self {
        PickWeights {
            prefix: 2.0,
            queue: 1.0,
            kv_usage: 1.0,
            in_flight: 1.0,
            tokens: DEFAULT_TOKENS_WEIGHT,
        }
    }
}

/// Load beyond which a pod is saturated.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadLimits {
    /// Router-counted requests in flight.
    pub max_in_flight: Option<u32>,
    /// Requests in flight at which the in-flight term bottoms out.
    pub in_flight_scale: f64,
    /// vLLM's `num_requests_waiting`.
    pub max_waiting: Option<u32>,
    /// vLLM's `kv_cache_usage_perc` (0..1).
    pub max_kv_usage: Option<f64>,
    /// Prefill throughput of one pod in tokens/s: turns a token backlog into
    /// seconds of prefill.
    pub prefill_tokens_per_s: f64,
    /// Seconds of prefill backlog at which the token term bottoms out.
    pub prefill_horizon_s: f64,
}

impl Default for LoadLimits {
    fn default() -> Self {
        LoadLimits {
            max_in_flight: Some(DEFAULT_MAX_IN_FLIGHT),
            in_flight_scale: DEFAULT_IN_FLIGHT_SCALE,
            max_waiting: Some(16),
            max_kv_usage: None,
            prefill_tokens_per_s: DEFAULT_PREFILL_TOKENS_PER_S,
            prefill_horizon_s: DEFAULT_PREFILL_HORIZON_S,
        }
    }
}

/// What is known of one candidate when picking.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Candidate {
    /// Normalised prefix score in [0, 1] (0 when unknown).
    pub prefix: f64,
    /// Requests in flight, counted by the scorers.
    pub in_flight: u32,
    /// Scraped `vllm:num_requests_waiting` (None: no fresh scrape).
    pub waiting: Option<u32>,
    /// Scraped `vllm:kv_cache_usage_perc` in 0..1 (None: no fresh scrape).
    pub kv_usage: Option<f64>,
    /// Uncached prompt tokens of the requests the scorers sent here that have
    /// not produced their first response byte yet (their prefill is pending).
    pub in_flight_tokens: u64,
    /// This request's uncached tokens on this pod: prompt tokens minus the
    /// cached prefix (blocks x block size).
    pub uncached_tokens: u64,
}

/// Every term of one candidate's blend, for logs and the HTTP API.
#[derive(Debug, Clone, PartialEq)]
pub struct Breakdown {
    pub prefix: f64,
    pub queue: f64,
    pub kv_usage: f64,
    pub in_flight: f64,
    pub tokens: f64,
    pub saturated: bool,
    pub total: f64,
}

impl Candidate {
    fn saturated(&self, limits: &LoadLimits) -> bool {
        limits.max_in_flight.is_some_and(|m| self.in_flight >= m)
            || limits
                .max_waiting
                .zip(self.waiting)
                .is_some_and(|(m, w)| w >= m)
            || limits
                .max_kv_usage
                .zip(self.kv_usage)
                .is_some_and(|(m, u)| u >= m)
    }
}

/// The load at which a term bottoms out when no limit is configured.
const DEFAULT_WAITING_SCALE: f64 = 16.0;
/// Default `--in-flight-scale`: see the module doc.
pub const DEFAULT_IN_FLIGHT_SCALE: f64 = 8.0;
/// Default `--max-in-flight`: see the module doc.
pub const DEFAULT_MAX_IN_FLIGHT: u32 = 256;

/// Default prefill throughput (`--prefill-tokens-per-s`): Llama-3.1-8B on
/// one H100 prefills ~35k tokens/s in 8192-token chunked-prefill steps (the
/// simulator's roofline, docs/engine-model.md). For a bigger model or GPU
/// set it to the pod's measured rate; only the ratio of the weight to
/// (rate x horizon) matters below the horizon.
pub const DEFAULT_PREFILL_TOKENS_PER_S: f64 = 35_000.0;
/// Default `--prefill-horizon-s`: see the module doc.
pub const DEFAULT_PREFILL_HORIZON_S: f64 = 2.0;
/// Default `--weight-tokens`: see the module doc.
pub const DEFAULT_TOKENS_WEIGHT: f64 = 4.0;

/// `1 - min(x, scale) / scale`: 1 when idle, 0 at the scale.
fn headroom(x: f64, scale: f64) -> f64 {
    1.0 - (x / scale).clamp(0.0, 1.0)
}

/// Scores every candidate; returns the breakdowns in input order.
///
/// Load terms are absolute (headroom below the configured limit), not
/// min-max normalised across candidates as llm-d's queue scorer is: with
/// min-max, one request in flight on the pod holding a whole prompt makes it
/// look "fully loaded" next to an idle pod holding nothing, and a hot prefix
/// ping-pongs between pods, losing the locality it was routed for.
pub fn blend(
    candidates: &[Candidate],
    weights: &PickWeights,
    limits: &LoadLimits,
) -> Vec<Breakdown> {
    let waiting_scale = limits
        .max_waiting
        .map_or(DEFAULT_WAITING_SCALE, |m| f64::from(m.max(1)));
    // Non-positive or NaN settings fall back to the defaults rather than
    // dividing by zero (a NaN total would never win nor tie).
    let positive = |x: f64, default: f64| if x > 0.0 && x.is_finite() { x } else { default };
    let tokens_per_s = positive(limits.prefill_tokens_per_s, DEFAULT_PREFILL_TOKENS_PER_S);
    let horizon_s = positive(limits.prefill_horizon_s, DEFAULT_PREFILL_HORIZON_S);
    let in_flight_scale = positive(limits.in_flight_scale, DEFAULT_IN_FLIGHT_SCALE);
    candidates
        .iter()
        .map(|c| {
            let prefix = c.prefix.clamp(0.0, 1.0);
            // An unscraped pod counts as half loaded rather than idle, so it
            // cannot attract everything before its first scrape.
            let queue = c
                .waiting
                .map_or(0.5, |w| headroom(f64::from(w), waiting_scale));
            let kv_usage = 1.0 - c.kv_usage.unwrap_or(0.5).clamp(0.0, 1.0);
            let in_flight = headroom(f64::from(c.in_flight), in_flight_scale);
            let backlog = (c.in_flight_tokens as f64 + c.uncached_tokens as f64) / tokens_per_s;
            let tokens = headroom(backlog, horizon_s);
            let total = weights.prefix * prefix
                + weights.queue * queue
                + weights.kv_usage * kv_usage
                + weights.in_flight * in_flight
                + weights.tokens * tokens;
            Breakdown {
                prefix,
                queue,
                kv_usage,
                in_flight,
                tokens,
                saturated: c.saturated(limits),
                total,
            }
        })
        .collect()
}

/// The index of the chosen candidate (None when there are none): the best
/// total among unsaturated candidates (all of them when every one is
/// saturated), ties broken uniformly with `random`.
pub fn choose(breakdowns: &[Breakdown], mut random: impl FnMut() -> u64) -> Option<usize> {
    let any_free = breakdowns.iter().any(|b| !b.saturated);
    let eligible = |b: &Breakdown| !any_free || !b.saturated;
    let best = breakdowns
        .iter()
        .filter(|b| eligible(b))
        .map(|b| b.total)
        .fold(f64::NEG_INFINITY, f64::max);
    // Reservoir sampling over the exact ties.
    let mut chosen = None;
    let mut seen = 0u64;
    for (i, b) in breakdowns.iter().enumerate() {
        if eligible(b) && b.total == best {
            seen += 1;
            if random().is_multiple_of(seen) {
                chosen = Some(i);
            }
        }
    }
    chosen
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic source for tests (SplitMix64).
    fn rng(mut s: u64) -> impl FnMut() -> u64 {
        move || {
            s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }
    }

    fn cand(prefix: f64, in_flight: u32) -> Candidate {
        Candidate {
            prefix,
            in_flight,
            waiting: Some(0),
            kv_usage: Some(0.1),
            ..Candidate::default()
        }
    }

    /// [`cand`] with a prefill backlog: `pending` tokens charged there and
    /// `uncached` of this request's own.
    fn loaded(prefix: f64, in_flight: u32, pending: u64, uncached: u64) -> Candidate {
        Candidate {
            in_flight_tokens: pending,
            uncached_tokens: uncached,
            ..cand(prefix, in_flight)
        }
    }

    #[test]
    fn longest_prefix_wins_at_equal_load() {
        let c = [cand(0.2, 0), cand(0.9, 0), cand(0.0, 0)];
        let b = blend(&c, &PickWeights::default(), &LoadLimits::default());
        assert_eq!(choose(&b, rng(1)), Some(1));
    }

    #[test]
    fn saturated_pod_is_skipped_until_all_are() {
        let limits = LoadLimits {
            max_in_flight: Some(4),
            ..LoadLimits::default()
        };
        let c = [cand(1.0, 4), cand(0.0, 1)];
        let b = blend(&c, &PickWeights::default(), &limits);
        assert!(b[0].saturated);
        assert_eq!(choose(&b, rng(1)), Some(1));
        let c = [cand(1.0, 4), cand(0.0, 5)];
        let b = blend(&c, &PickWeights::default(), &limits);
        assert_eq!(choose(&b, rng(1)), Some(0));
    }

    #[test]
    fn ties_are_broken_uniformly() {
        let c = [cand(0.0, 0), cand(0.0, 0), cand(0.0, 0), cand(0.0, 0)];
        let b = blend(&c, &PickWeights::default(), &LoadLimits::default());
        let mut counts = [0u32; 4];
        let mut r = rng(7);
        for _ in 0..4000 {
            let i = choose(&b, &mut r).expect("a candidate");
            counts[i] += 1;
        }
        for n in counts {
            assert!((800..1200).contains(&n), "{counts:?}");
        }
    }

    #[test]
    fn in_flight_term_moves_before_scrapes_do() {
        // Same prefix and scrape, one pod already busier by our own count.
        let c = [cand(0.5, 3), cand(0.5, 0)];
        let b = blend(&c, &PickWeights::default(), &LoadLimits::default());
        assert!(b[1].total > b[0].total);
        assert_eq!(choose(&b, rng(3)), Some(1));
    }

    /// Hand-computed: R = 1000 tokens/s, H = 2 s, weight 4, every other
    /// weight 0. Pod 0 has 500 pending and 100 uncached: b = 0.6 s,
    /// term 1 - 0.6/2 = 0.7, total 2.8. Pod 1 has nothing pending but
    /// 1500 uncached: b = 1.5 s, term 0.25, total 1.0. Pod 2 is past the
    /// horizon: term 0.
    #[test]
    fn prefill_backlog_term_is_headroom_of_pending_plus_uncached() {
        let weights = PickWeights {
            prefix: 0.0,
            queue: 0.0,
            kv_usage: 0.0,
            in_flight: 0.0,
            tokens: 4.0,
        };
        let limits = LoadLimits {
            prefill_tokens_per_s: 1000.0,
            prefill_horizon_s: 2.0,
            ..LoadLimits::default()
        };
        let with = |pending, uncached| loaded(0.0, 0, pending, uncached);
        let c = [with(500, 100), with(0, 1500), with(3000, 0)];
        let b = blend(&c, &weights, &limits);
        for (got, want) in b.iter().map(|b| b.tokens).zip([0.7, 0.25, 0.0]) {
            assert!((got - want).abs() < 1e-12, "{got} != {want}");
        }
        assert!((b[0].total - 2.8).abs() < 1e-12);
        assert!((b[1].total - 1.0).abs() < 1e-12);
        assert_eq!(b[2].total, 0.0);
        // Nonsense settings fall back to the defaults instead of NaN.
        let bad = LoadLimits {
            prefill_tokens_per_s: 0.0,
            prefill_horizon_s: f64::NAN,
            ..LoadLimits::default()
        };
        let b = blend(&[with(35_000, 0)], &weights, &bad);
        assert!((b[0].tokens - 0.5).abs() < 1e-12, "{}", b[0].tokens);
    }

    /// With the default weights, a pod holding the whole 15k-token prompt
    /// but 3 s of backlog (105k tokens at 35k/s) loses to an idle pod
    /// holding nothing: cached pod 2 x 1 + 4 x 0 = 2 (backlog past the 2 s
    /// horizon), idle pod 0 + 4 x (1 - (15k/35k)/2) = 3.14 (the other
    /// terms equal). At 0.5 s of backlog (17.5k tokens) the cached pod
    /// wins: 2 + 4 x 0.75 = 5 against 3.14.
    #[test]
    fn a_long_backlog_outweighs_a_full_prefix_match() {
        let w = PickWeights::default();
        let l = LoadLimits::default();
        let pod = |prefix, pending, uncached| loaded(prefix, 1, pending, uncached);
        let b = blend(&[pod(1.0, 105_000, 0), pod(0.0, 0, 15_000)], &w, &l);
        assert!((b[0].total - b[1].total - (2.0 - 4.0 * (1.0 - 15.0 / 70.0))).abs() < 1e-9);
        assert_eq!(choose(&b, rng(1)), Some(1));
        let b = blend(&[pod(1.0, 17_500, 0), pod(0.0, 0, 15_000)], &w, &l);
        assert!((b[0].total - b[1].total - (5.0 - 4.0 * (1.0 - 15.0 / 70.0))).abs() < 1e-9);
        assert_eq!(choose(&b, rng(1)), Some(0));
    }

    /// The in-flight term and the saturation limit are separate: a pod
    /// holding the whole prompt with 100 requests in flight (all decoding,
    /// no prefill pending) keeps winning over an idle pod holding nothing
    /// until it reaches `max_in_flight`; the term itself is flat past its
    /// scale.
    #[test]
    fn busy_decoding_pod_keeps_its_prefix_until_saturated() {
        let w = PickWeights::default();
        let l = LoadLimits::default();
        let pod = |prefix, in_flight, uncached| loaded(prefix, in_flight, 0, uncached);
        let b = blend(&[pod(1.0, 100, 0), pod(0.0, 0, 7_200)], &w, &l);
        assert!(!b[0].saturated);
        assert_eq!(b[0].in_flight, 0.0);
        assert_eq!(choose(&b, rng(1)), Some(0));
        let b = blend(&[pod(1.0, 256, 0), pod(0.0, 0, 7_200)], &w, &l);
        assert!(b[0].saturated);
        assert_eq!(choose(&b, rng(1)), Some(1));
        // Half the scale in flight: half the term.
        let b = blend(&[pod(0.0, 4, 0)], &w, &l);
        assert!((b[0].in_flight - 0.5).abs() < 1e-12);
    }

    #[test]
    fn empty_input_picks_nothing() {
        assert_eq!(choose(&[], rng(1)), None);
    }
}

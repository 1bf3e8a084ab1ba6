//! Picking: blend each candidate's prefix score with its load and choose.
//!
//! The blend is llm-d's weighted sum of [0, 1] terms (prefix 2 : queue 1 :
//! KV usage 1 by default, the weights of llm-d's precise-prefix-cache-aware
//! guide, scheduler v0.8.0-rc.1), plus a term for the
//! requests in flight that the scorers count themselves: scraped queue
//! lengths lag by a scrape interval, so under a burst they cannot stop one hot
//! prefix from piling every request onto one pod, while router-counted
//! in-flight requests move with every decision.
//!
//! On top of the blend, a hard limit: a pod whose in-flight or waiting count
//! reached its configured limit is *saturated* and only chosen when every
//! candidate is. That is what spreads a hot prefix once its pod is loaded,
//! regardless of how large the prefix term is. Ties are broken uniformly at
//! random (a caller-supplied random source keeps tests and benches seeded).

/// Weights of the blended terms (not normalised: llm-d's convention).
#[derive(Debug, Clone, PartialEq)]
pub struct PickWeights {
    pub prefix: f64,
    pub queue: f64,
    pub kv_usage: f64,
    pub in_flight: f64,
}

impl Default for PickWeights {
    fn default() -> Self {
        PickWeights {
            prefix: 2.0,
            queue: 1.0,
            kv_usage: 1.0,
            in_flight: 1.0,
        }
    }
}

/// Load beyond which a pod is saturated.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadLimits {
    /// Router-counted requests in flight.
    pub max_in_flight: Option<u32>,
    /// vLLM's `num_requests_waiting`.
    pub max_waiting: Option<u32>,
    /// vLLM's `kv_cache_usage_perc` (0..1).
    pub max_kv_usage: Option<f64>,
}

impl Default for LoadLimits {
    fn default() -> Self {
        LoadLimits {
            max_in_flight: Some(64),
            max_waiting: Some(16),
            max_kv_usage: None,
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
}

/// Every term of one candidate's blend, for logs and the HTTP API.
#[derive(Debug, Clone, PartialEq)]
pub struct Breakdown {
    pub prefix: f64,
    pub queue: f64,
    pub kv_usage: f64,
    pub in_flight: f64,
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
const DEFAULT_IN_FLIGHT_SCALE: f64 = 64.0;

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
    let in_flight_scale = limits
        .max_in_flight
        .map_or(DEFAULT_IN_FLIGHT_SCALE, |m| f64::from(m.max(1)));
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
            let total = weights.prefix * prefix
                + weights.queue * queue
                + weights.kv_usage * kv_usage
                + weights.in_flight * in_flight;
            Breakdown {
                prefix,
                queue,
                kv_usage,
                in_flight,
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

    #[test]
    fn empty_input_picks_nothing() {
        assert_eq!(choose(&[], rng(1)), None);
    }
}

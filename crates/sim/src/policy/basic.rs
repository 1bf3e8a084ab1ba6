//! The baselines every comparison needs, and the oracle that bounds them:
//! random, round-robin, session affinity, least-loaded, and an oracle that
//! reads every engine's true cache and queue.

use super::rng::{SplitMix64 as SplitMix, mix64 as mix};
use super::{PodIndex, Policy, Signals};
use crate::request::SimRequest;

/// Uniformly random pod: what a plain Kubernetes Service gives.
pub struct Random {
    rng: SplitMix,
}

impl Random {
    pub fn new(seed: u64) -> Random {
        Random {
            rng: SplitMix::new(seed),
        }
    }
}

impl Policy for Random {
    fn name(&self) -> &str {
        "random"
    }

    fn route(&mut self, _req: &SimRequest, signals: &Signals<'_>) -> PodIndex {
        self.rng.below(signals.pods())
    }
}

/// Pods in turn.
#[derive(Default)]
pub struct RoundRobin {
    next: usize,
}

impl Policy for RoundRobin {
    fn name(&self) -> &str {
        "round-robin"
    }

    fn route(&mut self, _req: &SimRequest, signals: &Signals<'_>) -> PodIndex {
        let pod = self.next % signals.pods();
        self.next = pod + 1;
        pod
    }
}

/// Consistent hashing of a session header (Envoy's ring-hash or Maglev on
/// `x-session-id`): rendezvous hashing, so a session keeps its pod and
/// only sessions of a removed pod move. Requests without a session go to a
/// random pod, as a hash policy without its header falls back to random.
pub struct SessionAffinity {
    rng: SplitMix,
}

impl SessionAffinity {
    pub fn new(seed: u64) -> SessionAffinity {
        SessionAffinity {
            rng: SplitMix::new(seed),
        }
    }
}

impl Policy for SessionAffinity {
    fn name(&self) -> &str {
        "session-affinity"
    }

    fn route(&mut self, req: &SimRequest, signals: &Signals<'_>) -> PodIndex {
        match req.session {
            None => self.rng.below(signals.pods()),
            Some(s) => (0..signals.pods())
                .max_by_key(|&p| mix(s ^ mix(p as u64 + 1)))
                .unwrap_or(0),
        }
    }
}

/// The pod with the shortest vLLM queue (scraped `num_requests_waiting` +
/// `num_requests_running`), plus the requests this router sent it since
/// that scrape: without them every arrival between two scrapes would herd
/// onto the same pod, which no real least-request balancer does.
pub struct LeastLoaded {
    rng: SplitMix,
    since_scrape: Vec<(f64, u32)>,
}

impl LeastLoaded {
    pub fn new(seed: u64) -> LeastLoaded {
        LeastLoaded {
            rng: SplitMix::new(seed),
            since_scrape: Vec::new(),
        }
    }
}

impl Policy for LeastLoaded {
    fn name(&self) -> &str {
        "least-loaded"
    }

    fn route(&mut self, _req: &SimRequest, signals: &Signals<'_>) -> PodIndex {
        let n = signals.pods();
        self.since_scrape.resize(n, (f64::NEG_INFINITY, 0));
        let loads: Vec<u64> = (0..n)
            .map(|p| {
                let (at, sent) = &mut self.since_scrape[p];
                let scraped = signals.scrapes[p];
                let scrape_at = scraped.map_or(f64::NEG_INFINITY, |s| s.at);
                if scrape_at > *at {
                    *at = scrape_at;
                    *sent = 0;
                }
                scraped.map_or(0, |s| u64::from(s.waiting) + u64::from(s.running))
                    + u64::from(*sent)
            })
            .collect();
        let pod = argmin_random(&loads, &mut self.rng);
        self.since_scrape[pod].1 += 1;
        pod
    }
}

/// Index of the smallest value, ties uniformly at random.
pub fn argmin_random<T: PartialOrd + Copy>(values: &[T], rng: &mut SplitMix) -> usize {
    let mut best = 0;
    let mut seen = 0usize;
    for (i, v) in values.iter().enumerate() {
        if i == 0 || *v < values[best] {
            best = i;
            seen = 1;
        } else if *v == values[best] {
            seen += 1;
            if rng.below(seen) == 0 {
                best = i;
            }
        }
    }
    best
}

/// The best a router could do greedily with perfect knowledge: it reads
/// every engine's true cache and prefill backlog and sends the request
/// where its first token comes soonest — the backlog plus its own uncached
/// prompt, at the pod's prefill rate. Ties go to the pod caching more.
pub struct Oracle {
    rng: SplitMix,
}

impl Oracle {
    pub fn new(seed: u64) -> Oracle {
        Oracle {
            rng: SplitMix::new(seed),
        }
    }
}

impl Policy for Oracle {
    fn name(&self) -> &str {
        "oracle"
    }

    fn wants_truth(&self) -> bool {
        true
    }

    fn route(&mut self, req: &SimRequest, signals: &Signals<'_>) -> PodIndex {
        let Some(truth) = signals.truth else {
            return self.rng.below(signals.pods());
        };
        let block = truth.block_size().max(1);
        let cost: Vec<(f64, i64)> = (0..signals.pods())
            .map(|p| {
                let cached = truth.cached_blocks(p, req);
                let uncached = req.prompt_len().saturating_sub(cached * block) as f64;
                let backlog = truth.pending_prefill_tokens(p) as f64;
                let rate = truth.prefill_tokens_per_s(p).max(1.0);
                ((backlog + uncached) / rate, -(cached as i64))
            })
            .collect();
        argmin_random(&cost, &mut self.rng)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Scrape, Truth};
    use kvroute_core::keys::{HashScheme, KeyScheme};

    fn scheme() -> KeyScheme {
        KeyScheme::new(HashScheme::Sha256Cbor, "0", 16).expect("scheme")
    }

    fn req(id: u64, session: Option<u64>, len: usize) -> SimRequest {
        SimRequest::new(id, 0.0, (0..len as u32).collect(), 4, session, &scheme())
    }

    fn signals(scrapes: &[Option<Scrape>]) -> Signals<'_> {
        Signals {
            now: 0.0,
            scrapes,
            truth: None,
        }
    }

    #[test]
    fn round_robin_cycles_and_random_covers_every_pod() {
        let s = [None; 3];
        let mut rr = RoundRobin::default();
        let picks: Vec<_> = (0..7)
            .map(|i| rr.route(&req(i, None, 8), &signals(&s)))
            .collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2, 0]);
        let mut r = Random::new(9);
        let mut counts = [0u32; 3];
        for i in 0..3000 {
            counts[r.route(&req(i, None, 8), &signals(&s))] += 1;
        }
        assert!(
            counts.iter().all(|&c| (850..1150).contains(&c)),
            "{counts:?}"
        );
    }

    #[test]
    fn sessions_keep_their_pod_and_spread() {
        let s = [None; 8];
        let mut a = SessionAffinity::new(1);
        let mut used = std::collections::HashSet::new();
        for session in 0..64u64 {
            let first = a.route(&req(0, Some(session), 8), &signals(&s));
            for i in 1..4 {
                assert_eq!(a.route(&req(i, Some(session), 8), &signals(&s)), first);
            }
            used.insert(first);
        }
        assert!(used.len() >= 6, "64 sessions over 8 pods used {used:?}");
    }

    #[test]
    fn least_loaded_counts_its_own_sends_between_scrapes() {
        let scrape = |waiting, running| {
            Some(Scrape {
                running,
                waiting,
                at: 0.0,
                ..Scrape::default()
            })
        };
        let s = [scrape(3, 1), scrape(0, 1), scrape(1, 1)];
        let mut l = LeastLoaded::new(3);
        // Loads 4, 1, 2: pod 1, then pod 1 again (2 vs 2: a tie with pod 2),
        // and never pod 0 until the others pass 4.
        let picks: Vec<_> = (0..5)
            .map(|i| l.route(&req(i, None, 8), &signals(&s)))
            .collect();
        assert_eq!(picks[0], 1);
        assert_eq!(picks.iter().filter(|&&p| p == 0).count(), 0, "{picks:?}");
        assert_eq!(picks.iter().filter(|&&p| p == 1).count(), 3, "{picks:?}");
    }

    struct FakeTruth {
        cached: Vec<usize>,
        backlog: Vec<u64>,
    }

    impl Truth for FakeTruth {
        fn cached_blocks(&self, pod: PodIndex, _req: &SimRequest) -> usize {
            self.cached[pod]
        }
        fn pending_prefill_tokens(&self, pod: PodIndex) -> u64 {
            self.backlog[pod]
        }
        fn requests(&self, _pod: PodIndex) -> (u32, u32) {
            (0, 0)
        }
        fn prefill_tokens_per_s(&self, _pod: PodIndex) -> f64 {
            10_000.0
        }
        fn block_size(&self) -> usize {
            16
        }
    }

    #[test]
    fn oracle_weighs_the_cache_against_the_backlog() {
        let s = [None; 3];
        let r = req(0, None, 1600);
        let mut o = Oracle::new(1);
        // Pod 0 holds 99 blocks (1,584 tokens) behind a 1,000-token backlog:
        // 1,016 tokens to wait for; pod 1 is idle but cold: 1,600.
        let truth = FakeTruth {
            cached: vec![99, 0, 10],
            backlog: vec![1000, 0, 900],
        };
        let sig = Signals {
            now: 0.0,
            scrapes: &s,
            truth: Some(&truth),
        };
        assert_eq!(o.route(&r, &sig), 0);
        // Behind a 2,000-token backlog the cold idle pod is sooner.
        let truth = FakeTruth {
            cached: vec![99, 0, 10],
            backlog: vec![2000, 0, 900],
        };
        let sig = Signals {
            now: 0.0,
            scrapes: &s,
            truth: Some(&truth),
        };
        assert_eq!(o.route(&r, &sig), 1);
    }
}

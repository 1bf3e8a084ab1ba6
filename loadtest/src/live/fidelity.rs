//! Index fidelity in live mode: sampled lookups through the same Redis
//! index code the scorer uses, compared with the engines' true caches at
//! the same moment.
//!
//! For a sampled request, each pod's index depth (consecutive blocks from
//! block 0 the index says it holds, capped as vLLM caps a hit) is compared
//! with the engine's true cached prefix:
//! - a lookup is *stale* when some pod's index depth exceeds its true
//!   depth: the index named a block the pod no longer holds (a routing
//!   decision would have counted a miss as a hit);
//! - *missed* blocks are true cached blocks beyond the index depth: the
//!   index had not heard of them yet (a decision would have undervalued
//!   that pod).
//!
//! Both are what the ingest lag leaves; the engine state is read between
//! its steps' publications, so a block stored or evicted by a step still
//! running counts against the index by up to one step.

use kvroute_core::ids::ModelName;
use kvroute_core::index::Index;
use kvroute_core::keys::{ExtraKeys, KeyScheme};
use kvroute_redis::RedisIndex;
use kvroute_sim::report::Fidelity;
use kvroute_sim::request::SimRequest;
use parking_lot::Mutex;

#[derive(Default)]
struct Counts {
    lookups: u64,
    stale: u64,
    true_blocks: u64,
    missed: u64,
    errors: u64,
}

pub struct Sampler {
    index: RedisIndex,
    model: ModelName,
    scheme: KeyScheme,
    endpoints: Vec<String>,
    counts: Mutex<Counts>,
}

impl Sampler {
    pub async fn connect(
        redis: &super::stack::Redis,
        model: &str,
        scheme: KeyScheme,
        endpoints: &[String],
    ) -> anyhow::Result<Sampler> {
        Ok(Sampler {
            index: if redis.is_cluster() {
                RedisIndex::connect_cluster(&redis.urls()).await?
            } else {
                RedisIndex::connect(&redis.urls()[0]).await?
            },
            model: ModelName::new(model),
            scheme,
            endpoints: endpoints.to_vec(),
            counts: Mutex::new(Counts::default()),
        })
    }

    /// Compares the index's answer for `req` with every engine's cache now.
    pub async fn sample(&self, fleet: &super::pod::Fleet, req: &SimRequest, tokens: &[u32]) {
        let keys = self.scheme.block_keys(tokens, ExtraKeys::NONE);
        let lookup = match self.index.lookup(&self.model, &keys, None).await {
            Ok(l) => l,
            Err(e) => {
                tracing::debug!(error = %e, "fidelity lookup failed");
                self.counts.lock().errors += 1;
                return;
            }
        };
        let cap = tokens.len().saturating_sub(1) / self.scheme.block_size();
        let mut stale = false;
        let (mut truth_total, mut missed) = (0u64, 0u64);
        for (p, ep) in self.endpoints.iter().enumerate() {
            let indexed = lookup
                .pods
                .iter()
                .filter(|x| x.pod.endpoint() == ep.as_str())
                .map(|x| x.depth as usize)
                .max()
                .unwrap_or(0)
                .min(cap);
            let truth = fleet.with_engine(p, |e| e.cached_blocks(req));
            stale |= indexed > truth;
            truth_total += truth as u64;
            missed += truth.saturating_sub(indexed) as u64;
        }
        let mut c = self.counts.lock();
        c.lookups += 1;
        c.stale += u64::from(stale);
        c.true_blocks += truth_total;
        c.missed += missed;
    }

    pub fn summary(&self) -> Fidelity {
        let c = self.counts.lock();
        let share = |a: u64, b: u64| if b == 0 { 0.0 } else { a as f64 / b as f64 };
        if c.errors > 0 {
            tracing::warn!(errors = c.errors, "fidelity lookups failed");
        }
        Fidelity {
            lookups: c.lookups,
            stale_lookup_share: share(c.stale, c.lookups),
            missed_block_share: share(c.missed, c.true_blocks),
            ingest_lag: Default::default(),
        }
    }
}

//! kvroute's own policy under simulation: not a re-implementation but the
//! product's code path. KV events go through the ingester's keying stage
//! ([`ingester::keys::Keyer`]: router keys from token ids, engine
//! hashes mapped) into the real in-memory index ([`MemoryIndex`], the
//! reference the Redis backend is property-tested against); each decision
//! is the scorer's [`EndpointPicker`] (`Decide::decide`: token ids -> block
//! keys -> index lookup -> tier-weighted scores -> blend with scraped load
//! and router-counted in-flight requests and prefill tokens -> pick); the
//! first token releases the decision's prefill charge as the first response
//! byte through Envoy's ext_proc stream does (`Decide::prefill_done`), and
//! completions release the in-flight slot as the stream's end does
//! (`Decide::finished`).

use ingester::keys::Keyer;
use kvroute_core::events::KvEvent;
use kvroute_core::ids::{ModelName, PodId};
use kvroute_core::index::IndexOp;
use kvroute_core::index::memory::MemoryIndex;
use kvroute_core::keys::KeyScheme;
use kvroute_sim::policy::{PodIndex, Policy, Signals};
use kvroute_sim::request::SimRequest;
use kvroute_tokens::TokenizerOptions;
use kvroute_tokens::TokenizerRegistry;
use scorer::candidates::Candidates;
use scorer::decide::{Decide, Decision, Prompt, RouteRequest};
use scorer::load::{EngineLoad, Load};
use scorer::route::{EndpointPicker, RouteConfig};
use std::collections::HashMap;
use std::sync::Arc;

/// The model name pods publish under (`kv@<pod>@<model>`).
pub const MODEL: &str = "meta-llama/Llama-3.1-8B-Instruct";

/// The scorer's default `--scrape-interval` (200 ms).
pub const SCORER_SCRAPE_INTERVAL_S: f64 = 0.2;

/// Index capacity: far above what a 16-pod fleet of 8B models holds
/// (16 x ~27k blocks), so the index never evicts in a run.
const INDEX_CAPACITY_BLOCKS: usize = 8_000_000;

pub struct Kvroute {
    rt: tokio::runtime::Runtime,
    picker: EndpointPicker<MemoryIndex>,
    index: Arc<MemoryIndex>,
    keyer: Keyer,
    trust_engine_hashes: bool,
    model: ModelName,
    endpoints: Vec<String>,
    pods: Vec<PodId>,
    by_endpoint: HashMap<String, PodIndex>,
    /// Scrape time last recorded per pod.
    recorded: Vec<f64>,
    /// The scorer's `--scrape-interval`: it reads a pod's metrics this
    /// often, whatever the simulator's scrape tick.
    scrape_interval_s: f64,
    ops: Vec<IndexOp>,
    /// Each routed request's decision until it finishes (what the
    /// ext_proc stream's guard holds).
    decisions: HashMap<u64, Decision>,
}

/// Loopback endpoint of simulated pod `i` (`127.0.0.11:8000`, ...): the
/// names live mode's pods really listen on.
pub fn endpoint(i: usize) -> String {
    format!("127.0.{}.{}:8000", i / 200, 11 + i % 200)
}

impl Kvroute {
    /// `router` is the scorer's and ingester's key scheme; `engine` is
    /// what the engines publish (different: the ingester maps hashes).
    pub fn new(
        pods: usize,
        router: KeyScheme,
        engine: &KeyScheme,
        config: RouteConfig,
        scrape_interval_s: f64,
        seed: u64,
    ) -> anyhow::Result<Kvroute> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let index = Arc::new(MemoryIndex::new(INDEX_CAPACITY_BLOCKS));
        let endpoints: Vec<String> = (0..pods).map(endpoint).collect();
        let registry = Arc::new(TokenizerRegistry::new(
            Vec::new(),
            Vec::new(),
            TokenizerOptions::default(),
        ));
        let picker = EndpointPicker::new(
            index.clone(),
            router.clone(),
            registry,
            Arc::new(Candidates::new(&endpoints)?),
            Load::default(),
            config,
            seed,
        );
        let trust_engine_hashes = router.scheme() == engine.scheme()
            && router.seed() == engine.seed()
            && router.block_size() == engine.block_size();
        Ok(Kvroute {
            rt,
            picker,
            index,
            keyer: Keyer::new(router, 500_000),
            trust_engine_hashes,
            model: ModelName::new(MODEL),
            pods: endpoints.iter().map(PodId::new).collect(),
            by_endpoint: endpoints.iter().cloned().zip(0..).collect(),
            endpoints,
            recorded: vec![f64::NEG_INFINITY; pods],
            scrape_interval_s,
            ops: Vec::new(),
            decisions: HashMap::new(),
        })
    }
}

impl Policy for Kvroute {
    fn name(&self) -> &str {
        "kvroute"
    }

    fn wants_events(&self) -> bool {
        true
    }

    fn route(&mut self, req: &SimRequest, signals: &Signals<'_>) -> PodIndex {
        // Scrapes reach the scorer's load table as its scraper writes them.
        for (p, s) in signals.scrapes.iter().enumerate() {
            if let Some(s) = s
                && s.at >= self.recorded[p] + self.scrape_interval_s
            {
                self.recorded[p] = s.at;
                self.picker.load().engines.record(
                    &self.endpoints[p],
                    EngineLoad {
                        waiting: f64::from(s.waiting),
                        running: f64::from(s.running),
                        kv_usage: Some(s.kv_usage),
                    },
                );
            }
        }
        let request = RouteRequest {
            model: MODEL.to_string(),
            prompt: Prompt::TokenIds(req.tokens.to_vec()),
            cache_salt: None,
            chat_template_kwargs: None,
            request_id: None,
        };
        match self.rt.block_on(self.picker.decide(request, None)) {
            Ok(d) => {
                let pod = self.by_endpoint.get(&d.endpoint).copied().unwrap_or(0);
                self.decisions.insert(req.id, d);
                pod
            }
            // Only "no candidates", impossible with a fixed fleet.
            Err(e) => {
                tracing::warn!(error = %e, "kvroute picked nothing");
                0
            }
        }
    }

    fn on_first_token(&mut self, _now: f64, req: &SimRequest, _pod: PodIndex) {
        if let Some(d) = self.decisions.get(&req.id) {
            self.picker.prefill_done(d);
        }
    }

    fn on_finish(&mut self, _now: f64, req: &SimRequest, _pod: PodIndex) {
        if let Some(d) = self.decisions.remove(&req.id) {
            self.picker.finished(&d);
        }
    }

    fn on_events(&mut self, _now: f64, pod: PodIndex, events: &[KvEvent]) {
        self.ops.clear();
        for ev in events {
            let (op, _) =
                self.keyer
                    .key_event(&self.pods[pod], &self.model, ev, self.trust_engine_hashes);
            self.ops.extend(op);
        }
        self.index.apply_sync(&self.ops);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvroute_core::keys::HashScheme;
    use kvroute_sim::engine::EngineConfig;
    use kvroute_sim::fleet::{self, FleetConfig};
    use kvroute_sim::policy::basic::RoundRobin;

    const TENANTS: u32 = 4;
    const SYSTEM: u32 = 2000;
    const QUESTION: u32 = 200;

    /// Four tenants, each a 2,000-token system prompt, every request its
    /// own 200-token question; 10 requests a second.
    fn tenants(n: u64, scheme: &KeyScheme) -> Vec<SimRequest> {
        (0..n)
            .map(|i| {
                let t = (i % u64::from(TENANTS)) as u32;
                let mut tokens: Vec<u32> = (0..SYSTEM).map(|j| 1 + t * 10_000 + j).collect();
                tokens.extend((0..QUESTION).map(|j| 50_000 + i as u32 * QUESTION + j));
                SimRequest::new(i, i as f64 * 0.1, tokens, 16, Some(u64::from(t)), scheme)
            })
            .collect()
    }

    fn fleet(scheme: &KeyScheme, pods: usize) -> FleetConfig {
        let mut engine = EngineConfig::llama31_8b_h100(0.9);
        engine.scheme = scheme.clone();
        FleetConfig {
            pods,
            engine,
            event_delay_s: 0.02,
            scrape_interval_s: 0.05,
        }
    }

    /// The product's path routes each tenant to a pod holding its system
    /// prompt: after the first request of each tenant, every request hits
    /// its 125 system blocks, as an ideal router's would; round-robin over
    /// 8 pods pays a miss per tenant per pod. With engines publishing
    /// another hash scheme the ingester maps every block and nothing
    /// changes.
    #[test]
    fn kvroute_routes_tenants_to_their_cached_system_prompt() {
        let router = KeyScheme::new(HashScheme::Sha256Cbor, "0", 16).expect("scheme");
        let n = 160u64;
        let per_request = u64::from(SYSTEM + QUESTION);
        let ideal_hits = (n - u64::from(TENANTS)) * u64::from(SYSTEM);
        for engine in [
            router.clone(),
            KeyScheme::new(HashScheme::Sha256Cbor64, "0", 16).expect("scheme"),
        ] {
            let reqs = tenants(n, &engine);
            let mut kv = Kvroute::new(
                8,
                router.clone(),
                &engine,
                RouteConfig::default(),
                SCORER_SCRAPE_INTERVAL_S,
                1,
            )
            .expect("kvroute policy");
            let r = fleet::run(&fleet(&engine, 8), "tenants", &reqs, &mut kv, &mut |_| {});
            assert_eq!(r.requests, n);
            assert_eq!(r.query_tokens, n * per_request);
            // At most one extra cold start per tenant (a second pod taking
            // load) on top of the ideal.
            let floor = ideal_hits - u64::from(TENANTS) * u64::from(SYSTEM);
            assert!(
                r.hit_tokens >= floor,
                "{:?}: kvroute hit {} tokens, ideal {ideal_hits}",
                engine.scheme(),
                r.hit_tokens
            );
            let rr = fleet::run(
                &fleet(&engine, 8),
                "tenants",
                &reqs,
                &mut RoundRobin::default(),
                &mut |_| {},
            );
            // Round-robin: each of the 8 pods sees each tenant's first
            // request cold (4 tenants x 8 pods... tenant t lands on pods
            // t, t+4 only, as 4 divides 8): 8 cold starts.
            assert_eq!(
                rr.hit_tokens,
                (n - 8) * u64::from(SYSTEM),
                "round-robin's hits follow from the arithmetic"
            );
        }
    }

    /// Two tenants at 100 requests/s, each answer 400 tokens long: ~100
    /// requests run on each tenant's pod at the peak, almost all decoding.
    /// The scorer's defaults keep each tenant on the pod holding its
    /// system prompt (one cold start per tenant); with the old in-flight
    /// limit of 64 the tenants' pods saturated and requests spread to pods
    /// without the prompt, each paying a cold start there.
    #[test]
    fn decoding_requests_do_not_push_a_prefix_off_its_pod() {
        let scheme = KeyScheme::new(HashScheme::Sha256Cbor, "0", 16).expect("scheme");
        let n = 200u64;
        let reqs: Vec<SimRequest> = (0..n)
            .map(|i| {
                let t = (i % 2) as u32;
                let mut tokens: Vec<u32> = (0..SYSTEM).map(|j| 1 + t * 10_000 + j).collect();
                tokens.extend((0..QUESTION).map(|j| 50_000 + i as u32 * QUESTION + j));
                SimRequest::new(i, i as f64 * 0.01, tokens, 400, Some(u64::from(t)), &scheme)
            })
            .collect();
        let cold_starts = |config: RouteConfig| {
            let mut kv = Kvroute::new(
                8,
                scheme.clone(),
                &scheme,
                config,
                SCORER_SCRAPE_INTERVAL_S,
                1,
            )
            .expect("kvroute policy");
            let r = fleet::run(&fleet(&scheme, 8), "tenants", &reqs, &mut kv, &mut |_| {});
            assert_eq!(r.requests, n);
            n - r.hit_tokens / u64::from(SYSTEM)
        };
        assert_eq!(cold_starts(RouteConfig::default()), 2);
        let mut old = RouteConfig::default();
        old.limits.max_in_flight = Some(64);
        old.limits.in_flight_scale = 64.0;
        let spread = cold_starts(old);
        assert!(spread > 2, "saturated at 64: {spread} cold starts");
    }
}

//! kvroute's own policy under simulation: not a re-implementation but the
//! product's code path. KV events go through the ingester's keying stage
//! ([`ingester::keys::Keyer`]: router keys from token ids, engine
//! hashes mapped) into the real in-memory index ([`MemoryIndex`], the
//! reference the Redis backend is property-tested against); each decision
//! is the scorer's [`EndpointPicker`] (`Decide::decide`: token ids -> block
//! keys -> index lookup -> tier-weighted scores -> blend with scraped load
//! and router-counted in-flight requests -> pick), and completions release
//! the in-flight slot as Envoy's stream end does.

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
use scorer::decide::{Decide, Prompt, RouteRequest};
use scorer::load::{EngineLoad, Load};
use scorer::route::{EndpointPicker, RouteConfig};
use std::collections::HashMap;
use std::sync::Arc;

/// The model name pods publish under (`kv@<pod>@<model>`).
pub const MODEL: &str = "meta-llama/Llama-3.1-8B-Instruct";

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
    ops: Vec<IndexOp>,
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
            pods: endpoints.iter().map(|e| PodId::new(e)).collect(),
            by_endpoint: endpoints.iter().cloned().zip(0..).collect(),
            endpoints,
            recorded: vec![f64::NEG_INFINITY; pods],
            ops: Vec::new(),
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
                && s.at > self.recorded[p]
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
            Ok(d) => self.by_endpoint.get(&d.endpoint).copied().unwrap_or(0),
            // Only "no candidates", impossible with a fixed fleet.
            Err(e) => {
                tracing::warn!(error = %e, "kvroute picked nothing");
                0
            }
        }
    }

    fn on_finish(&mut self, _now: f64, _req: &SimRequest, pod: PodIndex) {
        self.picker.finished(&self.endpoints[pod]);
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

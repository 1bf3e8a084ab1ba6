//! A simulated vLLM engine: vLLM v1's scheduler over the paged prefix
//! cache ([`crate::cache`]), a step-time cost model ([`CostModel`]) and
//! vLLM's metrics ([`EngineMetrics`]). It behaves like vLLM wherever a
//! router can tell: which requests run, which wait, what is cached and
//! published, and how long prefill and decode take.
//!
//! Scheduling follows `vllm/v1/core/sched/scheduler.py` (FCFS policy):
//! - Each step has a budget of `max_num_batched_tokens`. Running requests
//!   come first, in admission order: each asks for every token it has not
//!   computed (1 when decoding, the rest of its prompt when prefilling in
//!   chunks), capped by what is left of the budget.
//! - When a running request cannot get a KV block, the last admitted
//!   running request is preempted (recompute: its blocks are freed, it goes
//!   back to the front of the waiting queue with nothing computed, keeping
//!   the tokens it generated) until the request fits, or the request itself
//!   is the one preempted.
//! - Waiting requests are admitted FCFS only in a step that preempted
//!   nothing, while budget and `max_num_seqs` allow: the cached prefix is
//!   looked up (capped one token short of all the request's tokens), its
//!   blocks are referenced, blocks for the scheduled tokens allocated. The
//!   first request that does not fit stops admission (head-of-line, as
//!   vLLM). With chunked prefill off, a request whose uncached tokens
//!   exceed what is left of the budget stops admission too.
//! - Blocks that become full of computed tokens are cached at scheduling
//!   (`BlockStored`), decode blocks included; generated tokens are
//!   deterministic ids, hashed into the request's chain as they are made.
//! - The step that computes a request's last token samples its next token:
//!   the first one is its time to first token; after `output_len` tokens
//!   the request finishes and frees its blocks.

mod metrics;
mod model;

pub use metrics::{EngineMetrics, Histogram, TTFT_BUCKETS};
pub use model::{CostModel, ModelSpec};

use crate::cache::{Holding, PrefixCache};
use crate::hashing::RequestHashes;
use crate::request::SimRequest;
use crate::trace::TOKEN_ID_LIMIT;
use kvroute_core::events::KvEvent;
use kvroute_core::keys::{HashScheme, KeyScheme};
use std::collections::VecDeque;

/// vLLM's scheduler and cache settings that matter to routing, and the
/// cost model of the GPU it runs on.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Tokens per KV block (`--block-size`, 16). The engine uses the hashing
    /// scheme's block size, which must be the same.
    pub block_size: usize,
    /// vLLM's `num_gpu_blocks` (including its reserved null block).
    pub num_gpu_blocks: usize,
    /// `--max-num-seqs`: running requests at most.
    pub max_num_seqs: u32,
    /// `--max-num-batched-tokens`: tokens one step may compute.
    pub max_num_batched_tokens: u32,
    /// `--enable-chunked-prefill` (on by default in vLLM v1).
    pub chunked_prefill: bool,
    pub cost: CostModel,
    /// The block hashing the engine publishes in its KV events.
    pub scheme: KeyScheme,
    /// The `model_name` label of the metrics.
    pub model_name: String,
}

impl EngineConfig {
    /// `vllm serve meta-llama/Llama-3.1-8B-Instruct` on one H100 with vLLM
    /// v1's defaults for a GPU of 70 GiB or more (`max_num_seqs` 1024,
    /// `max_num_batched_tokens` 8192, chunked prefill and prefix caching
    /// on, block size 16, `sha256_cbor` hashing with `PYTHONHASHSEED`
    /// unset) and the KV capacity for `gpu_memory_utilization`.
    pub fn llama31_8b_h100(gpu_memory_utilization: f64) -> EngineConfig {
        let spec = ModelSpec::llama31_8b_h100();
        let block_size = 16;
        EngineConfig {
            block_size,
            num_gpu_blocks: spec.num_gpu_blocks(gpu_memory_utilization, block_size),
            max_num_seqs: 1024,
            max_num_batched_tokens: 8192,
            chunked_prefill: true,
            cost: CostModel::llama31_8b_h100(),
            scheme: KeyScheme::new(HashScheme::Sha256Cbor, "vllm-none-hash", block_size)
                .expect("block size 16 is not zero"),
            model_name: spec.name.to_string(),
        }
    }
}

/// What one step did; its effects exist at `now + duration_s`.
#[derive(Clone, Debug, Default)]
pub struct StepOutcome {
    pub duration_s: f64,
    /// Tokens computed for requests prefilling (new, chunked or resumed).
    pub prefill_tokens: u64,
    /// Requests that decoded one token.
    pub decode_seqs: u64,
    /// Request ids whose first token this step produced.
    pub first_tokens: Vec<u64>,
    /// Request ids that finished this step (`output_len` tokens made).
    pub finished: Vec<u64>,
    /// Request ids preempted this step (back to waiting, to recompute).
    pub preempted: Vec<u64>,
    /// Request ids the engine refused: their prompt plus output needs more
    /// KV blocks than the whole cache has (vLLM refuses a request longer
    /// than its max model length, which the cache must hold), or the prompt
    /// is empty. They never run.
    pub rejected: Vec<u64>,
}

/// One request inside the engine.
#[derive(Debug)]
struct Seq {
    id: u64,
    /// Arrival at the engine (the TTFT base).
    arrival: f64,
    prompt_len: usize,
    output_len: u32,
    /// Prompt, then the generated tokens.
    tokens: Vec<u32>,
    /// Chained hashes of every full block of `tokens`.
    hashes: RequestHashes,
    holding: Holding,
    /// vLLM's `num_computed_tokens`.
    computed: usize,
    generated: u32,
    /// Preempted at least once (vLLM counts its lookups apart).
    resumed: bool,
    /// Admitted and not yet past its (re)computation: its tokens count as
    /// prefill.
    prefilling: bool,
}

impl Seq {
    fn remaining(&self) -> usize {
        self.tokens.len().saturating_sub(self.computed)
    }
}

/// The engine's cumulative counters (the cache keeps the lookup ones for
/// new requests); resumed (once preempted) requests' lookups are kept
/// here, apart, as vLLM keeps them out of `vllm:prefix_cache_*_total`.
#[derive(Debug, Default, Clone, Copy)]
struct Counters {
    prompt_tokens: u64,
    generation_tokens: u64,
    preemptions: u64,
    resumed_query_tokens: u64,
    resumed_hit_tokens: u64,
}

/// A simulated vLLM engine (one pod, one GPU).
#[derive(Debug)]
pub struct Engine {
    config: EngineConfig,
    cache: PrefixCache,
    waiting: VecDeque<Seq>,
    running: Vec<Seq>,
    rejected: Vec<u64>,
    counters: Counters,
    ttft: Histogram,
}

/// The `position`-th generated token of request `id`: splitmix64 of both,
/// below [`TOKEN_ID_LIMIT`], so every run and policy generates the same
/// text and decode blocks hash alike.
fn output_token(id: u64, position: u32) -> u32 {
    let mut z = id
        .wrapping_mul(0xD6E8_FEB8_6659_FD93)
        .wrapping_add(u64::from(position))
        .wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z % u64::from(TOKEN_ID_LIMIT)) as u32
}

impl Engine {
    /// An idle engine with an empty cache of `num_gpu_blocks - 1` usable
    /// blocks (vLLM keeps one null block). The block size is the hashing
    /// scheme's (`config.block_size` is set to it).
    pub fn new(mut config: EngineConfig) -> Engine {
        config.block_size = config.scheme.block_size();
        let cache = PrefixCache::new(config.num_gpu_blocks.saturating_sub(1), config.block_size);
        Engine {
            config,
            cache,
            waiting: VecDeque::new(),
            running: Vec::new(),
            rejected: Vec::new(),
            counters: Counters::default(),
            ttft: Histogram::default(),
        }
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// A request arrives at the engine at virtual time `now` (seconds): it
    /// joins the waiting queue, or is refused (reported by the next step)
    /// when the cache could never hold it.
    pub fn submit(&mut self, now: f64, req: &SimRequest) {
        let bs = self.config.block_size;
        let output_len = req.output_len.max(1);
        // The last generated token is never fed back, so its KV is never
        // computed.
        let kv_tokens = req.prompt_len() + output_len as usize - 1;
        if req.prompt_len() == 0 || kv_tokens.div_ceil(bs) > self.cache.capacity() {
            self.rejected.push(req.id);
            return;
        }
        self.waiting.push_back(Seq {
            id: req.id,
            arrival: now,
            prompt_len: req.prompt_len(),
            output_len,
            tokens: req.tokens.to_vec(),
            hashes: (*req.hashes).clone(),
            holding: Holding::default(),
            computed: 0,
            generated: 0,
            resumed: false,
            prefilling: false,
        });
    }

    /// Whether anything is running or waiting (or a refusal is still to be
    /// reported).
    pub fn has_work(&self) -> bool {
        !self.running.is_empty() || !self.waiting.is_empty() || !self.rejected.is_empty()
    }

    /// Schedules and executes one engine step starting at `now`; its
    /// effects (tokens, finished requests, KV events) are what exists at
    /// `now + outcome.duration_s`. Returns duration 0 and empty lists when
    /// there is nothing to do. Never panics on any input state.
    pub fn step(&mut self, now: f64) -> StepOutcome {
        let mut out = StepOutcome {
            rejected: std::mem::take(&mut self.rejected),
            ..StepOutcome::default()
        };
        let scheduled = self.schedule(&mut out);
        if scheduled.is_empty() {
            // Nothing could run although requests wait: only possible if
            // the head can never fit; refuse it rather than stall.
            if self.running.is_empty()
                && let Some(seq) = self.waiting.pop_front()
            {
                out.rejected.push(seq.id);
            }
            return out;
        }
        let mut context = 0u64;
        for &(i, n) in &scheduled {
            let seq = &self.running[i];
            if seq.prefilling {
                out.prefill_tokens += n as u64;
            } else {
                out.decode_seqs += 1;
                context += seq.computed as u64;
            }
        }
        out.duration_s = self
            .config
            .cost
            .step_time(out.prefill_tokens, out.decode_seqs, context);
        let done_at = now + out.duration_s;
        self.update_after_step(&scheduled, done_at, &mut out);
        out
    }

    /// vLLM's `schedule()`: which requests compute how many tokens this
    /// step, as (index in `running`, tokens). Allocates, caches newly full
    /// blocks and advances `computed`.
    fn schedule(&mut self, out: &mut StepOutcome) -> Vec<(usize, usize)> {
        let bs = self.config.block_size;
        let max_tokens = self.config.max_num_batched_tokens.max(1) as usize;
        let max_seqs = self.config.max_num_seqs.max(1) as usize;
        let mut budget = max_tokens;
        let mut scheduled = Vec::new();
        let mut preempted_any = false;

        let mut i = 0;
        'running: while i < self.running.len() && budget > 0 {
            let n = self.running[i].remaining().min(budget);
            if n == 0 {
                i += 1;
                continue;
            }
            loop {
                let seq = &mut self.running[i];
                let target = seq.computed + n;
                if self.cache.allocate(&mut seq.holding, target).is_ok() {
                    break;
                }
                // Preempt the last admitted running request (FCFS).
                let Some(mut victim) = self.running.pop() else {
                    break 'running;
                };
                self.cache.free(std::mem::take(&mut victim.holding));
                victim.computed = 0;
                victim.resumed = true;
                victim.prefilling = false;
                out.preempted.push(victim.id);
                self.counters.preemptions += 1;
                preempted_any = true;
                let was_self = self.running.len() == i;
                self.waiting.push_front(victim);
                if was_self {
                    break 'running;
                }
            }
            let seq = &mut self.running[i];
            seq.computed += n;
            Self::cache_computed(&mut self.cache, seq, bs);
            scheduled.push((i, n));
            budget -= n;
            i += 1;
        }

        if preempted_any {
            return scheduled;
        }
        while budget > 0 && self.running.len() < max_seqs {
            let Some(seq) = self.waiting.front_mut() else {
                break;
            };
            let num_tokens = seq.tokens.len();
            let hit = self.cache.cached_prefix(&seq.hashes.hashes, num_tokens);
            let computed = hit * bs;
            let uncached = num_tokens.saturating_sub(computed);
            let n = if uncached <= budget {
                uncached
            } else if self.config.chunked_prefill {
                budget
            } else if budget == max_tokens {
                // Chunked prefill off: vLLM requires max_num_batched_tokens
                // >= max_model_len, so a prompt always fits an empty step;
                // here the budget may be smaller, so an empty step takes it
                // whole rather than never.
                uncached
            } else {
                break;
            };
            // Does it fit even if every hit block must leave the free queue?
            let new_blocks = (computed + n).div_ceil(bs).saturating_sub(hit);
            if new_blocks > self.cache.free_blocks() {
                break;
            }
            self.cache
                .touch_prefix(&mut seq.holding, &seq.hashes.hashes, hit);
            if self.cache.allocate(&mut seq.holding, computed + n).is_err() {
                // Undo the references (rare: hit blocks that were free and
                // are needed to fit).
                self.cache.free(std::mem::take(&mut seq.holding));
                break;
            }
            // Counted at admission, as vLLM does; resumed requests apart.
            if seq.resumed {
                self.counters.resumed_query_tokens += num_tokens as u64;
                self.counters.resumed_hit_tokens += computed as u64;
            } else {
                self.cache.record_lookup(num_tokens, hit);
            }
            seq.computed = computed + n;
            seq.prefilling = true;
            Self::cache_computed(&mut self.cache, seq, bs);
            let Some(seq) = self.waiting.pop_front() else {
                break;
            };
            self.running.push(seq);
            scheduled.push((self.running.len() - 1, n));
            budget = budget.saturating_sub(n);
        }
        scheduled
    }

    /// Caches the request's blocks that are now full of computed tokens.
    fn cache_computed(cache: &mut PrefixCache, seq: &mut Seq, bs: usize) {
        let full = (seq.computed / bs).min(seq.hashes.hashes.len());
        cache.cache_full(&mut seq.holding, &seq.hashes.hashes[..full], &seq.tokens);
    }

    /// vLLM's `update_from_output()`: every scheduled request that computed
    /// all its tokens samples one; finished requests free their blocks.
    fn update_after_step(
        &mut self,
        scheduled: &[(usize, usize)],
        done_at: f64,
        out: &mut StepOutcome,
    ) {
        let mut finished = Vec::new();
        for &(i, _) in scheduled {
            let seq = &mut self.running[i];
            if seq.remaining() > 0 {
                continue; // a prefill chunk: no token yet
            }
            seq.prefilling = false;
            seq.generated += 1;
            self.counters.generation_tokens += 1;
            if seq.generated == 1 {
                out.first_tokens.push(seq.id);
                self.ttft.observe(done_at - seq.arrival);
                self.counters.prompt_tokens += seq.prompt_len as u64;
            }
            if seq.generated >= seq.output_len {
                finished.push(i);
                continue;
            }
            seq.tokens.push(output_token(seq.id, seq.generated - 1));
            seq.hashes.extend(&self.config.scheme, &seq.tokens);
        }
        // Highest index first, so the others stay valid; then restore the
        // admission order of those left.
        finished.sort_unstable();
        for &i in finished.iter().rev() {
            let seq = self.running.remove(i);
            out.finished.push(seq.id);
            self.cache.free(seq.holding);
        }
        out.finished.reverse();
    }

    /// KV events produced by steps since the last call (one vLLM batch per
    /// step).
    pub fn take_events(&mut self) -> Vec<KvEvent> {
        self.cache.take_events()
    }

    pub fn metrics(&self) -> EngineMetrics {
        let stats = self.cache.stats();
        EngineMetrics {
            running: self.running.len() as u32,
            waiting: self.waiting.len() as u32,
            kv_usage: self.cache.usage(),
            prefix_cache_queries: stats.query_tokens,
            prefix_cache_hits: stats.hit_tokens,
            prompt_tokens: self.counters.prompt_tokens,
            generation_tokens: self.counters.generation_tokens,
            preemptions: self.counters.preemptions,
            num_gpu_blocks: u32::try_from(self.config.num_gpu_blocks).unwrap_or(u32::MAX),
            block_size: u32::try_from(self.config.block_size).unwrap_or(u32::MAX),
            ttft: self.ttft.clone(),
        }
    }

    /// Prefix-cache lookups of resumed (preempted) requests: (query tokens,
    /// hit tokens), which vLLM keeps out of the `prefix_cache_*` counters.
    pub fn resumed_lookups(&self) -> (u64, u64) {
        (
            self.counters.resumed_query_tokens,
            self.counters.resumed_hit_tokens,
        )
    }

    pub fn cache(&self) -> &PrefixCache {
        &self.cache
    }

    /// Full prompt blocks of `req` cached now (vLLM's cap applied).
    pub fn cached_blocks(&self, req: &SimRequest) -> usize {
        self.cache
            .cached_prefix(req.block_hashes(), req.prompt_len())
    }

    /// Prompt tokens still to prefill: waiting requests' uncached tokens
    /// (estimated against the cache now) + running requests' remainder.
    pub fn pending_prefill_tokens(&self) -> u64 {
        let bs = self.config.block_size;
        let waiting: usize = self
            .waiting
            .iter()
            .map(|s| {
                let hit = self.cache.cached_prefix(&s.hashes.hashes, s.tokens.len());
                s.tokens.len().saturating_sub(hit * bs)
            })
            .sum();
        let running: usize = self
            .running
            .iter()
            .filter(|s| s.prefilling)
            .map(Seq::remaining)
            .sum();
        (waiting + running) as u64
    }

    /// vLLM's `reset_prefix_cache`: drops every cached block no running
    /// request holds and publishes `AllBlocksCleared`.
    pub fn reset_prefix_cache(&mut self) {
        self.cache.reset();
    }

    /// Prometheus text of the metrics under vLLM's names.
    pub fn render_metrics(&self) -> String {
        self.metrics().render(&self.config.model_name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn config(blocks: usize, max_seqs: u32, budget: u32, chunked: bool) -> EngineConfig {
        let mut c = EngineConfig::llama31_8b_h100(0.9);
        c.num_gpu_blocks = blocks;
        c.max_num_seqs = max_seqs;
        c.max_num_batched_tokens = budget;
        c.chunked_prefill = chunked;
        c
    }

    /// Distinct prompts per `seed`: token i of prompt `seed`.
    fn prompt(seed: u32, len: usize) -> Vec<u32> {
        (0..len as u32)
            .map(|i| (seed * 7919 + i) % TOKEN_ID_LIMIT)
            .collect()
    }

    fn req(c: &EngineConfig, id: u64, arrival: f64, tokens: Vec<u32>, out: u32) -> SimRequest {
        SimRequest::new(id, arrival, tokens, out, None, &c.scheme)
    }

    #[derive(Default)]
    struct Run {
        ttft: HashMap<u64, f64>,
        finish: HashMap<u64, f64>,
        steps: Vec<StepOutcome>,
        events: Vec<KvEvent>,
        end: f64,
    }

    /// Drives `engine` through `reqs` (in arrival order) until idle, the
    /// way the fleet driver does: arrivals are submitted at step boundaries.
    fn run(engine: &mut Engine, reqs: &[SimRequest]) -> Run {
        let mut r = Run::default();
        let mut t = 0.0;
        let mut next = 0;
        for _ in 0..1_000_000 {
            while next < reqs.len() && reqs[next].arrival <= t {
                engine.submit(reqs[next].arrival, &reqs[next]);
                next += 1;
            }
            if !engine.has_work() {
                match reqs.get(next) {
                    Some(q) => {
                        t = q.arrival;
                        continue;
                    }
                    None => break,
                }
            }
            let o = engine.step(t);
            t += o.duration_s;
            for id in &o.first_tokens {
                let arrival = reqs.iter().find(|q| q.id == *id).map_or(0.0, |q| q.arrival);
                r.ttft.insert(*id, t - arrival);
            }
            for id in &o.finished {
                r.finish.insert(*id, t);
            }
            r.events.extend(engine.take_events());
            r.steps.push(o);
        }
        r.end = t;
        r
    }

    fn stored_blocks(events: &[KvEvent]) -> Vec<kvroute_core::events::BlockHash> {
        events
            .iter()
            .filter_map(|e| match e {
                KvEvent::BlockStored(s) => Some(s.block_hashes.clone()),
                _ => None,
            })
            .flatten()
            .collect()
    }

    #[test]
    fn default_config_is_vllms_h100_defaults() {
        let c = EngineConfig::llama31_8b_h100(0.9);
        assert_eq!(c.num_gpu_blocks, 27_725);
        assert_eq!(
            (c.block_size, c.max_num_seqs, c.max_num_batched_tokens),
            (16, 1024, 8192)
        );
        assert!(c.chunked_prefill);
        let e = Engine::new(c);
        assert_eq!(e.cache().capacity(), 27_724, "minus vLLM's null block");
    }

    #[test]
    fn idle_engine_steps_nothing() {
        let mut e = Engine::new(config(64, 8, 64, true));
        assert!(!e.has_work());
        let o = e.step(3.0);
        assert_eq!(o.duration_s, 0.0);
        assert!(o.first_tokens.is_empty() && o.finished.is_empty() && o.preempted.is_empty());
        assert!(e.take_events().is_empty());
    }

    #[test]
    fn ttft_of_a_lone_request_is_its_prefill_time() {
        let c = config(4096, 256, 8192, true);
        let cost = c.cost.clone();
        let mut e = Engine::new(c.clone());
        let r = run(&mut e, &[req(&c, 0, 0.5, prompt(1, 1000), 1)]);
        assert!((r.ttft[&0] - cost.step_time(1000, 0, 0)).abs() < 1e-12);
        assert_eq!(e.metrics().ttft.count, 1);
        assert!((e.metrics().ttft.sum - cost.step_time(1000, 0, 0)).abs() < 1e-12);

        // 20000 tokens in chunks of 8192, 8192 and 3616.
        let mut e = Engine::new(c.clone());
        let r = run(&mut e, &[req(&c, 0, 0.0, prompt(2, 20_000), 1)]);
        let chunks: Vec<u64> = r.steps.iter().map(|s| s.prefill_tokens).collect();
        assert_eq!(chunks, vec![8192, 8192, 3616]);
        let expected = 2.0 * cost.step_time(8192, 0, 0) + cost.step_time(3616, 0, 0);
        assert!((r.ttft[&0] - expected).abs() < 1e-12);
    }

    #[test]
    fn a_repeated_prompt_hits_all_but_its_last_block_and_counts_like_vllm() {
        let c = config(4096, 256, 8192, true);
        let cost = c.cost.clone();
        let mut e = Engine::new(c.clone());
        let tokens = prompt(3, 100);
        let first = req(&c, 0, 0.0, tokens.clone(), 1);
        let second = req(&c, 1, 10.0, tokens, 1);
        assert_eq!(e.cached_blocks(&second), 0);
        let r = run(&mut e, &[first, second.clone()]);
        // (100 - 1) / 16 = 6 blocks = 96 tokens hit; 4 tokens prefilled.
        assert_eq!(e.cached_blocks(&second), 6);
        assert_eq!(
            r.steps.iter().map(|s| s.prefill_tokens).collect::<Vec<_>>(),
            vec![100, 4]
        );
        assert!((r.ttft[&1] - cost.step_time(4, 0, 0)).abs() < 1e-12);
        let m = e.metrics();
        assert_eq!((m.prefix_cache_queries, m.prefix_cache_hits), (200, 96));
        assert_eq!((m.prompt_tokens, m.generation_tokens), (200, 2));
    }

    #[test]
    fn a_waiting_request_is_counted_once_at_admission() {
        // One running request at a time: the second waits through the
        // first's decode steps and is looked up once, when admitted.
        let c = config(4096, 1, 8192, true);
        let mut e = Engine::new(c.clone());
        let r = run(
            &mut e,
            &[
                req(&c, 0, 0.0, prompt(4, 50), 10),
                req(&c, 1, 0.0, prompt(5, 70), 1),
            ],
        );
        assert_eq!(
            r.steps.len(),
            11,
            "10 steps for the first, 1 for the second"
        );
        assert_eq!(e.metrics().prefix_cache_queries, 120);
    }

    #[test]
    fn max_num_seqs_caps_running() {
        let c = config(4096, 2, 8192, true);
        let mut e = Engine::new(c.clone());
        for id in 0..5 {
            e.submit(0.0, &req(&c, id, 0.0, prompt(id as u32, 30), 50));
        }
        let o = e.step(0.0);
        assert_eq!(o.prefill_tokens, 60);
        let m = e.metrics();
        assert_eq!((m.running, m.waiting), (2, 3));
        let o = e.step(o.duration_s);
        assert_eq!((o.prefill_tokens, o.decode_seqs), (0, 2));
        assert_eq!(e.metrics().running, 2);
    }

    #[test]
    fn chunked_prefill_on_and_off() {
        // A decodes while B (100 tokens) arrives; the budget is 64.
        let run_with = |chunked: bool| {
            let c = config(4096, 256, 64, chunked);
            let mut e = Engine::new(c.clone());
            e.submit(0.0, &req(&c, 0, 0.0, prompt(6, 10), 5));
            let first = e.step(0.0);
            assert_eq!(first.prefill_tokens, 10);
            e.submit(0.0, &req(&c, 1, 0.0, prompt(7, 100), 1));
            let mut steps = Vec::new();
            let mut t = first.duration_s;
            while e.has_work() {
                let o = e.step(t);
                t += o.duration_s;
                steps.push((o.prefill_tokens, o.decode_seqs, o.first_tokens.clone()));
            }
            steps
        };
        // On: B's prompt is split 63 + 37 around A's decode tokens.
        assert_eq!(
            run_with(true),
            vec![
                (63, 1, vec![]),
                (37, 1, vec![1]),
                (0, 1, vec![]),
                (0, 1, vec![])
            ]
        );
        // Off: B does not fit beside A's decode token and waits until A is
        // done; then an empty step takes it whole (vLLM sizes the budget to
        // the max model length when chunking is off).
        assert_eq!(
            run_with(false),
            vec![
                (0, 1, vec![]),
                (0, 1, vec![]),
                (0, 1, vec![]),
                (0, 1, vec![]),
                (100, 0, vec![1])
            ]
        );
    }

    #[test]
    fn decode_blocks_are_stored_with_the_chained_hashes() {
        let c = config(4096, 256, 8192, true);
        let mut e = Engine::new(c.clone());
        let tokens = prompt(8, 32);
        let r = run(&mut e, &[req(&c, 42, 0.0, tokens.clone(), 40)]);
        // 32 prompt + 39 fed-back tokens computed = 71: 4 full blocks, two of
        // them decode blocks.
        let stored = stored_blocks(&r.events);
        assert_eq!(stored.len(), 4);
        let mut all = tokens;
        all.extend((0..40).map(|k| output_token(42, k)));
        let mut chain = RequestHashes::new(&c.scheme);
        chain.extend(&c.scheme, &all[..64]);
        assert_eq!(stored, chain.hashes);
        assert_eq!(e.metrics().generation_tokens, 40);
        assert_eq!(r.finish.len(), 1);
    }

    #[test]
    fn a_tiny_cache_preempts_and_everything_still_finishes() {
        // 8 usable blocks; each request grows to ceil((40 + 29) / 16) = 5.
        let c = config(9, 256, 8192, true);
        let mut e = Engine::new(c.clone());
        let reqs: Vec<_> = (0..4)
            .map(|id| req(&c, id, 0.0, prompt(10 + id as u32, 40), 30))
            .collect();
        let r = run(&mut e, &reqs);
        let m = e.metrics();
        assert!(m.preemptions > 0, "8 blocks cannot hold four requests");
        let preempted: usize = r.steps.iter().map(|s| s.preempted.len()).sum();
        assert_eq!(preempted as u64, m.preemptions);
        assert_eq!(r.finish.len(), 4);
        assert_eq!(r.ttft.len(), 4);
        assert_eq!((m.generation_tokens, m.prompt_tokens), (120, 160));
        // New requests' lookups only; resumed ones are counted apart.
        assert_eq!(m.prefix_cache_queries, 160);
        assert!(e.resumed_lookups().0 > 0);
        assert_eq!((m.running, m.waiting), (0, 0));
        assert!((m.kv_usage - 0.0).abs() < 1e-12);
    }

    #[test]
    fn a_request_the_cache_cannot_hold_is_refused() {
        let c = config(5, 256, 8192, true);
        let mut e = Engine::new(c.clone());
        // 4 usable blocks of 16 = 64 KV tokens; 60 + 10 - 1 = 69 do not fit.
        e.submit(0.0, &req(&c, 7, 0.0, prompt(1, 60), 10));
        assert!(e.has_work());
        let o = e.step(0.0);
        assert_eq!((o.rejected.clone(), o.duration_s), (vec![7], 0.0));
        assert!(!e.has_work());
        e.submit(0.0, &req(&c, 8, 0.0, prompt(1, 60), 5));
        assert_eq!(e.step(0.0).first_tokens, vec![8]);
    }

    #[test]
    fn pending_prefill_counts_uncached_waiting_and_running_remainders() {
        let c = config(4096, 256, 64, true);
        let mut e = Engine::new(c.clone());
        run(&mut e, &[req(&c, 0, 0.0, prompt(20, 48), 1)]);
        // Now cached: 3 blocks of prompt 20. A 200-token prompt starting
        // with them, and a fresh 30-token one.
        let mut shared = prompt(20, 48);
        shared.extend(prompt(21, 152));
        e.submit(0.0, &req(&c, 1, 0.0, shared, 1));
        e.submit(0.0, &req(&c, 2, 0.0, prompt(22, 30), 1));
        assert_eq!(e.pending_prefill_tokens(), (200 - 48) + 30);
        // One step of 64 tokens goes to request 1.
        let o = e.step(0.0);
        assert_eq!(o.prefill_tokens, 64);
        assert_eq!(e.pending_prefill_tokens(), (152 - 64) + 30);
    }

    #[test]
    fn reset_clears_the_cache_and_publishes_it() {
        let c = config(4096, 256, 8192, true);
        let mut e = Engine::new(c.clone());
        let q = req(&c, 0, 0.0, prompt(30, 64), 1);
        run(&mut e, std::slice::from_ref(&q));
        assert_eq!(e.cached_blocks(&q), 3);
        e.reset_prefix_cache();
        assert_eq!(e.cached_blocks(&q), 0);
        assert!(matches!(
            e.take_events().last(),
            Some(KvEvent::AllBlocksCleared(_))
        ));
    }

    #[test]
    fn throughput_totals_add_up() {
        let c = config(27_725, 1024, 8192, true);
        let mut e = Engine::new(c.clone());
        let reqs: Vec<_> = (0..20)
            .map(|id| req(&c, id, 0.0, prompt(100 + id as u32, 1000), 10))
            .collect();
        let r = run(&mut e, &reqs);
        assert_eq!(r.finish.len(), 20);
        let prefill: u64 = r.steps.iter().map(|s| s.prefill_tokens).sum();
        let decode: u64 = r.steps.iter().map(|s| s.decode_seqs).sum();
        assert_eq!(prefill, 20_000, "distinct prompts: nothing hits");
        assert_eq!(decode, 20 * 9, "the first token comes from prefill");
        let m = e.metrics();
        assert_eq!((m.prompt_tokens, m.generation_tokens), (20_000, 200));
        assert_eq!((m.prefix_cache_queries, m.prefix_cache_hits), (20_000, 0));
        let busy: f64 = r.steps.iter().map(|s| s.duration_s).sum();
        assert!((busy - r.end).abs() < 1e-9, "always busy from t = 0");
        // 20000 prompt tokens need at least 20000 / 8192 steps of prefill.
        assert!(r.end >= 20_000.0 / c.cost.prefill_tokens_per_s(8192));
    }

    #[test]
    fn metrics_text_reads_like_vllms() {
        let c = config(4096, 256, 8192, true);
        let mut e = Engine::new(c.clone());
        let tokens = prompt(40, 100);
        run(&mut e, &[req(&c, 0, 0.0, tokens.clone(), 1)]);
        e.submit(1.0, &req(&c, 1, 1.0, tokens.clone(), 3));
        e.submit(1.0, &req(&c, 2, 1.0, tokens, 3));
        let text = e.render_metrics();
        let l = "model_name=\"meta-llama/Llama-3.1-8B-Instruct\",engine=\"0\"";
        for line in [
            format!("vllm:num_requests_running{{{l}}} 0.0"),
            format!("vllm:num_requests_waiting{{{l}}} 2.0"),
            format!("vllm:kv_cache_usage_perc{{{l}}} 0.0"),
            format!("vllm:prefix_cache_queries_total{{{l}}} 100.0"),
            format!("vllm:prefix_cache_hits_total{{{l}}} 0.0"),
            format!("vllm:generation_tokens_total{{{l}}} 1.0"),
            format!("vllm:time_to_first_token_seconds_bucket{{{l},le=\"0.001\"}} 0.0"),
            format!("vllm:time_to_first_token_seconds_bucket{{{l},le=\"0.04\"}} 1.0"),
            format!("vllm:time_to_first_token_seconds_bucket{{{l},le=\"+Inf\"}} 1.0"),
            format!("vllm:time_to_first_token_seconds_count{{{l}}} 1.0"),
            "vllm:cache_config_info{block_size=\"16\",cache_dtype=\"auto\",enable_prefix_caching=\"True\",engine=\"0\",num_gpu_blocks=\"4096\"} 1.0".to_string(),
        ] {
            assert!(text.lines().any(|x| x == line), "missing {line}\n{text}");
        }
        // The scorer's reading: name up to '{' or ' ', value after '}'.
        let mut read = HashMap::new();
        for line in text.lines().filter(|x| !x.starts_with('#')) {
            let name_end = line.find(['{', ' ']).unwrap_or(line.len());
            let rest = &line[name_end..];
            let rest = rest.find('}').map_or(rest, |i| &rest[i + 1..]);
            let v: f64 = rest.trim().parse().expect("a number after the labels");
            read.insert(&line[..name_end], v);
        }
        assert_eq!(read["vllm:num_requests_waiting"], 2.0);
        assert_eq!(read["vllm:num_requests_running"], 0.0);
        // A step admits both: one fresh 100-token lookup each.
        let o = e.step(1.0);
        assert_eq!(o.prefill_tokens, 4 + 4);
        let m = e.metrics();
        assert_eq!((m.running, m.waiting), (2, 0));
        assert_eq!((m.prefix_cache_queries, m.prefix_cache_hits), (300, 192));
        assert!(m.kv_usage > 0.0);
    }

    #[test]
    fn degenerate_configs_neither_panic_nor_stall() {
        // No usable block: everything is refused.
        let c = config(1, 0, 0, false);
        let mut e = Engine::new(c.clone());
        e.submit(0.0, &req(&c, 0, 0.0, prompt(1, 20), 3));
        assert_eq!(e.step(0.0).rejected, vec![0]);
        assert!(!e.has_work());
        // Zero seqs and zero budget act as one of each: one token a step.
        let c = config(64, 0, 0, true);
        let mut e = Engine::new(c.clone());
        let r = run(&mut e, &[req(&c, 0, 0.0, prompt(2, 5), 2)]);
        assert_eq!(
            r.steps.len(),
            6,
            "5 prompt tokens one by one, then 1 decode"
        );
        assert_eq!(r.finish.len(), 1);
    }

    #[test]
    fn output_tokens_are_deterministic_and_in_range() {
        assert_eq!(output_token(5, 3), output_token(5, 3));
        assert_ne!(output_token(5, 3), output_token(5, 4));
        assert_ne!(output_token(5, 3), output_token(6, 3));
        assert!((0..1000).all(|k| output_token(9, k) < TOKEN_ID_LIMIT));
    }
}

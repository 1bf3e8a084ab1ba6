//! The simulated cache's hit accounting against an independent calculation
//! on the Mooncake trace (`testdata/traces/`): round-robin over 8 and 16 pods with
//! unbounded caches, where the hit rate follows from the trace alone.
//!
//! The simulator hashes every 16-token block with vLLM's sha256_cbor chain
//! and looks the chain up in its block pool. The reference never hashes:
//! a trace hash id names a 512-token block with its whole prefix, so the
//! 16-token block `j` of id `h` is the same block wherever `(h, j)` occurs;
//! a pod holds it once any earlier request on that pod had at least
//! `(j + 1) * 16` tokens of `h`. A request hits its leading run of held
//! blocks, capped one token short of the prompt, as vLLM caps it.

use kvroute_core::keys::{HashScheme, KeyScheme};
use kvroute_sim::cache::{Holding, PrefixCache};
use kvroute_sim::hashing::RequestHashes;
use kvroute_sim::trace::{self, TRACE_BLOCK_TOKENS, TraceRequest};
use kvroute_testkit::test_env::testdata;
use std::collections::HashSet;

const BLOCK: usize = 16;

fn requests() -> Vec<TraceRequest> {
    let text = std::fs::read_to_string(testdata("traces/mooncake_synthetic_trace.jsonl"))
        .expect("the vendored trace");
    let all = trace::parse(&text).expect("the trace parses");
    assert_eq!(all.len(), 3_993, "the whole trace");
    all
}

/// Hit tokens per request, from the trace's ids alone.
fn reference(requests: &[TraceRequest], pods: usize) -> Vec<u64> {
    let mut held: Vec<HashSet<(u64, usize)>> = vec![HashSet::new(); pods];
    let per_id = TRACE_BLOCK_TOKENS / BLOCK;
    requests
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let pod = &mut held[i % pods];
            let blocks: Vec<(u64, usize)> = (0..r.input_length / BLOCK)
                .map(|b| (r.hash_ids[b / per_id], b % per_id))
                .collect();
            let cap = (r.input_length - 1) / BLOCK;
            let hit = blocks
                .iter()
                .take(cap)
                .take_while(|b| pod.contains(b))
                .count();
            pod.extend(blocks);
            (hit * BLOCK) as u64
        })
        .collect()
}

/// Round-robin over `pods` unbounded simulated caches; the hit rate.
fn simulate(requests: &[TraceRequest], hashed: &[(Vec<u32>, RequestHashes)], pods: usize) -> f64 {
    let most_tokens: usize = requests.iter().map(|r| r.input_length).sum();
    // Unbounded: every block of every request fits on any pod.
    let mut caches: Vec<PrefixCache> = (0..pods)
        .map(|_| PrefixCache::new(most_tokens / BLOCK + 1, BLOCK))
        .collect();
    let expected = reference(requests, pods);
    for (i, (tokens, hashes)) in hashed.iter().enumerate() {
        let cache = &mut caches[i % pods];
        let hit = cache.cached_prefix(&hashes.hashes, tokens.len());
        assert_eq!(
            (hit * BLOCK) as u64,
            expected[i],
            "{pods} pods: request {i} ({} tokens) on pod {}",
            tokens.len(),
            i % pods
        );
        cache.record_lookup(tokens.len(), hit);
        let mut holding = Holding::default();
        cache.touch_prefix(&mut holding, &hashes.hashes, hit);
        cache
            .allocate(&mut holding, tokens.len())
            .expect("unbounded");
        cache.cache_full(&mut holding, &hashes.hashes, tokens);
        cache.free(holding);
    }
    let hits: u64 = caches.iter().map(|p| p.stats().hit_tokens).sum();
    let queries: u64 = caches.iter().map(|p| p.stats().query_tokens).sum();
    assert_eq!(
        queries,
        requests.iter().map(|r| r.input_length as u64).sum::<u64>()
    );
    assert_eq!(hits, expected.iter().sum::<u64>(), "{pods} pods");
    assert!(
        caches.iter().all(|p| p.stats().evicted_blocks == 0),
        "unbounded"
    );
    hits as f64 / queries as f64
}

#[test]
fn round_robin_unbounded_hit_tokens_match_the_trace() {
    let requests = requests();
    let scheme = KeyScheme::new(HashScheme::Sha256Cbor, "vllm-none-hash", BLOCK).expect("scheme");
    let hashed: Vec<(Vec<u32>, RequestHashes)> = requests
        .iter()
        .map(|r| {
            let tokens = r.tokens();
            let mut h = RequestHashes::new(&scheme);
            h.extend(&scheme, &tokens);
            (tokens, h)
        })
        .collect();
    // The trace's README: 0.231 (8 pods) and 0.138 (16 pods), counting
    // whole 512-token blocks; 16-token blocks and vLLM's one-token cap land
    // on the same figures to three places.
    for (pods, published) in [(8, 0.231), (16, 0.138)] {
        let rate = simulate(&requests, &hashed, pods);
        println!("round-robin, {pods} pods, unbounded: hit rate {rate:.4} (README {published})");
        assert!(
            (rate - published).abs() < 0.0015,
            "{pods} pods: hit rate {rate}"
        );
    }
}

//! Builders shared by the peer policies' tests.

use super::{PodIndex, Policy, Scrape, Signals};
use crate::request::SimRequest;
use kvroute_core::events::{BlockStored, KvEvent};
use kvroute_core::keys::{HashScheme, KeyScheme};

pub fn scheme() -> KeyScheme {
    KeyScheme::new(HashScheme::Sha256Cbor, "0", 16).expect("valid key scheme")
}

/// A request with tokens `start..start + len` (distinct starts give
/// unrelated prompts; a shared start gives a shared prefix).
pub fn req_range(id: u64, start: u32, len: u32) -> SimRequest {
    req_tokens(id, (start..start + len).collect())
}

pub fn req_tokens(id: u64, tokens: Vec<u32>) -> SimRequest {
    SimRequest::new(id, 0.0, tokens, 8, None, &scheme())
}

/// `BlockStored` for the first `blocks` full blocks of `req`.
pub fn stored_prefix(req: &SimRequest, blocks: usize) -> KvEvent {
    KvEvent::BlockStored(BlockStored {
        block_hashes: req.block_hashes()[..blocks].to_vec(),
        parent_block_hash: None,
        token_ids: req.tokens[..blocks * 16].to_vec(),
        block_size: 16,
        ..BlockStored::default()
    })
}

/// Scrapes with the given (waiting, kv usage) per pod.
pub fn scrapes(gauges: &[(u32, f64)]) -> Vec<Option<Scrape>> {
    gauges
        .iter()
        .map(|&(waiting, kv_usage)| {
            Some(Scrape {
                waiting,
                kv_usage,
                num_gpu_blocks: 1000,
                block_size: 16,
                ..Scrape::default()
            })
        })
        .collect()
}

pub fn signals(now: f64, scrapes: &[Option<Scrape>]) -> Signals<'_> {
    Signals {
        now,
        scrapes,
        truth: None,
    }
}

/// Routes `req` at `now` and dispatches it where the policy chose.
pub fn route_dispatch(
    p: &mut dyn Policy,
    req: &SimRequest,
    now: f64,
    scrapes: &[Option<Scrape>],
) -> PodIndex {
    let pod = p.route(req, &signals(now, scrapes));
    p.on_dispatch(now, req, pod);
    pod
}

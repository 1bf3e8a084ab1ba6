//! Events -> index operations: the ingester's keying stage.
//!
//! The ingester never trusts that vLLM's block hash is the router key (vLLM's
//! default `sha256` and `xxhash` cannot be reproduced outside Python, LoRA adds
//! keys a router cannot know). It keys every stored block itself from the
//! event's token ids, chained from the parent's chain state, and records the
//! engine hash next to the key so removals and later `parent_block_hash`
//! references resolve.
//!
//! Chain states (not just keys: `sha256_cbor` chains on the full 32-byte
//! digest) are remembered per `(model, engine hash)` in a bounded cache shared
//! by all workers. A parent missing from it (evicted, or stored before this
//! ingester started) is recovered from the engine hash itself when the pod's
//! hashes have been agreeing with our keys and the hash carries the full state
//! (an int under `sha256_cbor_64bit`, a 32-byte digest under `sha256_cbor`);
//! otherwise the blocks cannot be keyed and are counted as orphans.
//!
//! The same cache resolves `BlockRemoved`: a removed engine hash whose chain
//! state is remembered becomes a removal by block key, so the index need not
//! read the `engine:` mapping (one GET wave per write saved). Only hashes the
//! cache has forgotten go to the index by engine hash. Both ways name the
//! same block: the cache and the `engine:` mapping are written from the same
//! store, and when the index has since dropped its mapping (the block lost its
//! last holder) the removal is a no-op either way.

use kvroute_core::events::{BlockHash, BlockStored, KvEvent};
use kvroute_core::ids::{EngineHash, ModelName, PodId};
use kvroute_core::index::{BlockRef, IndexOp, StoredBlock};
use kvroute_core::keys::{ChainState, ExtraKeys, HashScheme, KeyScheme};
use moka::sync::Cache;

/// Why blocks of an event could not be keyed; metric label via `as_label`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unkeyed {
    /// The parent's chain state is unknown.
    OrphanParent,
    /// The event's block size differs from the configured one.
    BlockSizeMismatch,
    /// Fewer token ids than `block_hashes.len() * block_size`.
    MissingTokens,
}

impl Unkeyed {
    pub fn as_label(self) -> &'static str {
        match self {
            Unkeyed::OrphanParent => "orphan_parent",
            Unkeyed::BlockSizeMismatch => "block_size_mismatch",
            Unkeyed::MissingTokens => "missing_tokens",
        }
    }
}

/// What keying one event produced besides its operation.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct KeyOutcome {
    /// Blocks whose engine hash equals the computed key.
    pub agree: u64,
    /// Blocks whose engine hash differs from the computed key.
    pub disagree: u64,
    /// Blocks that could not be keyed, and why.
    pub unkeyed: Option<(Unkeyed, u64)>,
    /// Removed blocks whose key the chain cache knew (removed by key).
    pub removals_cached: u64,
    /// Removed blocks left for the index to resolve by engine hash.
    pub removals_uncached: u64,
}

/// The keying stage: a key scheme plus the shared chain-state cache.
#[derive(Clone)]
pub struct Keyer {
    scheme: KeyScheme,
    chains: Cache<(ModelName, EngineHash), ChainState>,
}

impl Keyer {
    /// `chain_capacity` bounds the remembered chain states (~350 bytes of
    /// resident memory each, `examples/chain_cache_rss.rs`).
    pub fn new(scheme: KeyScheme, chain_capacity: u64) -> Self {
        Keyer {
            scheme,
            chains: Cache::new(chain_capacity),
        }
    }

    pub fn scheme(&self) -> &KeyScheme {
        &self.scheme
    }

    /// Turns one event of `pod` into an index operation (none when nothing
    /// can be keyed). `trust_engine_hashes` says whether this pod's hashes
    /// have agreed with our keys so far (used to recover unknown parents).
    pub fn key_event(
        &self,
        pod: &PodId,
        model: &ModelName,
        event: &KvEvent,
        trust_engine_hashes: bool,
    ) -> (Option<IndexOp>, KeyOutcome) {
        match event {
            KvEvent::BlockStored(ev) => self.key_stored(pod, model, ev, trust_engine_hashes),
            KvEvent::BlockRemoved(ev) => {
                let mut outcome = KeyOutcome::default();
                let blocks = ev
                    .engine_hashes()
                    .map(|e| match self.chains.get(&(model.clone(), e)) {
                        Some(state) => {
                            outcome.removals_cached += 1;
                            BlockRef::Key(state.key())
                        }
                        None => {
                            outcome.removals_uncached += 1;
                            BlockRef::Engine(e)
                        }
                    })
                    .collect();
                let op = IndexOp::Remove {
                    model: model.clone(),
                    pod: pod.clone(),
                    tier: ev.medium.clone().unwrap_or_default(),
                    blocks,
                };
                (Some(op), outcome)
            }
            // A medium-specific clear is rare (one offloading tier reset);
            // clearing the whole pod is the safe superset: a missing entry
            // costs a miss, a stale one misroutes.
            KvEvent::AllBlocksCleared(_) => (
                Some(IndexOp::ClearPod { pod: pod.clone() }),
                KeyOutcome::default(),
            ),
        }
    }

    fn key_stored(
        &self,
        pod: &PodId,
        model: &ModelName,
        ev: &BlockStored,
        trust_engine_hashes: bool,
    ) -> (Option<IndexOp>, KeyOutcome) {
        let n = ev.block_hashes.len() as u64;
        let bs = self.scheme.block_size();
        let unkeyed = |why| {
            (
                None,
                KeyOutcome {
                    unkeyed: Some((why, n)),
                    ..Default::default()
                },
            )
        };
        if ev.block_size as usize != bs {
            return unkeyed(Unkeyed::BlockSizeMismatch);
        }
        if ev.token_ids.len() < ev.block_hashes.len() * bs {
            return unkeyed(Unkeyed::MissingTokens);
        }
        let (parent, first_index) = match &ev.parent_block_hash {
            None => (self.scheme.root(), 0),
            Some(h) => match self.parent_state(model, h, trust_engine_hashes) {
                Some(state) => (state, 1),
                None => return unkeyed(Unkeyed::OrphanParent),
            },
        };
        let salt = cache_salt(ev);
        let extra = ExtraKeys {
            lora: ev.lora_name.as_deref(),
            cache_salt: if first_index == 0 {
                salt.as_deref()
            } else {
                None
            },
        };
        let tokens = &ev.token_ids[..ev.block_hashes.len() * bs];
        let mut blocks = Vec::with_capacity(ev.block_hashes.len());
        let mut outcome = KeyOutcome::default();
        let mut hashes = ev.engine_hashes();
        self.scheme
            .chain(parent, first_index, tokens, extra, |state| {
                let key = state.key();
                // chain() yields exactly one state per hash: tokens were cut to
                // block_hashes.len() full blocks above.
                let engine = hashes.next().unwrap_or(EngineHash(key.0));
                if engine.0 == key.0 {
                    outcome.agree += 1;
                } else {
                    outcome.disagree += 1;
                }
                self.chains.insert((model.clone(), engine), *state);
                blocks.push(StoredBlock {
                    key,
                    engine: Some(engine),
                });
            });
        let op = IndexOp::Store {
            model: model.clone(),
            pod: pod.clone(),
            tier: ev.tier(),
            blocks,
        };
        (Some(op), outcome)
    }

    fn parent_state(
        &self,
        model: &ModelName,
        parent: &BlockHash,
        trust: bool,
    ) -> Option<ChainState> {
        if let Some(state) = self.chains.get(&(model.clone(), parent.engine())) {
            return Some(state);
        }
        if !trust {
            return None;
        }
        match (self.scheme.scheme(), parent) {
            (HashScheme::Sha256Cbor64, BlockHash::U64(v)) => Some(ChainState::U64(*v)),
            (HashScheme::Sha256Cbor64, BlockHash::I64(v)) => Some(ChainState::U64(*v as u64)),
            (HashScheme::Sha256Cbor, BlockHash::Bytes32(d)) => Some(ChainState::Digest(*d)),
            _ => None,
        }
    }

    /// Diagnoses a disagreement: whether the engine's hashes match our
    /// configuration with the other chain scheme (a common misconfiguration
    /// after a vLLM upgrade). Only called once per pod.
    pub fn diagnose(&self, ev: &BlockStored) -> Option<HashScheme> {
        if ev.parent_block_hash.is_some() {
            return None;
        }
        let first = ev.block_hashes.first()?.engine();
        let bs = self.scheme.block_size();
        let tokens = ev.token_ids.get(..bs)?;
        let other = match self.scheme.scheme() {
            HashScheme::Sha256Cbor => HashScheme::Sha256Cbor64,
            HashScheme::Sha256Cbor64 => HashScheme::Sha256Cbor,
        };
        let scheme = KeyScheme::new(other, self.scheme.seed(), bs).ok()?;
        let salt = cache_salt(ev);
        let extra = ExtraKeys {
            lora: ev.lora_name.as_deref(),
            cache_salt: salt.as_deref(),
        };
        let key = scheme.block_keys(tokens, extra).first().copied()?;
        (key.0 == first.0).then_some(other)
    }
}

/// vLLM puts the cache salt last in block 0's extra keys, after the LoRA key.
fn cache_salt(ev: &BlockStored) -> Option<String> {
    let first = ev.extra_keys.as_ref()?.first()?.as_ref()?;
    let last = first.last()?.as_str()?;
    if Some(last) == ev.lora_name.as_deref() {
        None
    } else {
        Some(last.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvroute_core::events::decode_batch;
    use kvroute_core::ids::Tier;

    /// The payloads vLLM's own code produced (seed "42", block size 16).
    fn payload(file: &str, name: &str) -> Vec<KvEvent> {
        let path = kvroute_testkit::test_env::testdata("vllm").join(file);
        let text = std::fs::read_to_string(&path).expect("testdata/vllm in the checkout");
        let json: serde_json::Value = serde_json::from_str(&text).expect("json");
        let entry = json["event_payloads"]
            .as_array()
            .expect("payloads")
            .iter()
            .find(|p| p["name"] == name && p["data_parallel_rank"].is_null())
            .expect("payload by name");
        let bytes = hex::decode(entry["msgpack_hex"].as_str().expect("hex")).expect("hex");
        decode_batch(&bytes).expect("decodes").events
    }

    fn keyer(scheme: HashScheme) -> Keyer {
        Keyer::new(KeyScheme::new(scheme, "42", 16).expect("scheme"), 10_000)
    }

    fn stored_keys(op: &Option<IndexOp>) -> Vec<u64> {
        match op {
            Some(IndexOp::Store { blocks, .. }) => blocks.iter().map(|b| b.key.0).collect(),
            other => panic!("expected a store, got {other:?}"),
        }
    }

    #[test]
    fn vllm_chains_key_to_their_own_hashes_and_continue_from_parents() {
        for (file, scheme) in [
            ("vllm-0.10.0.json", HashScheme::Sha256Cbor64),
            ("vllm-0.33.0.json", HashScheme::Sha256Cbor),
        ] {
            let k = keyer(scheme);
            let (pod, model) = (PodId::new("127.0.0.11:8000"), ModelName::new("m"));
            let first = payload(file, "stored_int_hashes");
            let (op, out) = k.key_event(&pod, &model, &first[0], false);
            assert_eq!(out.agree, 3, "{file}");
            assert_eq!(out.disagree, 0);
            let all = stored_keys(&op);
            // The continuation names block 0 as parent: found in the chain cache.
            let cont = payload(file, "stored_with_parent_and_medium");
            let (op, out) = k.key_event(&pod, &model, &cont[0], false);
            assert_eq!(out.agree, 2, "{file}");
            assert_eq!(stored_keys(&op), all[1..].to_vec());
            if let Some(IndexOp::Store { tier, .. }) = &op {
                let expect = if file.contains("0.33") {
                    Tier::cpu()
                } else {
                    Tier::gpu()
                };
                assert_eq!(*tier, expect);
            }
        }
    }

    #[test]
    fn unknown_parent_is_recovered_only_from_trusted_full_state_hashes() {
        let (pod, model) = (PodId::new("127.0.0.11:8000"), ModelName::new("m"));
        let cont = payload("vllm-0.10.0.json", "stored_with_parent_and_medium");
        let k = keyer(HashScheme::Sha256Cbor64);
        let (op, out) = k.key_event(&pod, &model, &cont[0], false);
        assert!(op.is_none());
        assert_eq!(out.unkeyed, Some((Unkeyed::OrphanParent, 2)));
        let (op, out) = k.key_event(&pod, &model, &cont[0], true);
        assert_eq!(out.agree, 2);
        assert!(op.is_some());
        // Under sha256_cbor an int parent is only the lower 64 bits: never enough.
        let cont = payload("vllm-0.33.0.json", "stored_with_parent_and_medium");
        let k = keyer(HashScheme::Sha256Cbor);
        let (op, _) = k.key_event(&pod, &model, &cont[0], true);
        assert!(op.is_none());
    }

    #[test]
    fn lora_blocks_disagree_and_removals_and_clears_map_through() {
        let (pod, model) = (PodId::new("127.0.0.11:8000"), ModelName::new("m"));
        let k = keyer(HashScheme::Sha256Cbor);
        let lora = payload("vllm-0.33.0.json", "stored_lora_extra_keys");
        let (op, out) = k.key_event(&pod, &model, &lora[0], false);
        assert_eq!(out.disagree, 3);
        let expect = k.scheme().block_keys(
            &(100..148).collect::<Vec<u32>>(),
            ExtraKeys::lora("adapter-a"),
        );
        assert_eq!(
            stored_keys(&op),
            expect.iter().map(|b| b.0).collect::<Vec<_>>()
        );
        let removed = payload("vllm-0.33.0.json", "removed");
        let (op, _) = k.key_event(&pod, &model, &removed[0], false);
        assert!(matches!(op, Some(IndexOp::Remove { ref blocks, .. }) if blocks.len() == 2));
        let cleared = payload("vllm-0.33.0.json", "cleared");
        let (op, _) = k.key_event(&pod, &model, &cleared[0], false);
        assert_eq!(op, Some(IndexOp::ClearPod { pod }));
    }

    #[test]
    fn removals_resolve_through_the_chain_cache_when_it_knows_the_hash() {
        let (pod, model) = (PodId::new("127.0.0.11:8000"), ModelName::new("m"));
        let k = keyer(HashScheme::Sha256Cbor);
        // LoRA blocks: engine hashes differ from keys, so only a mapping
        // (cache or index) can turn them into keys.
        let lora = payload("vllm-0.33.0.json", "stored_lora_extra_keys");
        let KvEvent::BlockStored(stored) = &lora[0] else {
            panic!("stored")
        };
        let (op, _) = k.key_event(&pod, &model, &lora[0], false);
        let keys = stored_keys(&op);
        let mut hashes = stored.block_hashes.clone();
        hashes.push(BlockHash::U64(7)); // never stored: left to the index
        let removed = KvEvent::BlockRemoved(kvroute_core::events::BlockRemoved {
            block_hashes: hashes,
            medium: None,
        });
        let (op, out) = k.key_event(&pod, &model, &removed, false);
        assert_eq!((out.removals_cached, out.removals_uncached), (3, 1));
        let Some(IndexOp::Remove { blocks, .. }) = op else {
            panic!("remove expected, got {op:?}")
        };
        let mut expect: Vec<BlockRef> = keys
            .iter()
            .map(|&key| BlockRef::Key(kvroute_core::ids::BlockKey(key)))
            .collect();
        expect.push(BlockRef::Engine(EngineHash(7)));
        assert_eq!(blocks, expect);
        // Another model's removal of the same hashes: not this model's chain.
        let (_, out) = k.key_event(&pod, &ModelName::new("other"), &removed, false);
        assert_eq!((out.removals_cached, out.removals_uncached), (0, 4));
    }

    #[test]
    fn diagnose_names_the_other_scheme() {
        let stored = payload("vllm-0.10.0.json", "stored_int_hashes");
        let KvEvent::BlockStored(ev) = &stored[0] else {
            panic!("stored")
        };
        assert_eq!(
            keyer(HashScheme::Sha256Cbor).diagnose(ev),
            Some(HashScheme::Sha256Cbor64)
        );
        assert_eq!(keyer(HashScheme::Sha256Cbor64).diagnose(ev), None);
    }

    #[test]
    fn block_size_mismatch_is_counted() {
        let (pod, model) = (PodId::new("127.0.0.11:8000"), ModelName::new("m"));
        let k = Keyer::new(
            KeyScheme::new(HashScheme::Sha256Cbor, "42", 32).expect("scheme"),
            10,
        );
        let stored = payload("vllm-0.33.0.json", "stored_int_hashes");
        let (op, out) = k.key_event(&pod, &model, &stored[0], false);
        assert!(op.is_none());
        assert_eq!(out.unkeyed, Some((Unkeyed::BlockSizeMismatch, 3)));
    }
}

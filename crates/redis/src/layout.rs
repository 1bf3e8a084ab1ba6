//! Key and field names of the Redis layout (version 1), and their parsers.
//!
//! Read by llm-d and by operators with `redis-cli`:
//! - `<model>@<key>`: HASH, one field `<pod-id>@<tier>` per holder. The value
//!   is the empty string: nobody reads it, and an empty value keeps the
//!   listpack entry (and `MEMORY USAGE`) as small as the layout allows.
//! - `engine:<model>@<engine hash>`: STRING -> `<model>@<key>`, only where the
//!   engine hash differs from the key; deleted with the block's last holder.
//!
//! kvroute's own bookkeeping, all under `kvroute:`; `{tag}` is the tag of the
//! block key's slot ([`super::slots::tag_for_slot`]), so a script can change
//! the block and its bookkeeping atomically even on Redis Cluster:
//! - `kvroute:{tag}:pod:<pod-id>`: HASH, field `<tier>|<model>@<key>` (value
//!   empty) for every block that pod holds in that slot, so clearing a pod
//!   needs no SCAN. A HASH rather than a SET because Redis 7.0 keeps small
//!   hashes as listpacks but stores every set of strings as a hashtable, which
//!   costs about twice the bytes per entry.
//! - `kvroute:{tag}:engine`: HASH `<model>@<key>` -> engine hash, the reverse
//!   of the `engine:` mapping, so deleting a block knows which `engine:` key
//!   to delete.
//! - `kvroute:pod:<pod-id>:slots`: SET of the tags where the pod has (or had)
//!   data; only ever grows, so a store racing with a clear can never lose its
//!   registration (see `apply.rs`).
//! - `kvroute:pods`: SET of pod ids ever stored; `kvroute:layout`: "1".

use kvroute_core::ids::{BlockKey, EngineHash, ModelName, PodId, Tier};

/// The layout version this code writes and reads.
pub const LAYOUT_VERSION: &str = "1";
/// Holds [`LAYOUT_VERSION`]; written at connect when absent.
pub const LAYOUT_KEY: &str = "kvroute:layout";
/// SET of every pod id that ever stored a block.
pub const PODS_KEY: &str = "kvroute:pods";

/// Separates tier and block name in a per-slot pod entry
/// (`<tier>|<model>@<key>`, written by the scripts). Tiers may not contain it
/// ([`check_tier`]).
const MEMBER_SEPARATOR: char = '|';

/// `<model>@<key>`: the block's HASH.
pub fn block_key(model: &ModelName, key: BlockKey) -> String {
    format!("{model}@{key}")
}

/// `engine:<model>@<engine hash>`: the engine-hash -> block-key mapping.
pub fn engine_key(model: &ModelName, engine: EngineHash) -> String {
    format!("engine:{model}@{engine}")
}

/// `<pod-id>@<tier>`: a holder's field in a block HASH.
pub fn field(pod: &PodId, tier: &Tier) -> String {
    format!("{pod}@{tier}")
}

/// `kvroute:{tag}:pod:<pod-id>`: what `pod` holds in the slot of `tag`.
pub fn pod_slot_key(tag: &str, pod: &PodId) -> String {
    format!("kvroute:{{{tag}}}:pod:{pod}")
}

/// `kvroute:{tag}:engine`: reverse engine mappings of the blocks in the slot of `tag`.
pub fn engine_rev_key(tag: &str) -> String {
    format!("kvroute:{{{tag}}}:engine")
}

/// `kvroute:pod:<pod-id>:slots`: tags where `pod` has stored data.
pub fn pod_slots_key(pod: &PodId) -> String {
    format!("kvroute:pod:{pod}:slots")
}

/// Splits a holder field on its LAST `@` into (pod id, tier): pod ids contain
/// `:` and may contain `@`, tiers contain neither. `None` for a malformed
/// field (no `@`, empty pod or tier, not UTF-8).
pub fn parse_field(field: &[u8]) -> Option<(&str, &str)> {
    let s = std::str::from_utf8(field).ok()?;
    let (pod, tier) = s.rsplit_once('@')?;
    (!pod.is_empty() && !tier.is_empty()).then_some((pod, tier))
}

/// Splits a per-slot pod entry into (tier, block key name).
pub fn parse_member(member: &str) -> Option<(&str, &str)> {
    let (tier, block) = member.split_once(MEMBER_SEPARATOR)?;
    (!tier.is_empty() && parse_block_key(block).is_some()).then_some((tier, block))
}

/// Splits `<model>@<key>` into the model and the key.
pub fn parse_block_key(name: &str) -> Option<(&str, BlockKey)> {
    let (model, key) = name.rsplit_once('@')?;
    let key = key.parse::<u64>().ok()?;
    (!model.is_empty()).then_some((model, BlockKey(key)))
}

/// Why an operation cannot be written in this layout.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    #[error("tier {0:?} cannot be stored: it must be non-empty and contain neither '@' nor '|'")]
    Tier(String),
    #[error("pod id {0:?} cannot be stored: it must be non-empty")]
    Pod(String),
    #[error("model name {0:?} cannot be stored: it must be non-empty")]
    Model(String),
}

/// A tier ends a holder field (split on the last `@`, as llm-d does) and
/// starts a pod entry (split on the first `|`), so it may contain neither.
pub fn check_tier(tier: &Tier) -> Result<(), LayoutError> {
    let t = tier.as_str();
    if t.is_empty() || t.contains('@') || t.contains(MEMBER_SEPARATOR) {
        return Err(LayoutError::Tier(t.to_owned()));
    }
    Ok(())
}

/// Pod ids only need to be non-empty: fields are split on their last `@`.
pub fn check_pod(pod: &PodId) -> Result<(), LayoutError> {
    if pod.as_str().is_empty() {
        return Err(LayoutError::Pod(pod.to_string()));
    }
    Ok(())
}

/// Model names only need to be non-empty: block key names are split on
/// their last `@`.
pub fn check_model(model: &ModelName) -> Result<(), LayoutError> {
    if model.as_str().is_empty() {
        return Err(LayoutError::Model(model.to_string()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_llm_d_layout() {
        let m = ModelName::new("meta-llama/Llama-3.1-8B");
        let pod = PodId::with_rank("127.0.0.7:8000", Some(1));
        assert_eq!(
            block_key(&m, BlockKey(u64::MAX)),
            "meta-llama/Llama-3.1-8B@18446744073709551615"
        );
        assert_eq!(
            engine_key(&m, EngineHash(42)),
            "engine:meta-llama/Llama-3.1-8B@42"
        );
        assert_eq!(field(&pod, &Tier::gpu()), "127.0.0.7:8000#dp1@gpu");
        assert_eq!(
            pod_slot_key("a1", &pod),
            "kvroute:{a1}:pod:127.0.0.7:8000#dp1"
        );
        assert_eq!(engine_rev_key("a1"), "kvroute:{a1}:engine");
        assert_eq!(pod_slots_key(&pod), "kvroute:pod:127.0.0.7:8000#dp1:slots");
    }

    #[test]
    fn fields_split_on_the_last_at() {
        assert_eq!(
            parse_field(b"127.0.0.7:8000@gpu"),
            Some(("127.0.0.7:8000", "gpu"))
        );
        assert_eq!(
            parse_field(b"user@host:8000@cpu"),
            Some(("user@host:8000", "cpu"))
        );
        assert_eq!(
            parse_field(b"127.0.0.7:8000#dp3@gpu"),
            Some(("127.0.0.7:8000#dp3", "gpu"))
        );
        assert_eq!(parse_field(b"no-tier"), None);
        assert_eq!(parse_field(b"@gpu"), None);
        assert_eq!(parse_field(b"pod@"), None);
        assert_eq!(parse_field(&[0xff, b'@', b'g']), None);
    }

    #[test]
    fn members_and_block_names_parse() {
        assert_eq!(parse_member("gpu|m@7"), Some(("gpu", "m@7")));
        assert_eq!(parse_member("gpu|org/m|x@7"), Some(("gpu", "org/m|x@7")));
        assert_eq!(parse_member("gpu|m@x"), None);
        assert_eq!(parse_member("|m@7"), None);
        assert_eq!(parse_member("gpu"), None);
        assert_eq!(
            parse_block_key("a@b@18446744073709551615"),
            Some(("a@b", BlockKey(u64::MAX)))
        );
        assert_eq!(parse_block_key("@1"), None);
        assert_eq!(parse_block_key("m@-1"), None);
    }

    #[test]
    fn tiers_with_separators_are_rejected() {
        assert!(check_tier(&Tier::gpu()).is_ok());
        assert!(check_tier(&Tier::new("disk@x")).is_err());
        assert!(check_tier(&Tier::new("a|b")).is_err());
        assert!(check_tier(&Tier::new("")).is_err());
        assert!(check_pod(&PodId::new("")).is_err());
        assert!(check_model(&ModelName::new("")).is_err());
    }
}

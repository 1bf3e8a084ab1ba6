//! Redis Cluster hash slots, computed client-side, and the per-slot `{tag}`
//! that names kvroute's bookkeeping keys.
//!
//! Block keys (`<model>@<key>`) carry no hash tag (llm-d's layout), so their
//! slot is wherever CRC16 puts them. Bookkeeping that must change in the same
//! script call as a block key (the pod's per-slot list of blocks, the reverse
//! engine mapping) is named `kvroute:{tag}:...` with a `tag` chosen so that
//! `CRC16(tag) % 16384` is that block key's slot. [`tag_for_slot`] returns the
//! shortest such tag; the table is built once per process in about a
//! millisecond and is identical in every process (it is part of layout
//! version 1: changing the enumeration order renames every bookkeeping key).

use std::sync::OnceLock;

/// Number of hash slots in Redis Cluster.
pub const SLOT_COUNT: u16 = 16384;

/// Characters tags are made of, in enumeration order. Alphanumerics only, so a
/// tag never contains `{`, `}` or a separator used elsewhere in key names.
const TAG_ALPHABET: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";

/// Longest tag ever needed: the 36 + 36^2 + 36^3 strings of length <= 3 leave
/// a few hundred slots uncovered, length 4 covers them (pinned by a test).
const MAX_TAG_LEN: usize = 4;

/// CRC16-CCITT (XMODEM: polynomial 0x1021, initial value 0, no reflection), the
/// checksum Redis Cluster uses for key slots.
const CRC16_TABLE: [u16; 256] = crc16_table();

const fn crc16_table() -> [u16; 256] {
    let mut table = [0u16; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = (i as u16) << 8;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
            bit += 1;
        }
        table[i] = crc;
        i += 1;
    }
    table
}

/// CRC16-XMODEM of `bytes`.
pub fn crc16(bytes: &[u8]) -> u16 {
    bytes.iter().fold(0u16, |crc, &b| {
        (crc << 8) ^ CRC16_TABLE[usize::from(((crc >> 8) as u8) ^ b)]
    })
}

/// The part of a key Redis hashes: the content of the first `{...}` when it
/// is non-empty, else the whole key (Redis Cluster specification).
fn hashed_part(key: &[u8]) -> &[u8] {
    if let Some(open) = key.iter().position(|&b| b == b'{')
        && let Some(len) = key[open + 1..].iter().position(|&b| b == b'}')
        && len > 0
    {
        return &key[open + 1..open + 1 + len];
    }
    key
}

/// The cluster slot of a key, exactly as Redis computes it.
pub fn key_slot(key: &[u8]) -> u16 {
    crc16(hashed_part(key)) % SLOT_COUNT
}

/// All tags, concatenated, and where each slot's tag ends.
struct TagTable {
    text: String,
    /// `ends[s]` is the end of slot `s`'s tag in `text`; it starts at
    /// `ends[s - 1]` (0 for slot 0).
    ends: Vec<u32>,
}

fn table() -> &'static TagTable {
    static TABLE: OnceLock<TagTable> = OnceLock::new();
    TABLE.get_or_init(build_table)
}

/// Enumerates "0".."z", "00".."zz", ... (shortest first, then in alphabet
/// order) and keeps, per slot, the first string that hashes to it.
fn build_table() -> TagTable {
    let mut found: Vec<Option<([u8; MAX_TAG_LEN], u8)>> = vec![None; usize::from(SLOT_COUNT)];
    let mut missing = usize::from(SLOT_COUNT);
    let base = TAG_ALPHABET.len();
    'lengths: for len in 1..=MAX_TAG_LEN {
        let total = base.pow(len as u32);
        let mut buf = [0u8; MAX_TAG_LEN];
        for n in 0..total {
            // Digit i (most significant first) of n in base 36.
            let mut rest = n;
            for i in (0..len).rev() {
                buf[i] = TAG_ALPHABET[rest % base];
                rest /= base;
            }
            let slot = usize::from(key_slot(&buf[..len]));
            if found[slot].is_none() {
                found[slot] = Some((buf, len as u8));
                missing -= 1;
                if missing == 0 {
                    break 'lengths;
                }
            }
        }
    }
    let mut text = String::with_capacity(usize::from(SLOT_COUNT) * MAX_TAG_LEN);
    let mut ends = Vec::with_capacity(usize::from(SLOT_COUNT));
    for entry in found {
        // Every slot is covered by strings of length <= MAX_TAG_LEN (pinned by
        // `every_slot_has_a_short_tag`); an empty tag would only ever appear if
        // that constant were lowered, and the test would catch it.
        if let Some((bytes, len)) = entry {
            text.extend(bytes[..usize::from(len)].iter().map(|&b| char::from(b)));
        }
        ends.push(text.len() as u32);
    }
    TagTable { text, ends }
}

/// The shortest alphanumeric tag whose slot is `slot` (`slot` < 16384).
pub fn tag_for_slot(slot: u16) -> &'static str {
    let t = table();
    let s = usize::from(slot % SLOT_COUNT);
    let start = if s == 0 { 0 } else { t.ends[s - 1] as usize };
    &t.text[start..t.ends[s] as usize]
}

/// Builds the tag table now (it is otherwise built on first use, in the
/// middle of the first batch).
pub fn warm_up() {
    let _ = table();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc16_matches_xmodem_check_value() {
        assert_eq!(crc16(b"123456789"), 0x31C3);
        assert_eq!(crc16(b""), 0);
    }

    #[test]
    fn key_slot_matches_redis() {
        // Values from the Redis Cluster specification and `CLUSTER KEYSLOT`.
        assert_eq!(key_slot(b"foo"), 12182);
        assert_eq!(key_slot(b"bar"), 5061);
        assert_eq!(
            key_slot(b"{user1000}.following"),
            key_slot(b"{user1000}.followers")
        );
        assert_eq!(key_slot(b"{user1000}.following"), key_slot(b"user1000"));
        // Empty braces do not form a tag: the whole key is hashed.
        assert_eq!(key_slot(b"foo{}{bar}"), crc16(b"foo{}{bar}") % SLOT_COUNT);
        // Only the first `{` counts, up to the first `}` after it.
        assert_eq!(key_slot(b"foo{{bar}}zap"), key_slot(b"{bar"));
        assert_eq!(key_slot(b"foo{bar}{zap}"), key_slot(b"bar"));
        // No closing brace: the whole key.
        assert_eq!(key_slot(b"foo{bar"), crc16(b"foo{bar") % SLOT_COUNT);
    }

    #[test]
    fn every_slot_has_a_short_tag_that_hashes_to_it() {
        let mut longest = 0;
        for slot in 0..SLOT_COUNT {
            let tag = tag_for_slot(slot);
            assert!(!tag.is_empty(), "slot {slot} has no tag");
            assert!(tag.bytes().all(|b| b.is_ascii_alphanumeric()));
            assert_eq!(key_slot(tag.as_bytes()), slot);
            assert_eq!(
                key_slot(format!("kvroute:{{{tag}}}:pod:x").as_bytes()),
                slot
            );
            longest = longest.max(tag.len());
        }
        assert!(longest <= MAX_TAG_LEN);
    }

    #[test]
    fn tags_are_pinned_by_layout_version_1() {
        // Changing these renames every bookkeeping key of an existing index.
        // (Slot 12182 is the slot of "foo", so its shortest tag is "foo" itself.)
        assert_eq!(tag_for_slot(key_slot(b"0")), "0");
        assert_eq!(tag_for_slot(key_slot(b"z")), "z");
        let pinned: Vec<&str> = [0u16, 1, 12182, 16383]
            .iter()
            .map(|&s| tag_for_slot(s))
            .collect();
        assert_eq!(pinned, PINNED);
    }

    const PINNED: [&str; 4] = ["1bz", "emj", "foo", "hia"];
}

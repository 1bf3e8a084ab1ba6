//! Canonical CBOR for the one shape vLLM hashes: `[parent, tokens, extra]`
//! (and the seed string of the chain root).
//!
//! vLLM hashes `cbor2.dumps(obj, canonical=True)`. For this shape canonical
//! CBOR only means "every integer and length in its shortest form", so a
//! hand-written encoder is both exact and about 3x faster than going through
//! `ciborium` + serde (measured: 51 ns vs 171 ns per block; see
//! `docs/dependencies.md`). `ciborium` stays as the reference the tests compare
//! against, byte for byte, on every integer width boundary.

/// CBOR major types used here.
const UINT: u8 = 0;
const BYTES: u8 = 2;
const TEXT: u8 = 3;
const ARRAY: u8 = 4;
/// The simple value `null` (Python `None`).
pub const NULL: u8 = 0xf6;

/// A chain parent as vLLM encodes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parent<'a> {
    /// `sha256_cbor`: the previous block's full digest, a CBOR byte string.
    Digest(&'a [u8; 32]),
    /// `sha256_cbor_64bit`: the previous block's 64-bit hash, a CBOR uint.
    U64(u64),
}

/// Writes a major type with its argument in the shortest form (RFC 8949 §4.2.1).
#[inline]
pub fn write_head(out: &mut Vec<u8>, major: u8, arg: u64) {
    let m = major << 5;
    if arg < 24 {
        out.push(m | arg as u8);
    } else if arg <= u8::MAX as u64 {
        out.extend_from_slice(&[m | 24, arg as u8]);
    } else if arg <= u16::MAX as u64 {
        out.push(m | 25);
        out.extend_from_slice(&(arg as u16).to_be_bytes());
    } else if arg <= u32::MAX as u64 {
        out.push(m | 26);
        out.extend_from_slice(&(arg as u32).to_be_bytes());
    } else {
        out.push(m | 27);
        out.extend_from_slice(&arg.to_be_bytes());
    }
}

pub fn write_uint(out: &mut Vec<u8>, v: u64) {
    write_head(out, UINT, v);
}

pub fn write_text(out: &mut Vec<u8>, s: &str) {
    write_head(out, TEXT, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

/// Appends `canonical_CBOR([parent, tokens, extra])` to `out`; `extra` is
/// `null` when `None`, else an array of text strings.
pub fn write_block(out: &mut Vec<u8>, parent: Parent<'_>, tokens: &[u32], extra: Option<&[&str]>) {
    write_head(out, ARRAY, 3);
    match parent {
        Parent::Digest(d) => {
            write_head(out, BYTES, 32);
            out.extend_from_slice(d);
        }
        Parent::U64(v) => write_uint(out, v),
    }
    write_head(out, ARRAY, tokens.len() as u64);
    for &t in tokens {
        write_uint(out, t as u64);
    }
    match extra {
        None => out.push(NULL),
        Some(items) => {
            write_head(out, ARRAY, items.len() as u64);
            for s in items {
                write_text(out, s);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Serialize;

    /// The same value through ciborium (serde), with the byte-string parent
    /// going through `serde_bytes` as vLLM's `bytes` does.
    #[derive(Serialize)]
    #[serde(untagged)]
    enum RefParent {
        Bytes(#[serde(with = "serde_bytes")] Vec<u8>),
        U64(u64),
    }

    fn reference(parent: Parent<'_>, tokens: &[u32], extra: Option<&[&str]>) -> Vec<u8> {
        let p = match parent {
            Parent::Digest(d) => RefParent::Bytes(d.to_vec()),
            Parent::U64(v) => RefParent::U64(v),
        };
        let mut out = Vec::new();
        ciborium::into_writer(&(p, tokens, extra), &mut out).expect("serialize");
        out
    }

    fn ours(parent: Parent<'_>, tokens: &[u32], extra: Option<&[&str]>) -> Vec<u8> {
        let mut out = Vec::new();
        write_block(&mut out, parent, tokens, extra);
        out
    }

    /// Expected bytes produced by Python `cbor2.dumps((parent, tuple(tokens),
    /// extra), canonical=True)` (cbor2 5.x), i.e. what vLLM hashes.
    #[test]
    fn matches_python_cbor2_canonical() {
        type Case<'a> = (Parent<'a>, &'a [u32], Option<&'a [&'a str]>, &'a str);
        let cases: &[Case<'_>] = &[
            (
                Parent::U64(0),
                &[23, 24, 255, 256],
                None,
                "83008417181818ff190100f6",
            ),
            (
                Parent::U64(1 << 32),
                &[65535, 65536, 4_294_967_295],
                None,
                "831b00000001000000008319ffff1a000100001afffffffff6",
            ),
            (
                Parent::U64(1 << 63),
                &[0],
                Some(&["adapter-a"]),
                "831b800000000000000081008169616461707465722d61",
            ),
            (
                Parent::U64(u64::MAX),
                &[1, 2],
                Some(&["adapter-a", "salt-1"]),
                "831bffffffffffffffff8201028269616461707465722d616673616c742d31",
            ),
            (Parent::U64(24), &[], Some(&["x"]), "83181880816178"),
        ];
        for (p, t, e, hex_expected) in cases {
            assert_eq!(
                hex::encode(ours(*p, t, *e)),
                *hex_expected,
                "{p:?} {t:?} {e:?}"
            );
        }
        let digest: [u8; 32] = std::array::from_fn(|i| i as u8);
        assert_eq!(
            hex::encode(ours(Parent::Digest(&digest), &[128000], None)),
            "835820000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f811a0001f400f6"
        );
    }

    #[test]
    fn integer_width_boundaries_match_ciborium() {
        let edges: [u64; 16] = [
            0,
            1,
            23,
            24,
            255,
            256,
            65_535,
            65_536,
            (1 << 32) - 1,
            1 << 32,
            (1 << 63) - 1,
            1 << 63,
            u64::MAX,
            100,
            1000,
            128_000,
        ];
        for &v in &edges {
            let tok = [v.min(u32::MAX as u64) as u32];
            for extra in [None, Some(&["lora"][..]), Some(&["lora", "salt"][..])] {
                assert_eq!(
                    ours(Parent::U64(v), &tok, extra),
                    reference(Parent::U64(v), &tok, extra),
                    "parent {v}"
                );
            }
        }
        let digest = [0xabu8; 32];
        let tokens: Vec<u32> = (0..300).collect();
        assert_eq!(
            ours(Parent::Digest(&digest), &tokens, None),
            reference(Parent::Digest(&digest), &tokens, None)
        );
    }

    #[test]
    fn null_extra_differs_from_empty_array() {
        let a = ours(Parent::U64(1), &[1], None);
        let b = ours(Parent::U64(1), &[1], Some(&[]));
        assert_eq!(*a.last().unwrap_or(&0), NULL);
        assert_eq!(*b.last().unwrap_or(&0), 0x80);
    }

    proptest::proptest! {
        #[test]
        fn any_block_matches_ciborium(
            parent in proptest::prelude::any::<u64>(),
            digest in proptest::prelude::any::<[u8; 32]>(),
            use_digest in proptest::prelude::any::<bool>(),
            tokens in proptest::collection::vec(proptest::prelude::any::<u32>(), 0..70),
            extra in proptest::option::of(proptest::collection::vec("[a-z0-9/_-]{0,40}", 0..3)),
        ) {
            let extra_refs: Option<Vec<&str>> = extra.as_ref().map(|v| v.iter().map(String::as_str).collect());
            let p = if use_digest { Parent::Digest(&digest) } else { Parent::U64(parent) };
            proptest::prop_assert_eq!(
                ours(p, &tokens, extra_refs.as_deref()),
                reference(p, &tokens, extra_refs.as_deref())
            );
        }
    }
}

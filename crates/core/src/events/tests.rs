//! Unit tests of decoding and encoding on hand-built payloads (the vLLM
//! fixtures and property tests are in `crates/core/tests/vllm_events.rs`): here
//! what is skipped and how hashes and ranks decode; `tests/malformed.rs` the
//! errors; `tests/encode.rs` the encoder's options.

use rmp::encode as w;

use super::*;
use crate::ids::EngineHash;

mod encode;
mod malformed;

/// Builds msgpack from a compact text, so payloads (malformed ones included)
/// read like the data they are. Tokens, separated by spaces: `[n]` array
/// header, `{n}` map header, `'text'` string (no spaces), integers (minimal
/// encoding, `-` for negatives), `f<float>`, `nil`, `true`, `false`,
/// `b:<hex>` byte string, `x:<hex>` raw bytes.
fn mp(src: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let o = &mut out;
    for tok in src.split_whitespace() {
        let inner =
            |open: char, close: char| tok.strip_prefix(open).and_then(|t| t.strip_suffix(close));
        if let Some(n) = inner('[', ']') {
            w::write_array_len(o, n.parse().unwrap()).unwrap();
        } else if let Some(n) = inner('{', '}') {
            w::write_map_len(o, n.parse().unwrap()).unwrap();
        } else if let Some(s) = inner('\'', '\'') {
            w::write_str(o, s).unwrap();
        } else if let Some(h) = tok.strip_prefix("b:") {
            w::write_bin(o, &hex::decode(h).unwrap()).unwrap();
        } else if let Some(h) = tok.strip_prefix("x:") {
            o.extend_from_slice(&hex::decode(h).unwrap());
        } else if tok == "nil" {
            w::write_nil(o).unwrap();
        } else if let Ok(b) = tok.parse::<bool>() {
            w::write_bool(o, b).unwrap();
        } else if let Some(f) = tok.strip_prefix('f') {
            w::write_f64(o, f.parse().unwrap()).unwrap();
        } else if tok.starts_with('-') {
            w::write_sint(o, tok.parse().unwrap()).unwrap();
        } else {
            w::write_uint(o, tok.parse().unwrap_or_else(|_| panic!("bad token {tok}"))).unwrap();
        }
    }
    out
}

/// A batch header announcing `n` events; the caller appends events and rank.
fn batch(n: usize) -> String {
    format!("[3] f1.5 [{n}] ")
}

/// A minimal array-like BlockStored: one int hash, two tokens.
const STORED: &str = " [6] 'BlockStored' [1] 7 nil [2] 1 2 2 nil ";

fn decode(src: &str) -> DecodedBatch {
    decode_batch(&mp(src)).unwrap_or_else(|e| panic!("{src}: {e}"))
}

fn decode_err(src: &str) -> DecodeError {
    match decode_batch(&mp(src)) {
        Ok(b) => panic!("{src} decoded: {b:?}"),
        Err(e) => e,
    }
}

fn stored(ev: &KvEvent) -> &BlockStored {
    match ev {
        KvEvent::BlockStored(s) => s,
        other => panic!("expected BlockStored, got {other:?}"),
    }
}

fn removed(ev: &KvEvent) -> &BlockRemoved {
    match ev {
        KvEvent::BlockRemoved(r) => r,
        other => panic!("expected BlockRemoved, got {other:?}"),
    }
}

#[test]
fn unknown_event_types_are_skipped_and_counted() {
    let b = decode(&format!(
        "{} [3] 'BlockPinned' 1 [2] 2 3 \
         {{2}} 'type' 'FutureEvent' 'payload' {{1}} 'a' [1] nil {STORED} nil",
        batch(3)
    ));
    assert_eq!(b.events.len(), 1);
    assert_eq!(stored(&b.events[0]).block_hashes, [BlockHash::U64(7)]);
    assert_eq!(
        b.skipped,
        [
            Skip::UnknownEventType {
                index: 0,
                name: "BlockPinned".into()
            },
            Skip::UnknownEventType {
                index: 1,
                name: "FutureEvent".into()
            },
        ]
    );
    assert!(
        b.skipped
            .iter()
            .all(|s| s.as_label() == "unknown_event_type")
    );
}

#[test]
fn unknown_map_fields_are_skipped_and_type_need_not_be_first() {
    let b = decode(&format!(
        "{} {{5}} 'block_hashes' [1] 9 'group_idx' 5 'type' 'BlockRemoved' \
         'nested' [2] [1] 1 {{1}} 'k' b:76 'medium' 'CPU' 3",
        batch(1)
    ));
    assert_eq!(b.data_parallel_rank, Some(3));
    let expected = BlockRemoved {
        block_hashes: vec![BlockHash::U64(9)],
        medium: Some(Tier::cpu()),
    };
    assert_eq!(b.events, [KvEvent::BlockRemoved(expected)]);
    let labels: Vec<_> = b.skipped.iter().map(Skip::as_label).collect();
    assert_eq!(labels, ["unknown_field", "unknown_field"]);
    let field = "group_idx".into();
    assert_eq!(
        b.skipped[0],
        Skip::UnknownField {
            index: 0,
            event: "BlockRemoved",
            field
        }
    );
}

#[test]
fn extra_array_fields_are_skipped_and_counted() {
    let b = decode(&format!(
        "{} [11] 'BlockStored' [1] 7 6 [1] 1 1 4 'GPU' 'lora-a' [1] [1] 'lora-a' 'future-1' [1] 2 \
         [4] 'BlockRemoved' [0] nil 1 nil",
        batch(2)
    ));
    let s = stored(&b.events[0]);
    assert_eq!(s.parent_block_hash, Some(BlockHash::U64(6)));
    assert_eq!(s.lora_id, Some(4));
    assert_eq!(s.medium, Some(Tier::gpu()));
    assert_eq!(s.lora_name.as_deref(), Some("lora-a"));
    assert_eq!(
        s.extra_keys,
        Some(vec![Some(vec![ExtraValue::Str("lora-a".into())])])
    );
    assert_eq!(
        b.skipped,
        [
            Skip::ExtraArrayFields {
                index: 0,
                event: "BlockStored",
                count: 2
            },
            Skip::ExtraArrayFields {
                index: 1,
                event: "BlockRemoved",
                count: 1
            },
        ]
    );
    assert_eq!(b.skipped[0].as_label(), "extra_array_fields");
}

#[test]
fn negative_int_hashes_are_twos_complement() {
    let b = decode(&format!(
        "{} [2] 'BlockRemoved' [4] -1 -100 {} 5 nil",
        batch(1),
        i64::MIN
    ));
    let rm = removed(&b.events[0]);
    let wire = [
        BlockHash::I64(-1),
        BlockHash::I64(-100),
        BlockHash::I64(i64::MIN),
        BlockHash::U64(5),
    ];
    assert_eq!(rm.block_hashes, wire);
    let engine: Vec<_> = rm.engine_hashes().collect();
    let want = [
        EngineHash(u64::MAX),
        EngineHash(-100i64 as u64),
        EngineHash(1 << 63),
        EngineHash(5),
    ];
    assert_eq!(engine, want);
}

#[test]
fn u64_hashes_above_i64_max() {
    let big = u64::MAX - 1;
    let b = decode(&format!("{} [2] 'BlockRemoved' [1] {big} nil", batch(1)));
    let rm = removed(&b.events[0]);
    assert_eq!(rm.block_hashes, [BlockHash::U64(big)]);
    assert_eq!(rm.engine_hashes().next(), Some(EngineHash(big)));
}

#[test]
fn sixteen_and_thirty_two_byte_hashes() {
    let d16: [u8; 16] = std::array::from_fn(|i| i as u8);
    let d32: [u8; 32] = std::array::from_fn(|i| 100 + i as u8);
    let (h16, h32) = (hex::encode(d16), hex::encode(d32));
    let b = decode(&format!(
        "{} [2] 'BlockRemoved' [2] b:{h16} b:{h32} nil",
        batch(1)
    ));
    let rm = removed(&b.events[0]);
    assert_eq!(
        rm.block_hashes,
        [BlockHash::Bytes16(d16), BlockHash::Bytes32(d32)]
    );
    assert_eq!(
        rm.block_hashes[0].engine(),
        EngineHash(0x0809_0a0b_0c0d_0e0f)
    );
    assert_eq!(rm.block_hashes[1].engine(), EngineHash::from_bytes(&d32));

    let err = decode_err(&format!(
        "{} [2] 'BlockRemoved' [1] b:{} nil",
        batch(1),
        "01".repeat(20)
    ));
    let DecodeError::Field {
        index: 0,
        field: "block_hashes",
        source,
        ..
    } = &err
    else {
        panic!("{err}")
    };
    assert!(
        matches!(source, WireError::HashLength { len: 20, .. }),
        "{err}"
    );
}

#[test]
fn data_parallel_rank_missing_nil_or_set_and_extra_batch_elements() {
    let b = decode("[2] 1700000000 [1] [1] 'AllBlocksCleared'");
    assert_eq!(b.data_parallel_rank, None, "no rank element");
    assert_eq!(b.ts, 1_700_000_000.0, "an int ts is accepted");
    assert_eq!(
        b.events,
        [KvEvent::AllBlocksCleared(AllBlocksCleared::default())]
    );

    assert_eq!(
        decode(&format!("{} nil", batch(0))).data_parallel_rank,
        None
    );
    assert_eq!(
        decode(&format!("{} 7", batch(0))).data_parallel_rank,
        Some(7)
    );

    let b = decode("[5] f1 [0] 1 'x' [1] 1");
    assert_eq!(b.data_parallel_rank, Some(1));
    assert_eq!(b.skipped, [Skip::ExtraBatchFields { count: 2 }]);
    assert_eq!(b.skipped[0].as_label(), "extra_batch_fields");

    let err = decode_err(&format!("{} -1", batch(0)));
    assert!(
        matches!(
            err,
            DecodeError::Batch {
                field: "data_parallel_rank",
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn map_event_with_extra_keys_of_every_kind_and_absent_optionals() {
    let b = decode(&format!(
        "{} {{6}} 'type' 'BlockStored' 'block_hashes' [2] 1 2 'token_ids' [0] 'block_size' 16 \
         'lora_name' 'ad' 'extra_keys' [2] nil [8] nil true -3 {} f0.5 'salt' b:0001 [1] [0] nil",
        batch(1),
        u64::MAX
    ));
    let s = stored(&b.events[0]);
    assert_eq!(
        (s.parent_block_hash, s.lora_id, &s.medium),
        (None, None, &None)
    );
    assert_eq!(s.tier(), Tier::gpu(), "vLLM's default medium");
    let expected = vec![
        None,
        Some(vec![
            ExtraValue::Nil,
            ExtraValue::Bool(true),
            ExtraValue::Int(-3),
            ExtraValue::UInt(u64::MAX),
            ExtraValue::Float(0.5),
            ExtraValue::Str("salt".into()),
            ExtraValue::Bytes(vec![0, 1]),
            ExtraValue::Array(vec![ExtraValue::Array(vec![])]),
        ]),
    ];
    assert_eq!(s.extra_keys.as_ref(), Some(&expected));
    let again = decode_batch(&encode_batch(&b, Encoding::Map)).unwrap();
    assert_eq!(again.events, b.events, "the encoder writes what it read");
}

//! Golden tests against payloads produced by vLLM 0.10.0 and 0.33.0's own
//! code (`testdata/vllm/*.json`), plus property
//! tests: arbitrary and mutated bytes never panic the decoder, and generated
//! batches round-trip through encode -> decode in both encodings.

use std::path::PathBuf;

use base64::Engine as _;
use kvroute_core::events::{
    AllBlocksCleared, BlockHash, BlockRemoved, BlockStored, EncodeOptions, Encoding, EventBatch,
    ExtraValue, KvEvent, decode_batch, encode_batch,
};
use kvroute_core::ids::{EngineHash, Tier};
use proptest::prelude::*;
use serde_json::Value;

const TESTDATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../testdata/vllm/");

fn fixture(name: &str) -> Value {
    let path = PathBuf::from(TESTDATA).join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "cannot read the vLLM fixture {} ({e}) (testdata/vllm/ in the checkout)",
            path.display()
        )
    });
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

/// Positional field names of array-like events, after the tag.
fn positions(tag: &str) -> &'static [&'static str] {
    match tag {
        "BlockStored" => &[
            "block_hashes",
            "parent_block_hash",
            "token_ids",
            "block_size",
            "lora_id",
            "medium",
            "lora_name",
            "extra_keys",
        ],
        "BlockRemoved" => &["block_hashes", "medium"],
        "AllBlocksCleared" => &["medium"],
        other => panic!("fixture has an event type this test does not know: {other}"),
    }
}

/// The fixture's generic decoding of one event as (tag, field -> value).
fn json_fields(ev: &Value) -> (String, serde_json::Map<String, Value>) {
    match ev {
        Value::Array(items) => {
            let tag = items[0].as_str().expect("tag").to_owned();
            let names = positions(&tag);
            assert!(
                items.len() - 1 <= names.len(),
                "unexpected positions in {ev}"
            );
            let fields = names
                .iter()
                .zip(&items[1..])
                .map(|(n, v)| (n.to_string(), v.clone()))
                .collect();
            (tag, fields)
        }
        Value::Object(map) => {
            let mut fields = map.clone();
            let tag = fields
                .remove("type")
                .and_then(|t| t.as_str().map(str::to_owned))
                .expect("type");
            for key in fields.keys() {
                assert!(
                    positions(&tag).contains(&key.as_str()),
                    "unknown key {key} in {ev}"
                );
            }
            (tag, fields)
        }
        other => panic!("event is neither array nor map: {other}"),
    }
}

fn b64(s: &str) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .expect("base64")
}

fn assert_hash(ours: &BlockHash, json: &Value, what: &str) {
    match json {
        Value::String(s) => {
            let bytes = b64(s);
            assert_eq!(ours.engine(), EngineHash::from_bytes(&bytes), "{what}");
            match ours {
                BlockHash::Bytes32(d) => assert_eq!(&d[..], &bytes[..], "{what}"),
                BlockHash::Bytes16(d) => assert_eq!(&d[..], &bytes[..], "{what}"),
                other => panic!("{what}: expected a digest, got {other:?}"),
            }
        }
        Value::Number(n) => {
            let want = match (n.as_u64(), n.as_i64()) {
                (Some(u), _) => EngineHash(u),
                (None, Some(i)) => EngineHash(i as u64),
                _ => panic!("{what}: hash {n} is not an integer"),
            };
            assert_eq!(ours.engine(), want, "{what}");
            assert!(
                matches!(ours, BlockHash::U64(_) | BlockHash::I64(_)),
                "{what}: {ours:?}"
            );
        }
        other => panic!("{what}: hash {other}"),
    }
}

fn assert_hashes(ours: &[BlockHash], json: Option<&Value>, what: &str) {
    let list = json
        .and_then(Value::as_array)
        .unwrap_or_else(|| panic!("{what}: no hash list"));
    assert_eq!(ours.len(), list.len(), "{what}: number of hashes");
    for (i, (h, j)) in ours.iter().zip(list).enumerate() {
        assert_hash(h, j, &format!("{what}[{i}]"));
    }
}

/// `None` in JSON and an absent field both mean "not set".
fn opt<'a>(fields: &'a serde_json::Map<String, Value>, key: &str) -> Option<&'a Value> {
    fields.get(key).filter(|v| !v.is_null())
}

fn assert_medium(ours: &Option<Tier>, fields: &serde_json::Map<String, Value>, what: &str) {
    let want = opt(fields, "medium").map(|m| Tier::new(m.as_str().expect("medium is a string")));
    assert_eq!(ours, &want, "{what}: medium");
}

fn extra_value(json: &Value) -> ExtraValue {
    match json {
        Value::Null => ExtraValue::Nil,
        Value::Bool(b) => ExtraValue::Bool(*b),
        Value::Number(n) => match (n.as_u64(), n.as_i64(), n.as_f64()) {
            (Some(u), _, _) => ExtraValue::UInt(u),
            (None, Some(i), _) => ExtraValue::Int(i),
            (_, _, Some(f)) => ExtraValue::Float(f),
            _ => unreachable!(),
        },
        Value::String(s) => ExtraValue::Str(s.clone()),
        Value::Array(a) => ExtraValue::Array(a.iter().map(extra_value).collect()),
        Value::Object(_) => panic!("maps are not extra key values"),
    }
}

fn assert_stored(s: &BlockStored, f: &serde_json::Map<String, Value>, what: &str) {
    assert_hashes(&s.block_hashes, f.get("block_hashes"), what);
    match (&s.parent_block_hash, opt(f, "parent_block_hash")) {
        (None, None) => {}
        (Some(p), Some(j)) => assert_hash(p, j, &format!("{what}: parent")),
        (ours, want) => panic!("{what}: parent {ours:?} vs {want:?}"),
    }
    let tokens: Vec<u32> = f["token_ids"]
        .as_array()
        .expect("token_ids")
        .iter()
        .map(|t| u32::try_from(t.as_u64().expect("token id")).expect("u32 token"))
        .collect();
    assert_eq!(s.token_ids, tokens, "{what}: token_ids");
    assert_eq!(
        Some(s.block_size as u64),
        f["block_size"].as_u64(),
        "{what}: block_size"
    );
    assert_eq!(
        s.lora_id,
        opt(f, "lora_id").map(|v| v.as_i64().expect("lora_id")),
        "{what}: lora_id"
    );
    assert_medium(&s.medium, f, what);
    assert_eq!(
        s.lora_name.as_deref(),
        opt(f, "lora_name").map(|v| v.as_str().expect("lora_name")),
        "{what}: lora_name"
    );
    let extra = opt(f, "extra_keys").map(|v| {
        v.as_array()
            .expect("extra_keys list")
            .iter()
            .map(|block| {
                block
                    .as_array()
                    .map(|vals| vals.iter().map(extra_value).collect())
            })
            .collect::<Vec<Option<Vec<ExtraValue>>>>()
    });
    assert_eq!(s.extra_keys, extra, "{what}: extra_keys");
}

fn check_fixture(file: &str, encoding: Encoding, expected_names: &[&str]) {
    let data = fixture(file);
    let payloads = data["event_payloads"].as_array().expect("event_payloads");
    assert!(!payloads.is_empty(), "{file}: no payloads");
    for name in expected_names {
        assert!(
            payloads.iter().any(|p| p["name"] == *name),
            "{file}: the README promises a payload named {name}"
        );
    }
    for (i, p) in payloads.iter().enumerate() {
        let what = format!("{file} #{i} {}", p["name"]);
        let bytes = hex::decode(p["msgpack_hex"].as_str().expect("msgpack_hex")).expect("hex");
        let decoded = decode_batch(&bytes).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert!(
            decoded.skipped.is_empty(),
            "{what}: skipped {:?}",
            decoded.skipped
        );

        let json = p["decoded"].as_array().expect("decoded batch");
        assert_eq!(Some(decoded.ts), json[0].as_f64(), "{what}: ts");
        let json_rank = json.get(2).and_then(Value::as_u64);
        assert_eq!(
            decoded.data_parallel_rank.map(u64::from),
            json_rank,
            "{what}: rank"
        );
        assert_eq!(
            json_rank,
            p["data_parallel_rank"].as_u64(),
            "{what}: rank vs name"
        );

        let events = json[1].as_array().expect("events");
        assert_eq!(
            decoded.events.len(),
            events.len(),
            "{what}: number of events"
        );
        for (j, (ours, ev)) in decoded.events.iter().zip(events).enumerate() {
            let what = format!("{what} event {j}");
            let (tag, fields) = json_fields(ev);
            assert_eq!(ours.kind(), tag, "{what}");
            match ours {
                KvEvent::BlockStored(s) => assert_stored(s, &fields, &what),
                KvEvent::BlockRemoved(rm) => {
                    assert_hashes(&rm.block_hashes, fields.get("block_hashes"), &what);
                    assert_medium(&rm.medium, &fields, &what);
                }
                KvEvent::AllBlocksCleared(c) => assert_medium(&c.medium, &fields, &what),
            }
        }

        let again = encode_batch(&decoded, encoding);
        assert_eq!(
            hex::encode(&again),
            p["msgpack_hex"].as_str().unwrap_or_default(),
            "{what}: re-encoding"
        );
    }
}

const COMMON: &[&str] = &[
    "stored_int_hashes",
    "stored_with_parent_and_medium",
    "removed",
    "cleared",
    "mixed",
];

#[test]
fn vllm_0_10_0_payloads_decode_and_reencode_byte_for_byte() {
    check_fixture("vllm-0.10.0.json", Encoding::Array, COMMON);
}

#[test]
fn vllm_0_33_0_payloads_decode_and_reencode_byte_for_byte() {
    let mut names = COMMON.to_vec();
    names.extend(["stored_bytes_hashes", "stored_lora_extra_keys"]);
    check_fixture("vllm-0.33.0.json", Encoding::Map, &names);
}

// ---- property tests -------------------------------------------------------

fn block_hash() -> impl Strategy<Value = BlockHash> {
    prop_oneof![
        any::<u64>().prop_map(BlockHash::U64),
        (i64::MIN..0).prop_map(BlockHash::I64),
        any::<[u8; 32]>().prop_map(BlockHash::Bytes32),
        any::<[u8; 16]>().prop_map(BlockHash::Bytes16),
    ]
}

fn tier() -> impl Strategy<Value = Tier> {
    "[a-z_]{1,8}".prop_map(|s| Tier::new(&s))
}

fn not_nan() -> impl Strategy<Value = f64> {
    any::<f64>().prop_filter("NaN != NaN", |f| !f.is_nan())
}

fn arb_extra_value() -> impl Strategy<Value = ExtraValue> {
    let leaf = prop_oneof![
        Just(ExtraValue::Nil),
        any::<bool>().prop_map(ExtraValue::Bool),
        any::<u64>().prop_map(ExtraValue::UInt),
        (i64::MIN..0).prop_map(ExtraValue::Int),
        not_nan().prop_map(ExtraValue::Float),
        ".{0,40}".prop_map(ExtraValue::Str),
        prop::collection::vec(any::<u8>(), 0..300).prop_map(ExtraValue::Bytes),
    ];
    leaf.prop_recursive(3, 12, 4, |inner| {
        prop::collection::vec(inner, 0..4).prop_map(ExtraValue::Array)
    })
}

fn event() -> impl Strategy<Value = KvEvent> {
    let hashes = || prop::collection::vec(block_hash(), 0..20);
    let stored = (
        hashes(),
        prop::option::of(block_hash()),
        prop::collection::vec(any::<u32>(), 0..300),
        any::<u32>(),
        prop::option::of(any::<i64>()),
        prop::option::of(tier()),
        prop::option::of(".{0,20}"),
        prop::option::of(prop::collection::vec(
            prop::option::of(prop::collection::vec(arb_extra_value(), 0..3)),
            0..4,
        )),
    )
        .prop_map(
            |(
                block_hashes,
                parent_block_hash,
                token_ids,
                block_size,
                lora_id,
                medium,
                lora_name,
                extra_keys,
            )| {
                KvEvent::BlockStored(BlockStored {
                    block_hashes,
                    parent_block_hash,
                    token_ids,
                    block_size,
                    lora_id,
                    medium,
                    lora_name,
                    extra_keys,
                })
            },
        );
    prop_oneof![
        3 => stored,
        2 => (hashes(), prop::option::of(tier()))
            .prop_map(|(block_hashes, medium)| KvEvent::BlockRemoved(BlockRemoved { block_hashes, medium })),
        1 => prop::option::of(tier()).prop_map(|medium| KvEvent::AllBlocksCleared(AllBlocksCleared { medium })),
    ]
}

fn batch() -> impl Strategy<Value = EventBatch> {
    (
        not_nan(),
        prop::collection::vec(event(), 0..8),
        prop::option::of(any::<u32>()),
    )
        .prop_map(|(ts, events, data_parallel_rank)| EventBatch {
            ts,
            events,
            data_parallel_rank,
        })
}

fn encoding() -> impl Strategy<Value = Encoding> {
    prop_oneof![Just(Encoding::Array), Just(Encoding::Map)]
}

#[derive(Debug, Clone)]
enum Mutation {
    Set(usize, u8),
    Insert(usize, u8),
    Delete(usize),
    Truncate(usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    // Bytes that are msgpack length markers make lying headers likely.
    let byte = prop_oneof![
        any::<u8>(),
        prop::sample::select(vec![0xc0u8, 0xdc, 0xdd, 0xde, 0xdf, 0xdb, 0xc6, 0xff])
    ];
    prop_oneof![
        (any::<usize>(), byte.clone()).prop_map(|(i, b)| Mutation::Set(i, b)),
        (any::<usize>(), byte).prop_map(|(i, b)| Mutation::Insert(i, b)),
        any::<usize>().prop_map(Mutation::Delete),
        any::<usize>().prop_map(Mutation::Truncate),
    ]
}

fn mutate(bytes: &mut Vec<u8>, m: &Mutation) {
    let len = bytes.len();
    match *m {
        Mutation::Set(i, b) if len > 0 => bytes[i % len] = b,
        Mutation::Insert(i, b) => bytes.insert(i % (len + 1), b),
        Mutation::Delete(i) if len > 0 => {
            bytes.remove(i % len);
        }
        Mutation::Truncate(i) => bytes.truncate(i % (len + 1)),
        _ => {}
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode_batch(&bytes);
    }

    #[test]
    fn arbitrary_bytes_behind_a_batch_header_never_panic(
        tail in prop::collection::vec(any::<u8>(), 0..512),
        n in 0u8..4,
    ) {
        // [ts, [<tail>...]: gets past the header so event decoding is exercised.
        let mut bytes = vec![0x93, 0xcb, 0, 0, 0, 0, 0, 0, 0, 0, 0x90 | n];
        bytes.extend_from_slice(&tail);
        let _ = decode_batch(&bytes);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn mutated_valid_batches_never_panic(
        b in batch(),
        enc in encoding(),
        mutations in prop::collection::vec(mutation(), 1..5),
    ) {
        let mut bytes = encode_batch(&b, enc);
        for m in &mutations {
            mutate(&mut bytes, m);
        }
        if let Ok(d) = decode_batch(&bytes) {
            // Whatever decoded must encode and decode again.
            let again = encode_batch(&d, enc);
            prop_assert!(decode_batch(&again).is_ok());
        }
    }

    #[test]
    fn generated_batches_round_trip(b in batch(), enc in encoding()) {
        let bytes = encode_batch(&b, EncodeOptions::from(enc));
        let d = decode_batch(&bytes).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert!(d.skipped.is_empty());
        prop_assert_eq!(&encode_batch(&d, enc), &bytes);
        prop_assert_eq!(d.into_batch(), b);
    }
}

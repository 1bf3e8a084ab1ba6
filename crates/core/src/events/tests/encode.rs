//! Encoder options and the array encoding's optional trailing positions.

use super::*;
fn sample_stored(hashes: Vec<BlockHash>) -> EventBatch {
    let stored = BlockStored {
        block_hashes: hashes,
        token_ids: vec![1, 2],
        block_size: 1,
        ..BlockStored::default()
    };
    EventBatch {
        ts: 2.0,
        events: vec![KvEvent::BlockStored(stored)],
        data_parallel_rank: None,
    }
}

#[test]
fn hash_encoding_options_keep_the_engine_hash() {
    let d16: [u8; 16] = std::array::from_fn(|i| i as u8 + 1);
    let d32: [u8; 32] = std::array::from_fn(|i| i as u8 + 50);
    let hashes = vec![
        BlockHash::U64(u64::MAX),
        BlockHash::I64(-2),
        BlockHash::Bytes16(d16),
        BlockHash::Bytes32(d32),
    ];
    let batch = sample_stored(hashes.clone());
    let engine: Vec<_> = hashes.iter().map(BlockHash::engine).collect();
    for hashes_as in [HashEncoding::AsIs, HashEncoding::Int, HashEncoding::Bytes32] {
        for encoding in [Encoding::Array, Encoding::Map] {
            let bytes = encode_batch(
                &batch,
                EncodeOptions {
                    encoding,
                    hashes: hashes_as,
                },
            );
            let b = decode_batch(&bytes).unwrap();
            let s = stored(&b.events[0]);
            let what = format!("{hashes_as:?} {encoding:?}");
            assert_eq!(s.engine_hashes().collect::<Vec<_>>(), engine, "{what}");
            let form_ok = |h: &BlockHash| match hashes_as {
                HashEncoding::AsIs => true,
                HashEncoding::Int => matches!(h, BlockHash::U64(_) | BlockHash::I64(_)),
                HashEncoding::Bytes32 => matches!(h, BlockHash::Bytes32(_)),
            };
            assert!(
                s.block_hashes.iter().all(form_ok),
                "{what}: {:?}",
                s.block_hashes
            );
            if hashes_as == HashEncoding::AsIs {
                assert_eq!(s.block_hashes, hashes);
            }
        }
    }
}

#[test]
fn array_encoding_writes_optional_positions_only_up_to_the_last_set() {
    // Byte 11 is the first event's array header: [3] (1) + f64 ts (9) + [n] (1).
    let header = |b: &EventBatch| encode_batch(b, Encoding::Array)[11];
    let mut batch = sample_stored(vec![BlockHash::U64(1)]);
    assert_eq!(header(&batch), 0x96, "vLLM 0.10.0: six elements");
    let set = |batch: &mut EventBatch, medium: Option<Tier>, lora: Option<&str>| {
        let KvEvent::BlockStored(s) = &mut batch.events[0] else {
            unreachable!()
        };
        s.medium = medium;
        s.lora_name = lora.map(str::to_owned);
    };
    set(&mut batch, Some(Tier::cpu()), None);
    assert_eq!(header(&batch), 0x97);
    set(&mut batch, None, Some("a"));
    assert_eq!(header(&batch), 0x98);
    assert_eq!(
        decode_batch(&encode_batch(&batch, Encoding::Array))
            .unwrap()
            .into_batch(),
        batch
    );
}

//! Malformed input: every kind of broken payload is an error with context,
//! never a panic, an unbounded allocation or unbounded recursion.

use super::*;
/// Every strict prefix of a valid payload is an error, never a panic or Ok.
#[test]
fn truncation_anywhere_is_an_error() {
    let payload = mp(&format!(
        "{} {STORED} {{2}} 'type' 'BlockRemoved' 'block_hashes' [1] b:{} 1",
        batch(2),
        "07".repeat(32)
    ));
    assert!(decode_batch(&payload).is_ok());
    for cut in 0..payload.len() {
        assert!(
            decode_batch(&payload[..cut]).is_err(),
            "prefix of {cut} bytes decoded"
        );
    }
}

#[test]
fn malformed_batches_are_errors() {
    let err = decode_err(&format!("{} nil 1", batch(0)));
    assert!(
        matches!(err, DecodeError::TrailingBytes { len: 1, .. }),
        "{err}"
    );
    assert!(matches!(
        decode_err("{0}"),
        DecodeError::Batch { field: "array", .. }
    ));
    assert!(matches!(
        decode_err(""),
        DecodeError::Batch { field: "array", .. }
    ));
    assert!(matches!(
        decode_err("[1] f1"),
        DecodeError::BatchTooShort { len: 1 }
    ));
    assert!(matches!(
        decode_err("[2] 'x' [0]"),
        DecodeError::Batch { field: "ts", .. }
    ));
    assert!(matches!(
        decode_err("[2] f1 {0}"),
        DecodeError::Batch {
            field: "events",
            ..
        }
    ));
}

#[test]
fn malformed_events_name_the_event_and_field() {
    let stored = |fields: &str| format!("{} [6] 'BlockStored' {fields} nil", batch(1));
    let err = decode_err(&stored("[0] nil 'toks' 16 nil"));
    let DecodeError::Field {
        index: 0,
        event: "BlockStored",
        field: "token_ids",
        ..
    } = &err
    else {
        panic!("{err}")
    };
    assert!(err.to_string().contains("token_ids"), "{err}");

    for token in [(1u64 << 32).to_string(), "-1".into(), "f1.0".into()] {
        let err = decode_err(&stored(&format!("[0] nil [1] {token} 16 nil")));
        assert!(
            matches!(
                err,
                DecodeError::Field {
                    field: "token_ids",
                    ..
                }
            ),
            "{token}: {err}"
        );
    }
    let err = decode_err(&stored("[0] nil [0] -16 nil"));
    assert!(
        matches!(
            err,
            DecodeError::Field {
                field: "block_size",
                ..
            }
        ),
        "{err}"
    );
    let err = decode_err(&stored(&format!("[0] nil [0] 16 {}", u64::MAX)));
    assert!(
        matches!(
            err,
            DecodeError::Field {
                field: "lora_id",
                source: WireError::OutOfRange { .. },
                ..
            }
        ),
        "{err}"
    );
    let err = decode_err(&stored("[0] 'p' [0] 16 nil"));
    assert!(
        matches!(
            err,
            DecodeError::Field {
                field: "parent_block_hash",
                ..
            }
        ),
        "{err}"
    );

    let cases: &[(&str, &str)] = &[
        ("[3] 'BlockStored' [0] nil", "token_ids"),
        (
            "{3} 'type' 'BlockStored' 'block_hashes' [0] 'token_ids' [0]",
            "block_size",
        ),
        ("[1] 'BlockRemoved'", "block_hashes"),
        ("{1} 'block_hashes' [0]", "type"),
    ];
    for (event, field) in cases {
        let err = decode_err(&format!("{} {event} nil", batch(1)));
        assert!(
            matches!(err, DecodeError::MissingField { field: f, .. } if f == *field),
            "{event}: {err}"
        );
    }
    let dups: &[(&str, &str)] = &[
        (
            "{3} 'type' 'BlockRemoved' 'medium' nil 'medium' nil",
            "medium",
        ),
        ("{2} 'type' 'AllBlocksCleared' 'type' 'x'", "type"),
    ];
    for (event, field) in dups {
        let err = decode_err(&format!("{} {event} nil", batch(1)));
        assert!(
            matches!(err, DecodeError::DuplicateField { field: f, .. } if f == *field),
            "{event}: {err}"
        );
    }
    let wrong: &[(&str, &str)] = &[
        ("{1} 1 'BlockStored'", "key"),
        ("{1} 'type' 1", "type"),
        ("[1] 3", "type"),
        ("[1] x:a2fffe", "type"),
        ("[2] 'BlockRemoved' [1] 'h'", "block_hashes"),
        ("[3] 'BlockRemoved' [0] 7", "medium"),
        (
            "[9] 'BlockStored' [0] nil [0] 1 nil nil nil [1] [1] {0}",
            "extra_keys",
        ),
        (
            "[9] 'BlockStored' [0] nil [0] 1 nil nil nil [1] 'x'",
            "extra_keys",
        ),
        ("[8] 'BlockStored' [0] nil [0] 1 nil nil 5", "lora_name"),
    ];
    for (event, field) in wrong {
        let err = decode_err(&format!("{} {event} nil", batch(1)));
        assert!(
            matches!(err, DecodeError::Field { field: f, .. } if f == *field),
            "{event}: {err}"
        );
    }
    let err = decode_err(&format!("{} [0] nil", batch(1)));
    assert!(matches!(err, DecodeError::EmptyEvent { index: 0 }), "{err}");
    let err = decode_err(&format!("{} [1] 'AllBlocksCleared' 5 nil", batch(2)));
    assert!(matches!(err, DecodeError::Event { index: 1, .. }), "{err}");
    assert!(err.to_string().contains("event 1"), "{err}");
}

#[test]
fn absurd_lengths_fail_without_allocating() {
    // 32-bit headers claiming 4 billion items, with nothing behind them.
    let huge = [
        "x:ddffffffff",
        "x:dfffffffff",
        "x:dbffffffff",
        "x:c6ffffffff",
    ];
    for h in huge {
        decode_err(&format!("[2] f0 {h}"));
        decode_err(&format!("{} [6] 'BlockStored' {h}", batch(1)));
        decode_err(&format!("{} [6] 'BlockStored' [0] nil {h}", batch(1)));
        decode_err(&format!("{} {{2}} 'type' 'X' 'y' {h}", batch(1)));
        decode_err(&format!(
            "{} [9] 'BlockStored' [0] nil [0] 1 nil nil nil {h}",
            batch(1)
        ));
    }
}

#[test]
fn nesting_is_bounded() {
    let deep_field = |depth: usize| {
        format!(
            "{} {{2}} 'type' 'AllBlocksCleared' 'deep' {} nil nil",
            batch(1),
            "[1] ".repeat(depth)
        )
    };
    decode(&deep_field(10));
    let err = decode_err(&deep_field(100_000));
    assert!(
        matches!(
            err,
            DecodeError::Event {
                source: WireError::TooDeep { .. },
                ..
            }
        ),
        "{err}"
    );

    let deep_extra = |depth: usize| {
        let nested = "[1] ".repeat(depth);
        format!(
            "{} [9] 'BlockStored' [0] nil [0] 1 nil nil nil [1] {nested} nil nil",
            batch(1)
        )
    };
    decode(&deep_extra(5));
    let err = decode_err(&deep_extra(100_000));
    assert!(
        matches!(
            err,
            DecodeError::Field {
                field: "extra_keys",
                source: WireError::TooDeep { .. },
                ..
            }
        ),
        "{err}"
    );
}

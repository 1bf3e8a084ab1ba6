//! Mooncake-format request traces (the format of the Mooncake FAST'25
//! release, which NVIDIA Dynamo's benchmarking tools and others replay).
//!
//! One JSON object a line: `timestamp` (ms from the start), `input_length`
//! and `output_length` (tokens) and `hash_ids`, one id per 512-token block
//! of the input (the last may be partial). An id names a block together
//! with its whole prefix, so two requests share exactly their common
//! leading ids. Traces carry no text: [`TraceRequest::tokens`] makes
//! deterministic token ids per hash id (equal ids, equal tokens), so
//! 16-token block hashing sees exactly the trace's sharing.

use serde::Deserialize;

/// Tokens per hash id in Mooncake traces.
pub const TRACE_BLOCK_TOKENS: usize = 512;

/// Token ids are drawn below this (Llama 3's 128,000 regular tokens, so a
/// tokenizer-free replay never produces a special token).
pub const TOKEN_ID_LIMIT: u32 = 128_000;

/// One request of a trace.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct TraceRequest {
    /// Arrival, in milliseconds from the trace's start.
    pub timestamp: f64,
    pub input_length: usize,
    pub output_length: usize,
    pub hash_ids: Vec<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("trace line {line}: {source}")]
    Json {
        line: usize,
        source: serde_json::Error,
    },
    #[error(
        "trace line {line}: input_length {input} needs {expected} hash ids of {TRACE_BLOCK_TOKENS} tokens, the line has {got}"
    )]
    HashIds {
        line: usize,
        input: usize,
        expected: usize,
        got: usize,
    },
    #[error("trace line {line}: timestamp {ts} is before the previous line's {previous}")]
    Order { line: usize, ts: f64, previous: f64 },
}

/// Parses a whole trace; blank lines are skipped. Requests must be in
/// arrival order and carry one hash id per started 512-token block.
pub fn parse(text: &str) -> Result<Vec<TraceRequest>, TraceError> {
    let mut out = Vec::new();
    let mut previous = f64::NEG_INFINITY;
    for (i, l) in text.lines().enumerate() {
        let line = i + 1;
        if l.trim().is_empty() {
            continue;
        }
        let r: TraceRequest =
            serde_json::from_str(l).map_err(|source| TraceError::Json { line, source })?;
        let expected = r.input_length.div_ceil(TRACE_BLOCK_TOKENS);
        if r.hash_ids.len() != expected {
            return Err(TraceError::HashIds {
                line,
                input: r.input_length,
                expected,
                got: r.hash_ids.len(),
            });
        }
        if !r.timestamp.is_finite() || r.timestamp < previous {
            return Err(TraceError::Order {
                line,
                ts: r.timestamp,
                previous,
            });
        }
        previous = r.timestamp;
        out.push(r);
    }
    Ok(out)
}

impl TraceRequest {
    /// The prompt's token ids: 512 per hash id (fewer for the last), each
    /// a function of the hash id and the position within its block only.
    pub fn tokens(&self) -> Vec<u32> {
        let mut out = Vec::with_capacity(self.input_length);
        for &id in &self.hash_ids {
            let n = (self.input_length - out.len()).min(TRACE_BLOCK_TOKENS);
            out.extend((0..n as u64).map(|j| token_id(id, j)));
        }
        out
    }
}

/// splitmix64 of (hash id, position), reduced below [`TOKEN_ID_LIMIT`].
fn token_id(hash_id: u64, position: u64) -> u32 {
    let mut z = hash_id
        .wrapping_mul(TRACE_BLOCK_TOKENS as u64)
        .wrapping_add(position)
        .wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z % u64::from(TOKEN_ID_LIMIT)) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_ids_give_equal_tokens_and_lengths_are_honoured() {
        let t = parse(concat!(
            "{\"timestamp\": 0, \"input_length\": 600, \"output_length\": 3, \"hash_ids\": [4, 5]}\n",
            "\n",
            "{\"timestamp\": 10, \"input_length\": 512, \"output_length\": 1, \"hash_ids\": [4]}\n",
        ))
        .expect("parse");
        let (a, b) = (t[0].tokens(), t[1].tokens());
        assert_eq!((a.len(), b.len()), (600, 512));
        assert_eq!(a[..512], b[..]);
        assert_ne!(a[512..], a[..88], "another id, other tokens");
        assert!(a.iter().all(|&x| x < TOKEN_ID_LIMIT));
    }

    #[test]
    fn malformed_lines_name_their_line() {
        let bad_ids = "{\"timestamp\": 0, \"input_length\": 1025, \"output_length\": 1, \"hash_ids\": [1, 2]}";
        assert!(matches!(
            parse(bad_ids),
            Err(TraceError::HashIds {
                line: 1,
                expected: 3,
                got: 2,
                ..
            })
        ));
        let order = concat!(
            "{\"timestamp\": 5, \"input_length\": 1, \"output_length\": 1, \"hash_ids\": [1]}\n",
            "{\"timestamp\": 4, \"input_length\": 1, \"output_length\": 1, \"hash_ids\": [1]}\n",
        );
        assert!(matches!(
            parse(order),
            Err(TraceError::Order { line: 2, .. })
        ));
        assert!(matches!(parse("{"), Err(TraceError::Json { line: 1, .. })));
    }
}

//! Workload 7: a Mooncake-format trace replayed as token ids. `trace.rs`
//! parses it and turns each 512-token hash id into fixed token ids (equal
//! ids, equal tokens), so block hashing at any block size dividing 512 sees
//! exactly the trace's sharing. Timestamps (ms) become seconds times the
//! spec's `time_scale`; lengths are the trace's. The body sends the ids
//! (vLLM's completions endpoint accepts a token-id prompt), as a trace has
//! no text.

use std::path::Path;

use super::{Body, WorkloadError, WorkloadRequest, WorkloadSpec};

pub(super) fn generate(
    spec: &WorkloadSpec,
    path: &Path,
) -> Result<Vec<WorkloadRequest>, WorkloadError> {
    let text = std::fs::read_to_string(path).map_err(|source| WorkloadError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let trace = crate::trace::parse(&text).map_err(|source| WorkloadError::Trace {
        path: path.to_path_buf(),
        source,
    })?;
    let keep = spec.requests.unwrap_or(trace.len());
    Ok(trace
        .into_iter()
        .take(keep)
        .map(|r| {
            let tokens = r.tokens();
            WorkloadRequest {
                arrival: r.timestamp / 1_000.0 * spec.time_scale,
                body: Body::TokenIds {
                    prompt: tokens.clone(),
                },
                tokens,
                output_len: u32::try_from(r.output_length).unwrap_or(u32::MAX).max(1),
                // Traces carry no session ids; a conversation's turns start
                // with the same block, which is what a session header groups.
                session: r.hash_ids.first().copied(),
            }
        })
        .collect())
}

//! Workload 4: retrieval-augmented questions over a shared corpus. Each
//! request is a chat: a system message all requests share (the RAG
//! instructions), then a user message holding one retrieved document and a
//! question about it. Documents are drawn with Zipf popularity (a few hot
//! documents, a long tail), so requests share the instructions always and
//! a document's blocks whenever they retrieved the same one. Documents and
//! questions start with serials, so different documents diverge at their
//! first token and every question is new. `session` is the document id.

use rand::Rng;

use super::text::TextGen;
use super::{Body, Message, SimTokenizer, WorkloadError, WorkloadRequest, WorkloadSpec, Zipf};

pub(super) const REQUESTS: usize = 2_000;
/// Documents in the corpus.
pub(super) const DOCUMENTS: usize = 200;
/// Tokens of each document, uniform.
pub(super) const DOCUMENT_TOKENS: std::ops::RangeInclusive<usize> = 800..=3_000;
/// Tokens of the shared instructions.
pub(super) const SYSTEM_TOKENS: usize = 120;
/// Tokens of each question, uniform.
pub(super) const QUESTION_TOKENS: std::ops::RangeInclusive<usize> = 15..=60;
pub(super) const OUTPUT_TOKENS: std::ops::RangeInclusive<u32> = 50..=300;
/// Zipf exponent of document popularity.
pub(super) const POPULARITY: f64 = 0.9;

pub(super) fn generate(
    spec: &WorkloadSpec,
    tok: &SimTokenizer,
) -> Result<Vec<WorkloadRequest>, WorkloadError> {
    let words = TextGen::new(tok);
    let mut rng = spec.content_rng();
    let system = words.prose(&mut rng, SYSTEM_TOKENS);
    let documents: Vec<String> = (0..DOCUMENTS)
        .map(|d| {
            let n = rng.random_range(DOCUMENT_TOKENS);
            words.tagged(d as u64, &mut rng, n)
        })
        .collect();
    let zipf = Zipf::new(DOCUMENTS, POPULARITY);
    let arrivals = super::poisson_arrivals(&mut spec.arrival_rng(), spec.size(REQUESTS), spec.rate);
    arrivals
        .into_iter()
        .enumerate()
        .map(|(i, arrival)| {
            let doc = zipf.sample(&mut rng);
            let n = rng.random_range(QUESTION_TOKENS);
            let question = words.tagged(i as u64, &mut rng, n);
            let messages = vec![
                Message::new("system", system.clone()),
                Message::new("user", format!("{}\n\n{question}", documents[doc])),
            ];
            let output_len = rng.random_range(OUTPUT_TOKENS);
            Ok(WorkloadRequest {
                arrival,
                tokens: tok.encode_chat(&messages)?,
                body: Body::Chat { messages },
                output_len,
                session: Some(doc as u64),
            })
        })
        .collect()
}

//! Why a request went where it went: [`Reason`] is the `reason` label of
//! `kvroute_scorer_decisions_total`, of the HTTP API's report and of the
//! ext_proc span; [`Fallback`] is the subset that routed by load because the
//! prompt's prefix could not be known (`kvroute_scorer_fallbacks_total`).
//!
//! The labels are the metrics' and reports' wire format: operators alert on
//! them, so [`Reason::as_label`] and [`Fallback::as_label`] must not change.

use std::fmt;

/// Why the prefix of a prompt is unknown; the request routes by load with
/// every prefix score at 0 (never an error: Envoy cannot fail open in
/// FULL_DUPLEX_STREAMED mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Fallback {
    /// A completion prompt of no text.
    EmptyPrompt,
    /// No local tokenizer for the model, and no remote tokenization.
    NoTokenizer,
    /// The chat template failed to render or its text to tokenize.
    TemplateError,
    /// The chat template stopped at a render bound (fuel, output size,
    /// message count or text: `kvroute_tokens::ChatLimits`).
    TemplateLimit,
    /// The tokenizer failed (or its pool job panicked).
    TokenizeError,
    /// The tokenization pool's queue was full, or no thread came free in time.
    TokenizeOverloaded,
    /// Tokenization started but exceeded `--tokenize-timeout`.
    TokenizeTimeout,
    /// vLLM's `/tokenize` exceeded `--remote-tokenize-timeout`.
    RemoteTokenizeTimeout,
    /// vLLM's `/tokenize` failed (no endpoint, connection, status, body).
    RemoteTokenizeFailed,
    /// The index lookup exceeded `--lookup-timeout`.
    IndexTimeout,
    /// The index is not connected or the lookup failed.
    IndexUnavailable,
}

impl Fallback {
    /// Every fallback, for tests and documentation.
    pub const ALL: [Fallback; 11] = [
        Fallback::EmptyPrompt,
        Fallback::NoTokenizer,
        Fallback::TemplateError,
        Fallback::TemplateLimit,
        Fallback::TokenizeError,
        Fallback::TokenizeOverloaded,
        Fallback::TokenizeTimeout,
        Fallback::RemoteTokenizeTimeout,
        Fallback::RemoteTokenizeFailed,
        Fallback::IndexTimeout,
        Fallback::IndexUnavailable,
    ];

    /// The metric label (`reason="..."`).
    pub fn as_label(self) -> &'static str {
        match self {
            Fallback::EmptyPrompt => "empty_prompt",
            Fallback::NoTokenizer => "no_tokenizer",
            Fallback::TemplateError => "template_error",
            Fallback::TemplateLimit => "template_limit",
            Fallback::TokenizeError => "tokenize_error",
            Fallback::TokenizeOverloaded => "tokenize_overloaded",
            Fallback::TokenizeTimeout => "tokenize_timeout",
            Fallback::RemoteTokenizeTimeout => "remote_tokenize_timeout",
            Fallback::RemoteTokenizeFailed => "remote_tokenize_failed",
            Fallback::IndexTimeout => "index_timeout",
            Fallback::IndexUnavailable => "index_unavailable",
        }
    }

    /// Whether the same request may well succeed when retried: the stage was
    /// busy, slow or unreachable rather than the prompt bad (llm-d's indexer
    /// API answers a transient tokenization failure `UNAVAILABLE`).
    pub fn is_transient(self) -> bool {
        matches!(
            self,
            Fallback::TokenizeOverloaded
                | Fallback::TokenizeTimeout
                | Fallback::RemoteTokenizeTimeout
                | Fallback::RemoteTokenizeFailed
                | Fallback::IndexTimeout
                | Fallback::IndexUnavailable
        )
    }
}

impl fmt::Display for Fallback {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_label())
    }
}

/// Why the router picked the endpoint it picked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// The chosen endpoint holds some of the prompt's prefix.
    Prefix,
    /// Prefixes were known, but the chosen endpoint holds none of it (load
    /// outweighed them, or nobody holds the prompt).
    Load,
    /// Prefixes were unknown: picked by load alone.
    Fallback(Fallback),
}

impl Reason {
    /// The metric label (`reason="..."`) and the report's `reason`.
    pub fn as_label(self) -> &'static str {
        match self {
            Reason::Prefix => "prefix",
            Reason::Load => "load",
            Reason::Fallback(f) => f.as_label(),
        }
    }

    /// The fallback, when the prefix was unknown.
    pub fn fallback(self) -> Option<Fallback> {
        match self {
            Reason::Fallback(f) => Some(f),
            Reason::Prefix | Reason::Load => None,
        }
    }
}

impl From<Fallback> for Reason {
    fn from(f: Fallback) -> Self {
        Reason::Fallback(f)
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_label())
    }
}

/// Serialized as its label (the HTTP API's report).
impl serde::Serialize for Reason {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_label())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn labels_are_the_published_ones() {
        let labels: Vec<_> = Fallback::ALL.iter().map(|f| f.as_label()).collect();
        assert_eq!(
            labels,
            [
                "empty_prompt",
                "no_tokenizer",
                "template_error",
                "template_limit",
                "tokenize_error",
                "tokenize_overloaded",
                "tokenize_timeout",
                "remote_tokenize_timeout",
                "remote_tokenize_failed",
                "index_timeout",
                "index_unavailable",
            ]
        );
        assert_eq!(labels.iter().collect::<HashSet<_>>().len(), labels.len());
        assert_eq!(Reason::Prefix.as_label(), "prefix");
        assert_eq!(Reason::Load.as_label(), "load");
        let r = Reason::from(Fallback::IndexTimeout);
        assert_eq!(
            (r.as_label(), r.fallback()),
            ("index_timeout", Some(Fallback::IndexTimeout))
        );
        assert_eq!(
            serde_json::to_string(&Reason::Prefix).expect("json"),
            "\"prefix\""
        );
    }
}

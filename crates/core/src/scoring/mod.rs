//! Scoring and picking: a lookup's per-pod prefix depths become tier-weighted
//! scores ([`score`]), which [`pick`] blends with load to choose an endpoint;
//! [`fold`] reduces them to what a caller reports (best tier, best rank).
//!
//! All are pure functions, shared so that the scorer, the load test's
//! in-process policies and llm-d-compatible APIs score identically.

mod fold;
pub mod pick;
mod score;

pub use fold::{best_tier, fold_best};
pub use score::{PrefixScore, TierWeights, TierWeightsError, score_prefixes};

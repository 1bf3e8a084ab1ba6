//! Why writing a report failed. Every variant names the path it was writing,
//! because a report run writes several files and "permission denied" alone
//! does not say which directory to fix.

use std::io;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("cannot create report directory {path}: {source}")]
    CreateDir { path: PathBuf, source: io::Error },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error("cannot encode PNG {path}: {source}")]
    Png {
        path: PathBuf,
        source: png::EncodingError,
    },
    /// plotters' own drawing errors (its error type borrows the backend, so
    /// it is kept as text).
    #[error("cannot draw chart {path}: {message}")]
    Draw { path: PathBuf, message: String },
    /// The embedded font did not parse (a corrupt asset, not an input
    /// problem, but still no reason to panic a finished simulation).
    #[error("the embedded chart font did not load; no chart was drawn")]
    Font,
}

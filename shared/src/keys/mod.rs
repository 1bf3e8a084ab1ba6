//! Block keys (placeholder).

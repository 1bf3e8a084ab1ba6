//! Throwaway redis-server processes for tests and benchmarks (placeholder).

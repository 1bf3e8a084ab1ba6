//! `kvroute-testkit`: fixtures for kvroute's tests and benchmarks, never
//! linked into a service. Each one starts the real component (a
//! `redis-server`, a local Redis Cluster, the Python test peers) on loopback.
#![forbid(unsafe_code)]

pub mod envoy;
pub mod net;
pub mod process;
pub mod publisher;
pub mod redis_server;
pub mod scorer;
pub mod test_env;
pub mod tls;

//! `kvroute-scorer`: the read path. Envoy asks, per request, which endpoint
//! should serve it:
//!
//! request body -> [`decide::RouteRequest`] -> tokens -> block keys -> index
//! lookup -> tier-weighted prefix scores ([`prefix`]) -> blend with load
//! ([`route`]) -> endpoint.
#![forbid(unsafe_code)]

pub mod background;
pub mod candidates;
pub mod config;
pub mod decide;
pub mod ext_proc;
pub mod grpc;
pub mod http_api;
pub mod indexer_api;
pub mod keying;
pub mod load;
pub mod metrics;
pub mod pending;
pub mod prefix;
pub mod reason;
pub mod request;
pub mod route;
pub mod service;
pub mod tokenize;
pub mod why;

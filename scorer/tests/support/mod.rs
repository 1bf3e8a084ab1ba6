//! Helpers the scorer's integration tests share: a table-driven `Decide`,
//! the scorer's gRPC server on a free port, and for the end-to-end tests a
//! real Envoy, fake vLLM pods and a small HTTP/1.1 client; for the tests of
//! the real binary (`e2e.rs`) the scorer process, a fake vLLM fleet and the
//! index writes an ingester would make.
#![allow(dead_code)]

pub mod backend;
pub mod decide;
pub mod e2e;
pub mod envoy;
pub mod extproc;
pub mod http;
pub mod index;
pub mod indexer_client;
pub mod pods;
pub mod scorer;
pub mod scorer_proc;

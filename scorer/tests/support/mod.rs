//! Helpers the scorer's integration tests share: a table-driven `Decide`,
//! the scorer's gRPC server on a free port, and for the end-to-end tests a
//! real Envoy, fake vLLM pods and a small HTTP/1.1 client.
#![allow(dead_code)]

pub mod backend;
pub mod decide;
pub mod envoy;
pub mod extproc;
pub mod http;
pub mod scorer;

//! The Redis backend against real `redis-server`s (single node and a local
//! 3-master cluster), each test with its own fixture. What is checked is
//! what llm-d and an operator see: the keys and fields, read back with a raw
//! connection, plus the command counts that prove ClearPod needs no SCAN.

mod clear;
mod cluster;
mod common;
mod fixture;
mod lookup;
mod writes;

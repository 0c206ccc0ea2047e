//! Fixtures for foobar-lb's integration tests and benchmarks: network namespaces
//! and the netns lab (from `foobar-lab`), a packet lab for BPF_PROG_TEST_RUN,
//! packets built and checked with etherparse, and a small HTTP client.

pub mod browser;
pub mod e2e;
pub mod nodes;
pub use foobar_lab::{db, http, lab, netns, probe, process, stack};
pub mod packet;
pub mod packet_lab;

//! Fixtures for foobar-lb's integration tests and data-plane benchmark: network
//! namespaces, a packet lab for BPF_PROG_TEST_RUN, and packets built and checked
//! with etherparse.

pub use foobar_lab::netns;
pub mod packet;
pub mod packet_lab;

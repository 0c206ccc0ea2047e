//! The foobar.com lab: network namespaces with a client, the balancer (or two) and
//! web servers, and a client that keeps probing, used by `cargo xtask lab` and by the end-to-end tests. It runs the
//! built binaries; it does not link foobar-lb, so xtask can use it before the eBPF
//! toolchain exists.

pub mod acme;
pub mod bgp;
pub mod db;
pub mod deploy;
pub mod http;
pub mod lab;
pub mod monitoring;
pub mod netns;
pub mod pki;
pub mod probe;
pub mod process;
pub mod stack;

//! foobar-lb: an XDP layer-4 load balancer.
//!
//! The kernel side (`foobar-lb-ebpf`) only looks things up; this crate decides:
//! [`schedule`] computes the Maglev tables and round-robin rings, [`state`] holds
//! the validated desired configuration, [`reconcile`] turns it into minimal map
//! updates, and [`dataplane`] loads the program and owns the maps (pinned by [`pin`]).
//! The [`agent`] ties them together behind the [`daemon`]'s control socket
//! ([`api`]); [`health`] checks the backends, [`vrrp`] fails the VIPs over to a peer,
//! [`bgp`] announces them to routers (active-active, through BIRD), [`metrics`] and
//! [`http`] export it all; [`cli`] and [`render`] are the command line.

pub mod agent;
pub mod api;
pub mod batch;
pub mod bgp;
pub mod cli;
pub mod config;
pub mod connections;
pub mod daemon;
pub mod dataplane;
pub mod decap;
pub mod edge;
pub mod health;
pub mod http;
pub mod metrics;
pub mod migrate;
pub mod persist;
pub mod pin;
pub mod reconcile;
pub mod render;
pub mod schedule;
pub mod state;
pub mod systemd;
pub mod topology;
pub mod vrrp;

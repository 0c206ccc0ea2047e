//! Types and pure logic shared by the foobar-lb XDP program and its agent.
//!
//! Everything here is `no_std` and allocation-free so that both sides compile the
//! same definitions: the map keys and values (`maps`), the per-packet outcome table
//! (`reason`), the decapsulation program's maps and reasons (`decap`), the flow hash both sides must agree on (`hash`) and the incremental
//! checksum arithmetic (`checksum`).
#![no_std]

pub mod checksum;
pub mod decap;
pub mod hash;
pub mod maps;
pub mod reason;

pub use maps::*;
pub use reason::Reason;

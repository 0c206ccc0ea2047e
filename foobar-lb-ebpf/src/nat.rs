//! Address and port rewrites with incremental checksum updates (RFC 1624).

use aya_ebpf::programs::XdpContext;
use foobar_lb_common::Reason;

use crate::{
    Verdict,
    family::Family,
    parse::{L4, Packet, ptr_at},
};

/// Which end of a packet a rewrite changes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum End {
    Source,
    Destination,
}

/// Rewrites one end's address and port of a TCP/UDP packet, from what the packet
/// holds now (`old`, as parsed) to `new`: the address, the port, the IPv4 header
/// checksum and the transport checksum (whose pseudo-header covers the address).
#[inline(always)]
pub fn rewrite<F: Family>(
    ctx: &XdpContext,
    pkt: &Packet<F>,
    l4: &L4,
    end: End,
    old: (F::Addr, u16),
    new: (F::Addr, u16),
) -> Result<(), Verdict> {
    let truncated = Verdict::of(Reason::DropTruncatedL4);
    let (addr_at, port_at) = match end {
        End::Source => (F::SRC_AT, 0),
        End::Destination => (F::DST_AT, 2),
    };
    // Parsing checked these; the verifier needs each pointer checked where it is made.
    let addr: *mut F::Addr = ptr_at(ctx, pkt.l3 + addr_at).ok_or(truncated)?;
    let port: *mut u16 = ptr_at(ctx, pkt.l4 + port_at).ok_or(truncated)?;
    let check: *mut u16 = ptr_at(ctx, l4.check as usize).ok_or(truncated)?;
    F::header_checksum(ctx, pkt.l3, old.0, new.0)?;
    unsafe {
        addr.write_unaligned(new.0);
        port.write_unaligned(new.1);
        let sum = F::replace_addr(check.read_unaligned(), old.0, new.0, l4.udp);
        check.write_unaligned(replace_port(sum, old.1, new.1, l4.udp));
    }
    Ok(())
}

/// A transport checksum after a port changed.
#[inline(always)]
fn replace_port(check: u16, old: u16, new: u16, udp: bool) -> u16 {
    use foobar_lb_common::checksum::{replace2, udp_replace2};
    if udp {
        udp_replace2(check, old, new)
    } else {
        replace2(check, old, new)
    }
}

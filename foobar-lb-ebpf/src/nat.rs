//! Address and port rewrites with incremental checksum updates (RFC 1624).

use aya_ebpf::programs::XdpContext;
use foobar_lb_common::{PROTO_UDP, Reason, checksum};
use network_types::ip::Ipv4Hdr;

use crate::{
    Verdict,
    parse::{L4, Packet, ptr_at},
};

/// Client → VIP becomes client → backend.
#[inline(always)]
pub fn rewrite_destination(
    ctx: &XdpContext,
    pkt: &Packet,
    l4: &L4,
    addr: u32,
    port: u16,
) -> Result<(), Verdict> {
    // Destination address at byte 16 of the IPv4 header, destination port at byte 2 of L4.
    rewrite(ctx, pkt, l4, 16, pkt.dst, addr, 2, pkt.dport, port)
}

/// Backend → client becomes VIP → client.
#[inline(always)]
pub fn rewrite_source(
    ctx: &XdpContext,
    pkt: &Packet,
    l4: &L4,
    addr: u32,
    port: u16,
) -> Result<(), Verdict> {
    rewrite(ctx, pkt, l4, 12, pkt.src, addr, 0, pkt.sport, port)
}

#[expect(clippy::too_many_arguments, reason = "one rewrite, both directions")]
#[inline(always)]
fn rewrite(
    ctx: &XdpContext,
    pkt: &Packet,
    l4: &L4,
    addr_at: usize,
    old_addr: u32,
    new_addr: u32,
    port_at: usize,
    old_port: u16,
    new_port: u16,
) -> Result<(), Verdict> {
    let truncated = Verdict::of(Reason::DropTruncatedL4);
    // Parsing checked these; the verifier needs each pointer checked where it is made.
    let ip: *mut Ipv4Hdr = ptr_at(ctx, pkt.l3).ok_or(Verdict::of(Reason::DropTruncatedIpv4))?;
    let addr: *mut u32 = ptr_at(ctx, pkt.l3 + addr_at).ok_or(truncated)?;
    let port: *mut u16 = ptr_at(ctx, pkt.l4 + port_at).ok_or(truncated)?;
    let check: *mut u16 = ptr_at(ctx, l4.check).ok_or(truncated)?;
    unsafe {
        let ip_check = u16::from_ne_bytes((*ip).check);
        (*ip).check = checksum::replace4(ip_check, old_addr, new_addr).to_ne_bytes();
        addr.write_unaligned(new_addr);
        port.write_unaligned(new_port);
        // The L4 checksum covers the pseudo-header's address and the port.
        let l4_check = check.read_unaligned();
        let l4_check = if pkt.proto == PROTO_UDP {
            checksum::udp_replace2(
                checksum::udp_replace4(l4_check, old_addr, new_addr),
                old_port,
                new_port,
            )
        } else {
            checksum::replace2(
                checksum::replace4(l4_check, old_addr, new_addr),
                old_port,
                new_port,
            )
        };
        check.write_unaligned(l4_check);
    }
    Ok(())
}

//! Map keys, values, names and capacities.
//!
//! All types are `#[repr(C)]` with explicit padding and plain integers, so their
//! layout is the same in the kernel and in user space; the size asserts catch drift.
//! Addresses and ports are kept in network byte order, as they appear in packets.

use core::mem::size_of;

/// `Endpoint::family` of an IPv4 endpoint.
pub const FAMILY_IPV4: u8 = 4;
/// `Endpoint::family` of an IPv6 endpoint.
pub const FAMILY_IPV6: u8 = 6;

/// IP protocol number of TCP.
pub const PROTO_TCP: u8 = 6;
/// IP protocol number of UDP.
pub const PROTO_UDP: u8 = 17;
/// IP protocol number of ICMP.
pub const PROTO_ICMP: u8 = 1;
/// IP protocol number of ICMPv6.
pub const PROTO_ICMPV6: u8 = 58;
/// IP protocol number of IPv4 in IP (IPIP).
pub const PROTO_IPIP: u8 = 4;
/// IP protocol number of IPv6 in IP.
pub const PROTO_IPV6: u8 = 41;

/// Forwarding mode ([`VipInfo::forwarding`], [`Backend::forwarding`]): the destination
/// becomes the backend; its replies pass the balancer, which restores the VIP.
pub const FORWARD_NAT: u32 = 0;
/// Both addresses are rewritten: the client's becomes the balancer's own (a port it
/// allocates), so replies come back to the balancer whatever the backends' routes.
pub const FORWARD_FULLNAT: u32 = 1;
/// Direct server return: the packet is encapsulated in IP (IPIP or IPv6-in-IPv6) to
/// the backend, which answers the client itself.
pub const FORWARD_DSR_IPIP: u32 = 2;
/// Direct server return in GUE (UDP, variant 1: the inner IP header follows the UDP one).
pub const FORWARD_DSR_GUE: u32 = 3;

/// The version of the pinned maps' layout: bumped whenever a map's key, value or
/// meaning changes, so that an upgrade knows to migrate the pinned maps (see the
/// agent's `migrate`) rather than misread them. Maps of layout `N` are pinned in
/// `maps-vN` under the pin directory; layout 1 had them in the directory itself.
#[cfg(not(feature = "layout-test"))]
pub const LAYOUT_VERSION: u32 = 2;
/// The test build's next layout: [`TrafficStats`] has one more counter.
#[cfg(feature = "layout-test")]
pub const LAYOUT_VERSION: u32 = 3;
/// The oldest layout whose maps this build carries over by their sizes (copied, or
/// counters widened). A change that keeps a map's size but changes its meaning (fields
/// reordered, a flag redefined) must raise this to the new [`LAYOUT_VERSION`], so that
/// an upgrade refuses what it would misread.
pub const OLDEST_CARRIED_LAYOUT: u32 = 1;

/// Most VIPs a data plane holds.
pub const MAX_VIPS: u32 = 64;
/// Most backends a data plane holds, over all VIPs.
pub const MAX_BACKENDS: u32 = 4096;
/// Slots reserved per VIP in [`SCHEDULES`]: the largest schedule (Maglev table or
/// round-robin ring) a VIP can have. 65,537 is prime, the default Maglev size.
pub const SCHEDULE_STRIDE: u32 = 65_537;
/// Default capacity of the flow table; the agent may load it with another.
pub const DEFAULT_FLOW_CAPACITY: u32 = 262_144;
/// Most interfaces the data plane can redirect to.
pub const MAX_TX_PORTS: u32 = 64;
/// Interfaces are looked up by ifindex in an array: the program runs on interfaces
/// whose ifindex is below this.
pub const MAX_IFINDEX: u32 = 4096;
/// Most client-side routes mirrored into [`map_names::ROUTES`].
pub const MAX_ROUTES: u32 = 4096;
/// Most neighbours (next hops on the client side) mirrored into
/// [`map_names::NEIGHBOURS`] (and as many into `NEIGHBOURS6`).
pub const MAX_NEIGHBOURS: u32 = 65_536;
/// How many source ports a full-NAT flow tries before it gives up.
pub const FULLNAT_PORT_TRIES: u32 = 8;
/// The UDP port GUE is sent to unless configured otherwise (Katran's).
pub const DEFAULT_GUE_PORT: u16 = 6080;
/// Most access-list rules, over the global list and every VIP's.
pub const MAX_ACL_RULES: u32 = 4096;
/// Scopes of access lists: the global one (0) and one per VIP (`1 + vip id`).
pub const ACL_SCOPE_COUNT: u32 = 1 + MAX_VIPS;
/// Sources whose new-flow rate is tracked at once (LRU: the least recent go first).
pub const SOURCE_LIMIT_CAPACITY: u32 = 65_536;

/// Map names, as the agent looks them up in the loaded object.
pub mod map_names {
    /// [`crate::Endpoint`] → [`crate::VipInfo`].
    pub const VIPS: &str = "VIPS";
    /// [`crate::VipAddr`] → [`crate::AddrUse`]: the VIP addresses, closed to what is
    /// not a VIP endpoint unless open.
    pub const VIP_ADDRS: &str = "VIP_ADDRS";
    /// Access lists: an LPM trie keyed by [`crate::AclKey`] (scope word, then
    /// address) → [`crate::AclRule`].
    pub const ACLS: &str = "ACLS";
    /// Scope (0 global, `1 + vip id`) → `u32` flags ([`crate::ACL_ANY`], ...).
    pub const ACL_SCOPES: &str = "ACL_SCOPES";
    /// Per-CPU `u64` per rule id: packets the rule decided.
    pub const ACL_STATS: &str = "ACL_STATS";
    /// [`crate::SourceKey`] → `u64`: when a source may open its next flow (GCRA), LRU.
    pub const SOURCE_LIMITS: &str = "SOURCE_LIMITS";
    /// Two `u64`: whether flows were ever opened by SYN cookies (then TCP packets of
    /// NAT VIPs look for their flow's sequence delta), and when a cookie was last sent.
    pub const PROXIED: &str = "PROXIED";
    /// `u32` backend id → [`crate::Backend`].
    pub const BACKENDS: &str = "BACKENDS";
    /// `vip_id * SCHEDULE_STRIDE + slot` → backend id.
    pub const SCHEDULES: &str = "SCHEDULES";
    /// `u32` vip id → round-robin cursor.
    pub const RR_CURSORS: &str = "RR_CURSORS";
    /// [`crate::FlowKey`] → [`crate::FlowState`], LRU with per-CPU LRU lists.
    pub const FLOWS: &str = "FLOWS";
    /// [`crate::FlowKey6`] → [`crate::FlowState`]: IPv6 flows.
    pub const FLOWS6: &str = "FLOWS6";
    /// Full NAT's reverse entries: the backend-side [`crate::FlowKey`] of a flow (backend
    /// to the balancer's address and allocated port) → [`crate::NatTarget`].
    pub const NAT_FLOWS: &str = "NAT_FLOWS";
    /// The same for IPv6 ([`crate::FlowKey6`]).
    pub const NAT_FLOWS6: &str = "NAT_FLOWS6";
    /// ifindex → [`crate::Iface`]: the interfaces the program runs on, their MAC and role.
    pub const INTERFACES: &str = "INTERFACES";
    /// Client-side destinations (an LPM trie keyed by prefix length and IPv4 address,
    /// network order) → [`crate::Route`].
    pub const ROUTES: &str = "ROUTES";
    /// The same for IPv6 (`[u32; 4]` addresses).
    pub const ROUTES6: &str = "ROUTES6";
    /// Next-hop address → [`crate::NextHop`]: the client side's resolved neighbours.
    pub const NEIGHBOURS: &str = "NEIGHBOURS";
    /// The same for IPv6 (`[u32; 4]` addresses).
    pub const NEIGHBOURS6: &str = "NEIGHBOURS6";
    /// [`crate::VipAddr`] → `u32` reference count: addresses of NAT-mode backends, whose
    /// reply fragments must not pass untranslated.
    pub const BACKEND_ADDRS: &str = "BACKEND_ADDRS";
    /// One [`crate::Settings`].
    pub const SETTINGS: &str = "SETTINGS";
    /// Per-CPU [`crate::RateWindow`]: this CPU's new flows in the current second.
    pub const FLOOD: &str = "FLOOD";
    /// Per-CPU [`crate::RateWindow`]: this CPU's ICMP answers in the current second.
    pub const ICMP_RATE: &str = "ICMP_RATE";
    /// NAT backend [`crate::Endpoint`] → [`crate::ReplyTarget`]: how to rewrite replies.
    pub const REPLIES: &str = "REPLIES";
    /// ifindex → ifindex: the interfaces packets may be redirected to.
    pub const TX_PORTS: &str = "TX_PORTS";
    /// Per-CPU [`crate::Counters`], one entry.
    pub const COUNTERS: &str = "COUNTERS";
    /// Per-CPU [`crate::TrafficStats`] per vip id.
    pub const VIP_STATS: &str = "VIP_STATS";
    /// Per-CPU [`crate::TrafficStats`] per backend id.
    pub const BACKEND_STATS: &str = "BACKEND_STATS";
    /// Every map, for pinning.
    pub const ALL: [&str; 28] = [
        PROXIED,
        VIPS,
        VIP_ADDRS,
        ACLS,
        ACL_SCOPES,
        ACL_STATS,
        SOURCE_LIMITS,
        BACKENDS,
        SCHEDULES,
        RR_CURSORS,
        FLOWS,
        FLOWS6,
        NAT_FLOWS,
        NAT_FLOWS6,
        ROUTES6,
        NEIGHBOURS6,
        BACKEND_ADDRS,
        ICMP_RATE,
        REPLIES,
        TX_PORTS,
        COUNTERS,
        VIP_STATS,
        BACKEND_STATS,
        INTERFACES,
        ROUTES,
        NEIGHBOURS,
        SETTINGS,
        FLOOD,
    ];
}

/// An address, port and protocol: a VIP, or a backend as seen in its replies.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Endpoint {
    /// IPv4 in `addr[0]` (network order) and zeros after it, or IPv6.
    pub addr: [u32; 4],
    /// Port in network byte order.
    pub port: u16,
    /// [`PROTO_TCP`] or [`PROTO_UDP`].
    pub proto: u8,
    /// [`FAMILY_IPV4`] or [`FAMILY_IPV6`].
    pub family: u8,
}
const _: () = assert!(size_of::<Endpoint>() == 20);

impl Endpoint {
    /// An IPv4 endpoint; `addr` and `port` in network order, as read from a packet.
    #[inline(always)]
    pub const fn ipv4(addr: u32, port: u16, proto: u8) -> Self {
        Self {
            addr: [addr, 0, 0, 0],
            port,
            proto,
            family: FAMILY_IPV4,
        }
    }

    /// An IPv6 endpoint; the address as four network-order words.
    #[inline(always)]
    pub const fn ipv6(addr: [u32; 4], port: u16, proto: u8) -> Self {
        Self {
            addr,
            port,
            proto,
            family: FAMILY_IPV6,
        }
    }
}

/// A VIP address alone, the key of the map that catches fragments sent to a VIP.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VipAddr {
    /// As in [`Endpoint::addr`].
    pub addr: [u32; 4],
}
const _: () = assert!(size_of::<VipAddr>() == 16);

/// `AddrUse::flags`: the address is open: what is not for one of its VIP endpoints
/// passes to the balancer's own stack (otherwise it is dropped).
pub const ADDR_OPEN: u32 = 1;

/// What the data plane knows of a VIP address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AddrUse {
    /// How many VIPs use it.
    pub vips: u32,
    /// [`ADDR_OPEN`] or 0.
    pub flags: u32,
}
const _: () = assert!(size_of::<AddrUse>() == 8);

/// `AclRule::action`: the rule lets the source in.
pub const ACL_ALLOW: u32 = 1;
/// `AclRule::action`: the rule keeps the source out.
pub const ACL_DENY: u32 = 2;
/// `ACL_SCOPES` flags: the scope has rules.
pub const ACL_RULES: u32 = 1;
/// `ACL_SCOPES` flags: the scope has allow rules, so a source none matches is kept out.
pub const ACL_DEFAULT_DENY: u32 = 2;
/// `ACL_SCOPES[0]` flag: some scope has rules (without it, no list is looked at).
pub const ACL_ANY: u32 = 4;

/// The data of an access-list key: the scope word (scope << 8 | family), matched
/// whole, then the source address; its LPM prefix length is 32 + the rule's.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct AclKey {
    /// [`acl_scope_word`].
    pub scope: u32,
    /// The rule's prefix (network order; IPv4 in word 0).
    pub addr: [u32; 4],
}
const _: () = assert!(size_of::<AclKey>() == 20);

/// The scope word of an access-list key, big-endian so the trie matches it first.
#[inline(always)]
pub const fn acl_scope_word(scope: u32, family: u8) -> u32 {
    ((scope << 8) | family as u32).to_be()
}

/// An access-list rule.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AclRule {
    /// Its counter in `ACL_STATS`.
    pub id: u32,
    /// [`ACL_ALLOW`] or [`ACL_DENY`].
    pub action: u32,
}
const _: () = assert!(size_of::<AclRule>() == 8);

/// A source of new flows to a VIP, as its limit counts it: the address cut to the
/// VIP's prefix length.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SourceKey {
    /// The VIP's id.
    pub vip_id: u32,
    /// The source prefix (network order; IPv4 in word 0).
    pub addr: [u32; 4],
}
const _: () = assert!(size_of::<SourceKey>() == 20);

/// `VipInfo::scheduler`: the next slot of the ring for each new flow: weighted round
/// robin.
pub const SCHED_RR: u32 = 0;
/// `VipInfo::scheduler`: Maglev table indexed by the flow hash.
pub const SCHED_MAGLEV: u32 = 1;
/// `VipInfo::scheduler`: least connections: a ring, as [`SCHED_RR`], that the agent
/// rewrites every few milliseconds; so its flows are always remembered (a flow placed
/// by its hash over a changing ring would not keep its backend).
pub const SCHED_LEAST_CONN: u32 = 2;

/// What the data plane knows of a VIP.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VipInfo {
    /// Index into the per-VIP arrays (schedule block, cursor, stats).
    pub id: u32,
    /// Slots in use in this VIP's schedule block; 0 = no backend available.
    pub schedule_len: u32,
    /// [`SCHED_RR`] or [`SCHED_MAGLEV`].
    pub scheduler: u32,
    /// [`FORWARD_NAT`], [`FORWARD_FULLNAT`], [`FORWARD_DSR_IPIP`] or [`FORWARD_DSR_GUE`].
    pub forwarding: u32,
    /// New-flow limit per source: nanoseconds a source earns one new flow in; 0: no
    /// limit. (A GCRA: the rate's inverse, computed by the agent.)
    pub limit_interval_ns: u32,
    /// Bits of an IPv4 source that make a source (32: each address).
    pub limit_prefix_v4: u8,
    /// Bits of an IPv6 source that make a source (64: each subnet).
    pub limit_prefix_v6: u8,
    /// Bits of an IPv4 client address its hash covers, with [`crate::hash::HASH_SOURCE`].
    pub hash_prefix_v4: u8,
    /// The same for IPv6.
    pub hash_prefix_v6: u8,
    /// How far ahead of its rate a source may be: `burst × interval`.
    pub limit_burst_ns: u64,
    /// What of a flow its hash covers: [`crate::hash::HASH_FLOW`] (the 5-tuple),
    /// [`crate::hash::HASH_SOURCE`], [`crate::hash::HASH_DESTINATION_PORT`].
    pub hash: u32,
    /// Explicit padding.
    pub _pad: u32,
}
const _: () = assert!(size_of::<VipInfo>() == 40);

/// `Backend::flags`: the slot holds a live backend. Flows pointing at a slot
/// without it are scheduled again.
pub const BACKEND_ACTIVE: u32 = 1;

/// `NextHop::flags`: the entry may be used. The agent clears it before it learns that
/// a route or neighbour changed; the program then asks the kernel's FIB.
pub const NEXT_HOP_VALID: u16 = 1;

/// Where a packet leaves for a next hop: the egress interface, its MTU, and both MACs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NextHop {
    /// Egress interface.
    pub ifindex: u32,
    /// Its MTU: bigger IP packets are handed to the kernel (which fragments or
    /// answers "fragmentation needed").
    pub mtu: u16,
    /// [`NEXT_HOP_VALID`] or 0.
    pub flags: u16,
    /// The egress interface's MAC.
    pub smac: [u8; 6],
    /// The next hop's MAC.
    pub dmac: [u8; 6],
}
const _: () = assert!(size_of::<NextHop>() == 20);

/// A backend slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    /// Where packets for it go.
    pub endpoint: Endpoint,
    /// [`BACKEND_ACTIVE`] or 0.
    pub flags: u32,
    /// Bumped each time the slot is retired or its flows reset; a flow remembers the
    /// generation it was scheduled in, and one from another generation is scheduled
    /// again, so no flow entry ever has to be found and deleted.
    pub generation: u32,
    /// The VIP it serves (for the VIP's counters on the established path).
    pub vip_id: u32,
    /// The VIP's forwarding mode, [`FORWARD_NAT`] ..., here so that a packet of a known
    /// flow needs no VIP lookup.
    pub forwarding: u32,
    /// How to reach it, resolved by the agent.
    pub next_hop: NextHop,
    /// The balancer's address the packets leave from: the client's replacement in full
    /// NAT, the outer source of GUE; for IPIP the base of the outer sources (the flow
    /// hash fills the bits of `Settings::ipip_spread_*`).
    pub source: [u32; 4],
}
const _: () = assert!(size_of::<Backend>() == 72);

/// The client-to-VIP 5-tuple of an IPv4 flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// Client address (network order).
    pub src: u32,
    /// VIP address.
    pub dst: u32,
    /// Client port, network order.
    pub sport: u16,
    /// VIP port, network order.
    pub dport: u16,
    /// IP protocol.
    pub proto: u8,
    /// Explicit padding, always zero (it is part of the hashed key); two fields, so
    /// that zeroing it is two stores, not a call of a byte-loop memset.
    pub _pad1: u8,
    /// See `_pad1`.
    pub _pad2: u16,
}
const _: () = assert!(size_of::<FlowKey>() == 16);

impl FlowKey {
    /// The key of an IPv4 flow (addresses and ports in network order).
    #[inline(always)]
    pub const fn new(src: u32, dst: u32, sport: u16, dport: u16, proto: u8) -> Self {
        Self {
            src,
            dst,
            sport,
            dport,
            proto,
            _pad1: 0,
            _pad2: 0,
        }
    }
}

/// The client-to-VIP 5-tuple of an IPv6 flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey6 {
    /// Client address, four network-order words.
    pub src: [u32; 4],
    /// VIP address.
    pub dst: [u32; 4],
    /// Client port, network order.
    pub sport: u16,
    /// VIP port, network order.
    pub dport: u16,
    /// IP protocol.
    pub proto: u8,
    /// Explicit padding, always zero, as in [`FlowKey`].
    pub _pad1: u8,
    /// See `_pad1`.
    pub _pad2: u16,
}
const _: () = assert!(size_of::<FlowKey6>() == 40);

impl FlowKey6 {
    /// The key of an IPv6 flow.
    #[inline(always)]
    pub const fn new(src: [u32; 4], dst: [u32; 4], sport: u16, dport: u16, proto: u8) -> Self {
        Self {
            src,
            dst,
            sport,
            dport,
            proto,
            _pad1: 0,
            _pad2: 0,
        }
    }
}

/// `FlowState::flags`: a packet other than the SYN has been seen. A SYN on an
/// established entry opens a new connection on a reused 5-tuple (scheduled afresh);
/// on an entry that is not, it is a retransmission and keeps its backend.
pub const FLOW_ESTABLISHED: u16 = 1;
/// `FlowState::flags`: the client sent a FIN or RST.
pub const FLOW_CLOSING: u16 = 2;
/// `FlowState::flags`: opened by a proven SYN cookie; the balancer sent the backend
/// its SYN and waits for its SYN-ACK. `FlowState::seq` holds the cookie (the
/// sequence number the client was given).
pub const FLOW_SYN_SENT: u16 = 4;
/// `FlowState::flags`: a proxied flow whose backend answered: `FlowState::seq` is
/// the cookie minus the backend's initial sequence number, added to the backend's
/// sequence numbers and taken from the client's acknowledgements.
pub const FLOW_SEQ_ADJUSTED: u16 = 8;
/// `FlowState::flags`: the backend sent a FIN or RST (seen in NAT and full NAT, whose
/// replies pass the balancer).
pub const FLOW_REPLY_CLOSING: u16 = 16;
/// `FlowState::flags`: the connection is over (FIN both ways, an RST, or the client's
/// FIN in DSR, whose replies are never seen) and was counted closed, once.
pub const FLOW_CLOSED: u16 = 32;
/// `FlowState::seen` is `bpf_ktime_get_coarse_ns() >> FLOW_CLOCK_SHIFT`: a tick of
/// about a second (2^30 ns), so a flow's entry is written once a second at most.
pub const FLOW_CLOCK_SHIFT: u32 = 30;

/// Where a flow goes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowState {
    /// Backend slot the flow is pinned to.
    pub backend_id: u32,
    /// The slot's [`Backend::generation`] when the flow was scheduled.
    pub generation: u32,
    /// [`FLOW_ESTABLISHED`], [`FLOW_CLOSING`], ... Changed with atomic ORs of the
    /// 32-bit word it shares with `nat_port` (CPUs may see both ends at once).
    pub flags: u16,
    /// Full NAT: the source port allocated to the flow (network order); 0 otherwise.
    pub nat_port: u16,
    /// A proxied flow's cookie or sequence delta ([`FLOW_SYN_SENT`],
    /// [`FLOW_SEQ_ADJUSTED`]); 0 otherwise.
    pub seq: u32,
    /// When a packet of the flow was last seen, in ticks of [`FLOW_CLOCK_SHIFT`]: the
    /// agent forgets flows idle for longer than their timeout.
    pub seen: u32,
}
const _: () = assert!(size_of::<FlowState>() == 20);

/// Where a full-NAT reply goes back to: the flow as the client sees it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NatTarget {
    /// The client's address (IPv4 in word 0).
    pub client: [u32; 4],
    /// The VIP's address.
    pub vip: [u32; 4],
    /// The client's port, network order.
    pub client_port: u16,
    /// The VIP's port, network order.
    pub vip_port: u16,
    /// For the VIP's reply counters.
    pub vip_id: u32,
    /// For the backend's reply counters.
    pub backend_id: u32,
}
const _: () = assert!(size_of::<NatTarget>() == 44);

/// `Iface::roles`: VIP traffic from clients arrives here.
pub const ROLE_CLIENT: u32 = 1;
/// `Iface::roles`: backends' replies arrive here.
pub const ROLE_BACKEND: u32 = 2;

/// An interface the program runs on.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Iface {
    /// [`ROLE_CLIENT`] | [`ROLE_BACKEND`]; 0: not ours, everything passes.
    pub roles: u32,
    /// Its MAC: only unicast frames to it are steered.
    pub mac: [u8; 6],
    /// Explicit padding.
    pub _pad: [u8; 2],
}
const _: () = assert!(size_of::<Iface>() == 12);

/// `Route::kind`: the destination is this machine (a health check's answer).
pub const ROUTE_LOCAL: u32 = 1;
/// `Route::kind`: on the link: the destination is its own next hop.
pub const ROUTE_LINK: u32 = 2;
/// `Route::kind`: through `Route::gateway`.
pub const ROUTE_GATEWAY: u32 = 3;
/// `Route::kind`: something only the kernel does (blackhole, multipath): ask its FIB.
pub const ROUTE_KERNEL: u32 = 4;

/// A client-side route.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Route {
    /// [`ROUTE_LOCAL`], [`ROUTE_LINK`] or [`ROUTE_GATEWAY`].
    pub kind: u32,
    /// The gateway for [`ROUTE_GATEWAY`] (network order; IPv4 in word 0).
    pub gateway: [u32; 4],
}
const _: () = assert!(size_of::<Route>() == 20);

/// Knobs of the data plane.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    /// New flows per second on one CPU above which Maglev VIPs stop inserting new
    /// flows (their answer does not need the table); 0: never.
    pub flood_threshold: u32,
    /// ICMP messages the balancer sends per second on one CPU (echo replies, "too
    /// big" errors); more are dropped.
    pub icmp_rate: u32,
    /// First source port of full NAT (host order).
    pub fullnat_port_min: u16,
    /// How many ports from `fullnat_port_min` full NAT allocates; 0: none.
    pub fullnat_port_count: u16,
    /// The UDP port GUE is sent to (network order).
    pub gue_port: u16,
    /// Explicit padding.
    pub _pad: u16,
    /// The bits of an IPIP outer IPv4 source that the flow hash fills (network order).
    pub ipip_spread_v4: u32,
    /// The same for the last word of an IPv6 outer source.
    pub ipip_spread_v6: u32,
}
const _: () = assert!(size_of::<Settings>() == 24);

/// One CPU's count of events (new flows, ICMP answers) in the current one-second window.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateWindow {
    /// When the window started (`bpf_ktime_get_ns`).
    pub started_ns: u64,
    /// Events in it.
    pub count: u32,
    /// 1 if the window before it was over its limit (a flood is held for a whole
    /// window after the one it was seen in).
    pub previous_over: u32,
}
const _: () = assert!(size_of::<RateWindow>() == 16);

/// How to rewrite a reply that a NAT backend sends to a client. (Full NAT's replies
/// are found by their 5-tuple in `NAT_FLOWS`; DSR backends send none through here.)
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReplyTarget {
    /// The VIP the backend serves: the reply's new source.
    pub vip: Endpoint,
    /// For the VIP's reply counters.
    pub vip_id: u32,
    /// For the backend's reply counters.
    pub backend_id: u32,
}
const _: () = assert!(size_of::<ReplyTarget>() == 28);

/// Traffic counters of a VIP or a backend (per CPU in the kernel). New counters go at
/// the end: an upgrade then carries the old ones over (see the agent's `migrate`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrafficStats {
    /// Client-to-VIP packets forwarded.
    pub packets: u64,
    /// Their bytes (whole frames).
    pub bytes: u64,
    /// Flows scheduled.
    pub new_flows: u64,
    /// Backend-to-client replies rewritten.
    pub reply_packets: u64,
    /// Their bytes.
    pub reply_bytes: u64,
    /// Flow-table entries that ended ([`FLOW_CLOSED`]): active connections are
    /// `opened_flows` minus these (less what the agent forgot as idle).
    pub closed_flows: u64,
    /// Flow-table entries made: connections opened.
    pub opened_flows: u64,
    /// A counter only the upgrade test's build has, to change the layout the way a
    /// real new counter would (appended: see the agent's `migrate`).
    #[cfg(feature = "layout-test")]
    pub layout_test: u64,
}
#[cfg(not(feature = "layout-test"))]
const _: () = assert!(size_of::<TrafficStats>() == 56);
#[cfg(feature = "layout-test")]
const _: () = assert!(size_of::<TrafficStats>() == 64);

impl TrafficStats {
    /// Adds another CPU's counters to these.
    pub fn add(&mut self, other: &Self) {
        self.packets += other.packets;
        self.bytes += other.bytes;
        self.new_flows += other.new_flows;
        self.reply_packets += other.reply_packets;
        self.reply_bytes += other.reply_bytes;
        self.closed_flows += other.closed_flows;
        self.opened_flows += other.opened_flows;
    }
}

/// Global counters (per CPU in the kernel): one per [`crate::Reason`]. New reasons
/// go at the end, so an upgrade carries the old counts over.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Counters {
    /// Indexed by `Reason as usize`.
    pub by_reason: [u64; crate::reason::REASON_COUNT],
}
const _: () = assert!(size_of::<Counters>() == 8 * crate::reason::REASON_COUNT);

impl Default for Counters {
    fn default() -> Self {
        Self {
            by_reason: [0; crate::reason::REASON_COUNT],
        }
    }
}

impl Counters {
    /// Adds another CPU's counters to these.
    pub fn add(&mut self, other: &Self) {
        for (a, b) in self.by_reason.iter_mut().zip(other.by_reason.iter()) {
            *a += b;
        }
    }

    /// The count of one reason.
    pub fn get(&self, reason: crate::Reason) -> u64 {
        self.by_reason[reason as usize]
    }
}

/// Index of a slot of a VIP's schedule in [`map_names::SCHEDULES`].
pub const fn schedule_index(vip_id: u32, slot: u32) -> u32 {
    vip_id * SCHEDULE_STRIDE + slot
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are repr(C) plain integers with explicit padding.
    unsafe impl aya::Pod for super::Endpoint {}
    unsafe impl aya::Pod for super::VipAddr {}
    unsafe impl aya::Pod for super::AddrUse {}
    unsafe impl aya::Pod for super::AclKey {}
    unsafe impl aya::Pod for super::AclRule {}
    unsafe impl aya::Pod for super::SourceKey {}
    unsafe impl aya::Pod for super::VipInfo {}
    unsafe impl aya::Pod for super::Backend {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::FlowKey6 {}
    unsafe impl aya::Pod for super::NatTarget {}
    unsafe impl aya::Pod for super::FlowState {}
    unsafe impl aya::Pod for super::ReplyTarget {}
    unsafe impl aya::Pod for super::TrafficStats {}
    unsafe impl aya::Pod for super::Counters {}
    unsafe impl aya::Pod for super::NextHop {}
    unsafe impl aya::Pod for super::Iface {}
    unsafe impl aya::Pod for super::Route {}
    unsafe impl aya::Pod for super::Settings {}
    unsafe impl aya::Pod for super::RateWindow {}
}

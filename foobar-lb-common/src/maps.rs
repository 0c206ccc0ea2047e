//! Map keys, values, names and capacities.
//!
//! All types are `#[repr(C)]` with explicit padding and plain integers, so their
//! layout is the same in the kernel and in user space; the size asserts catch drift.
//! Addresses and ports are kept in network byte order, as they appear in packets.

use core::mem::size_of;

/// `Endpoint::family` of an IPv4 endpoint.
pub const FAMILY_IPV4: u8 = 4;
/// `Endpoint::family` of an IPv6 endpoint (types are ready; the data plane is IPv4 now).
pub const FAMILY_IPV6: u8 = 6;

/// IP protocol number of TCP.
pub const PROTO_TCP: u8 = 6;
/// IP protocol number of UDP.
pub const PROTO_UDP: u8 = 17;

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

/// Map names, as the agent looks them up in the loaded object.
pub mod map_names {
    /// [`crate::Endpoint`] → [`crate::VipInfo`].
    pub const VIPS: &str = "VIPS";
    /// [`crate::VipAddr`] → `u32` reference count: the VIP addresses, for fragments.
    pub const VIP_ADDRS: &str = "VIP_ADDRS";
    /// `u32` backend id → [`crate::Backend`].
    pub const BACKENDS: &str = "BACKENDS";
    /// `vip_id * SCHEDULE_STRIDE + slot` → backend id.
    pub const SCHEDULES: &str = "SCHEDULES";
    /// `u32` vip id → round-robin cursor.
    pub const RR_CURSORS: &str = "RR_CURSORS";
    /// [`crate::FlowKey`] → [`crate::FlowState`], LRU.
    pub const FLOWS: &str = "FLOWS";
    /// Backend [`crate::Endpoint`] → [`crate::ReplyTarget`]: how to rewrite replies.
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
    pub const ALL: [&str; 11] = [
        VIPS,
        VIP_ADDRS,
        BACKENDS,
        SCHEDULES,
        RR_CURSORS,
        FLOWS,
        REPLIES,
        TX_PORTS,
        COUNTERS,
        VIP_STATS,
        BACKEND_STATS,
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
    pub const fn ipv4(addr: u32, port: u16, proto: u8) -> Self {
        Self {
            addr: [addr, 0, 0, 0],
            port,
            proto,
            family: FAMILY_IPV4,
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

/// `VipInfo::scheduler`: weighted round robin over the ring.
pub const SCHED_RR: u32 = 0;
/// `VipInfo::scheduler`: Maglev table indexed by the flow hash.
pub const SCHED_MAGLEV: u32 = 1;

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
    /// Reserved for per-VIP flags.
    pub flags: u32,
}
const _: () = assert!(size_of::<VipInfo>() == 16);

/// `Backend::flags`: the slot holds a live backend. Flows pointing at a slot
/// without it are scheduled again.
pub const BACKEND_ACTIVE: u32 = 1;

/// A backend slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    /// Where packets for it go.
    pub endpoint: Endpoint,
    /// [`BACKEND_ACTIVE`] or 0.
    pub flags: u32,
}
const _: () = assert!(size_of::<Backend>() == 24);

/// The client-to-VIP 5-tuple of a flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// Client address.
    pub src: [u32; 4],
    /// VIP address.
    pub dst: [u32; 4],
    /// Client port, network order.
    pub sport: u16,
    /// VIP port, network order.
    pub dport: u16,
    /// IP protocol.
    pub proto: u8,
    /// [`FAMILY_IPV4`] or [`FAMILY_IPV6`].
    pub family: u8,
    /// Explicit padding, always zero (it is part of the hashed key).
    pub _pad: [u8; 2],
}
const _: () = assert!(size_of::<FlowKey>() == 40);

/// Where a flow goes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowState {
    /// Backend slot the flow is pinned to.
    pub backend_id: u32,
    /// VIP the flow belongs to.
    pub vip_id: u32,
}
const _: () = assert!(size_of::<FlowState>() == 8);

/// How to rewrite a reply that a backend sends to a client.
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

/// Traffic counters of a VIP or a backend (per CPU in the kernel).
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
}
const _: () = assert!(size_of::<TrafficStats>() == 40);

impl TrafficStats {
    /// Adds another CPU's counters to these.
    pub fn add(&mut self, other: &Self) {
        self.packets += other.packets;
        self.bytes += other.bytes;
        self.new_flows += other.new_flows;
        self.reply_packets += other.reply_packets;
        self.reply_bytes += other.reply_bytes;
    }
}

/// Global counters (per CPU in the kernel): one per [`crate::Reason`].
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
    unsafe impl aya::Pod for super::VipInfo {}
    unsafe impl aya::Pod for super::Backend {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::FlowState {}
    unsafe impl aya::Pod for super::ReplyTarget {}
    unsafe impl aya::Pod for super::TrafficStats {}
    unsafe impl aya::Pod for super::Counters {}
}

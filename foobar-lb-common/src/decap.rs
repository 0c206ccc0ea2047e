//! The backend side of direct server return: the maps of the decapsulation program
//! (`foobar-lb decap`) and why it did what it did with each packet.

use core::mem::size_of;

/// Map names of the decapsulation program.
pub mod map_names {
    /// [`crate::VipAddr`] → `u32` (1): the VIPs whose packets are taken out of their
    /// outer header here. Anything else encapsulated is dropped.
    pub const DECAP_VIPS: &str = "DECAP_VIPS";
    /// One [`crate::decap::DecapSettings`].
    pub const DECAP_SETTINGS: &str = "DECAP_SETTINGS";
    /// The outer sources accepted (an LPM trie of IPv4 prefixes → 1), when
    /// `DecapSettings::check_sources` is set: the balancers'.
    pub const DECAP_SOURCES: &str = "DECAP_SOURCES";
    /// The same for IPv6.
    pub const DECAP_SOURCES6: &str = "DECAP_SOURCES6";
    /// Per-CPU [`crate::decap::DecapCounters`].
    pub const DECAP_COUNTERS: &str = "DECAP_COUNTERS";
}

/// Most VIPs one backend decapsulates for.
pub const MAX_DECAP_VIPS: u32 = 256;
/// Most source prefixes per family.
pub const MAX_DECAP_SOURCES: u32 = 256;

/// Knobs of the decapsulation program.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DecapSettings {
    /// The UDP port GUE arrives on (network order); 0: no GUE.
    pub gue_port: u16,
    /// 1: only outer sources in `DECAP_SOURCES`/`DECAP_SOURCES6` are decapsulated.
    pub check_sources: u16,
}
const _: () = assert!(size_of::<DecapSettings>() == 4);

macro_rules! decap_reasons {
    ($($variant:ident = $name:literal, $doc:literal;)+) => {
        /// What the decapsulation program did with a packet: the index into
        /// [`DecapCounters`].
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum DecapReason {
            $(#[doc = $doc] $variant,)+
        }

        /// Number of decapsulation reasons.
        pub const DECAP_REASON_COUNT: usize = [$(DecapReason::$variant),+].len();

        impl DecapReason {
            /// Every reason, in counter order.
            pub const ALL: [DecapReason; DECAP_REASON_COUNT] = [$(DecapReason::$variant),+];

            /// The snake_case name.
            pub const fn name(self) -> &'static str {
                match self { $(DecapReason::$variant => $name,)+ }
            }
        }
    };
}

decap_reasons! {
    Ipip = "decapsulated_ipip", "An IPIP (or IPv6-in-IP) packet to a VIP, taken out of its outer header and passed on.";
    Gue = "decapsulated_gue", "A GUE packet to a VIP, taken out of its outer headers and passed on.";
    PassNotEncapsulated = "pass_not_encapsulated", "Not encapsulated (or not to this host's GUE port): the kernel's, untouched.";
    DropTruncated = "drop_truncated", "An outer or inner header cut short.";
    DropBadInner = "drop_bad_inner", "The inner packet is not IPv4 or IPv6, or its version does not match.";
    DropNotAVip = "drop_not_a_vip", "The inner destination is not a VIP of this backend: not ours to accept.";
    DropUnknownSource = "drop_unknown_source", "The outer source is none of the balancers' prefixes given.";
    DropFragment = "drop_fragment", "An outer fragment: an encapsulated packet is taken whole or not at all.";
    DropNoRoom = "drop_no_room", "The frame could not be shrunk.";
}

/// Decapsulation counters (per CPU in the kernel), one per [`DecapReason`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecapCounters {
    /// Indexed by `DecapReason as usize`.
    pub by_reason: [u64; DECAP_REASON_COUNT],
}

impl Default for DecapCounters {
    fn default() -> Self {
        Self {
            by_reason: [0; DECAP_REASON_COUNT],
        }
    }
}

impl DecapCounters {
    /// Adds another CPU's counters to these.
    pub fn add(&mut self, other: &Self) {
        for (a, b) in self.by_reason.iter_mut().zip(other.by_reason.iter()) {
            *a += b;
        }
    }

    /// The count of one reason.
    pub fn get(&self, reason: DecapReason) -> u64 {
        self.by_reason[reason as usize]
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C) plain integers with explicit padding.
    unsafe impl aya::Pod for super::DecapSettings {}
    unsafe impl aya::Pod for super::DecapCounters {}
}

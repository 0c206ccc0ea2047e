//! Why a packet got the action it got.
//!
//! Every packet ends in exactly one *outcome* reason, each tied to one XDP action, so
//! the per-action totals are sums the agent computes: the kernel bumps one counter
//! per packet. *Event* reasons count what happened on the way (a flow was scheduled,
//! a reply was rewritten) and have no action of their own.

/// XDP action numbers (uapi `enum xdp_action`).
pub mod xdp_action {
    /// The program failed; the kernel drops the frame and traces it.
    pub const ABORTED: u32 = 0;
    /// Dropped.
    pub const DROP: u32 = 1;
    /// Handed to the kernel's stack.
    pub const PASS: u32 = 2;
    /// Sent back out of the interface it came in on.
    pub const TX: u32 = 3;
    /// Sent out of another interface.
    pub const REDIRECT: u32 = 4;
}

macro_rules! reasons {
    ($($variant:ident = $name:literal, $action:expr, $doc:literal;)+) => {
        /// Why a packet got its action: the index into [`crate::Counters`].
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum Reason {
            $(#[doc = $doc] $variant,)+
        }

        /// Number of reasons: the length of [`crate::Counters::by_reason`].
        pub const REASON_COUNT: usize = [$(Reason::$variant),+].len();

        impl Reason {
            /// Every reason, in counter order.
            pub const ALL: [Reason; REASON_COUNT] = [$(Reason::$variant),+];

            /// The snake_case name used in metrics and the CLI.
            pub const fn name(self) -> &'static str {
                match self { $(Reason::$variant => $name,)+ }
            }

            /// The XDP action of an outcome; `None` for an event.
            pub const fn action(self) -> Option<u32> {
                match self { $(Reason::$variant => $action,)+ }
            }
        }
    };
}

use xdp_action::{DROP, PASS, REDIRECT, TX};

reasons! {
    // Outcomes handed to the kernel untouched: not ours.
    PassNotOurInterface = "pass_not_our_interface", Some(PASS), "Arrived on an interface the agent has not set up (or whose ifindex is beyond the table).";
    PassOtherMac = "pass_other_mac", Some(PASS), "Unicast to another MAC (a flooding switch, a promiscuous NIC): not for this balancer.";
    PassMulticast = "pass_multicast", Some(PASS), "Broadcast or multicast (ARP requests, VRRP, neighbour solicitations): the kernel's.";
    PassNotIp = "pass_not_ip", Some(PASS), "Neither IPv4 nor IPv6 (ARP, unknown ethertype).";
    PassNotTcpUdp = "pass_not_tcp_udp", Some(PASS), "IP but neither TCP, UDP nor ICMP (VRRP, ESP, ...).";
    PassIcmp = "pass_icmp", Some(PASS), "ICMP that is not an echo request to a VIP nor an error about a VIP flow (neighbour discovery, the balancer's own pings).";
    PassNotVip = "pass_not_vip", Some(PASS), "TCP/UDP for no VIP and from no backend.";
    PassFragment = "pass_fragment", Some(PASS), "A fragment not addressed to a VIP nor from a NAT backend.";
    PassLocal = "pass_local", Some(PASS), "From a backend but not to be forwarded: to the balancer itself (a health check's answer), or to nowhere.";
    // Outcomes of packets we rewrote but leave the kernel to deliver.
    PassNoNeighbour = "pass_no_neighbour", Some(PASS), "Rewritten, next hop not resolved yet: the kernel forwards it and resolves it.";
    PassNotTxPort = "pass_not_tx_port", Some(PASS), "Rewritten, egress interface not in the redirect map: the kernel forwards it.";
    PassTooBig = "pass_too_big", Some(PASS), "Rewritten, bigger than the egress MTU and fragmentable (IPv4 without DF): the kernel fragments it.";
    // Outcomes of malformed or unsteerable packets.
    DropTruncatedEthernet = "drop_truncated_ethernet", Some(DROP), "Shorter than an Ethernet (or 802.1Q) header.";
    DropTruncatedIpv4 = "drop_truncated_ipv4", Some(DROP), "Shorter than its IPv4 header, options included.";
    DropBadIpVersion = "drop_bad_ip_version", Some(DROP), "The IP version field does not match the ethertype.";
    DropBadIhl = "drop_bad_ihl", Some(DROP), "IPv4 header length below 5 words.";
    DropBadTotalLength = "drop_bad_total_length", Some(DROP), "IPv4 total length (or IPv6 payload length) below the headers or beyond the frame.";
    DropTruncatedIpv6 = "drop_truncated_ipv6", Some(DROP), "Shorter than an IPv6 header.";
    DropIpv6ExtensionHeaders = "drop_ipv6_extension_headers", Some(DROP), "More IPv6 extension headers than the program walks (4), or one cut short.";
    DropTruncatedL4 = "drop_truncated_l4", Some(DROP), "TCP/UDP/ICMP header cut short.";
    DropBadTcpDataOffset = "drop_bad_tcp_data_offset", Some(DROP), "TCP data offset below 5 words or beyond the packet.";
    DropFragment = "drop_fragment", Some(DROP), "A fragment addressed to a VIP: it cannot be steered.";
    DropReplyFragment = "drop_reply_fragment", Some(DROP), "A fragment from a NAT backend: it cannot be translated, and must not leak its address.";
    DropTruncatedIcmp = "drop_truncated_icmp", Some(DROP), "An ICMP error about a VIP flow whose quoted headers are cut short.";
    DropIcmpRateLimited = "drop_icmp_rate_limited", Some(DROP), "An ICMP answer beyond the configured rate (echo reply, too big).";
    DropNoBackend = "drop_no_backend", Some(DROP), "For a VIP with no backend available.";
    DropNoNatPort = "drop_no_nat_port", Some(DROP), "Full NAT found no free source port toward the backend.";
    DropNoRoom = "drop_no_room", Some(DROP), "The frame could not be grown or shrunk (outer header, ICMP answer).";
    DropNoRoute = "drop_no_route", Some(DROP), "Rewritten but the kernel has no route to forward it.";
    DropForgedReply = "drop_forged_reply", Some(DROP), "From a backend's address and port, but on a client-side interface: forged, not translated.";
    // Outcomes of edge protection.
    DropClosedAddress = "drop_closed_address", Some(DROP), "To a VIP address but for none of its VIP endpoints (a port scan, the balancer's own services): the address is closed.";
    DropAcl = "drop_acl", Some(DROP), "From a source the global access list or its VIP's keeps out.";
    DropSourceLimit = "drop_source_limit", Some(DROP), "A new flow from a source over its VIP's new-flow rate.";
    DropSynProxyPending = "drop_syn_proxy_pending", Some(DROP), "A packet of a flow opened by a SYN cookie whose backend has not answered yet.";
    // Outcomes of forwarded or answered packets.
    Tx = "tx", Some(TX), "Rewritten and sent back out of the interface it came in on.";
    Redirect = "redirect", Some(REDIRECT), "Rewritten and redirected out of another interface.";
    IcmpEchoReply = "icmp_echo_reply", Some(TX), "An echo request to a VIP, answered.";
    IcmpTooBig = "icmp_too_big", Some(TX), "Too big for the next hop (with the outer header, in DSR): answered with ICMP fragmentation needed / packet too big.";
    SynCookie = "syn_cookie", Some(TX), "A SYN to a NAT VIP during a new-flow flood, answered by the balancer with a SYN cookie (nothing remembered).";
    SynProxyAck = "syn_proxy_ack", Some(TX), "A backend's SYN-ACK of a proxied flow sent again: answered with the client's ACK.";
    // Events (flow hits are not counted: they are packets minus new flows).
    FlowNew = "flow_new", None, "A flow was scheduled onto a backend (a SYN, or a flow-table miss).";
    FlowMissNonSyn = "flow_miss_non_syn", None, "A non-SYN packet missed the flow table (evicted, or a takeover).";
    FlowBackendGone = "flow_backend_gone", None, "A known flow's backend was removed or reset: the flow was scheduled again.";
    FlowReused = "flow_reused", None, "A SYN on an established flow's 5-tuple: a new connection, scheduled afresh.";
    SynRetransmit = "syn_retransmit", None, "A SYN again before its flow was established: it kept its backend.";
    FlowInsertFailed = "flow_insert_failed", None, "The flow table refused a new entry: the flow was forwarded but not remembered.";
    FlowInsertSkipped = "flow_insert_skipped", None, "A new flow during a new-flow flood: placed by its hash and not inserted (the hash gives it the same backend again).";
    NextHopFib = "next_hop_fib", None, "The next hop was not cached (or not valid): the kernel's FIB was asked.";
    Reply = "reply", None, "A backend's reply was rewritten to come from its VIP (NAT or full NAT).";
    FullNat = "fullnat", None, "A client packet left with the balancer's address and port as its source (full NAT).";
    EncapIpip = "encap_ipip", None, "A client packet was encapsulated in IP to its backend (DSR).";
    EncapGue = "encap_gue", None, "A client packet was encapsulated in GUE to its backend (DSR).";
    IcmpToBackend = "icmp_to_backend", None, "An ICMP error about a VIP flow was sent on to the flow's backend.";
    IcmpToClient = "icmp_to_client", None, "An ICMP error from a backend's side was translated for the client.";
    SynCookieValid = "syn_cookie_valid", None, "A client's ACK proved its SYN cookie: its flow was opened, and the backend sent a SYN.";
}

/// Index of the first event reason: every reason from here on is an event.
pub const FIRST_EVENT: usize = Reason::FlowNew as usize;
/// Number of event reasons.
pub const EVENT_COUNT: usize = REASON_COUNT - FIRST_EVENT;

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;

    #[test]
    fn names_are_unique_and_snake_case() {
        let mut names: std::vec::Vec<_> = Reason::ALL.iter().map(|r| r.name()).collect();
        assert!(names.iter().all(|n| {
            n.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        }));
        names.sort();
        names.dedup();
        assert_eq!(names.len(), REASON_COUNT);
    }

    #[test]
    fn events_come_after_every_outcome() {
        for r in Reason::ALL {
            assert_eq!(r.action().is_none(), r as usize >= FIRST_EVENT, "{r:?}");
        }
        const { assert!(EVENT_COUNT <= 16, "events are a 16-bit set in the program") };
    }

    #[test]
    fn counter_order_is_declaration_order() {
        for (i, r) in Reason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i, "{r:?}");
        }
    }
}

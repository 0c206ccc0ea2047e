//! Edge protection: who may reach a VIP (access lists), how fast a source may open
//! flows (a GCRA per source), and what becomes of traffic to a VIP address that is
//! for none of its VIP endpoints (dropped, unless the address is open).
//!
//! The agent writes the lists and each scope's flags; a data plane without rules
//! pays one array lookup per client packet for them.

use aya_ebpf::{helpers::bpf_ktime_get_ns, maps::lpm_trie::Key};
use foobar_lb_common::{
    ACL_ALLOW, ACL_ANY, ACL_DEFAULT_DENY, ACL_RULES, ADDR_OPEN, AclKey, FAMILY_IPV6, Reason,
    SourceKey, VipAddr, VipInfo, acl_scope_word, hash::masked,
};

use crate::{
    ACL_SCOPES, ACL_STATS, ACLS, SCRATCH, SOURCE_LIMITS, VIP_ADDRS, Verdict, family::Family,
};

/// Where the edge's map keys are built: in the scratch map, as the program's stack
/// is spent by its deepest chain of calls.
pub struct EdgeScratch {
    acl: Key<AclKey>,
    source: SourceKey,
}

/// Whether the global access list and VIP `vip_id`'s let the parsed packet's
/// source in.
#[inline(always)]
pub fn admit<F: Family>(vip_id: u32) -> Result<(), Verdict> {
    let global = match ACL_SCOPES.get(0) {
        Some(flags) => *flags,
        None => 0,
    };
    if global & ACL_ANY == 0 {
        return Ok(());
    }
    let vip = match ACL_SCOPES.get(1 + vip_id) {
        Some(flags) => *flags,
        None => 0,
    };
    if scope_admits::<F>(0, global) && scope_admits::<F>(1 + vip_id, vip) {
        Ok(())
    } else {
        Err(Verdict::of(Reason::DropAcl))
    }
}

/// One list's answer for the parsed packet's source: its longest matching rule's,
/// or its default (keep out when it has allow rules, let in otherwise). The rule
/// that answers is counted.
#[inline(never)]
fn scope_admits<F: Family>(scope: u32, flags: u32) -> bool {
    if flags & ACL_RULES == 0 {
        return true;
    }
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return true;
    };
    let scratch = unsafe { &mut *scratch };
    let src = F::words(F::packet(scratch).src);
    let key = &mut scratch.edge.acl;
    key.prefix_len = 32 + F::BITS;
    key.data = AclKey {
        scope: acl_scope_word(scope, F::FAMILY),
        addr: src,
    };
    match ACLS.get(&*key) {
        Some(rule) => {
            if let Some(count) = ACL_STATS.get_ptr_mut(rule.id) {
                unsafe { *count += 1 };
            }
            rule.action == ACL_ALLOW
        }
        None => flags & ACL_DEFAULT_DENY == 0,
    }
}

/// Whether the parsed packet's source may open one more flow to `vip` now.
#[inline(always)]
pub fn within_limit<F: Family>(vip: &VipInfo) -> bool {
    vip.limit_interval_ns == 0 || source_within_limit::<F>(vip)
}

/// A generic cell rate algorithm: the entry holds when the source's next flow is
/// due; it may be up to the burst ahead of now. (CPUs race on an entry without
/// harm: at worst a flow more passes.)
#[inline(never)]
#[expect(
    clippy::needless_borrows_for_generic_args,
    reason = "the key is passed where it is, in the scratch map, not copied to the stack"
)]
fn source_within_limit<F: Family>(vip: &VipInfo) -> bool {
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return true;
    };
    let scratch = unsafe { &mut *scratch };
    let words = F::words(F::packet(scratch).src);
    let prefix = if F::FAMILY == FAMILY_IPV6 {
        vip.limit_prefix_v6
    } else {
        vip.limit_prefix_v4
    } as u32;
    let key = &mut scratch.edge.source;
    key.vip_id = vip.id;
    key.addr = [
        masked(words[0], prefix, 0),
        masked(words[1], prefix, 32),
        masked(words[2], prefix, 64),
        masked(words[3], prefix, 96),
    ];
    let now = unsafe { bpf_ktime_get_ns() };
    let interval = vip.limit_interval_ns as u64;
    match SOURCE_LIMITS.get_ptr_mut(&*key) {
        Some(due) => {
            let due = unsafe { &mut *due };
            let from = if *due > now { *due } else { now };
            if from + interval - now > vip.limit_burst_ns {
                return false;
            }
            *due = from + interval;
        }
        None => {
            // A full table forgets its least recent source: at worst it starts over.
            let _ = SOURCE_LIMITS.insert(&*key, now + interval, 0);
        }
    }
    true
}

/// What becomes of a packet to `dst` that is for no VIP endpoint and no reply:
/// dropped at a closed VIP address, passed (`otherwise`) anywhere else.
#[inline(always)]
pub fn not_for_a_vip<F: Family>(dst: F::Addr, otherwise: Reason) -> Verdict {
    let to = VipAddr {
        addr: F::words(dst),
    };
    match unsafe { VIP_ADDRS.get(to) } {
        Some(address) if address.flags & ADDR_OPEN == 0 => Verdict::of(Reason::DropClosedAddress),
        _ => Verdict::of(otherwise),
    }
}

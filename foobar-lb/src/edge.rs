//! Edge protection as an operator writes it: access lists (global and per VIP),
//! new-flow limits per source, and the VIP addresses left open to the balancer's own
//! services. Validation here; the maps' form is computed in [`crate::reconcile`].
//!
//! ```toml
//! [edge]
//! acl = { deny = ["192.0.2.0/24"] }          # every VIP
//! open_addresses = []                         # VIP addresses whose other ports pass
//!
//! [[vips]]
//! name = "www"
//! acl = { allow = ["198.51.100.0/24"], deny = ["198.51.100.66/32"] }
//! new_flow_limit = { rate = 50, burst = 100, prefix_v4 = 32, prefix_v6 = 64 }
//! ```

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use foobar_lb_common::{ACL_ALLOW, ACL_DENY, MAX_ACL_RULES};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::state::StateError;

/// What a rule does to the sources it matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Let in.
    Allow,
    /// Keep out.
    Deny,
}

impl Action {
    /// The data plane's constant.
    pub const fn code(self) -> u32 {
        match self {
            Action::Allow => ACL_ALLOW,
            Action::Deny => ACL_DENY,
        }
    }

    /// Its name in the config file and the CLI.
    pub const fn name(self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Deny => "deny",
        }
    }
}

/// An access list. The longest prefix that matches a source decides; a source no
/// rule matches is let in, unless the list has allow rules (then it is an allow list,
/// and keeps out whoever it does not name). A packet must pass the global list and
/// its VIP's; open flows are cut as soon as a change keeps their source out.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Acl {
    /// Prefixes let in.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<IpNet>,
    /// Prefixes kept out.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny: Vec<IpNet>,
}

impl Acl {
    /// Whether it has no rule.
    pub fn is_empty(&self) -> bool {
        self.allow.is_empty() && self.deny.is_empty()
    }

    /// Its rules.
    pub fn rules(&self) -> impl Iterator<Item = (IpNet, Action)> + '_ {
        let allow = self.allow.iter().map(|n| (*n, Action::Allow));
        allow.chain(self.deny.iter().map(|n| (*n, Action::Deny)))
    }

    /// The list of `action`.
    pub fn list_mut(&mut self, action: Action) -> &mut Vec<IpNet> {
        match action {
            Action::Allow => &mut self.allow,
            Action::Deny => &mut self.deny,
        }
    }

    /// Refuses prefixes with host bits set, and a prefix listed twice.
    pub fn validate(&self, at: &str) -> Result<(), StateError> {
        let mut seen: BTreeMap<IpNet, Action> = BTreeMap::new();
        for (net, action) in self.rules() {
            let field = format!("{at}.{}", action.name());
            if net.trunc() != net {
                return Err(StateError {
                    field,
                    message: format!("{net} has host bits set (did you mean {}?)", net.trunc()),
                });
            }
            if let Some(before) = seen.insert(net, action) {
                let message = if before == action {
                    format!("{net} is listed twice")
                } else {
                    format!("{net} is both allowed and denied")
                };
                return Err(StateError { field, message });
            }
        }
        Ok(())
    }
}

fn default_prefix_v4() -> u8 {
    32
}

fn default_prefix_v6() -> u8 {
    64
}

/// How many new flows per second one source may open to a VIP. A source is an
/// address cut to a prefix length (an IPv6 /64 by default: one host has a whole
/// subnet). New flows over the limit are dropped; established flows never are.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewFlowLimit {
    /// New flows per second, sustained.
    pub rate: u32,
    /// New flows a quiet source may open at once; the rate by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
    /// Bits of an IPv4 address that make one source.
    #[serde(default = "default_prefix_v4")]
    pub prefix_v4: u8,
    /// Bits of an IPv6 address that make one source.
    #[serde(default = "default_prefix_v6")]
    pub prefix_v6: u8,
}

/// Highest rate accepted: one new flow a nanosecond would be no limit at all.
pub const MAX_NEW_FLOW_RATE: u32 = 10_000_000;

impl NewFlowLimit {
    /// Refuses a rate or burst of 0 and prefixes longer than an address.
    pub fn validate(&self, at: &str) -> Result<(), StateError> {
        let refuse = |field: &str, message: String| StateError {
            field: format!("{at}.{field}"),
            message,
        };
        if self.rate == 0 || self.rate > MAX_NEW_FLOW_RATE {
            return Err(refuse(
                "rate",
                format!("must be 1 to {MAX_NEW_FLOW_RATE} new flows per second"),
            ));
        }
        if self.burst == Some(0) {
            return Err(refuse("burst", "must be 1 or more".into()));
        }
        if self.prefix_v4 > 32 {
            return Err(refuse("prefix_v4", "must be 0 to 32".into()));
        }
        if self.prefix_v6 > 128 {
            return Err(refuse("prefix_v6", "must be 0 to 128".into()));
        }
        Ok(())
    }

    /// Nanoseconds in which a source earns one new flow.
    pub fn interval_ns(&self) -> u32 {
        1_000_000_000 / self.rate.max(1)
    }

    /// How far ahead of its rate a source may run: the burst's worth of intervals.
    pub fn burst_ns(&self) -> u64 {
        u64::from(self.burst.unwrap_or(self.rate)) * u64::from(self.interval_ns())
    }
}

/// Edge settings that are not a VIP's own.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EdgeSpec {
    /// The access list every VIP's traffic passes first.
    #[serde(default, skip_serializing_if = "Acl::is_empty")]
    pub acl: Acl,
    /// VIP addresses that stay open: what arrives for none of their VIP endpoints
    /// passes to the balancer's own stack, as before edge protection (by default a VIP
    /// address is closed, so a service of the balancer listening on every address is
    /// not reachable through it).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub open_addresses: Vec<IpAddr>,
}

impl EdgeSpec {
    /// Checks the global list and that every open address is a VIP's.
    pub fn validate(&self, vip_addresses: &BTreeSet<IpAddr>) -> Result<(), StateError> {
        self.acl.validate("edge.acl")?;
        for (i, address) in self.open_addresses.iter().enumerate() {
            if !vip_addresses.contains(address) {
                return Err(StateError {
                    field: format!("edge.open_addresses[{i}]"),
                    message: format!("{address} is the address of no VIP"),
                });
            }
        }
        Ok(())
    }
}

/// Refuses more rules than the data plane holds.
pub fn check_rule_count(total: usize) -> Result<(), StateError> {
    if total > MAX_ACL_RULES as usize {
        return Err(StateError {
            field: "acl".into(),
            message: format!("{total} access-list rules in all, at most {MAX_ACL_RULES}"),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acl(allow: &[&str], deny: &[&str]) -> Acl {
        Acl {
            allow: allow.iter().map(|s| s.parse().unwrap()).collect(),
            deny: deny.iter().map(|s| s.parse().unwrap()).collect(),
        }
    }

    #[test]
    fn refuses_host_bits_and_duplicates_naming_the_prefix() {
        let e = acl(&["10.0.0.1/8"], &[])
            .validate("vips[0].acl")
            .unwrap_err();
        assert_eq!(e.field, "vips[0].acl.allow");
        assert!(e.message.contains("10.0.0.1/8") && e.message.contains("10.0.0.0/8"));
        let e = acl(&["10.0.0.0/8"], &["10.0.0.0/8"])
            .validate("edge.acl")
            .unwrap_err();
        assert_eq!(e.field, "edge.acl.deny");
        assert!(e.message.contains("both allowed and denied"), "{e}");
        assert!(
            acl(&["10.0.0.0/8", "2001:db8::/32"], &["10.1.0.0/16"])
                .validate("x")
                .is_ok()
        );
    }

    #[test]
    fn limit_rates_become_intervals() {
        let limit = NewFlowLimit {
            rate: 50,
            burst: Some(100),
            prefix_v4: 32,
            prefix_v6: 64,
        };
        assert_eq!(limit.interval_ns(), 20_000_000);
        assert_eq!(limit.burst_ns(), 2_000_000_000);
        let bad = NewFlowLimit { rate: 0, ..limit };
        assert_eq!(
            bad.validate("vips[1].new_flow_limit").unwrap_err().field,
            "vips[1].new_flow_limit.rate"
        );
        let bad = NewFlowLimit {
            prefix_v4: 33,
            ..limit
        };
        assert!(bad.validate("x").is_err());
    }

    #[test]
    fn open_addresses_must_be_vip_addresses() {
        let spec = EdgeSpec {
            acl: Acl::default(),
            open_addresses: vec!["10.0.0.9".parse().unwrap()],
        };
        let vips: BTreeSet<IpAddr> = ["10.0.0.100".parse().unwrap()].into();
        let e = spec.validate(&vips).unwrap_err();
        assert_eq!(e.field, "edge.open_addresses[0]");
    }
}

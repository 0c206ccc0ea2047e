//! Active-passive failover of the VIPs with VRRP version 3 (RFC 5798), IPv4, wire
//! compatible with keepalived.
//!
//! The MASTER holds the VIP addresses on its client-side interface and the backends'
//! virtual gateway on the backend side (as LVS-NAT pairs do with keepalived), so both
//! client traffic and the backends' replies find it. The data plane runs on both
//! balancers; since both compute the same Maglev tables from the same backends and
//! replies are translated statelessly, a new MASTER carries on the flows of the old.
//!
//! [`packet`] is the wire format, [`router`] the state machine, [`net`] the sockets
//! and addresses, [`handoff`] what a restart passes from one agent to the next, and
//! [`instance`] runs them as a task of the daemon.

pub mod handoff;
pub mod instance;
pub mod net;
pub mod packet;
pub mod router;

use std::{collections::BTreeSet, net::Ipv4Addr, time::Duration};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::state::{StateError, VipSpec};

pub use instance::{VrrpStatus, VrrpView};
pub use router::Role;

fn default_interval_ms() -> u32 {
    1000
}

fn default_true() -> bool {
    true
}

fn default_track_weight() -> u8 {
    50
}

/// An address that moves with the VIPs, on an interface of its own: in `nat` mode,
/// the backends' gateway on the backend-side network.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VirtualAddress {
    /// The interface it lives on.
    pub interface: String,
    /// Address and prefix, e.g. `10.1.0.1/24`.
    pub address: Ipv4Net,
}

/// What lowers our priority so that the peer takes over.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrackConfig {
    /// Subtracted from the priority while the data plane is not serving (an interface
    /// missing or down) or a VIP of the router has no usable backend; 0 turns tracking off.
    #[serde(default = "default_track_weight")]
    pub weight: u8,
}

impl Default for TrackConfig {
    fn default() -> Self {
        TrackConfig {
            weight: default_track_weight(),
        }
    }
}

/// `[vrrp]`: one virtual router shared with a peer balancer (foobar-lb or keepalived).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VrrpConfig {
    /// Where advertisements are sent and heard, and where the VIPs live (client side).
    pub interface: String,
    /// Virtual router id, 1..=255; the same on both balancers.
    pub vrid: u8,
    /// 1..=254; the higher priority is MASTER.
    pub priority: u8,
    /// Advertisement interval in ms, a multiple of 10 (the wire carries centiseconds).
    #[serde(default = "default_interval_ms")]
    pub advert_interval_ms: u32,
    /// Whether a higher-priority BACKUP takes over from a running MASTER.
    #[serde(default = "default_true")]
    pub preempt: bool,
    /// VIP addresses the router moves; each must be the address of a `[[vips]]` entry.
    pub vips: Vec<Ipv4Addr>,
    /// Further addresses moving with the VIPs (the backends' gateway in `nat` mode).
    #[serde(default)]
    pub virtual_addresses: Vec<VirtualAddress>,
    /// Priority tracking.
    #[serde(default)]
    pub track: TrackConfig,
}

impl VrrpConfig {
    /// The advertisement interval.
    pub fn interval(&self) -> Duration {
        Duration::from_millis(u64::from(self.advert_interval_ms))
    }

    /// Every address the router owns, as `(interface, address)`, in advertisement
    /// order: the VIPs (`/32`) then the virtual addresses.
    pub fn addresses(&self) -> Vec<(String, Ipv4Net)> {
        self.vips
            .iter()
            .map(|&vip| (self.interface.clone(), Ipv4Net::from(vip)))
            .chain(
                self.virtual_addresses
                    .iter()
                    .map(|v| (v.interface.clone(), v.address)),
            )
            .collect()
    }

    /// Checks every field against the data-plane interfaces and the VIPs.
    pub fn validate(&self, interfaces: &[String], vips: &[VipSpec]) -> Result<(), StateError> {
        let bad = |field: String, message: String| StateError { field, message };
        let on_dataplane = |field: String, name: &str| {
            if interfaces.iter().any(|i| i == name) {
                Ok(())
            } else {
                Err(bad(
                    field,
                    format!(
                        "{name:?} is not in dataplane.interfaces {interfaces:?}: the data plane \
                         must see the traffic of the addresses it moves"
                    ),
                ))
            }
        };
        on_dataplane("vrrp.interface".into(), &self.interface)?;
        if self.vrid == 0 {
            return Err(bad(
                "vrrp.vrid".into(),
                "0 is not a VRID; use 1..=255".into(),
            ));
        }
        if !(1..=254).contains(&self.priority) {
            return Err(bad(
                "vrrp.priority".into(),
                format!(
                    "{} is outside 1..=254 (255 is for the owner of real addresses)",
                    self.priority
                ),
            ));
        }
        let max_ms = u32::from(packet::MAX_INTERVAL_CS) * 10;
        if !(10..=max_ms).contains(&self.advert_interval_ms)
            || !self.advert_interval_ms.is_multiple_of(10)
        {
            return Err(bad(
                "vrrp.advert_interval_ms".into(),
                format!(
                    "{} must be a multiple of 10 in 10..={max_ms}",
                    self.advert_interval_ms
                ),
            ));
        }
        if self.vips.is_empty() {
            return Err(bad(
                "vrrp.vips".into(),
                "name at least one VIP address to move".into(),
            ));
        }
        let known: BTreeSet<Ipv4Addr> = vips
            .iter()
            .filter_map(|v| match v.address {
                std::net::IpAddr::V4(a) => Some(a),
                std::net::IpAddr::V6(_) => None,
            })
            .collect();
        let mut seen = BTreeSet::new();
        for (i, vip) in self.vips.iter().enumerate() {
            let field = format!("vrrp.vips[{i}]");
            if !known.contains(vip) {
                return Err(bad(
                    field,
                    format!("{vip} is not the address of any [[vips]] entry (known: {known:?})"),
                ));
            }
            if !seen.insert(*vip) {
                return Err(bad(field, format!("{vip} is listed twice")));
            }
        }
        for (i, v) in self.virtual_addresses.iter().enumerate() {
            let field = format!("vrrp.virtual_addresses[{i}]");
            on_dataplane(format!("{field}.interface"), &v.interface)?;
            if !seen.insert(v.address.addr()) {
                return Err(bad(
                    format!("{field}.address"),
                    format!("{} is listed twice", v.address.addr()),
                ));
            }
        }
        if seen.len() > 255 {
            return Err(bad(
                "vrrp".into(),
                "at most 255 addresses fit in an advertisement".into(),
            ));
        }
        Ok(())
    }

    /// The priority to advertise given the tracked faults.
    pub fn effective_priority(&self, faults: &[String]) -> u8 {
        if faults.is_empty() {
            self.priority
        } else {
            self.priority.saturating_sub(self.track.weight).max(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> VrrpConfig {
        toml::from_str(
            r#"
            interface = "lbc"
            vrid = 51
            priority = 150
            vips = ["10.0.0.100"]
            virtual_addresses = [{ interface = "lbb", address = "10.1.0.1/24" }]
            "#,
        )
        .unwrap()
    }

    fn vips() -> Vec<VipSpec> {
        crate::config::Config::parse(crate::config::tests::GOOD)
            .unwrap()
            .vips
    }

    fn field(edit: impl FnOnce(&mut VrrpConfig)) -> String {
        let mut c = config();
        edit(&mut c);
        c.validate(&["lbc".into(), "lbb".into()], &vips())
            .unwrap_err()
            .field
    }

    #[test]
    fn defaults_and_addresses() {
        let c = config();
        assert_eq!(c.interval(), Duration::from_secs(1));
        assert!(c.preempt);
        assert_eq!(c.track.weight, 50);
        c.validate(&["lbc".into(), "lbb".into()], &vips()).unwrap();
        assert_eq!(
            c.addresses(),
            vec![
                ("lbc".to_string(), "10.0.0.100/32".parse().unwrap()),
                ("lbb".to_string(), "10.1.0.1/24".parse().unwrap()),
            ]
        );
    }

    #[test]
    fn refuses_bad_fields_by_name() {
        assert_eq!(field(|c| c.interface = "eth9".into()), "vrrp.interface");
        assert_eq!(field(|c| c.vrid = 0), "vrrp.vrid");
        assert_eq!(field(|c| c.priority = 255), "vrrp.priority");
        assert_eq!(field(|c| c.priority = 0), "vrrp.priority");
        assert_eq!(
            field(|c| c.advert_interval_ms = 105),
            "vrrp.advert_interval_ms"
        );
        assert_eq!(
            field(|c| c.advert_interval_ms = 50_000),
            "vrrp.advert_interval_ms"
        );
        assert_eq!(field(|c| c.vips.clear()), "vrrp.vips");
        assert_eq!(
            field(|c| c.vips.push("10.0.0.9".parse().unwrap())),
            "vrrp.vips[1]"
        );
        assert_eq!(
            field(|c| c.vips.push("10.0.0.100".parse().unwrap())),
            "vrrp.vips[1]"
        );
        assert_eq!(
            field(|c| c.virtual_addresses[0].interface = "eth9".into()),
            "vrrp.virtual_addresses[0].interface"
        );
    }

    #[test]
    fn unknown_vip_names_the_known_ones() {
        let mut c = config();
        c.vips = vec!["10.0.0.9".parse().unwrap()];
        let err = c
            .validate(&["lbc".into(), "lbb".into()], &vips())
            .unwrap_err();
        assert!(err.message.contains("10.0.0.100"), "{}", err.message);
    }

    #[test]
    fn faults_lower_the_priority_but_never_below_one() {
        let mut c = config();
        assert_eq!(c.effective_priority(&[]), 150);
        assert_eq!(c.effective_priority(&["eth down".into()]), 100);
        c.priority = 20;
        c.track.weight = 19;
        assert_eq!(c.effective_priority(&["x".into()]), 1);
    }
}

//! The desired state: VIPs and their backends as an operator writes them, and the
//! validation that turns them into schedules or refuses them whole.

use std::{collections::BTreeMap, net::IpAddr};

use foobar_lb_common::{
    Endpoint, FAMILY_IPV6, FORWARD_DSR_GUE, FORWARD_DSR_IPIP, FORWARD_FULLNAT, FORWARD_NAT,
    MAX_BACKENDS, MAX_VIPS, PROTO_TCP, PROTO_UDP,
    hash::{HASH_DESTINATION_PORT, HASH_FLOW, HASH_SOURCE},
};
use serde::{Deserialize, Serialize};

use crate::{
    edge::{Acl, EdgeSpec, NewFlowLimit},
    health::{HealthCheck, OnDown},
    schedule::{self, DEFAULT_MAGLEV_SIZE, Weighted},
};

/// Largest backend weight, as in HAProxy.
pub const MAX_WEIGHT: u32 = 256;

/// Transport protocol of a VIP.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, PartialOrd, Ord, Hash,
)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// TCP.
    #[default]
    Tcp,
    /// UDP.
    Udp,
}

impl Protocol {
    /// IP protocol number.
    pub const fn number(self) -> u8 {
        match self {
            Protocol::Tcp => PROTO_TCP,
            Protocol::Udp => PROTO_UDP,
        }
    }
}

/// How a VIP picks the backend of a new flow.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scheduler {
    /// Weighted round robin: consecutive new flows take consecutive backends.
    #[default]
    Rr,
    /// Maglev consistent hashing of the flow: the same flow always lands on the same
    /// backend for the same backend set, on any balancer.
    Maglev,
    /// Least connections: a new flow goes to the backend with the fewest active
    /// connections (any weight above 0 counts the same).
    Lc,
    /// Weighted least connections: the fewest active connections per unit of weight.
    Wlc,
    /// Source hashing: Maglev over the client's address alone, so a client keeps its
    /// backend across connections and balancers (session persistence).
    Sh,
}

impl Scheduler {
    /// Whether new flows take the next slot of a ring (round robin, least
    /// connections) rather than their hash's slot of a Maglev table.
    pub const fn uses_ring(self) -> bool {
        matches!(self, Scheduler::Rr | Scheduler::Lc | Scheduler::Wlc)
    }

    /// Whether the agent keeps rewriting the ring from the connection counts.
    pub const fn counts_connections(self) -> bool {
        matches!(self, Scheduler::Lc | Scheduler::Wlc)
    }
}

/// What of a flow a hashing VIP (`maglev`, `sh`) hashes, as Katran's VIP flags choose.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FlowHash {
    /// The whole 5-tuple: each connection is placed on its own (`maglev`'s default).
    #[serde(rename = "5-tuple")]
    FiveTuple,
    /// The client's address alone, cut to `hash_prefix_v4`/`hash_prefix_v6` bits
    /// (`sh`'s): every connection of a client (or of a client network behind one NAT,
    /// with a shorter prefix) lands on one backend.
    Source,
    /// The destination port alone.
    DestinationPort,
}

impl FlowHash {
    /// The data plane's constant.
    pub const fn code(self) -> u32 {
        match self {
            FlowHash::FiveTuple => HASH_FLOW,
            FlowHash::Source => HASH_SOURCE,
            FlowHash::DestinationPort => HASH_DESTINATION_PORT,
        }
    }
}

/// How a VIP's packets reach its backends, and its backends' replies the clients.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Forwarding {
    /// The destination becomes the backend; replies must route back through the
    /// balancer, which restores the VIP (LVS-NAT).
    #[default]
    Nat,
    /// Both addresses are rewritten, the source to the balancer's own: replies come
    /// back to it whatever the backends' routes (works for clients on the backends'
    /// own network).
    Fullnat,
    /// Direct server return in IPIP (IPv6 in IPv6): the backend decapsulates
    /// (`foobar-lb decap`) and answers the client itself.
    DsrIpip,
    /// Direct server return in GUE (UDP).
    DsrGue,
}

impl Forwarding {
    /// The data plane's constant.
    pub const fn code(self) -> u32 {
        match self {
            Forwarding::Nat => FORWARD_NAT,
            Forwarding::Fullnat => FORWARD_FULLNAT,
            Forwarding::DsrIpip => FORWARD_DSR_IPIP,
            Forwarding::DsrGue => FORWARD_DSR_GUE,
        }
    }

    /// From the data plane's constant (a VIP read back from pinned maps).
    pub const fn from_code(code: u32) -> Self {
        match code {
            FORWARD_FULLNAT => Forwarding::Fullnat,
            FORWARD_DSR_IPIP => Forwarding::DsrIpip,
            FORWARD_DSR_GUE => Forwarding::DsrGue,
            _ => Forwarding::Nat,
        }
    }

    /// Whether backends answer clients directly (the balancer sees no replies).
    pub const fn is_dsr(self) -> bool {
        matches!(self, Forwarding::DsrIpip | Forwarding::DsrGue)
    }

    /// The name used in the config file and status.
    pub const fn name(self) -> &'static str {
        match self {
            Forwarding::Nat => "nat",
            Forwarding::Fullnat => "fullnat",
            Forwarding::DsrIpip => "dsr-ipip",
            Forwarding::DsrGue => "dsr-gue",
        }
    }
}

/// A backend of a VIP.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendSpec {
    /// Server address.
    pub address: IpAddr,
    /// Server port.
    pub port: u16,
    /// Relative share of new flows, 0 to [`MAX_WEIGHT`]; 0 drains (existing flows stay).
    #[serde(default = "default_weight")]
    pub weight: u32,
}

fn default_weight() -> u32 {
    1
}

fn default_table_size() -> u32 {
    DEFAULT_MAGLEV_SIZE
}

fn default_prefix_v4() -> u8 {
    32
}

fn default_prefix_v6() -> u8 {
    128
}

impl VipSpec {
    /// What its flows' hash covers, the default filled in.
    pub fn flow_hash(&self) -> FlowHash {
        match (self.hash, self.scheduler) {
            (Some(hash), _) => hash,
            (None, Scheduler::Sh) => FlowHash::Source,
            (None, _) => FlowHash::FiveTuple,
        }
    }
}

/// A virtual service: address, port, protocol, scheduler and backends.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VipSpec {
    /// Name for people (metrics labels, CLI).
    pub name: String,
    /// The virtual address clients connect to.
    pub address: IpAddr,
    /// The virtual port.
    pub port: u16,
    /// TCP or UDP.
    #[serde(default)]
    pub protocol: Protocol,
    /// `rr`, `maglev`, `lc`, `wlc` or `sh`.
    #[serde(default)]
    pub scheduler: Scheduler,
    /// What a hashing scheduler hashes; none: `sh` the source, `maglev` the 5-tuple.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash: Option<FlowHash>,
    /// Bits of an IPv4 client address that source hashing covers (24: clients of one
    /// /24 stay together).
    #[serde(default = "default_prefix_v4")]
    pub hash_prefix_v4: u8,
    /// The same for IPv6.
    #[serde(default = "default_prefix_v6")]
    pub hash_prefix_v6: u8,
    /// `nat`, `fullnat`, `dsr-ipip` or `dsr-gue`.
    #[serde(default)]
    pub forwarding: Forwarding,
    /// Maglev table size, a prime; ignored for `rr`.
    #[serde(default = "default_table_size")]
    pub maglev_table_size: u32,
    /// The servers.
    #[serde(default)]
    pub backends: Vec<BackendSpec>,
    /// How its backends are checked; none: they are always up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheck>,
    /// What happens to a backend's open flows when its checks take it down.
    #[serde(default)]
    pub on_backend_down: OnDown,
    /// Who may reach it (after the global list, `edge.acl`).
    #[serde(default, skip_serializing_if = "Acl::is_empty")]
    pub acl: Acl,
    /// How many new flows per second one source may open; none: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new_flow_limit: Option<NewFlowLimit>,
}

/// Every VIP the balancer should serve.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DesiredState {
    /// The VIPs.
    #[serde(default)]
    pub vips: Vec<VipSpec>,
    /// Access control and limits beyond any one VIP.
    #[serde(default)]
    pub edge: EdgeSpec,
}

/// A refused configuration: the field at fault and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct StateError {
    /// Path of the bad field, e.g. `vips[0].backends[2].weight`.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> StateError {
    StateError {
        field: field.into(),
        message: message.into(),
    }
}

/// A validated VIP, ready to write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedVip {
    /// The VIP as the data plane keys it.
    pub endpoint: Endpoint,
    /// What it was made from.
    pub spec: VipSpec,
    /// Backend endpoints, in the order of `spec.backends`.
    pub backends: Vec<Endpoint>,
    /// The schedule, as positions in `backends`.
    pub schedule: Vec<u32>,
}

impl PlannedVip {
    /// Its backends as the schedulers weigh them.
    pub fn weighted(&self) -> Vec<Weighted> {
        self.backends
            .iter()
            .zip(&self.spec.backends)
            .map(|(&endpoint, b)| Weighted {
                endpoint,
                weight: b.weight,
            })
            .collect()
    }

    /// A stand-in plan for a VIP read back from pinned maps: enough to diff against
    /// (endpoints, scheduler); weights and name are unknown until the next apply.
    pub fn adopted(
        endpoint: Endpoint,
        scheduler: Scheduler,
        forwarding: Forwarding,
        backends: &[(u32, Endpoint)],
    ) -> Self {
        let (address, port, protocol) = socket_of(&endpoint);
        let spec = VipSpec {
            name: format!("{}", std::net::SocketAddr::new(address, port)),
            address,
            port,
            protocol,
            scheduler,
            hash: None,
            hash_prefix_v4: default_prefix_v4(),
            hash_prefix_v6: default_prefix_v6(),
            forwarding,
            maglev_table_size: DEFAULT_MAGLEV_SIZE,
            backends: backends
                .iter()
                .map(|(_, b)| {
                    let (address, port, _) = socket_of(b);
                    BackendSpec {
                        address,
                        port,
                        weight: 1,
                    }
                })
                .collect(),
            health_check: None,
            on_backend_down: OnDown::Keep,
            acl: Acl::default(),
            new_flow_limit: None,
        };
        Self {
            endpoint,
            spec,
            backends: backends.iter().map(|&(_, b)| b).collect(),
            schedule: Vec::new(),
        }
    }
}

/// The address of a data-plane endpoint's four network-order words.
pub fn address_of(words: &[u32; 4], family: u8) -> IpAddr {
    if family == FAMILY_IPV6 {
        let mut octets = [0u8; 16];
        for (i, w) in words.iter().enumerate() {
            octets[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
        }
        IpAddr::from(octets)
    } else {
        IpAddr::from(words[0].to_ne_bytes())
    }
}

/// The address, port and protocol of a data-plane endpoint.
pub fn socket_of(endpoint: &Endpoint) -> (IpAddr, u16, Protocol) {
    let address = address_of(&endpoint.addr, endpoint.family);
    let protocol = if endpoint.proto == PROTO_UDP {
        Protocol::Udp
    } else {
        Protocol::Tcp
    };
    (address, u16::from_be(endpoint.port), protocol)
}

/// Converts an address and port to the data plane's form.
pub fn endpoint(address: IpAddr, port: u16, protocol: Protocol) -> Endpoint {
    let words = crate::topology::words(address);
    match address {
        IpAddr::V4(_) => Endpoint::ipv4(words[0], port.to_be(), protocol.number()),
        IpAddr::V6(_) => Endpoint::ipv6(words, port.to_be(), protocol.number()),
    }
}

/// The endpoint of a VIP or backend at `at`, its port and address checked.
fn checked_endpoint(
    at: &str,
    address: IpAddr,
    port: u16,
    protocol: Protocol,
) -> Result<Endpoint, StateError> {
    if port == 0 {
        return Err(invalid(format!("{at}.port"), "must be 1-65535"));
    }
    if address.is_unspecified() || address.is_multicast() || address.is_loopback() {
        return Err(invalid(
            format!("{at}.address"),
            "must be a unicast address of the network",
        ));
    }
    Ok(endpoint(address, port, protocol))
}

impl DesiredState {
    /// Checks everything and computes every schedule; nothing is written here, so a
    /// refusal leaves the running state as it was.
    pub fn plan(&self) -> Result<Vec<PlannedVip>, StateError> {
        if self.vips.len() > MAX_VIPS as usize {
            return Err(invalid(
                "vips",
                format!("{} VIPs, at most {MAX_VIPS}", self.vips.len()),
            ));
        }
        let total: usize = self.vips.iter().map(|v| v.backends.len()).sum();
        if total > MAX_BACKENDS as usize {
            return Err(invalid(
                "vips",
                format!("{total} backends in all, at most {MAX_BACKENDS}"),
            ));
        }
        let mut vips_seen = BTreeMap::new();
        let mut names_seen = BTreeMap::new();
        let mut backends_seen: BTreeMap<Endpoint, String> = BTreeMap::new();
        let mut planned = Vec::with_capacity(self.vips.len());
        for (v, vip) in self.vips.iter().enumerate() {
            let at = format!("vips[{v}]");
            if vip.name.trim().is_empty() {
                return Err(invalid(format!("{at}.name"), "must not be empty"));
            }
            if let Some(other) = names_seen.insert(vip.name.clone(), v) {
                return Err(invalid(
                    format!("{at}.name"),
                    format!("{:?} is also the name of vips[{other}]", vip.name),
                ));
            }
            let vip_ep = checked_endpoint(&at, vip.address, vip.port, vip.protocol)?;
            if let Some(check) = &vip.health_check {
                check
                    .validate(&format!("{at}.health_check"))
                    .map_err(|(field, message)| invalid(field, message))?;
            }
            vip.acl.validate(&format!("{at}.acl"))?;
            if let Some(limit) = &vip.new_flow_limit {
                limit.validate(&format!("{at}.new_flow_limit"))?;
            }
            if vip.hash.is_some() && vip.scheduler.uses_ring() {
                return Err(invalid(
                    format!("{at}.hash"),
                    "only a hashing scheduler (maglev, sh) hashes: rr, lc and wlc take turns",
                ));
            }
            if !(1..=32).contains(&vip.hash_prefix_v4) {
                return Err(invalid(format!("{at}.hash_prefix_v4"), "must be 1-32"));
            }
            if !(1..=128).contains(&vip.hash_prefix_v6) {
                return Err(invalid(format!("{at}.hash_prefix_v6"), "must be 1-128"));
            }
            if let Some(other) = vips_seen.insert(vip_ep, v) {
                return Err(invalid(
                    at,
                    format!("same address, port and protocol as vips[{other}]"),
                ));
            }
            let mut weighted = Vec::with_capacity(vip.backends.len());
            for (b, backend) in vip.backends.iter().enumerate() {
                let at = format!("{at}.backends[{b}]");
                let ep = checked_endpoint(&at, backend.address, backend.port, vip.protocol)?;
                if backend.weight > MAX_WEIGHT {
                    return Err(invalid(
                        format!("{at}.weight"),
                        format!("{} is above {MAX_WEIGHT}", backend.weight),
                    ));
                }
                if ep == vip_ep {
                    return Err(invalid(at, "a backend cannot be its own VIP"));
                }
                if backend.address.is_ipv4() != vip.address.is_ipv4() {
                    return Err(invalid(
                        format!("{at}.address"),
                        "must be of the VIP's address family",
                    ));
                }
                if vip.forwarding.is_dsr() && backend.port != vip.port {
                    // The packet reaches the backend as the client sent it.
                    return Err(invalid(
                        format!("{at}.port"),
                        format!(
                            "{} forwards without changing the port: must be the VIP's port {}",
                            vip.forwarding.name(),
                            vip.port
                        ),
                    ));
                }
                // NAT replies are mapped back to their VIP by the backend endpoint alone.
                if vip.forwarding == Forwarding::Nat
                    && let Some(other) = backends_seen.insert(ep, at.clone())
                {
                    return Err(invalid(
                        at,
                        format!(
                            "same address and port as {other}: a backend endpoint serves one NAT VIP \
                             (its replies are mapped back by it; full NAT and DSR have no such limit)"
                        ),
                    ));
                }
                weighted.push(Weighted {
                    endpoint: ep,
                    weight: backend.weight,
                });
            }
            let schedule = match vip.scheduler {
                Scheduler::Rr => schedule::round_robin(&weighted),
                Scheduler::Maglev | Scheduler::Sh => {
                    schedule::maglev(&weighted, vip.maglev_table_size)
                }
                // No connection yet: the counts' ring starts from zeros; the agent
                // rewrites it as they change.
                Scheduler::Lc | Scheduler::Wlc => Ok(schedule::least_connections(
                    &weighted,
                    &vec![0; weighted.len()],
                    vip.scheduler == Scheduler::Wlc,
                )),
            }
            .map_err(|e| {
                let field = match e {
                    schedule::ScheduleError::RingTooLong { .. } => format!("{at}.backends"),
                    _ => format!("{at}.maglev_table_size"),
                };
                invalid(field, e.to_string())
            })?;
            planned.push(PlannedVip {
                endpoint: vip_ep,
                spec: vip.clone(),
                backends: weighted.iter().map(|w| w.endpoint).collect(),
                schedule,
            });
        }
        let addresses = self.vips.iter().map(|v| v.address).collect();
        self.edge.validate(&addresses)?;
        let rules = self.edge.acl.rules().count()
            + self
                .vips
                .iter()
                .map(|v| v.acl.rules().count())
                .sum::<usize>();
        crate::edge::check_rule_count(rules)?;
        // VIPs keyed by their endpoint must not collide with any backend either.
        for p in &planned {
            if let Some(backend) = backends_seen.get(&p.endpoint) {
                return Err(invalid(
                    backend.clone(),
                    format!("same endpoint as VIP {:?}", p.spec.name),
                ));
            }
        }
        Ok(planned)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vip(name: &str, addr: &str, backends: &[(&str, u16, u32)]) -> VipSpec {
        VipSpec {
            name: name.into(),
            address: addr.parse().unwrap(),
            port: 80,
            protocol: Protocol::Tcp,
            scheduler: Scheduler::Rr,
            forwarding: Forwarding::Nat,
            maglev_table_size: DEFAULT_MAGLEV_SIZE,
            hash: None,
            hash_prefix_v4: 32,
            hash_prefix_v6: 128,
            backends: backends
                .iter()
                .map(|&(a, port, weight)| BackendSpec {
                    address: a.parse().unwrap(),
                    port,
                    weight,
                })
                .collect(),
            health_check: None,
            on_backend_down: OnDown::Keep,
            acl: Acl::default(),
            new_flow_limit: None,
        }
    }

    fn field_of(state: DesiredState) -> String {
        state.plan().unwrap_err().field
    }

    #[test]
    fn plans_a_valid_state() {
        let state = DesiredState {
            vips: vec![vip(
                "web",
                "10.0.0.100",
                &[("10.1.0.11", 8080, 3), ("10.1.0.12", 8080, 1)],
            )],
            ..Default::default()
        };
        let plan = state.plan().unwrap();
        assert_eq!(plan[0].schedule, vec![0, 0, 1, 0]);
        assert_eq!(plan[0].endpoint.port, 80u16.to_be());
    }

    #[test]
    fn names_the_bad_field() {
        let mut s = DesiredState {
            vips: vec![vip("web", "10.0.0.100", &[("10.1.0.11", 8080, 300)])],
            ..Default::default()
        };
        assert_eq!(field_of(s.clone()), "vips[0].backends[0].weight");
        s.vips[0].backends[0].weight = 1;
        s.vips[0].backends[0].port = 0;
        assert_eq!(field_of(s.clone()), "vips[0].backends[0].port");
        s.vips[0].backends[0].port = 80;
        s.vips[0].address = "::1".parse().unwrap();
        assert_eq!(field_of(s.clone()), "vips[0].address");
        s.vips[0].address = "fd00::100".parse().unwrap();
        assert_eq!(field_of(s.clone()), "vips[0].backends[0].address");
        s.vips[0].address = "10.0.0.100".parse().unwrap();
        s.vips[0].forwarding = Forwarding::DsrIpip;
        s.vips[0].backends[0].port = 81;
        assert_eq!(field_of(s.clone()), "vips[0].backends[0].port");
        s.vips[0].backends[0].port = 80;
        s.vips[0].forwarding = Forwarding::Nat;
        s.vips[0].scheduler = Scheduler::Maglev;
        s.vips[0].maglev_table_size = 1000;
        assert_eq!(field_of(s.clone()), "vips[0].maglev_table_size");
        s.vips[0].maglev_table_size = 65_537;
        s.vips.push(vip("web", "10.0.0.101", &[]));
        assert_eq!(field_of(s.clone()), "vips[1].name");
        s.vips[1].name = "other".into();
        s.vips[1].address = "10.0.0.100".parse().unwrap();
        assert_eq!(field_of(s.clone()), "vips[1]");
        s.vips[1] = vip("other", "10.0.0.101", &[("10.1.0.11", 80, 1)]);
        assert_eq!(field_of(s.clone()), "vips[1].backends[0]");
        s.vips[1].backends.clear();
        assert!(s.plan().is_ok());
    }

    #[test]
    fn parses_toml_with_defaults() {
        let state: DesiredState = toml::from_str(
            r#"
            [[vips]]
            name = "web"
            address = "10.0.0.100"
            port = 80
            backends = [{ address = "10.1.0.11", port = 8080 }]
            "#,
        )
        .unwrap();
        assert_eq!(state.vips[0].scheduler, Scheduler::Rr);
        assert_eq!(state.vips[0].forwarding, Forwarding::Nat);
        assert_eq!(state.vips[0].backends[0].weight, 1);
        let dsr: DesiredState = toml::from_str(
            "[[vips]]\nname='x'\naddress='fd00::100'\nport=80\nforwarding='dsr-gue'\n\
             backends=[{ address = 'fd00:1::11', port = 80 }]",
        )
        .unwrap();
        assert_eq!(dsr.vips[0].forwarding, Forwarding::DsrGue);
        let plan = dsr.plan().unwrap();
        assert_eq!(plan[0].endpoint.family, FAMILY_IPV6);
        assert_eq!(
            socket_of(&plan[0].backends[0]).0,
            "fd00:1::11".parse::<IpAddr>().unwrap()
        );
        assert!(
            toml::from_str::<DesiredState>(
                "[[vips]]\nname='x'\naddress='1.2.3.4'\nport=1\ncolour='red'"
            )
            .is_err()
        );
    }
}

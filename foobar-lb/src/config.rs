//! The agent's configuration file (TOML): where the data plane runs, and the VIPs.
//!
//! ```toml
//! [dataplane]
//! interfaces = [                  # where the program runs, and what arrives there
//!   { name = "eth0", role = "client" },   # VIP traffic from clients
//!   { name = "eth1", role = "backend" },  # the backends' replies
//! ]                               # a bare name ("eth0") takes both roles
//! xdp_mode = "auto"               # native | generic | auto
//! fullnat_ports = "10000-32767"   # full NAT's source ports (keep clear of the kernel's)
//! ipip_source = "172.16.0.0/16"   # IPIP outer sources; the flow hash fills the host bits
//! ipip6_source = "100::/64"
//! gue_port = 6080
//! icmp_rate = 1000                # ICMP answers per second per CPU
//!
//! [edge]                          # optional: edge protection (module edge)
//! acl = { deny = ["192.0.2.0/24"] }         # the global access list
//! open_addresses = []             # VIP addresses open to what is not a VIP endpoint
//!
//! [[vips]]
//! name = "www"
//! address = "203.0.113.10"
//! port = 80
//! scheduler = "rr"                # rr | maglev
//! forwarding = "nat"              # nat | fullnat | dsr-ipip | dsr-gue
//! acl = { allow = ["198.51.100.0/24"] }     # who may reach this VIP
//! new_flow_limit = { rate = 50, burst = 100 } # new flows/s per source
//! backends = [
//!   { address = "10.1.0.11", port = 8080, weight = 1 },
//!   { address = "10.1.0.12", port = 8080, weight = 1 },
//! ]
//!
//! [vrrp]                          # optional: failover with a peer (module vrrp)
//! interface = "eth0"
//! vrid = 51
//! priority = 150
//! vips = ["203.0.113.10"]
//!
//! # [bgp]                         # optional, instead of [vrrp]: announce to routers
//! # local_as = 65001              # (module bgp), active-active: announced VIPs need
//! # announce_from = "10.0.0.3"    # maglev or sh; the sessions' source, routes' next hop
//! # vips = ["203.0.113.10"]       # default: every VIP address not in [vrrp]
//! # [bgp.bfd]
//! # interval_ms = 50
//! # multiplier = 3
//! # [[bgp.neighbours]]
//! # address = "10.0.0.254"
//! # remote_as = 65000
//! ```

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

use aya::programs::XdpMode;
use foobar_lb_common::{
    DEFAULT_FLOW_CAPACITY, DEFAULT_GUE_PORT, MAX_TX_PORTS, ROLE_BACKEND, ROLE_CLIENT, Settings,
};
use ipnet::{Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};

use crate::{
    bgp::BgpConfig,
    edge::EdgeSpec,
    state::{DesiredState, StateError, VipSpec},
    vrrp::VrrpConfig,
};

/// Smallest flow table accepted.
pub const MIN_FLOW_CAPACITY: u32 = 1024;
/// Largest flow table accepted (about 0.8 GiB of kernel memory).
pub const MAX_FLOW_CAPACITY: u32 = 16 * 1024 * 1024;

/// Which XDP mode to attach in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum XdpModeSetting {
    /// Native (driver) XDP where the driver has it, generic otherwise: the kernel picks.
    #[default]
    Auto,
    /// Native XDP only; attaching fails on drivers without it.
    Native,
    /// Generic (skb) XDP: works everywhere, slower.
    Generic,
}

impl XdpModeSetting {
    /// The mode aya attaches with.
    pub fn mode(self) -> XdpMode {
        match self {
            XdpModeSetting::Auto => XdpMode::Default,
            XdpModeSetting::Native => XdpMode::Driver,
            XdpModeSetting::Generic => XdpMode::Skb,
        }
    }
}

fn default_flow_capacity() -> u32 {
    DEFAULT_FLOW_CAPACITY
}

fn default_flood_threshold() -> u32 {
    DEFAULT_FLOOD_THRESHOLD
}

/// New flows per second on one CPU above which Maglev VIPs stop remembering new flows
/// (Katran's default).
pub const DEFAULT_FLOOD_THRESHOLD: u32 = 125_000;

/// ICMP messages the data plane sends per second on one CPU.
pub const DEFAULT_ICMP_RATE: u32 = 1000;

fn default_icmp_rate() -> u32 {
    DEFAULT_ICMP_RATE
}

fn default_gue_port() -> u16 {
    DEFAULT_GUE_PORT
}

fn default_fullnat_ports() -> PortRange {
    PortRange {
        first: 10_000,
        last: 32_767,
    }
}

fn default_ipip_source() -> Ipv4Net {
    "172.16.0.0/16".parse().expect("a prefix")
}

fn default_ipip6_source() -> Ipv6Net {
    // The discard-only prefix (RFC 6666), as Katran uses.
    "100::/64".parse().expect("a prefix")
}

/// A range of ports, written `"first-last"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PortRange {
    /// The first port.
    pub first: u16,
    /// The last port, included.
    pub last: u16,
}

impl TryFrom<String> for PortRange {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        let bad = || format!("{text:?} is not a port range like \"10000-32767\"");
        let (first, last) = text.split_once('-').ok_or_else(bad)?;
        let first: u16 = first.trim().parse().map_err(|_| bad())?;
        let last: u16 = last.trim().parse().map_err(|_| bad())?;
        if first == 0 || first > last {
            return Err(format!(
                "{text:?}: the first port must be 1 or more and not above the last"
            ));
        }
        Ok(Self { first, last })
    }
}

impl From<PortRange> for String {
    fn from(range: PortRange) -> String {
        format!("{}-{}", range.first, range.last)
    }
}

impl PortRange {
    /// How many ports it holds.
    pub fn count(&self) -> u32 {
        u32::from(self.last) - u32::from(self.first) + 1
    }

    /// Whether it shares a port with `other`.
    pub fn overlaps(&self, other: &PortRange) -> bool {
        self.first <= other.last && other.first <= self.last
    }
}

/// What arrives on an interface.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Clients' packets for the VIPs.
    Client,
    /// The backends' replies.
    Backend,
    /// Both (one-armed).
    #[default]
    Both,
}

impl Role {
    /// The data plane's role bits.
    pub const fn bits(self) -> u32 {
        match self {
            Role::Client => ROLE_CLIENT,
            Role::Backend => ROLE_BACKEND,
            Role::Both => ROLE_CLIENT | ROLE_BACKEND,
        }
    }
}

/// An interface the program runs on: a bare name (both roles), or a name and a role.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    untagged,
    expecting = "an interface name, or { name = \"eth0\", role = \"client\" | \"backend\" | \"both\" }"
)]
pub enum InterfaceConfig {
    /// Both roles.
    Name(String),
    /// A name and a role.
    WithRole {
        /// The interface.
        name: String,
        /// What arrives on it.
        role: Role,
    },
}

impl InterfaceConfig {
    /// The interface's name.
    pub fn name(&self) -> &str {
        match self {
            InterfaceConfig::Name(name) | InterfaceConfig::WithRole { name, .. } => name,
        }
    }

    /// Its role.
    pub fn role(&self) -> Role {
        match self {
            InterfaceConfig::Name(_) => Role::Both,
            InterfaceConfig::WithRole { role, .. } => *role,
        }
    }
}

/// Where and how the data plane runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataplaneConfig {
    /// Interfaces the program is attached to, with what arrives on each; packets may
    /// leave by any of them.
    pub interfaces: Vec<InterfaceConfig>,
    /// Native, generic or auto.
    #[serde(default)]
    pub xdp_mode: XdpModeSetting,
    /// Flow-table entries (LRU); changing it needs a restart with an empty table.
    #[serde(default = "default_flow_capacity")]
    pub flow_capacity: u32,
    /// New flows per second on one CPU above which Maglev VIPs stop remembering new
    /// flows (their hash places every packet alike), so a flood cannot push
    /// established flows out of the table; 0: never.
    #[serde(default = "default_flood_threshold")]
    pub flood_threshold: u32,
    /// ICMP messages (echo replies, "too big") sent per second per CPU; more are dropped.
    #[serde(default = "default_icmp_rate")]
    pub icmp_rate: u32,
    /// The source ports full NAT allocates, per backend and balancer address; keep
    /// them out of the kernel's own `ip_local_port_range`.
    #[serde(default = "default_fullnat_ports")]
    pub fullnat_ports: PortRange,
    /// IPIP outer IPv4 sources: this prefix, its host bits taken from the flow hash
    /// so that backends' receive-side scaling spreads flows (a /32: one source).
    #[serde(default = "default_ipip_source")]
    pub ipip_source: Ipv4Net,
    /// The same for IPv6 in IPv6 (the last 32 bits at most vary).
    #[serde(default = "default_ipip6_source")]
    pub ipip6_source: Ipv6Net,
    /// The UDP port GUE packets are sent to (the backends' `foobar-lb decap` port).
    #[serde(default = "default_gue_port")]
    pub gue_port: u16,
    /// Seconds a TCP connection may stay silent before the agent forgets it (its
    /// backend's active connections count it no more), as IPVS's `tcp` timeout.
    #[serde(default = "default_tcp_idle_timeout")]
    pub tcp_idle_timeout: u32,
    /// The same for a UDP flow, which has no end but silence.
    #[serde(default = "default_udp_idle_timeout")]
    pub udp_idle_timeout: u32,
}

fn default_tcp_idle_timeout() -> u32 {
    900
}

fn default_udp_idle_timeout() -> u32 {
    300
}

impl Default for DataplaneConfig {
    /// Every default, and no interface.
    fn default() -> Self {
        Self {
            interfaces: Vec::new(),
            xdp_mode: XdpModeSetting::default(),
            flow_capacity: default_flow_capacity(),
            flood_threshold: default_flood_threshold(),
            icmp_rate: default_icmp_rate(),
            fullnat_ports: default_fullnat_ports(),
            ipip_source: default_ipip_source(),
            ipip6_source: default_ipip6_source(),
            gue_port: default_gue_port(),
            tcp_idle_timeout: default_tcp_idle_timeout(),
            udp_idle_timeout: default_udp_idle_timeout(),
        }
    }
}

impl DataplaneConfig {
    /// The data plane's knobs.
    pub fn settings(&self) -> Settings {
        let v4_spread = u32::from_ne_bytes(self.ipip_source.hostmask().octets());
        let v6_host = self.ipip6_source.hostmask().octets();
        let v6_spread = u32::from_ne_bytes([v6_host[12], v6_host[13], v6_host[14], v6_host[15]]);
        Settings {
            flood_threshold: self.flood_threshold,
            icmp_rate: self.icmp_rate,
            fullnat_port_min: self.fullnat_ports.first,
            fullnat_port_count: self.fullnat_ports.count().min(u16::MAX as u32) as u16,
            gue_port: self.gue_port.to_be(),
            _pad: 0,
            ipip_spread_v4: v4_spread,
            ipip_spread_v6: v6_spread,
        }
    }

    /// The interfaces' names.
    pub fn interface_names(&self) -> Vec<String> {
        self.interfaces
            .iter()
            .map(|i| i.name().to_owned())
            .collect()
    }
}

/// The metrics and status-page listener.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address of `/metrics`, `/status.json` and the status page `/`; none: off.
    /// Changing it needs a restart.
    pub listen: Option<std::net::SocketAddr>,
}

/// The whole configuration file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where the data plane runs.
    pub dataplane: DataplaneConfig,
    /// The metrics listener.
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// The VIPs.
    #[serde(default)]
    pub vips: Vec<VipSpec>,
    /// Access control and limits beyond any one VIP (each VIP has its own too).
    #[serde(default)]
    pub edge: EdgeSpec,
    /// Active-passive failover with a peer; none: this balancer holds its VIPs alone.
    #[serde(default)]
    pub vrrp: Option<VrrpConfig>,
    /// Active-active announcements to routers over BGP (BIRD); none: no BGP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bgp: Option<BgpConfig>,
}

/// Why a configuration file was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message, with line and column.
        message: String,
    },
    /// A value is out of range or inconsistent.
    #[error("{path}: {source}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The field and what is wrong with it.
        source: StateError,
    },
}

impl ConfigError {
    /// The field at fault, when one is known.
    pub fn field(&self) -> Option<&str> {
        match self {
            ConfigError::Invalid { source, .. } => Some(&source.field),
            _ => None,
        }
    }
}

impl Config {
    /// Reads, parses and validates a file; nothing is applied here.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_owned(),
                message,
            },
            ConfigError::Invalid { source, .. } => ConfigError::Invalid {
                path: path.to_owned(),
                source,
            },
            other => other,
        })
    }

    /// Parses and validates TOML text.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::new(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        config.validate().map_err(|source| ConfigError::Invalid {
            path: PathBuf::new(),
            source,
        })?;
        Ok(config)
    }

    /// Checks every field, the VIPs included (their schedules are computed).
    pub fn validate(&self) -> Result<(), StateError> {
        let dp = &self.dataplane;
        let bad = |field: &str, message: String| StateError {
            field: field.into(),
            message,
        };
        if dp.interfaces.is_empty() {
            return Err(bad(
                "dataplane.interfaces",
                "name at least one interface".into(),
            ));
        }
        if dp.interfaces.len() > MAX_TX_PORTS as usize {
            return Err(bad(
                "dataplane.interfaces",
                format!("at most {MAX_TX_PORTS} interfaces"),
            ));
        }
        let mut seen = BTreeSet::new();
        for (i, name) in dp.interfaces.iter().map(InterfaceConfig::name).enumerate() {
            let field = format!("dataplane.interfaces[{i}]");
            // IFNAMSIZ is 16 with the NUL.
            if name.is_empty() || name.len() > 15 || name.contains(['/', ' ', '\0']) {
                return Err(bad(&field, format!("{name:?} is not an interface name")));
            }
            if !seen.insert(name) {
                return Err(bad(&field, format!("{name:?} is listed twice")));
            }
        }
        if dp.gue_port == 0 {
            return Err(bad("dataplane.gue_port", "must be 1-65535".into()));
        }
        for (field, value) in [
            ("dataplane.tcp_idle_timeout", dp.tcp_idle_timeout),
            ("dataplane.udp_idle_timeout", dp.udp_idle_timeout),
        ] {
            if !(1..=86_400).contains(&value) {
                return Err(bad(field, format!("{value} s is outside 1..=86400")));
            }
        }
        if !(MIN_FLOW_CAPACITY..=MAX_FLOW_CAPACITY).contains(&dp.flow_capacity) {
            return Err(bad(
                "dataplane.flow_capacity",
                format!(
                    "{} is outside {MIN_FLOW_CAPACITY}..={MAX_FLOW_CAPACITY}",
                    dp.flow_capacity
                ),
            ));
        }
        self.desired_state().plan()?;
        if let Some(vrrp) = &self.vrrp {
            vrrp.validate(&dp.interface_names(), &self.vips)?;
        }
        if let Some(bgp) = &self.bgp {
            bgp.validate(&self.vips, self.vrrp.as_ref())?;
        }
        self.check_desired(&self.desired_state())
    }

    /// Checks what the start-only sections demand of a desired state, the file's or
    /// one changed through the API: VIPs on addresses announced over BGP have a hash
    /// scheduler (see [`BgpConfig::check_active_active`]).
    pub fn check_desired(&self, desired: &DesiredState) -> Result<(), StateError> {
        match &self.bgp {
            Some(bgp) => bgp.check_active_active(&desired.vips, self.vrrp.as_ref()),
            None => Ok(()),
        }
    }

    /// The VIP part, as the reconciler takes it.
    pub fn desired_state(&self) -> DesiredState {
        DesiredState {
            vips: self.vips.clone(),
            edge: self.edge.clone(),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A small valid file: VIP www 10.0.0.100:80 on interfaces `lbc` and `lbb`.
    pub(crate) const GOOD: &str = r#"
        [dataplane]
        interfaces = ["lbc", "lbb"]

        [[vips]]
        name = "www"
        address = "10.0.0.100"
        port = 80
        backends = [{ address = "10.1.0.11", port = 8080 }]
    "#;

    fn field(text: &str) -> String {
        match Config::parse(text).unwrap_err() {
            ConfigError::Invalid { source, .. } => source.field,
            other => panic!("expected a field error, got {other}"),
        }
    }

    #[test]
    fn parses_with_defaults() {
        let config = Config::parse(GOOD).unwrap();
        assert_eq!(config.dataplane.xdp_mode, XdpModeSetting::Auto);
        let settings = config.dataplane.settings();
        assert_eq!(
            (settings.fullnat_port_min, settings.fullnat_port_count),
            (10_000, 22_768)
        );
        assert_eq!(settings.ipip_spread_v4.to_ne_bytes(), [0, 0, 255, 255]);
        assert_eq!(settings.ipip_spread_v6, u32::MAX);
        assert_eq!(u16::from_be(settings.gue_port), 6080);
        assert_eq!(config.dataplane.flow_capacity, DEFAULT_FLOW_CAPACITY);
        assert_eq!(config.vips[0].backends[0].weight, 1);
    }

    #[test]
    fn refuses_bad_fields_by_name() {
        assert_eq!(
            field(&GOOD.replace(r#"["lbc", "lbb"]"#, "[]")),
            "dataplane.interfaces"
        );
        assert_eq!(
            field(&GOOD.replace(r#""lbb""#, r#""lbc""#)),
            "dataplane.interfaces[1]"
        );
        assert_eq!(
            field(&GOOD.replace(r#""lbb""#, r#""a-very-long-interface""#)),
            "dataplane.interfaces[1]"
        );
        assert_eq!(
            field(&GOOD.replace(
                r#"interfaces = ["lbc", "lbb"]"#,
                "interfaces = [\"lbc\"]\nflow_capacity = 10"
            )),
            "dataplane.flow_capacity"
        );
        assert_eq!(
            field(&GOOD.replace("8080", "0")),
            "vips[0].backends[0].port"
        );
        let err = Config::parse(&GOOD.replace(
            r#"interfaces = ["lbc", "lbb"]"#,
            "interfaces = [\"lbc\"]\nfullnat_ports = \"3000-2000\"",
        ))
        .unwrap_err();
        assert!(err.to_string().contains("3000-2000"), "{err}");
    }

    #[test]
    fn interfaces_take_a_role() {
        let text = GOOD.replace(
            r#"["lbc", "lbb"]"#,
            r#"[{ name = "lbc", role = "client" }, "lbb"]"#,
        );
        let config = Config::parse(&text).unwrap();
        let roles: Vec<Role> = config
            .dataplane
            .interfaces
            .iter()
            .map(|i| i.role())
            .collect();
        assert_eq!(roles, [Role::Client, Role::Both]);
        assert_eq!(config.dataplane.interface_names(), ["lbc", "lbb"]);
        let err = Config::parse(&GOOD.replace(r#""lbb""#, r#"{ name = "lbb", role = "middle" }"#))
            .unwrap_err();
        assert!(err.to_string().contains("role"), "{err}");
    }

    #[test]
    fn refuses_unknown_keys_and_bad_syntax_with_a_line() {
        let err = Config::parse(&GOOD.replace("port = 80", "port = 80\ncolour = 1")).unwrap_err();
        assert!(err.to_string().contains("colour"), "{err}");
        let err = Config::parse(&GOOD.replace("address = \"10.0.0.100\"", "address = 10.0.0.100"))
            .unwrap_err();
        assert!(err.to_string().contains("line"), "{err}");
        let err = Config::parse(&GOOD.replace("\"10.0.0.100\"", "\"10.0.0.300\"")).unwrap_err();
        assert!(err.to_string().contains("invalid"), "{err}");
    }
}

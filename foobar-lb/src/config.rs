//! The agent's configuration file (TOML): where the data plane runs, and the VIPs.
//!
//! ```toml
//! [dataplane]
//! interfaces = [                  # where the program runs, and what arrives there
//!   { name = "eth0", role = "client" },   # VIP traffic from clients
//!   { name = "eth1", role = "backend" },  # the backends' replies
//! ]                               # a bare name ("eth0") takes both roles
//! xdp_mode = "auto"               # native | generic | auto
//!
//! [[vips]]
//! name = "www"
//! address = "203.0.113.10"
//! port = 80
//! scheduler = "rr"                # rr | maglev
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
//! ```

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

use aya::programs::XdpMode;
use foobar_lb_common::{DEFAULT_FLOW_CAPACITY, MAX_TX_PORTS, ROLE_BACKEND, ROLE_CLIENT};
use serde::{Deserialize, Serialize};

use crate::{
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
}

impl DataplaneConfig {
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
    /// Active-passive failover with a peer; none: this balancer holds its VIPs alone.
    #[serde(default)]
    pub vrrp: Option<VrrpConfig>,
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
        Ok(())
    }

    /// The VIP part, as the reconciler takes it.
    pub fn desired_state(&self) -> DesiredState {
        DesiredState {
            vips: self.vips.clone(),
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

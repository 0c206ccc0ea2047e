//! `[bgp]`: what this balancer announces, to which routers, and how BIRD runs. Read
//! at start only, as `[vrrp]` is.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::{
    state::{StateError, VipSpec},
    vrrp::VrrpConfig,
};

/// Where Debian's bird2 package installs the daemon.
pub const DEFAULT_BIRD: &str = "/usr/sbin/bird";
/// BIRD refuses hold times from 1 to 2 s (RFC 4271: 0 or at least 3).
pub const MIN_HOLD_TIME_S: u32 = 3;
/// Longest wait between withdrawing and stopping the data plane: with the rest of a
/// clean stop it stays within the packaged unit's `TimeoutStopSec=30`.
pub const MAX_WITHDRAW_WAIT_MS: u32 = 20_000;

fn default_hold_time_s() -> u32 {
    MIN_HOLD_TIME_S
}

fn default_connect_retry_s() -> u32 {
    5
}

fn default_withdraw_wait_ms() -> u32 {
    300
}

fn default_bird() -> PathBuf {
    PathBuf::from(DEFAULT_BIRD)
}

/// `[bgp.bfd]`: BFD on the sessions, so that a router notices a dead balancer in
/// `interval_ms × multiplier` instead of a hold time.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BfdConfig {
    /// Minimum transmit and receive interval, 10..=10000 ms.
    pub interval_ms: u32,
    /// Packets missed before the session is down, 1..=255.
    pub multiplier: u32,
}

/// One router this balancer announces its VIPs to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Neighbour {
    /// The router's address (a directly connected one).
    pub address: IpAddr,
    /// The router's AS.
    pub remote_as: u32,
    /// Whether the session uses BFD; none: when `[bgp.bfd]` exists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bfd: Option<bool>,
}

/// `[bgp]`: active-active scale-out. Each balancer announces its healthy VIP addresses
/// to the routers, which spread flows over the balancers by ECMP.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BgpConfig {
    /// This balancer's AS.
    pub local_as: u32,
    /// BGP router id (IPv4); none: `announce_from`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub router_id: Option<IpAddr>,
    /// This balancer's address toward the routers: source of the sessions, next hop
    /// of the routes.
    pub announce_from: IpAddr,
    /// VIP addresses announced (/32, /128); none: every `[[vips]]` address that
    /// `[vrrp]` does not move.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vips: Option<Vec<IpAddr>>,
    /// Standard communities (`ASN:value`) on every announcement.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub communities: Vec<String>,
    /// Hold time, at least 3 s; keepalives go every third of it.
    #[serde(default = "default_hold_time_s")]
    pub hold_time_s: u32,
    /// Seconds between attempts to connect to a router.
    #[serde(default = "default_connect_retry_s")]
    pub connect_retry_s: u32,
    /// On a clean stop, the time between withdrawing and stopping the data plane, so
    /// that routers move the flows elsewhere first; at most 20000.
    #[serde(default = "default_withdraw_wait_ms")]
    pub withdraw_wait_ms: u32,
    /// The BIRD 2 daemon.
    #[serde(default = "default_bird")]
    pub bird: PathBuf,
    /// Where `bird.conf` and BIRD's control socket go; none: `<control socket>.bird`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_dir: Option<PathBuf>,
    /// BFD on the sessions; none: no BFD.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bfd: Option<BfdConfig>,
    /// The routers.
    #[serde(default)]
    pub neighbours: Vec<Neighbour>,
}

/// Parses a standard community, `ASN:value` with each part a u16.
pub fn parse_community(text: &str) -> Result<(u16, u16), String> {
    let bad = || format!("{text:?} is not a community like \"65001:100\" (two numbers 0-65535)");
    let (asn, value) = text.split_once(':').ok_or_else(bad)?;
    let asn: u16 = asn.trim().parse().map_err(|_| bad())?;
    let value: u16 = value.trim().parse().map_err(|_| bad())?;
    Ok((asn, value))
}

impl BgpConfig {
    /// The router id, `announce_from` unless given (valid after [`Self::validate`]).
    pub fn router_id(&self) -> Ipv4Addr {
        match (self.router_id, self.announce_from) {
            (Some(IpAddr::V4(id)), _) | (None, IpAddr::V4(id)) => id,
            _ => Ipv4Addr::UNSPECIFIED,
        }
    }

    /// The communities, parsed (the ones that parse: all, after [`Self::validate`]).
    pub fn parsed_communities(&self) -> Vec<(u16, u16)> {
        self.communities
            .iter()
            .filter_map(|c| parse_community(c).ok())
            .collect()
    }

    /// Whether the session with `neighbour` uses BFD.
    pub fn uses_bfd(&self, neighbour: &Neighbour) -> bool {
        self.bfd.is_some() && neighbour.bfd.unwrap_or(true)
    }

    /// Keepalive interval: a third of the hold time, as BIRD's default.
    pub fn keepalive_s(&self) -> u32 {
        (self.hold_time_s / 3).max(1)
    }

    /// Where `bird.conf` and BIRD's socket go: `run_dir`, or a directory beside the
    /// agent's control socket, so that agents on one host never share one.
    pub fn run_dir(&self, control_socket: &Path) -> PathBuf {
        self.run_dir.clone().unwrap_or_else(|| {
            let mut dir = control_socket.as_os_str().to_owned();
            dir.push(".bird");
            PathBuf::from(dir)
        })
    }

    /// The addresses that may be announced: `vips` as listed, or else every address of
    /// the running VIPs that `[vrrp]` does not move (a VRRP address lives on one
    /// balancer at a time; announcing it from every one would split its flows).
    pub fn candidates(&self, vips: &[VipSpec], vrrp: Option<&VrrpConfig>) -> BTreeSet<IpAddr> {
        match &self.vips {
            Some(listed) => listed.iter().copied().collect(),
            None => vips
                .iter()
                .map(|v| v.address)
                .filter(|a| !moved_by_vrrp(*a, vrrp))
                .collect(),
        }
    }

    /// Whether BIRD gets the IPv6 static protocol and channels: when an address that
    /// may be announced, as the file says at start (`vips`, or else the file's VIPs),
    /// is IPv6. Fixed for the speaker's life: adding the channels later would reset
    /// every session, so an IPv6 VIP added at runtime waits for a restart.
    pub fn announces_ipv6(&self, file_vips: &[VipSpec], vrrp: Option<&VrrpConfig>) -> bool {
        self.candidates(file_vips, vrrp).iter().any(IpAddr::is_ipv6)
    }

    /// The active-active rule: a VIP on an announced address carries a hash
    /// scheduler. Routers move flows between balancers (ECMP rehashes when one joins
    /// or leaves), and without flow-state sync only a hash picks the same backend on
    /// every balancer; a ring picks by turn, so a moved connection would break.
    /// Checked for the file (start and reload) and for every change through the API.
    pub fn check_active_active(
        &self,
        vips: &[VipSpec],
        vrrp: Option<&VrrpConfig>,
    ) -> Result<(), StateError> {
        let announced = self.candidates(vips, vrrp);
        for (i, vip) in vips.iter().enumerate() {
            if announced.contains(&vip.address) && vip.scheduler.uses_ring() {
                let scheduler = format!("{:?}", vip.scheduler).to_lowercase();
                return Err(StateError {
                    field: format!("vips[{i}].scheduler"),
                    message: format!(
                        "vip {}: scheduler {scheduler} cannot be announced active-active over \
                         BGP: the routers move flows between balancers, and only a hash \
                         scheduler (maglev, sh) picks the same backend on every balancer; \
                         use maglev",
                        vip.name
                    ),
                });
            }
        }
        Ok(())
    }

    /// Checks every field against the file's VIPs and `[vrrp]`.
    pub fn validate(&self, vips: &[VipSpec], vrrp: Option<&VrrpConfig>) -> Result<(), StateError> {
        let bad = |field: String, message: String| StateError { field, message };
        if self.local_as == 0 {
            return Err(bad("bgp.local_as".into(), "0 is not an AS number".into()));
        }
        if !is_unicast(self.announce_from) {
            return Err(bad(
                "bgp.announce_from".into(),
                format!("{} is not a unicast address", self.announce_from),
            ));
        }
        match (self.router_id, self.announce_from) {
            (Some(IpAddr::V6(id)), _) => {
                return Err(bad(
                    "bgp.router_id".into(),
                    format!("{id}: a router id is an IPv4 address"),
                ));
            }
            (Some(IpAddr::V4(id)), _) if id.is_unspecified() => {
                return Err(bad(
                    "bgp.router_id".into(),
                    "0.0.0.0 is not a router id".into(),
                ));
            }
            (None, IpAddr::V6(_)) => {
                return Err(bad(
                    "bgp.router_id".into(),
                    "required when announce_from is IPv6: a router id is an IPv4 address".into(),
                ));
            }
            _ => {}
        }
        if !(MIN_HOLD_TIME_S..=65_535).contains(&self.hold_time_s) {
            return Err(bad(
                "bgp.hold_time_s".into(),
                format!(
                    "{} is outside {MIN_HOLD_TIME_S}..=65535 (BIRD's smallest is 3)",
                    self.hold_time_s
                ),
            ));
        }
        if !(1..=65_535).contains(&self.connect_retry_s) {
            return Err(bad(
                "bgp.connect_retry_s".into(),
                format!("{} is outside 1..=65535", self.connect_retry_s),
            ));
        }
        if self.withdraw_wait_ms > MAX_WITHDRAW_WAIT_MS {
            return Err(bad(
                "bgp.withdraw_wait_ms".into(),
                format!("{} is above {MAX_WITHDRAW_WAIT_MS}", self.withdraw_wait_ms),
            ));
        }
        if self.bird.as_os_str().is_empty() {
            return Err(bad("bgp.bird".into(), "name the BIRD 2 daemon".into()));
        }
        for (i, c) in self.communities.iter().enumerate() {
            parse_community(c).map_err(|m| bad(format!("bgp.communities[{i}]"), m))?;
        }
        if let Some(bfd) = &self.bfd {
            if !(10..=10_000).contains(&bfd.interval_ms) {
                return Err(bad(
                    "bgp.bfd.interval_ms".into(),
                    format!("{} is outside 10..=10000", bfd.interval_ms),
                ));
            }
            if !(1..=255).contains(&bfd.multiplier) {
                return Err(bad(
                    "bgp.bfd.multiplier".into(),
                    format!("{} is outside 1..=255", bfd.multiplier),
                ));
            }
        }
        self.validate_neighbours()?;
        self.validate_vips(vips, vrrp)
    }

    fn validate_neighbours(&self) -> Result<(), StateError> {
        let bad = |field: String, message: String| StateError { field, message };
        if self.neighbours.is_empty() {
            return Err(bad(
                "bgp.neighbours".into(),
                "name at least one neighbour ([[bgp.neighbours]] with address and remote_as)"
                    .into(),
            ));
        }
        let mut seen = BTreeSet::new();
        for (i, n) in self.neighbours.iter().enumerate() {
            let at = format!("bgp.neighbours[{i}]");
            if !is_unicast(n.address) || n.address == self.announce_from {
                return Err(bad(
                    format!("{at}.address"),
                    format!("{} is not a router's unicast address", n.address),
                ));
            }
            // One source address serves every session.
            if n.address.is_ipv4() != self.announce_from.is_ipv4() {
                return Err(bad(
                    format!("{at}.address"),
                    format!(
                        "{} is not of the family of announce_from {}: the session's source must be",
                        n.address, self.announce_from
                    ),
                ));
            }
            if !seen.insert(n.address) {
                return Err(bad(
                    format!("{at}.address"),
                    format!("{} is listed twice", n.address),
                ));
            }
            if n.remote_as == 0 {
                return Err(bad(
                    format!("{at}.remote_as"),
                    "0 is not an AS number".into(),
                ));
            }
            if n.bfd == Some(true) && self.bfd.is_none() {
                return Err(bad(
                    format!("{at}.bfd"),
                    "BFD needs a [bgp.bfd] section with interval_ms and multiplier".into(),
                ));
            }
        }
        Ok(())
    }

    fn validate_vips(&self, vips: &[VipSpec], vrrp: Option<&VrrpConfig>) -> Result<(), StateError> {
        let bad = |field: String, message: String| StateError { field, message };
        let Some(listed) = &self.vips else {
            return Ok(());
        };
        if listed.is_empty() {
            return Err(bad(
                "bgp.vips".into(),
                "empty: name at least one address, or leave vips out to announce every VIP".into(),
            ));
        }
        let known: BTreeSet<IpAddr> = vips.iter().map(|v| v.address).collect();
        let mut seen = BTreeSet::new();
        for (i, address) in listed.iter().enumerate() {
            let field = format!("bgp.vips[{i}]");
            if !known.contains(address) {
                return Err(bad(
                    field,
                    format!(
                        "{address} is not the address of any [[vips]] entry (known: {known:?})"
                    ),
                ));
            }
            if !seen.insert(*address) {
                return Err(bad(field, format!("{address} is listed twice")));
            }
            // The route's next hop is `announce_from` (`next hop self`): one of the
            // other family cannot be given over these sessions.
            if address.is_ipv6() != self.announce_from.is_ipv6() {
                let (vip, from) = if address.is_ipv6() {
                    ("IPv6", "IPv4")
                } else {
                    ("IPv4", "IPv6")
                };
                return Err(bad(
                    field,
                    format!(
                        "{address} is an {vip} address, but announce_from {} is {from}: the \
                         routers need an {vip} next hop, which sessions from an {from} \
                         address cannot give; announce it from balancers whose announce_from \
                         and neighbours are {vip}, or leave it out of bgp.vips",
                        self.announce_from
                    ),
                ));
            }
            if moved_by_vrrp(*address, vrrp) {
                return Err(bad(
                    field,
                    format!(
                        "{address} is in vrrp.vips too: a VIP address either moves between two \
                         balancers (VRRP) or is announced by all of them (BGP), not both"
                    ),
                ));
            }
        }
        Ok(())
    }
}

fn moved_by_vrrp(address: IpAddr, vrrp: Option<&VrrpConfig>) -> bool {
    matches!((address, vrrp), (IpAddr::V4(a), Some(v)) if v.vips.contains(&a))
}

fn is_unicast(address: IpAddr) -> bool {
    !(address.is_unspecified() || address.is_multicast() || address.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, ConfigError};

    /// Two VIPs on 10.0.0.100 (maglev, sh), one rr VIP on 10.0.0.101, and a `[bgp]`
    /// section announcing 10.0.0.100.
    const FILE: &str = r#"
        [dataplane]
        interfaces = ["lbc", "lbb"]

        [[vips]]
        name = "www"
        address = "10.0.0.100"
        port = 80
        scheduler = "maglev"
        backends = [{ address = "10.1.0.11", port = 8080 }]

        [[vips]]
        name = "dns"
        address = "10.0.0.100"
        port = 53
        protocol = "udp"
        scheduler = "sh"
        backends = [{ address = "10.1.0.21", port = 53 }]

        [[vips]]
        name = "mail"
        address = "10.0.0.101"
        port = 25
        scheduler = "rr"
        backends = [{ address = "10.1.0.31", port = 25 }]

        [bgp]
        local_as = 65001
        announce_from = "10.0.0.3"
        vips = ["10.0.0.100"]
        communities = ["65001:100"]

        [bgp.bfd]
        interval_ms = 50
        multiplier = 3

        [[bgp.neighbours]]
        address = "10.0.0.254"
        remote_as = 65000
    "#;

    fn refused(text: &str) -> StateError {
        match Config::parse(text) {
            Err(ConfigError::Invalid { source, .. }) => source,
            Err(other) => panic!("expected a field error, got {other}"),
            Ok(_) => panic!("expected a refusal of:\n{text}"),
        }
    }

    fn field(text: &str) -> String {
        refused(text).field
    }

    fn bgp(text: &str) -> BgpConfig {
        Config::parse(text)
            .unwrap_or_else(|e| panic!("the file should load: {e}"))
            .bgp
            .expect("a [bgp] section")
    }

    #[test]
    fn parses_with_defaults() {
        let b = bgp(FILE);
        assert_eq!(b.router_id(), Ipv4Addr::new(10, 0, 0, 3));
        assert_eq!(b.hold_time_s, 3);
        assert_eq!(b.keepalive_s(), 1);
        assert_eq!(b.connect_retry_s, 5);
        assert_eq!(b.withdraw_wait_ms, 300);
        assert_eq!(b.bird, PathBuf::from("/usr/sbin/bird"));
        assert_eq!(b.parsed_communities(), [(65001, 100)]);
        assert!(
            b.uses_bfd(&b.neighbours[0]),
            "BFD is on by default with [bgp.bfd]"
        );
        assert_eq!(
            b.run_dir(Path::new("/run/foobar-lb/control.sock")),
            PathBuf::from("/run/foobar-lb/control.sock.bird")
        );
        let explicit = bgp(&FILE.replace(
            "local_as = 65001",
            "local_as = 65001\nrouter_id = \"192.0.2.1\"\nrun_dir = \"/tmp/b\"",
        ));
        assert_eq!(explicit.router_id(), Ipv4Addr::new(192, 0, 2, 1));
        assert_eq!(explicit.run_dir(Path::new("/x")), PathBuf::from("/tmp/b"));
    }

    #[test]
    fn without_vips_every_address_but_vrrps_is_a_candidate() {
        let text = FILE
            .replace("vips = [\"10.0.0.100\"]\n", "")
            .replace("scheduler = \"rr\"", "scheduler = \"maglev\"");
        let config = Config::parse(&text).unwrap_or_else(|e| panic!("should load: {e}"));
        let b = config.bgp.as_ref().expect("[bgp]");
        let ip = |a: &str| a.parse::<IpAddr>().expect("an address");
        let all: Vec<IpAddr> = b.candidates(&config.vips, None).into_iter().collect();
        assert_eq!(all, [ip("10.0.0.100"), ip("10.0.0.101")]);
        let vrrp: VrrpConfig = toml::from_str(
            "interface = \"lbc\"\nvrid = 51\npriority = 150\nvips = [\"10.0.0.101\"]",
        )
        .expect("a [vrrp] section");
        let some: Vec<IpAddr> = b
            .candidates(&config.vips, Some(&vrrp))
            .into_iter()
            .collect();
        assert_eq!(some, [ip("10.0.0.100")]);
    }

    #[test]
    fn refuses_bad_fields_by_name() {
        let cases = [
            ("local_as = 65001", "local_as = 0", "bgp.local_as"),
            (
                "local_as = 65001",
                "local_as = 65001\nrouter_id = \"2001:db8::1\"",
                "bgp.router_id",
            ),
            (
                "announce_from = \"10.0.0.3\"",
                "announce_from = \"2001:db8::3\"",
                "bgp.router_id",
            ),
            (
                "local_as = 65001",
                "local_as = 65001\nhold_time_s = 2",
                "bgp.hold_time_s",
            ),
            (
                "local_as = 65001",
                "local_as = 65001\nconnect_retry_s = 0",
                "bgp.connect_retry_s",
            ),
            ("\"65001:100\"", "\"65001:70000\"", "bgp.communities[0]"),
            ("\"65001:100\"", "\"65001\"", "bgp.communities[0]"),
            ("interval_ms = 50", "interval_ms = 5", "bgp.bfd.interval_ms"),
            (
                "interval_ms = 50",
                "interval_ms = 20000",
                "bgp.bfd.interval_ms",
            ),
            ("multiplier = 3", "multiplier = 0", "bgp.bfd.multiplier"),
            ("multiplier = 3", "multiplier = 256", "bgp.bfd.multiplier"),
            (
                "remote_as = 65000",
                "remote_as = 0",
                "bgp.neighbours[0].remote_as",
            ),
            (
                "address = \"10.0.0.254\"",
                "address = \"2001:db8::254\"",
                "bgp.neighbours[0].address",
            ),
            (
                "vips = [\"10.0.0.100\"]",
                "vips = [\"10.0.0.9\"]",
                "bgp.vips[0]",
            ),
            (
                "vips = [\"10.0.0.100\"]",
                "vips = [\"10.0.0.100\", \"10.0.0.100\"]",
                "bgp.vips[1]",
            ),
            ("vips = [\"10.0.0.100\"]", "vips = []", "bgp.vips"),
            (
                "local_as = 65001",
                "local_as = 65001\nwithdraw_wait_ms = 20001",
                "bgp.withdraw_wait_ms",
            ),
        ];
        for (from, to, expected) in cases {
            let text = FILE.replace(from, to);
            assert_ne!(text, FILE, "the case {to:?} changed nothing");
            assert_eq!(field(&text), expected, "for {to:?}");
        }
    }

    #[test]
    fn neighbours_are_needed_unique_and_bfd_needs_its_section() {
        let none = FILE.replace(
            "[[bgp.neighbours]]\n        address = \"10.0.0.254\"\n        remote_as = 65000",
            "",
        );
        assert_eq!(field(&none), "bgp.neighbours");
        let twice = format!(
            "{FILE}\n        [[bgp.neighbours]]\n        address = \"10.0.0.254\"\n        remote_as = 65002\n"
        );
        assert_eq!(field(&twice), "bgp.neighbours[1].address");
        let no_bfd = FILE
            .replace(
                "[bgp.bfd]\n        interval_ms = 50\n        multiplier = 3",
                "",
            )
            .replace("remote_as = 65000", "remote_as = 65000\n        bfd = true");
        assert_eq!(field(&no_bfd), "bgp.neighbours[0].bfd");
        let off = bgp(&FILE.replace(
            "remote_as = 65000",
            "remote_as = 65000\n        bfd = false",
        ));
        assert!(
            !off.uses_bfd(&off.neighbours[0]),
            "bfd = false turns it off"
        );
    }

    #[test]
    fn a_withdraw_wait_fits_in_the_units_stop_timeout() {
        let most = bgp(&FILE.replace(
            "local_as = 65001",
            "local_as = 65001\nwithdraw_wait_ms = 20000",
        ));
        assert_eq!(most.withdraw_wait_ms, MAX_WITHDRAW_WAIT_MS);
    }

    /// FILE with an IPv6 VIP (maglev) at 2001:db8::100 too.
    fn with_ipv6_vip() -> String {
        FILE.replace(
            "        [bgp]\n",
            "        [[vips]]\n        name = \"www6\"\n        address = \"2001:db8::100\"\n        \
             port = 80\n        scheduler = \"maglev\"\n        \
             backends = [{ address = \"2001:db8:1::11\", port = 8080 }]\n\n        [bgp]\n",
        )
    }

    #[test]
    fn refuses_an_ipv6_vip_announced_from_an_ipv4_address() {
        let text = with_ipv6_vip().replace(
            "vips = [\"10.0.0.100\"]",
            "vips = [\"10.0.0.100\", \"2001:db8::100\"]",
        );
        let err = refused(&text);
        assert_eq!(err.field, "bgp.vips[1]");
        assert!(
            err.message.starts_with(
                "2001:db8::100 is an IPv6 address, but announce_from 10.0.0.3 is IPv4"
            ),
            "{}",
            err.message
        );
    }

    #[test]
    fn the_ipv6_channel_follows_the_file_at_start() {
        let channel = |text: &str| {
            let config = Config::parse(text).unwrap_or_else(|e| panic!("should load: {e}"));
            let b = config.bgp.as_ref().expect("[bgp]");
            b.announces_ipv6(&config.vips, config.vrrp.as_ref())
        };
        // Listed: only what is listed counts.
        assert!(!channel(&with_ipv6_vip()));
        // Not listed: every VIP of the file, the IPv6 one too.
        let unlisted = |text: &str| {
            text.replace("vips = [\"10.0.0.100\"]\n", "")
                .replace("scheduler = \"rr\"", "scheduler = \"maglev\"")
        };
        assert!(!channel(&unlisted(FILE)));
        assert!(channel(&unlisted(&with_ipv6_vip())));
    }

    #[test]
    fn refuses_an_address_in_both_vrrp_and_bgp() {
        let text = format!(
            "{FILE}\n        [vrrp]\n        interface = \"lbc\"\n        vrid = 51\n        \
             priority = 150\n        vips = [\"10.0.0.100\"]\n"
        );
        let err = refused(&text);
        assert_eq!(err.field, "bgp.vips[0]");
        assert!(err.message.contains("vrrp.vips"), "{}", err.message);
    }

    #[test]
    fn refuses_a_ring_scheduler_on_an_announced_address() {
        let err = refused(&FILE.replace("vips = [\"10.0.0.100\"]", "vips = [\"10.0.0.101\"]"));
        assert_eq!(err.field, "vips[2].scheduler");
        assert!(
            err.message
                .starts_with("vip mail: scheduler rr cannot be announced active-active"),
            "{}",
            err.message
        );
        assert!(err.message.contains("use maglev"), "{}", err.message);
        // Without a `vips` list every VIP address is announced, the rr one too.
        assert_eq!(
            field(&FILE.replace("vips = [\"10.0.0.100\"]\n", "")),
            "vips[2].scheduler"
        );
        for ring in ["lc", "wlc"] {
            let text = FILE.replace("scheduler = \"sh\"", &format!("scheduler = \"{ring}\""));
            assert_eq!(field(&text), "vips[1].scheduler", "for {ring}");
        }
    }

    #[test]
    fn the_rule_holds_for_runtime_changes() {
        let config = Config::parse(FILE).unwrap_or_else(|e| panic!("should load: {e}"));
        let mut desired = config.desired_state();
        config
            .check_desired(&desired)
            .unwrap_or_else(|e| panic!("the file's own VIPs pass: {e}"));
        // An rr VIP added on the announced address, as `vip add` would.
        let mut added = desired.vips[0].clone();
        added.name = "api".into();
        added.port = 8443;
        added.scheduler = crate::state::Scheduler::Rr;
        desired.vips.push(added);
        let err = config
            .check_desired(&desired)
            .expect_err("an rr VIP on an announced address is refused");
        assert_eq!(err.field, "vips[3].scheduler");
    }

    #[test]
    fn round_trips_through_toml() {
        let config = Config::parse(FILE).unwrap_or_else(|e| panic!("should load: {e}"));
        let text = toml::to_string_pretty(&config).expect("serializes");
        let again = Config::parse(&text).unwrap_or_else(|e| panic!("reads back: {e}\n{text}"));
        assert_eq!(again, config, "{text}");
    }
}

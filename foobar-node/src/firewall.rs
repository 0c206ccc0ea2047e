//! The host firewall of a node: nftables rules written from the node's own
//! `[firewall]` section into one table the node owns (`inet foobar_web`,
//! `inet foobar_app`, `inet foobar_db`), replaced atomically when it starts and
//! removed when it stops cleanly.
//!
//! ```toml
//! [firewall]
//! host_ports = [80, 443, 8000, 3306, 8306]      # every port open on this host
//! allow = [                                     # this node's ports, and who may reach them
//!   { ports = [80, 443], from = ["10.0.0.0/24", "10.1.0.1", "fd00::/64"] },
//! ]
//! # table = "foobar_web"                        # the table's name; the node's role by default
//! ```
//!
//! **Several nodes share a host, so a table may only drop.** Every table's base chain
//! at the input hook sees every packet: an `accept` only ends that chain (the packet
//! goes on to the other tables), a `drop` is final. So each node's table accepts
//! nothing for the host, and drops, each rule counted:
//! - a new connection to a port of this node (one in `allow`) from a source no entry
//!   names (`refuse <port>`);
//! - new TCP and UDP to any port not in `host_ports` (`closed`), and protocols other
//!   than TCP, UDP and ICMP (`other protocols`).
//!
//! `host_ports` is every port open on the host, whichever node serves it, and is the
//! same in every node's file (whoever writes the files knows them all). The tables
//! therefore agree: a port another node owns passes this table and meets its owner's,
//! and any one table keeps the host closed, so a node that restarts (a rolling deploy
//! restarts the web and application nodes under load) neither opens the host nor
//! drops the traffic of the nodes that stay up. While a node is down its own ports
//! lose their source check, but nothing listens on them; it writes its table before
//! it listens again.
//!
//! Before the drops, in each table, go what must never be dropped, as `accept`s that
//! end this table's chain: loopback, packets of established and related connections
//! (the replies to every process's connections, whatever their port: each table sees
//! them, so each needs the rule; and a changed policy applies to new connections),
//! ICMP (errors, path MTU, neighbour discovery), and each `allow` entry's sources to
//! its ports, ahead of those ports' `refuse`. The `ct` rules turn connection tracking
//! on in the host's network namespace; it stays on while any node's table is there.
//!
//! Why not one table for the host: no process owns the host, and a table written by
//! every node would be replaced by each with its own view. Why not every node writing
//! the whole host's rules: each file would carry the other nodes' ports and sources,
//! and they drift. Marks set in one table and read in another would tie the tables'
//! order together and fail open when the marking node is down. Here a node's file
//! says who may reach it, plus the one list of the host's ports.
//!
//! **Replaced atomically**: the table is written by one `nft -f -` script that
//! declares it, deletes it and defines it anew, which the kernel commits as one
//! transaction; the table is never half written, and never absent. **Removed on a
//! clean stop** (the node's run returns); a node that crashes or is killed leaves its
//! table, so its ports stay guarded until its next start replaces it.
//!
//! **Counted**: every rule has a counter and a comment naming it. [`counters`] reads
//! them (`nft -j list table`), and the node's `/metrics` shows them as
//! `<service>_firewall_packets_total{rule}` and `_bytes_total` ([`register_metrics`],
//! [`metrics_text`]), under the prefix of its other series, which tells the tables
//! apart. A packet to a closed port is counted by whichever table's chain
//! sees it first: the host's figure is the sum over its tables.
//!
//! The unit of a rule is an address: nodes that share a host share its addresses, so
//! the rule that lets the other database node replicate lets every process of its
//! host through too.

use std::{
    collections::BTreeSet,
    fmt::{self, Write as _},
    io::Write as _,
    net::{IpAddr, SocketAddr},
    path::Path,
    process::{Command, Stdio},
    str::FromStr,
    sync::Mutex,
};

use ipnet::IpNet;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{MetricType, counter::ConstCounter},
    registry::Registry,
};
use serde::{Deserialize, Deserializer};
use tracing::{info, warn};

use crate::config::Invalid;

/// `[firewall]`: the host's open ports, and who may reach this node's.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Every port open on this host, TCP and UDP, whichever node serves it (an
    /// operator's ssh too): new connections to any other port are dropped. The same
    /// list in every node's file of the host.
    pub host_ports: Vec<u16>,
    /// This node's ports and who may reach them; other sources are dropped.
    #[serde(default)]
    pub allow: Vec<Allow>,
    /// The table's name (`inet <table>`); the node's role when absent. Two nodes of
    /// one role on one host need a name each.
    #[serde(default)]
    pub table: Option<String>,
}

/// One entry of `allow`: these ports from these sources.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Allow {
    /// Ports of this node, each also in `host_ports`.
    pub ports: Vec<u16>,
    /// Addresses (`10.1.0.1`) and prefixes (`10.0.0.0/24`, `fd00::/64`).
    pub from: Vec<Source>,
}

/// A source: an address, or a prefix without host bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Source(
    /// The prefix (an address alone: /32 or /128).
    pub IpNet,
);

impl FromStr for Source {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let net = match text.parse::<IpAddr>() {
            Ok(address) => IpNet::from(address),
            Err(_) => text
                .parse::<IpNet>()
                .map_err(|_| format!("{text:?} is neither an address nor a prefix"))?,
        };
        if net.trunc() != net {
            return Err(format!(
                "{net} has host bits set (did you mean {}?)",
                net.trunc()
            ));
        }
        Ok(Source(net))
    }
}

impl<'de> Deserialize<'de> for Source {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// As nft writes it: an address alone, a prefix with its length.
impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.prefix_len() == self.0.max_prefix_len() {
            fmt::Display::fmt(&self.0.addr(), f)
        } else {
            fmt::Display::fmt(&self.0, f)
        }
    }
}

/// Matches TCP and UDP, so `th dport` (either's destination port) can follow.
const TRANSPORT: &str = "meta l4proto { tcp, udp }";

/// One rule of the chain: what it matches, its verdict, and its name (its comment,
/// and its counter's label).
struct Rule {
    name: String,
    matches: String,
    verdict: &'static str,
}

impl Rule {
    fn accepting(name: impl Into<String>, matches: impl Into<String>) -> Self {
        Rule {
            name: name.into(),
            matches: matches.into(),
            verdict: "accept",
        }
    }

    fn dropping(name: impl Into<String>, matches: impl Into<String>) -> Self {
        Rule {
            name: name.into(),
            matches: matches.into(),
            verdict: "drop",
        }
    }
}

/// `{ a, b }`: nft's anonymous set.
fn set<T: fmt::Display>(items: impl IntoIterator<Item = T>) -> String {
    let items: Vec<String> = items.into_iter().map(|i| i.to_string()).collect();
    format!("{{ {} }}", items.join(", "))
}

impl Policy {
    /// Checks the section at `at` (`firewall`). `listens` are the node's listeners
    /// (field, address): the port of each that is reachable from outside must be a
    /// host port, or the node's own table would drop its clients.
    pub fn validate(&self, at: &str, listens: &[(&str, SocketAddr)]) -> Result<(), Invalid> {
        for (i, port) in self.host_ports.iter().enumerate() {
            if *port == 0 {
                return Err(Invalid::new(format!("{at}.host_ports[{i}]"), "port 0"));
            }
        }
        for (field, address) in listens {
            if !address.ip().is_loopback() && !self.host_ports.contains(&address.port()) {
                return Err(Invalid::new(
                    format!("{at}.host_ports"),
                    format!("does not list {}, the port of {field}", address.port()),
                ));
            }
        }
        for (i, allow) in self.allow.iter().enumerate() {
            let at = format!("{at}.allow[{i}]");
            if allow.ports.is_empty() {
                return Err(Invalid::new(
                    format!("{at}.ports"),
                    "needs at least one port",
                ));
            }
            for (j, port) in allow.ports.iter().enumerate() {
                if !self.host_ports.contains(port) {
                    return Err(Invalid::new(
                        format!("{at}.ports[{j}]"),
                        format!("{port} is not in host_ports: a node's ports are its host's"),
                    ));
                }
            }
            if allow.from.is_empty() {
                return Err(Invalid::new(
                    format!("{at}.from"),
                    "needs at least one address or prefix",
                ));
            }
        }
        if let Some(table) = &self.table
            && (table.is_empty()
                || table.len() > 32
                || !table
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
        {
            return Err(Invalid::new(
                format!("{at}.table"),
                "lowercase letters, digits and '_' only, at most 32",
            ));
        }
        Ok(())
    }

    /// The table's rules, in the chain's order.
    fn rules(&self) -> Vec<Rule> {
        let mut rules = vec![
            Rule::accepting("loopback", "iif \"lo\""),
            Rule::accepting("established", "ct state established,related"),
            Rule::accepting("icmp", "meta l4proto { icmp, ipv6-icmp }"),
        ];
        for (i, allow) in self.allow.iter().enumerate() {
            let ports = set(allow.ports.iter().collect::<BTreeSet<_>>());
            for (family, selector, v6) in [("ipv4", "ip", false), ("ipv6", "ip6", true)] {
                let sources: BTreeSet<&Source> = allow
                    .from
                    .iter()
                    .filter(|s| s.0.addr().is_ipv6() == v6)
                    .collect();
                if !sources.is_empty() {
                    rules.push(Rule::accepting(
                        format!("allow[{i}] {family}"),
                        format!(
                            "{TRANSPORT} th dport {ports} {selector} saddr {}",
                            set(sources)
                        ),
                    ));
                }
            }
        }
        // Reached by the sources no entry accepted.
        let owned: BTreeSet<u16> = self
            .allow
            .iter()
            .flat_map(|a| a.ports.iter().copied())
            .collect();
        for port in owned {
            rules.push(Rule::dropping(
                format!("refuse {port}"),
                format!("{TRANSPORT} th dport {port}"),
            ));
        }
        let open: BTreeSet<u16> = self.host_ports.iter().copied().collect();
        rules.push(Rule::dropping(
            "closed",
            if open.is_empty() {
                TRANSPORT.to_owned()
            } else {
                format!("{TRANSPORT} th dport != {}", set(open))
            },
        ));
        rules.push(Rule::dropping(
            "other protocols",
            "meta l4proto != { tcp, udp, icmp, ipv6-icmp }",
        ));
        rules
    }

    /// The nft script that replaces table `inet <table>` with this policy in one
    /// transaction: declared (so deleting it cannot fail), deleted, defined anew.
    pub fn ruleset(&self, table: &str) -> String {
        let mut out = format!(
            "table inet {table}\ndelete table inet {table}\ntable inet {table} {{\n\
             \tchain input {{\n\t\ttype filter hook input priority filter; policy accept;\n"
        );
        for rule in self.rules() {
            let _ = writeln!(
                out,
                "\t\t{} counter {} comment \"{}\"",
                rule.matches, rule.verdict, rule.name
            );
        }
        out.push_str("\t}\n}\n");
        out
    }
}

/// What nft could not do.
#[derive(Debug, thiserror::Error)]
pub enum FirewallError {
    /// `nft` could not be run.
    #[error("running nft: {0}")]
    Run(#[source] std::io::Error),
    /// `nft` refused the command.
    #[error("{command}: {message}")]
    Refused {
        /// The command.
        command: String,
        /// nft's error output.
        message: String,
    },
    /// Its JSON was not what `nft -j` writes.
    #[error("nft's JSON: {0}")]
    Json(#[from] serde_json::Error),
}

/// `nft`, from where Debian puts it (a service's PATH may lack /usr/sbin), or PATH.
fn nft_program() -> &'static str {
    if Path::new("/usr/sbin/nft").exists() {
        "/usr/sbin/nft"
    } else {
        "nft"
    }
}

/// Runs `nft args`, with `script` on its standard input; its standard output.
fn nft(args: &[&str], script: Option<&str>) -> Result<String, FirewallError> {
    let mut child = Command::new(nft_program())
        .args(args)
        .stdin(if script.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(FirewallError::Run)?;
    // Standard input is closed once written (dropped in the arm): nft reads to the
    // end, then commits. A failed write shows as nft's own refusal below.
    let written = match (script, child.stdin.take()) {
        (Some(text), Some(mut stdin)) => stdin.write_all(text.as_bytes()),
        _ => Ok(()),
    };
    let out = child.wait_with_output().map_err(FirewallError::Run)?;
    if !out.status.success() {
        return Err(FirewallError::Refused {
            command: format!("nft {}", args.join(" ")),
            message: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    written.map_err(FirewallError::Run)?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The table this process installed, whose counters its metrics show.
static INSTALLED: Mutex<Option<String>> = Mutex::new(None);

fn installed() -> Option<String> {
    INSTALLED.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

/// A table a node installed; [`Table::remove`] takes it away on a clean stop. Dropped
/// without it (a panic), the table stays: the node's ports stay guarded.
#[derive(Debug)]
pub struct Table {
    name: String,
}

impl Table {
    /// Writes `policy` as table `inet <name>`, replacing any table of that name in
    /// one transaction (a table a crashed run left, an older policy).
    pub fn install(name: &str, policy: &Policy) -> Result<Table, FirewallError> {
        nft(&["-f", "-"], Some(&policy.ruleset(name)))?;
        *INSTALLED.lock().unwrap_or_else(|p| p.into_inner()) = Some(name.to_owned());
        info!(table = %name, "firewall in place");
        Ok(Table {
            name: name.to_owned(),
        })
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Every rule's counter.
    pub fn counters(&self) -> Result<Vec<RuleCounter>, FirewallError> {
        counters(&self.name)
    }

    /// Deletes the table (a clean stop); the host stays closed by its other nodes'
    /// tables. A failure is logged: the node is stopping anyway.
    pub fn remove(self) {
        *INSTALLED.lock().unwrap_or_else(|p| p.into_inner()) = None;
        match nft(&["delete", "table", "inet", &self.name], None) {
            Ok(_) => info!(table = %self.name, "firewall removed"),
            Err(e) => warn!(table = %self.name, "removing the firewall: {e}"),
        }
    }
}

/// Installs the table of a node's `[firewall]`, if it has one: named by the section's
/// `table`, or `role` (`foobar_web`).
pub fn install(role: &str, policy: Option<&Policy>) -> Result<Option<Table>, FirewallError> {
    policy
        .map(|p| Table::install(p.table.as_deref().unwrap_or(role), p))
        .transpose()
}

/// One rule's counter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleCounter {
    /// The rule's name (its comment).
    pub rule: String,
    /// Packets it matched.
    pub packets: u64,
    /// Their bytes.
    pub bytes: u64,
}

/// Every rule's counter of table `inet <table>`, in the chain's order.
pub fn counters(table: &str) -> Result<Vec<RuleCounter>, FirewallError> {
    parse_counters(&nft(&["-j", "list", "table", "inet", table], None)?)
}

/// The counters in `nft -j list table`'s output: of each rule with a comment and a
/// counter.
pub fn parse_counters(json: &str) -> Result<Vec<RuleCounter>, FirewallError> {
    #[derive(Deserialize)]
    struct Listing {
        nftables: Vec<serde_json::Value>,
    }
    let listing: Listing = serde_json::from_str(json)?;
    Ok(listing
        .nftables
        .iter()
        .filter_map(|item| {
            let rule = item.get("rule")?;
            let counter = rule["expr"]
                .as_array()?
                .iter()
                .find_map(|e| e.get("counter"))?;
            Some(RuleCounter {
                rule: rule["comment"].as_str()?.to_owned(),
                packets: counter["packets"].as_u64()?,
                bytes: counter["bytes"].as_u64()?,
            })
        })
        .collect())
}

/// The counters of this process's table; none without one (or when nft fails, logged).
fn installed_counters() -> Option<Vec<RuleCounter>> {
    let table = installed()?;
    counters(&table)
        .inspect_err(|e| warn!(table = %table, "reading the firewall's counters: {e}"))
        .ok()
}

/// One exported series: name, help, and a rule's value.
type Series = (&'static str, &'static str, fn(&RuleCounter) -> u64);

/// The two series.
const SERIES: [Series; 2] = [
    (
        "firewall_packets",
        "Packets each rule of the node's firewall table matched (its nftables counter)",
        packets_of,
    ),
    (
        "firewall_bytes",
        "Bytes of the packets each rule of the node's firewall table matched",
        bytes_of,
    ),
];

fn packets_of(rule: &RuleCounter) -> u64 {
    rule.packets
}

fn bytes_of(rule: &RuleCounter) -> u64 {
    rule.bytes
}

/// Adds the firewall's counters to a service's metrics, under the registry's prefix
/// (`foobar_web_firewall_packets_total{rule}`, `_bytes_total`): read from the table at
/// each scrape, nothing while the process has no table.
pub fn register_metrics(registry: &mut Registry) {
    registry.register_collector(Box::new(Metrics));
}

/// The collector of [`register_metrics`].
#[derive(Debug)]
struct Metrics;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RuleLabels {
    rule: String,
}

impl Collector for Metrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let Some(rules) = installed_counters() else {
            return Ok(());
        };
        for (name, help, value) in SERIES {
            let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for rule in &rules {
                let labels = RuleLabels {
                    rule: rule.rule.clone(),
                };
                ConstCounter::new(value(rule)).encode(metric.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

/// The same counters in the classic text format, for a service that writes its own
/// metrics: `<prefix>_firewall_packets_total{rule="..."}`; empty without a table.
pub fn metrics_text(prefix: &str) -> String {
    let mut out = String::new();
    let Some(rules) = installed_counters() else {
        return out;
    };
    for (name, help, value) in SERIES {
        let _ = writeln!(out, "# HELP {prefix}_{name}_total {help}");
        let _ = writeln!(out, "# TYPE {prefix}_{name}_total counter");
        for rule in &rules {
            let label = rule
                .rule
                .replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('\n', "\\n");
            let _ = writeln!(
                out,
                "{prefix}_{name}_total{{rule=\"{label}\"}} {}",
                value(rule)
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::{Validate, parse};

    /// A node's file with nothing but a listener and the section.
    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Node {
        listen: SocketAddr,
        firewall: Policy,
    }

    impl Validate for Node {
        fn validate(&self) -> Result<(), Invalid> {
            self.firewall
                .validate("firewall", &[("listen", self.listen)])
        }
    }

    const WEB: &str = "listen = '0.0.0.0:80'\n[firewall]\nhost_ports = [80, 443, 3306]\n\
                       allow = [\n  { ports = [443, 80], from = ['10.0.0.0/24', '10.1.0.1', 'fd00::/64'] },\n  \
                       { ports = [80], from = ['10.1.0.12'] },\n]\n";

    fn field_of(text: &str) -> String {
        parse::<Node>(text, Path::new("node.toml"))
            .unwrap_err()
            .field()
            .unwrap()
            .to_owned()
    }

    #[test]
    fn names_the_field_at_fault() {
        assert!(parse::<Node>(WEB, Path::new("node.toml")).is_ok());
        let with = |from: &str, to: &str| field_of(&WEB.replacen(from, to, 1));
        assert_eq!(
            with("'10.0.0.0/24'", "'10.0.0.1/24'"),
            "firewall.allow[0].from[0]"
        );
        assert_eq!(with("'10.1.0.1'", "'nowhere'"), "firewall.allow[0].from[1]");
        assert_eq!(with("[443, 80]", "[443, 22]"), "firewall.allow[0].ports[1]");
        assert_eq!(with("[443, 80]", "[]"), "firewall.allow[0].ports");
        assert_eq!(
            with("from = ['10.1.0.12']", "from = []"),
            "firewall.allow[1].from"
        );
        assert_eq!(
            with("[80, 443, 3306]", "[443, 3306]"),
            "firewall.host_ports"
        );
        assert_eq!(
            with("[80, 443, 3306]", "[80, 443, 0]"),
            "firewall.host_ports[2]"
        );
        assert_eq!(
            with("[80, 443, 3306]", "[80, 70000]"),
            "firewall.host_ports[1]"
        );
        assert_eq!(
            with("host_ports", "table = 'Web'\nhost_ports"),
            "firewall.table"
        );
        assert_eq!(
            with("host_ports", "colour = 1\nhost_ports"),
            "firewall.colour"
        );
        // A node listening on loopback only needs no host port.
        let local = WEB.replacen("0.0.0.0:80", "127.0.0.1:9000", 1);
        assert!(parse::<Node>(&local, Path::new("node.toml")).is_ok());
    }

    #[test]
    fn writes_one_table_that_only_drops_for_the_host() {
        let node = parse::<Node>(WEB, Path::new("node.toml")).unwrap();
        let expected = "table inet foobar_web\n\
            delete table inet foobar_web\n\
            table inet foobar_web {\n\
            \tchain input {\n\
            \t\ttype filter hook input priority filter; policy accept;\n\
            \t\tiif \"lo\" counter accept comment \"loopback\"\n\
            \t\tct state established,related counter accept comment \"established\"\n\
            \t\tmeta l4proto { icmp, ipv6-icmp } counter accept comment \"icmp\"\n\
            \t\tmeta l4proto { tcp, udp } th dport { 80, 443 } ip saddr { 10.0.0.0/24, 10.1.0.1 } counter accept comment \"allow[0] ipv4\"\n\
            \t\tmeta l4proto { tcp, udp } th dport { 80, 443 } ip6 saddr { fd00::/64 } counter accept comment \"allow[0] ipv6\"\n\
            \t\tmeta l4proto { tcp, udp } th dport { 80 } ip saddr { 10.1.0.12 } counter accept comment \"allow[1] ipv4\"\n\
            \t\tmeta l4proto { tcp, udp } th dport 80 counter drop comment \"refuse 80\"\n\
            \t\tmeta l4proto { tcp, udp } th dport 443 counter drop comment \"refuse 443\"\n\
            \t\tmeta l4proto { tcp, udp } th dport != { 80, 443, 3306 } counter drop comment \"closed\"\n\
            \t\tmeta l4proto != { tcp, udp, icmp, ipv6-icmp } counter drop comment \"other protocols\"\n\
            \t}\n\
            }\n";
        assert_eq!(node.firewall.ruleset("foobar_web"), expected);
        // Without open ports, every new TCP and UDP connection is closed.
        let shut = Policy {
            host_ports: vec![],
            allow: vec![],
            table: None,
        };
        assert!(
            shut.ruleset("t")
                .contains("\t\tmeta l4proto { tcp, udp } counter drop comment \"closed\"\n")
        );
    }

    #[test]
    fn reads_each_rule_counter_from_nft_json() {
        // As nft 1.0.6 lists a table (`nft -j list table inet foobar_web`), shortened.
        let json = r#"{"nftables": [{"metainfo": {"version": "1.0.6", "json_schema_version": 1}},
            {"table": {"family": "inet", "name": "foobar_web", "handle": 3}},
            {"chain": {"family": "inet", "table": "foobar_web", "name": "input", "handle": 1,
              "type": "filter", "hook": "input", "prio": 0, "policy": "accept"}},
            {"rule": {"family": "inet", "table": "foobar_web", "chain": "input", "handle": 2,
              "comment": "loopback", "expr": [{"match": {"op": "==", "left": {"meta": {"key": "iif"}},
              "right": "lo"}}, {"counter": {"packets": 12, "bytes": 720}}, {"accept": null}]}},
            {"rule": {"family": "inet", "table": "foobar_web", "chain": "input", "handle": 15,
              "comment": "refuse 80", "expr": [{"match": {"op": "==", "left": {"payload":
              {"protocol": "th", "field": "dport"}}, "right": 80}},
              {"counter": {"packets": 3, "bytes": 180}}, {"drop": null}]}}]}"#;
        assert_eq!(
            parse_counters(json).unwrap(),
            [
                RuleCounter {
                    rule: "loopback".into(),
                    packets: 12,
                    bytes: 720
                },
                RuleCounter {
                    rule: "refuse 80".into(),
                    packets: 3,
                    bytes: 180
                },
            ]
        );
        assert!(parse_counters("{}").is_err());
    }
}

//! The command line: clap definitions (also the source of the man page and shell
//! completions) and how each command's answer is shown.

use std::{net::SocketAddr, path::PathBuf, str::FromStr};

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::{
    agent::OnExit,
    api::{DEFAULT_SOCKET, Request},
    edge::Action,
    persist::DEFAULT_STATE_FILE,
    state::{BackendSpec, Forwarding, MAX_WEIGHT, Protocol, Scheduler, VipSpec},
};

/// Default pin directory on bpffs.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/foobar-lb";

/// foobar-lb: an XDP layer-4 load balancer.
///
/// `foobar-lb run` is the daemon: it attaches the XDP program and owns its maps. Every
/// other command talks to it over its control socket and needs root.
#[derive(Debug, Parser)]
#[command(name = "foobar-lb", version, propagate_version = true)]
pub struct Cli {
    /// The daemon's control socket.
    #[arg(long, global = true, env = "FOOBAR_LB_SOCKET", default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Output format of listings and answers.
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Output formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Aligned text for people.
    Table,
    /// JSON, one document, for programs.
    Json,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: attach to the configured interfaces and serve the control socket.
    ///
    /// SIGHUP reloads the configuration file; SIGTERM and SIGINT stop the daemon
    /// (with `[bgp]`, after withdrawing the VIPs from the routers). With `[bgp]` it
    /// runs BIRD 2 (Debian's bird2) as its child, which listens on TCP port 179.
    /// It needs root, or the capabilities CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN and
    /// CAP_NET_RAW alone, as the Debian package's foobar-lb service runs it
    /// (`systemctl reload foobar-lb` sends SIGHUP).
    ///
    /// Examples:
    ///   sudo foobar-lb run --config /etc/foobar-lb/foobar-lb.toml
    ///   sudo foobar-lb run --config lb.toml --on-exit detach
    ///   sudo systemctl enable --now foobar-lb
    #[command(verbatim_doc_comment)]
    Run(RunArgs),
    /// List, add or remove VIPs.
    #[command(subcommand)]
    Vip(VipCommand),
    /// List, add, remove, drain, reweight, disable or enable backends of a VIP.
    #[command(subcommand)]
    Backend(BackendCommand),
    /// List, add or remove access-list rules, global or of a VIP.
    #[command(subcommand)]
    Acl(AclCommand),
    /// VIPs, backends, weights, flows and rates; the VRRP router and the BGP
    /// sessions and announcements when configured.
    ///
    /// Examples:
    ///   sudo foobar-lb status
    ///   sudo foobar-lb status -o json
    #[command(verbatim_doc_comment)]
    Status,
    /// Counters per XDP action, outcome, VIP and backend.
    ///
    /// Examples:
    ///   sudo foobar-lb stats
    ///   sudo foobar-lb stats -o json
    #[command(verbatim_doc_comment)]
    Stats,
    /// Which backend a new flow from CLIENT would get on VIP (from the schedule as
    /// written; no packet is sent).
    ///
    /// Examples:
    ///   sudo foobar-lb explain www 198.51.100.7:53211
    #[command(verbatim_doc_comment)]
    Explain {
        /// VIP name or address:port.
        vip: String,
        /// Client address:port.
        client: std::net::SocketAddr,
    },
    /// On a DSR backend: take the balancer's encapsulation (IPIP, IPv6 in IP, GUE)
    /// off packets for the VIPs, in XDP, and put the VIPs on the loopback. Runs in
    /// the foreground until SIGTERM or SIGINT, then detaches, takes the VIPs off the
    /// loopback again and prints its counters as JSON.
    ///
    /// Examples:
    ///   sudo foobar-lb decap --interface eth0 --vip 203.0.113.10 --from 172.16.0.0/16
    ///   sudo foobar-lb decap --interface eth0 --vip 203.0.113.10 --vip 2001:db8::10 \
    ///       --from 172.16.0.0/16 --from 100::/64 --from 10.1.0.0/24 --gue-port 6080
    #[command(verbatim_doc_comment)]
    Decap(DecapArgs),
    /// Re-read the configuration file and apply it whole; a bad file changes nothing.
    /// The file is the truth again: changes made through the CLI go (disabled
    /// backends stay disabled; no file says otherwise).
    ///
    /// Examples:
    ///   sudo foobar-lb reload
    #[command(verbatim_doc_comment)]
    Reload,
    /// Write the running state (the configuration file with the changes made through
    /// the CLI) as a configuration file, to FILE or stdout. Comments of the original
    /// are not kept; disabled backends are listed in a comment. The file is checked to
    /// load back as the same configuration before it is written, atomically.
    ///
    /// Examples:
    ///   sudo foobar-lb save > lb.toml
    ///   sudo foobar-lb save /etc/foobar-lb/foobar-lb.toml && sudo foobar-lb reload
    #[command(verbatim_doc_comment)]
    Save {
        /// Where to write it (replaced whole); none: stdout.
        file: Option<PathBuf>,
    },
    /// Print a shell completion script.
    ///
    /// Examples:
    ///   foobar-lb completions bash > /etc/bash_completion.d/foobar-lb
    #[command(verbatim_doc_comment)]
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff).
    ///
    /// Examples:
    ///   foobar-lb man > /usr/local/share/man/man8/foobar-lb.8
    #[command(verbatim_doc_comment)]
    Man,
}

/// `acl` subcommands. A source must pass the global list and its VIP's; in each,
/// the longest matching prefix decides, and a list with allow rules keeps out every
/// source it does not match. Changes apply at once, to open connections too.
#[derive(Debug, Subcommand)]
pub enum AclCommand {
    /// List every rule with the packets it decided.
    ///
    /// Examples:
    ///   sudo foobar-lb acl list
    #[command(verbatim_doc_comment)]
    List,
    /// Add a rule (a prefix already listed takes the new action).
    ///
    /// Examples:
    ///   sudo foobar-lb acl add deny 192.0.2.0/24
    ///   sudo foobar-lb acl add allow 198.51.100.0/24 --vip www
    #[command(verbatim_doc_comment)]
    Add {
        /// allow or deny.
        #[arg(value_enum)]
        action: ActionArg,
        /// The sources it matches, a prefix (an address alone is a /32 or /128).
        #[arg(value_parser = parse_prefix)]
        prefix: ipnet::IpNet,
        /// The VIP (name or address:port) whose list it goes in; none: the global list.
        #[arg(long)]
        vip: Option<String>,
    },
    /// Remove a rule.
    ///
    /// Examples:
    ///   sudo foobar-lb acl remove 192.0.2.0/24
    #[command(verbatim_doc_comment)]
    Remove {
        /// The rule's prefix.
        #[arg(value_parser = parse_prefix)]
        prefix: ipnet::IpNet,
        /// The VIP whose list it is in; none: the global list.
        #[arg(long)]
        vip: Option<String>,
    },
}

/// `acl add` actions.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum ActionArg {
    /// Let the sources in.
    Allow,
    /// Keep them out.
    Deny,
}

/// A prefix, or an address alone (all its bits).
fn parse_prefix(text: &str) -> Result<ipnet::IpNet, String> {
    if let Ok(net) = text.parse::<ipnet::IpNet>() {
        return Ok(net);
    }
    text.parse::<std::net::IpAddr>()
        .map(ipnet::IpNet::from)
        .map_err(|_| format!("{text:?} is not a prefix like 192.0.2.0/24 or an address"))
}

/// Options of `decap`.
#[derive(Debug, Args)]
pub struct DecapArgs {
    /// Interface the encapsulated packets arrive on. Repeatable.
    #[arg(long = "interface", required = true)]
    pub interfaces: Vec<String>,
    /// A VIP this backend serves: its packets are decapsulated, and it is put on the
    /// loopback. Repeatable.
    #[arg(long = "vip", required = true)]
    pub vips: Vec<std::net::IpAddr>,
    /// The UDP port of GUE (the balancer's `dataplane.gue_port`); 0: IPIP only.
    #[arg(long, default_value_t = foobar_lb_common::DEFAULT_GUE_PORT)]
    pub gue_port: u16,
    /// XDP attach mode.
    #[arg(long, value_enum, default_value = "auto")]
    pub xdp_mode: XdpModeArg,
    /// Leave the loopback and ARP settings alone (they are configured elsewhere).
    #[arg(long)]
    pub no_loopback: bool,
    /// A prefix the balancers send from (their `ipip_source`, their own addresses
    /// toward this host): encapsulated packets from elsewhere are dropped. Repeatable;
    /// none: any source.
    #[arg(long = "from", value_name = "PREFIX")]
    pub sources: Vec<ipnet::IpNet>,
}

/// `--xdp-mode` values.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum XdpModeArg {
    /// Native where the driver has it, generic otherwise.
    Auto,
    /// Native only.
    Native,
    /// Generic (skb) XDP.
    Generic,
}

/// Options of `run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The configuration file (TOML).
    #[arg(short, long)]
    pub config: PathBuf,
    /// Where maps and links are pinned (on bpffs; mounted if needed).
    #[arg(long, default_value = DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
    /// Do not pin: the data plane stops when the daemon does.
    #[arg(long, conflicts_with = "on_exit")]
    pub no_pin: bool,
    /// What happens to the data plane when the daemon exits.
    #[arg(long, value_enum, default_value_t = OnExit::Keep)]
    pub on_exit: OnExit,
    /// Where changes made through the CLI (weights, drains, disables, VIPs, backends,
    /// access-list rules) are kept, so that the next start applies them again; one
    /// saved before the configuration file was edited is dropped (the file wins).
    #[arg(long, default_value = DEFAULT_STATE_FILE)]
    pub state_file: PathBuf,
    /// Keep no state file: a restart forgets the changes made through the CLI.
    #[arg(long, conflicts_with = "state_file")]
    pub no_state_file: bool,
}

/// `vip` subcommands.
#[derive(Debug, Subcommand)]
pub enum VipCommand {
    /// List the VIPs.
    ///
    /// Examples:
    ///   sudo foobar-lb vip list
    #[command(verbatim_doc_comment)]
    List,
    /// Add a VIP.
    ///
    /// Examples:
    ///   sudo foobar-lb vip add www 10.0.0.100:80 --backend 10.1.0.11:8080 --backend 10.1.0.12:8080@2
    ///   sudo foobar-lb vip add dns 10.0.0.100:53 --protocol udp --scheduler maglev
    ///   sudo foobar-lb vip add db [fd00::200]:3306 --forwarding fullnat --backend [fd00:1::11]:3306
    #[command(verbatim_doc_comment)]
    Add {
        /// A name for people.
        name: String,
        /// The virtual address:port.
        address: SocketAddr,
        /// tcp or udp.
        #[arg(long, value_enum, default_value = "tcp")]
        protocol: ProtocolArg,
        /// rr (weighted round robin) or maglev (consistent hashing).
        #[arg(long, value_enum, default_value = "rr")]
        scheduler: SchedulerArg,
        /// Maglev table size, a prime.
        #[arg(long, default_value_t = crate::schedule::DEFAULT_MAGLEV_SIZE)]
        maglev_table_size: u32,
        /// How packets reach the backends: nat, fullnat, dsr-ipip or dsr-gue.
        #[arg(long, value_enum, default_value = "nat")]
        forwarding: ForwardingArg,
        /// A backend as address:port, optionally @weight (default 1). Repeatable.
        #[arg(long = "backend", value_name = "ADDRESS:PORT[@WEIGHT]")]
        backends: Vec<BackendArg>,
    },
    /// Remove a VIP; its flows end.
    ///
    /// Examples:
    ///   sudo foobar-lb vip remove www
    #[command(verbatim_doc_comment)]
    Remove {
        /// VIP name or address:port.
        vip: String,
    },
}

/// `backend` subcommands.
#[derive(Debug, Subcommand)]
pub enum BackendCommand {
    /// List backends, of one VIP or of all.
    ///
    /// Examples:
    ///   sudo foobar-lb backend list www
    #[command(verbatim_doc_comment)]
    List {
        /// VIP name or address:port.
        vip: Option<String>,
    },
    /// Add a backend to a VIP.
    ///
    /// Examples:
    ///   sudo foobar-lb backend add www 10.1.0.13:8080 --weight 2
    #[command(verbatim_doc_comment)]
    Add {
        /// VIP name or address:port.
        vip: String,
        /// Backend address:port.
        backend: SocketAddr,
        /// Share of new flows relative to the others (0 adds it drained).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(0..=MAX_WEIGHT as i64))]
        weight: u32,
    },
    /// Remove a backend: its open connections are cut (their flows are purged).
    ///
    /// Examples:
    ///   sudo foobar-lb backend remove www 10.1.0.13:8080
    #[command(verbatim_doc_comment)]
    Remove {
        /// VIP name or address:port.
        vip: String,
        /// Backend address:port.
        backend: SocketAddr,
    },
    /// Drain a backend: no new flows, open connections keep working (weight 0).
    ///
    /// Examples:
    ///   sudo foobar-lb backend drain www 10.1.0.11:8080
    ///   sudo foobar-lb backend drain www 10.1.0.11:8080 --wait --timeout 120
    #[command(verbatim_doc_comment)]
    Drain {
        /// VIP name or address:port.
        vip: String,
        /// Backend address:port.
        backend: SocketAddr,
        /// Return only once the backend has no active connection left (fails, saying
        /// how many remain, when the timeout passes first).
        #[arg(long)]
        wait: bool,
        /// Seconds `--wait` waits at most.
        #[arg(long, default_value_t = 300, requires = "wait")]
        timeout: u64,
    },
    /// Disable a backend whatever its health (maintenance): no new flows, open ones stay.
    ///
    /// Examples:
    ///   sudo foobar-lb backend disable www 10.1.0.11:8080
    #[command(verbatim_doc_comment)]
    Disable {
        /// VIP name or address:port.
        vip: String,
        /// Backend address:port.
        backend: SocketAddr,
    },
    /// Enable a disabled backend: its health checks decide again.
    ///
    /// Examples:
    ///   sudo foobar-lb backend enable www 10.1.0.11:8080
    #[command(verbatim_doc_comment)]
    Enable {
        /// VIP name or address:port.
        vip: String,
        /// Backend address:port.
        backend: SocketAddr,
    },
    /// Set a backend's weight (also how a drained backend comes back).
    ///
    /// Examples:
    ///   sudo foobar-lb backend weight www 10.1.0.11:8080 3
    #[command(verbatim_doc_comment)]
    Weight {
        /// VIP name or address:port.
        vip: String,
        /// Backend address:port.
        backend: SocketAddr,
        /// The new weight, 0 to 256.
        #[arg(value_parser = clap::value_parser!(u32).range(0..=MAX_WEIGHT as i64))]
        weight: u32,
    },
}

/// `--protocol` values.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum ProtocolArg {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

/// `--scheduler` values.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum SchedulerArg {
    /// Weighted round robin.
    Rr,
    /// Maglev consistent hashing.
    Maglev,
    /// Least connections.
    Lc,
    /// Weighted least connections.
    Wlc,
    /// Source hashing (Maglev over the client's address).
    Sh,
}

/// `--forwarding` values.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum ForwardingArg {
    /// The destination becomes the backend; replies route back through the balancer.
    Nat,
    /// Both addresses rewritten: backends need no route back through the balancer.
    Fullnat,
    /// Direct server return in IPIP: backends run `foobar-lb decap`.
    DsrIpip,
    /// Direct server return in GUE (UDP).
    DsrGue,
}

/// A `--backend ADDRESS:PORT[@WEIGHT]` value.
#[derive(Clone, Debug)]
pub struct BackendArg(pub BackendSpec);

impl FromStr for BackendArg {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (address, weight) = match s.split_once('@') {
            Some((a, w)) => (
                a,
                w.parse::<u32>()
                    .map_err(|_| format!("weight {w:?} is not a number"))?,
            ),
            None => (s, 1),
        };
        if weight > MAX_WEIGHT {
            return Err(format!("weight {weight} is above {MAX_WEIGHT}"));
        }
        let address: SocketAddr = address
            .parse()
            .map_err(|_| format!("{address:?} is not an address:port"))?;
        Ok(BackendArg(BackendSpec {
            address: address.ip(),
            port: address.port(),
            weight,
        }))
    }
}

impl Command {
    /// The control request of a client command; `None` for the local ones.
    pub fn request(&self) -> Option<Request> {
        Some(match self {
            Command::Run(_) | Command::Decap(_) | Command::Completions { .. } | Command::Man => {
                return None;
            }
            Command::Status
            | Command::Vip(VipCommand::List)
            | Command::Backend(BackendCommand::List { .. }) => Request::Status,
            Command::Stats => Request::Stats,
            Command::Reload => Request::Reload,
            Command::Save { .. } => Request::RunningConfig,
            Command::Explain { vip, client } => Request::Explain {
                vip: vip.clone(),
                client: client.ip(),
                client_port: client.port(),
            },
            Command::Vip(VipCommand::Add {
                name,
                address,
                protocol,
                scheduler,
                maglev_table_size,
                forwarding,
                backends,
            }) => Request::VipAdd {
                vip: VipSpec {
                    name: name.clone(),
                    address: address.ip(),
                    port: address.port(),
                    protocol: match protocol {
                        ProtocolArg::Tcp => Protocol::Tcp,
                        ProtocolArg::Udp => Protocol::Udp,
                    },
                    scheduler: match scheduler {
                        SchedulerArg::Rr => Scheduler::Rr,
                        SchedulerArg::Maglev => Scheduler::Maglev,
                        SchedulerArg::Lc => Scheduler::Lc,
                        SchedulerArg::Wlc => Scheduler::Wlc,
                        SchedulerArg::Sh => Scheduler::Sh,
                    },
                    hash: None,
                    hash_prefix_v4: 32,
                    hash_prefix_v6: 128,
                    forwarding: match forwarding {
                        ForwardingArg::Nat => Forwarding::Nat,
                        ForwardingArg::Fullnat => Forwarding::Fullnat,
                        ForwardingArg::DsrIpip => Forwarding::DsrIpip,
                        ForwardingArg::DsrGue => Forwarding::DsrGue,
                    },
                    maglev_table_size: *maglev_table_size,
                    backends: backends.iter().map(|b| b.0.clone()).collect(),
                    health_check: None,
                    on_backend_down: Default::default(),
                    acl: Default::default(),
                    new_flow_limit: None,
                },
            },
            Command::Vip(VipCommand::Remove { vip }) => Request::VipRemove { vip: vip.clone() },
            Command::Acl(AclCommand::List) => Request::AclList,
            Command::Acl(AclCommand::Add {
                action,
                prefix,
                vip,
            }) => Request::AclAdd {
                vip: vip.clone(),
                action: match action {
                    ActionArg::Allow => Action::Allow,
                    ActionArg::Deny => Action::Deny,
                },
                prefix: *prefix,
            },
            Command::Acl(AclCommand::Remove { prefix, vip }) => Request::AclRemove {
                vip: vip.clone(),
                prefix: *prefix,
            },
            Command::Backend(BackendCommand::Add {
                vip,
                backend,
                weight,
            }) => Request::BackendAdd {
                vip: vip.clone(),
                backend: BackendSpec {
                    address: backend.ip(),
                    port: backend.port(),
                    weight: *weight,
                },
            },
            Command::Backend(BackendCommand::Remove { vip, backend }) => Request::BackendRemove {
                vip: vip.clone(),
                backend: *backend,
            },
            Command::Backend(BackendCommand::Disable { vip, backend }) => Request::BackendDisable {
                vip: vip.clone(),
                backend: *backend,
            },
            Command::Backend(BackendCommand::Enable { vip, backend }) => Request::BackendEnable {
                vip: vip.clone(),
                backend: *backend,
            },
            Command::Backend(BackendCommand::Drain { vip, backend, .. }) => {
                Request::BackendSetWeight {
                    vip: vip.clone(),
                    backend: *backend,
                    weight: 0,
                }
            }
            Command::Backend(BackendCommand::Weight {
                vip,
                backend,
                weight,
            }) => Request::BackendSetWeight {
                vip: vip.clone(),
                backend: *backend,
                weight: *weight,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn definitions_are_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_backend_values() {
        let b: BackendArg = "10.1.0.11:8080@3".parse().unwrap();
        assert_eq!((b.0.port, b.0.weight), (8080, 3));
        assert_eq!("10.1.0.11:8080".parse::<BackendArg>().unwrap().0.weight, 1);
        assert!("10.1.0.11".parse::<BackendArg>().is_err());
        assert!("10.1.0.11:8080@x".parse::<BackendArg>().is_err());
        assert!("10.1.0.11:8080@999".parse::<BackendArg>().is_err());
    }

    #[test]
    fn refuses_malformed_arguments() {
        for args in [
            &["foobar-lb", "backend", "add", "www", "10.1.0.300:80"][..],
            &[
                "foobar-lb",
                "backend",
                "weight",
                "www",
                "10.1.0.1:80",
                "257",
            ],
            &["foobar-lb", "vip", "add", "www", "10.0.0.1"],
            &["foobar-lb", "explain", "www", "::1"],
            &["foobar-lb", "status", "-o", "yaml"],
            &["foobar-lb", "acl", "add", "permit", "10.0.0.0/8"],
            &["foobar-lb", "acl", "add", "deny", "10.0.0.0/33"],
            &["foobar-lb", "acl", "remove", "not-a-prefix"],
        ] {
            assert!(Cli::try_parse_from(args).is_err(), "{args:?} was accepted");
        }
    }
}

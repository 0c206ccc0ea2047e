//! The balancer's data plane in a namespace of its own, with a client-side and a
//! backend-side veth whose routes and neighbour entries make `bpf_fib_lookup`
//! answer as on a real two-armed balancer; packets go in through test_run.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use aya::programs::{TestRun, TestRunOptions};
use foobar_lb::{
    dataplane::{Dataplane, LoadOptions},
    reconcile::{Balancer, Environment},
    state::{BackendSpec, DesiredState, Forwarding, Protocol, Scheduler, VipSpec},
    topology::Topology,
};
use foobar_lb_common::{Counters, ROLE_BACKEND, ROLE_CLIENT, Reason, Settings, reason::xdp_action};

use crate::netns::{Entered, Netns, ifindex};

/// MAC of the balancer's client-side interface.
pub const LB_CLIENT_MAC: [u8; 6] = [0x02, 0xfb, 0, 0, 0, 0x01];
/// MAC of the balancer's backend-side interface.
pub const LB_BACKEND_MAC: [u8; 6] = [0x02, 0xfb, 0, 0, 1, 0x01];
/// MAC of the client (and of every host on the client network: one router).
pub const CLIENT_MAC: [u8; 6] = [0x02, 0xc1, 0, 0, 0, 0x02];
/// The client.
pub const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
/// A host behind a router on the client side (routed via `CLIENT`).
pub const REMOTE_CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 7, 9);
/// The VIP of the default setup.
pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 100);
/// Backend addresses 10.1.0.11 .. 10.1.0.30, each with a neighbour entry.
pub fn backend_addr(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 1, 0, 11 + i)
}
/// MAC of backend `i`.
pub fn backend_mac(i: u8) -> [u8; 6] {
    [0x02, 0xbe, 0, 0, 0, 11 + i]
}
/// How many backends have neighbour entries.
pub const BACKENDS: u8 = 20;
/// A backend address with a route but no neighbour entry.
pub const UNRESOLVED_BACKEND: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 99);
/// A backend address with no route at all.
pub const UNROUTABLE_BACKEND: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
/// A server on the client-side network: reaching it leaves by the way it came (XDP_TX).
pub const SAME_SIDE_BACKEND: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 50);
/// A server behind an interface the program may not redirect to.
pub const OFF_MAP_BACKEND: Ipv4Addr = Ipv4Addr::new(10, 2, 0, 5);
/// The backends' port.
pub const BACKEND_PORT: u16 = 8080;
/// The balancer's own address on the backend side (full NAT's and GUE's source).
pub const LB_BACKEND_SIDE: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 1);

/// The client, IPv6.
pub const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2);
/// A host behind a router on the client side, IPv6 (routed via `CLIENT6`).
pub const REMOTE_CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 7, 0, 0, 0, 0, 9);
/// The VIP of IPv6 setups.
pub const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x100);
/// The balancer's own IPv6 address on the backend side.
pub const LB_BACKEND_SIDE6: Ipv6Addr = Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 1);
/// Backend addresses fd00:1::11 .., each with a neighbour entry (the MACs of
/// [`backend_mac`]).
pub fn backend_addr6(i: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 0x11 + i as u16)
}

/// An address family of a test setup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    /// The client.
    pub fn client(self) -> IpAddr {
        match self {
            Family::V4 => CLIENT.into(),
            Family::V6 => CLIENT6.into(),
        }
    }
    /// A host behind the client-side router.
    pub fn remote_client(self) -> IpAddr {
        match self {
            Family::V4 => REMOTE_CLIENT.into(),
            Family::V6 => REMOTE_CLIENT6.into(),
        }
    }
    /// The VIP.
    pub fn vip(self) -> IpAddr {
        match self {
            Family::V4 => VIP.into(),
            Family::V6 => VIP6.into(),
        }
    }
    /// Backend `i`.
    pub fn backend(self, i: u8) -> IpAddr {
        match self {
            Family::V4 => backend_addr(i).into(),
            Family::V6 => backend_addr6(i).into(),
        }
    }
    /// The balancer's address on the backend side.
    pub fn lb_backend_side(self) -> IpAddr {
        match self {
            Family::V4 => LB_BACKEND_SIDE.into(),
            Family::V6 => LB_BACKEND_SIDE6.into(),
        }
    }
    /// The IP header's length.
    pub fn header_len(self) -> usize {
        match self {
            Family::V4 => 20,
            Family::V6 => 40,
        }
    }
}

fn mac(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// `struct xdp_md` for test_run's ctx_in: the interface a packet arrives on.
#[repr(C)]
struct XdpMd {
    data: u32,
    data_end: u32,
    data_meta: u32,
    ingress_ifindex: u32,
    rx_queue_index: u32,
    egress_ifindex: u32,
}

/// Which side a packet arrives on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// From clients (`lbc`).
    Client,
    /// From backends (`lbb`).
    Backend,
    /// From an interface the agent gave no role (`lbx`).
    Other,
}

/// The result of one packet through the program.
#[derive(Debug)]
pub struct Outcome {
    /// The XDP action.
    pub action: u32,
    /// The frame as the program left it.
    pub packet: Vec<u8>,
}

/// A loaded, configured data plane in its own namespace.
pub struct PacketLab {
    /// The balancer, as the agent would drive it.
    pub balancer: Balancer,
    /// ifindex of the client-side interface.
    pub client_if: u32,
    /// ifindex of the backend-side interface.
    pub backend_if: u32,
    _entered: Entered,
    /// The namespace the lab lives in.
    pub ns: Netns,
}

impl PacketLab {
    /// An empty balancer (no VIP) in a fresh namespace.
    pub fn new() -> Self {
        Self::with_flow_capacity(foobar_lb_common::DEFAULT_FLOW_CAPACITY)
    }

    /// The same with a flow table of `flow_capacity` entries.
    pub fn with_flow_capacity(flow_capacity: u32) -> Self {
        let ns = Netns::new("pkt");
        for (inside, peer, addr, addr6, lb_mac) in [
            (
                "lbc",
                "lbc-peer",
                "10.0.0.1/24",
                "fd00::1/64",
                LB_CLIENT_MAC,
            ),
            (
                "lbb",
                "lbb-peer",
                "10.1.0.1/24",
                "fd00:1::1/64",
                LB_BACKEND_MAC,
            ),
            (
                "lbx",
                "lbx-peer",
                "10.2.0.1/24",
                "fd00:2::1/64",
                [0x02, 0xfb, 0, 0, 2, 0x01],
            ),
        ] {
            ns.ip(&["link", "add", inside, "type", "veth", "peer", "name", peer]);
            ns.ip(&["link", "set", inside, "address", &mac(lb_mac)]);
            ns.ip(&["addr", "add", addr, "dev", inside]);
            ns.ip(&["-6", "addr", "add", addr6, "dev", inside, "nodad"]);
            ns.ip(&["link", "set", inside, "up"]);
            ns.ip(&["link", "set", peer, "up"]);
        }
        let permanent = |addr: IpAddr, m: [u8; 6], dev: &str| {
            ns.ip(&[
                "neigh",
                "replace",
                &addr.to_string(),
                "lladdr",
                &mac(m),
                "dev",
                dev,
                "nud",
                "permanent",
            ]);
        };
        permanent(CLIENT.into(), CLIENT_MAC, "lbc");
        permanent(CLIENT6.into(), CLIENT_MAC, "lbc");
        permanent(SAME_SIDE_BACKEND.into(), [0x02, 0x5a, 0, 0, 0, 50], "lbc");
        permanent(OFF_MAP_BACKEND.into(), [0x02, 0x0f, 0, 0, 0, 5], "lbx");
        for i in 0..BACKENDS {
            permanent(backend_addr(i).into(), backend_mac(i), "lbb");
            permanent(backend_addr6(i).into(), backend_mac(i), "lbb");
        }
        ns.ip(&[
            "route",
            "add",
            "198.18.0.0/15",
            "via",
            &CLIENT.to_string(),
            "dev",
            "lbc",
        ]);
        ns.ip(&[
            "-6",
            "route",
            "add",
            "2001:db8::/32",
            "via",
            &CLIENT6.to_string(),
            "dev",
            "lbc",
        ]);
        // bpf_fib_lookup forwards only where the kernel would: a router's sysctl.
        ns.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"]);
        ns.exec("sysctl", &["-qw", "net.ipv6.conf.all.forwarding=1"]);

        let entered = ns.enter();
        let mut dataplane = Dataplane::load(&LoadOptions {
            flow_capacity,
            ..LoadOptions::default()
        })
        .expect("load the data plane");
        let (client_if, backend_if) = (ifindex("lbc"), ifindex("lbb"));
        dataplane.add_tx_port(client_if).expect("tx port");
        dataplane.add_tx_port(backend_if).expect("tx port");
        let mut lab = Self {
            balancer: Balancer::new(dataplane),
            client_if,
            backend_if,
            _entered: entered,
            ns,
        };
        lab.set_settings(foobar_lb::config::DataplaneConfig::default().settings());
        lab
    }

    /// Writes the interfaces (`lbc` client side, `lbb` backend side), the next hops
    /// read from the namespace's routes and neighbours, and `settings`, as the agent
    /// does.
    pub fn set_settings(&mut self, settings: Settings) {
        let topology = Topology::read_blocking().expect("read the routing tables");
        let mut env = Environment::new(
            topology,
            &[
                (self.client_if, ROLE_CLIENT),
                (self.backend_if, ROLE_BACKEND),
            ],
            settings,
        );
        let defaults = foobar_lb::config::DataplaneConfig::default();
        env.ipip_sources = (
            Some(defaults.ipip_source.into()),
            Some(defaults.ipip6_source.into()),
        );
        self.balancer
            .set_environment(env)
            .expect("write the environment");
    }

    /// Reads the namespace's routes and neighbours again (after a test changed them).
    pub fn reread_topology(&mut self) {
        let settings = self.balancer.environment().settings;
        self.set_settings(settings);
    }

    /// A balancer with one TCP VIP `VIP:80` over backends of the given weights.
    pub fn with_vip(scheduler: Scheduler, weights: &[u32]) -> Self {
        let mut lab = Self::new();
        lab.apply(vec![vip_spec(
            "web",
            VIP,
            80,
            Protocol::Tcp,
            scheduler,
            weights,
        )]);
        lab
    }

    /// Applies a set of VIPs, panicking if refused.
    pub fn apply(&mut self, vips: Vec<VipSpec>) {
        self.apply_state(DesiredState {
            vips,
            ..Default::default()
        });
    }

    /// Applies a whole desired state (VIPs and edge rules), panicking if refused.
    pub fn apply_state(&mut self, state: DesiredState) {
        self.balancer.apply(&state).expect("apply");
    }

    /// Runs one frame through the program as arriving on `side`.
    pub fn run(&mut self, side: Side, frame: &[u8]) -> Outcome {
        self.run_repeated(side, frame, 1).0
    }

    /// Runs a frame `repeat` times (the kernel does not reset it in between) and
    /// returns the last outcome and the kernel's mean time per run.
    pub fn run_repeated(
        &mut self,
        side: Side,
        frame: &[u8],
        repeat: u32,
    ) -> (Outcome, std::time::Duration) {
        let ifindex = match side {
            Side::Client => self.client_if,
            Side::Backend => self.backend_if,
            Side::Other => ifindex("lbx"),
        };
        let ctx = XdpMd {
            data: 0,
            data_end: frame.len() as u32,
            data_meta: 0,
            ingress_ifindex: ifindex,
            rx_queue_index: 0,
            egress_ifindex: 0,
        };
        let ctx_bytes = unsafe {
            std::slice::from_raw_parts((&ctx as *const XdpMd).cast::<u8>(), size_of::<XdpMd>())
        };
        let mut out = vec![0u8; frame.len() + 256];
        let program = self.balancer.dataplane().program_mut().expect("program");
        let result = program
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ctx_in: Some(ctx_bytes),
                repeat,
                ..Default::default()
            })
            .expect("test_run");
        out.truncate(result.data_size_out as usize);
        (
            Outcome {
                action: result.return_value,
                packet: out,
            },
            result.duration,
        )
    }

    /// Global counters, summed over CPUs.
    pub fn counters(&mut self) -> Counters {
        self.balancer.dataplane().counters().expect("counters")
    }

    /// One counter.
    pub fn count(&mut self, reason: Reason) -> u64 {
        self.counters().get(reason)
    }
}

impl Default for PacketLab {
    fn default() -> Self {
        Self::new()
    }
}

/// A VIP spec over backends `backend_addr(0..)` on [`BACKEND_PORT`] with these weights.
pub fn vip_spec(
    name: &str,
    addr: Ipv4Addr,
    port: u16,
    protocol: Protocol,
    scheduler: Scheduler,
    weights: &[u32],
) -> VipSpec {
    VipSpec {
        name: name.into(),
        address: addr.into(),
        port,
        protocol,
        scheduler,
        forwarding: Default::default(),
        maglev_table_size: foobar_lb::schedule::DEFAULT_MAGLEV_SIZE,
        hash: None,
        hash_prefix_v4: 32,
        hash_prefix_v6: 128,
        backends: weights
            .iter()
            .enumerate()
            .map(|(i, &weight)| BackendSpec {
                address: backend_addr(i as u8).into(),
                port: BACKEND_PORT,
                weight,
            })
            .collect(),
        health_check: None,
        on_backend_down: Default::default(),
        acl: Default::default(),
        new_flow_limit: None,
    }
}

/// A VIP spec of `family` and `forwarding` on port `port` over backends
/// `family.backend(0..)` with these weights, on [`BACKEND_PORT`] (DSR: on the VIP's
/// port, which it cannot change).
pub fn mode_vip(
    family: Family,
    forwarding: Forwarding,
    port: u16,
    protocol: Protocol,
    scheduler: Scheduler,
    weights: &[u32],
) -> VipSpec {
    let backend_port = if forwarding.is_dsr() {
        port
    } else {
        BACKEND_PORT
    };
    VipSpec {
        name: format!("{}-{family:?}-{port}", forwarding.name()),
        address: family.vip(),
        port,
        protocol,
        scheduler,
        forwarding,
        maglev_table_size: foobar_lb::schedule::DEFAULT_MAGLEV_SIZE,
        hash: None,
        hash_prefix_v4: 32,
        hash_prefix_v6: 128,
        backends: weights
            .iter()
            .enumerate()
            .map(|(i, &weight)| BackendSpec {
                address: family.backend(i as u8),
                port: backend_port,
                weight,
            })
            .collect(),
        health_check: None,
        on_backend_down: Default::default(),
        acl: Default::default(),
        new_flow_limit: None,
    }
}

/// Human name of an XDP action, for assertion messages.
pub fn action_name(action: u32) -> &'static str {
    match action {
        xdp_action::ABORTED => "ABORTED",
        xdp_action::DROP => "DROP",
        xdp_action::PASS => "PASS",
        xdp_action::TX => "TX",
        xdp_action::REDIRECT => "REDIRECT",
        _ => "?",
    }
}

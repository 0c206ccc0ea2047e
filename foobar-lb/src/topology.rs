//! Where packets go, as the kernel knows it: links, addresses, routes (the main and
//! local tables) and neighbours (ARP and IPv6 neighbour discovery), read over
//! rtnetlink for both families, and what the data plane needs of them, so that it
//! does not have to ask the kernel's FIB for every packet:
//! - each backend's next hop (egress, both MACs, MTU), written into its slot, and
//!   the balancer's own address toward it (full NAT's and GUE's source);
//! - the client side's routes and neighbours, written into the `ROUTES`/`ROUTES6`
//!   tries and the `NEIGHBOURS`/`NEIGHBOURS6` maps, so a reply finds its next hop with
//!   two lookups, and one neighbour entry serves every client behind a gateway.
//!
//! The reading is whole and cheap (a few dumps); [`watch`] re-reads after every
//! link, address, route or neighbour change the kernel announces. Destinations the
//! mirror does not cover (routes through interfaces the program does not run on, an
//! unresolved neighbour) are left to `bpf_fib_lookup`. Policy routing rules are not
//! mirrored: replies follow the main table.

use std::{
    collections::BTreeMap,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use foobar_lb_common::{
    NEXT_HOP_VALID, NextHop, ROUTE_GATEWAY, ROUTE_KERNEL, ROUTE_LINK, ROUTE_LOCAL, Route,
};
use futures_util::{StreamExt, TryStreamExt};
use ipnet::IpNet;
use rtnetlink::packet_route::{
    address::{AddressAttribute, AddressHeaderFlags, AddressScope},
    link::{LinkAttribute, LinkFlags, LinkXdp},
    neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourState},
    route::{RouteAddress, RouteAttribute, RouteType},
};
use rtnetlink::{MulticastGroup, RouteMessageBuilder};

/// An interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    /// Its name.
    pub name: String,
    /// Its hardware address.
    pub mac: [u8; 6],
    /// Its MTU.
    pub mtu: u32,
    /// Up, with carrier.
    pub running: bool,
    /// The id of the XDP program attached to it, 0 if none.
    pub xdp_program: u32,
}

/// What a route does with a destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    /// This machine's own address (local table).
    Local,
    /// On the link of `oif`.
    Link,
    /// Through a gateway.
    Gateway(IpAddr),
    /// Something only the kernel does (blackhole, unreachable, multipath...).
    Kernel,
}

/// A route of the main or local table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteEntry {
    /// The destination prefix.
    pub dst: IpNet,
    /// The egress interface, if any.
    pub oif: Option<u32>,
    /// What it does.
    pub via: Via,
    /// Lower wins among routes of the same prefix.
    pub metric: u32,
    /// The source address the kernel prefers for it, if the route names one.
    pub prefsrc: Option<IpAddr>,
}

/// The kernel's view, read at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Topology {
    /// Interfaces by index.
    pub links: BTreeMap<u32, Link>,
    /// Each interface's addresses (global scope, usable: not tentative).
    pub addresses: BTreeMap<u32, Vec<IpAddr>>,
    /// Routes of the main and local tables, both families.
    pub routes: Vec<RouteEntry>,
    /// Resolved neighbours: (interface, address) → MAC.
    pub neighbours: BTreeMap<(u32, IpAddr), [u8; 6]>,
}

/// The main and local routing tables.
const TABLE_MAIN: u32 = 254;
const TABLE_LOCAL: u32 = 255;

impl Topology {
    /// Reads links, routes and neighbours of this network namespace.
    pub async fn read() -> io::Result<Topology> {
        let (connection, handle, _) = rtnetlink::new_connection()?;
        let task = tokio::spawn(connection);
        let result = Self::read_with(&handle).await;
        task.abort();
        result
    }

    /// [`Topology::read`] from synchronous code: on the runtime of a blocking task
    /// of the agent, or on a runtime of its own (tests, benchmarks).
    pub fn read_blocking() -> io::Result<Topology> {
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => handle.block_on(Self::read()),
            Err(_) => tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(Self::read()),
        }
    }

    async fn read_with(handle: &rtnetlink::Handle) -> io::Result<Topology> {
        let mut topology = Topology::default();
        let mut links = handle.link().get().execute();
        while let Some(link) = links.try_next().await.map_err(io::Error::other)? {
            let mut name = String::new();
            let mut mac = [0u8; 6];
            let mut mtu = 1500;
            let mut xdp_program = 0;
            for attribute in &link.attributes {
                match attribute {
                    LinkAttribute::IfName(n) => name = n.clone(),
                    LinkAttribute::Address(a) if a.len() == 6 => mac.copy_from_slice(a),
                    LinkAttribute::Mtu(m) => mtu = *m,
                    LinkAttribute::Xdp(xdp) => {
                        for x in xdp {
                            if let LinkXdp::ProgId(id) = x {
                                xdp_program = *id;
                            }
                        }
                    }
                    _ => {}
                }
            }
            let running = link
                .header
                .flags
                .contains(LinkFlags::Up | LinkFlags::Running);
            topology.links.insert(
                link.header.index,
                Link {
                    name,
                    mac,
                    mtu,
                    running,
                    xdp_program,
                },
            );
        }

        let mut addresses = handle.address().get().execute();
        while let Some(address) = addresses.try_next().await.map_err(io::Error::other)? {
            let header = &address.header;
            if header.scope != AddressScope::Universe
                || header
                    .flags
                    .intersects(AddressHeaderFlags::Tentative | AddressHeaderFlags::Dadfailed)
            {
                continue;
            }
            // IPv4's own address is IFA_LOCAL (IFA_ADDRESS is the peer's on a
            // point-to-point link); IPv6 has only IFA_ADDRESS.
            let (mut local, mut addr) = (None, None);
            for attribute in &address.attributes {
                match attribute {
                    AddressAttribute::Local(a) => local = Some(*a),
                    AddressAttribute::Address(a) => addr = Some(*a),
                    _ => {}
                }
            }
            if let Some(a) = local.or(addr) {
                topology.addresses.entry(header.index).or_default().push(a);
            }
        }

        // One dump at a time: a second started on the socket while the first runs is
        // refused (EBUSY).
        let mut routes = handle
            .route()
            .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute()
            .try_collect::<Vec<_>>()
            .await
            .map_err(io::Error::other)?;
        routes.extend(
            handle
                .route()
                .get(RouteMessageBuilder::<Ipv6Addr>::new().build())
                .execute()
                .try_collect::<Vec<_>>()
                .await
                .map_err(io::Error::other)?,
        );
        for route in routes {
            let mut table = route.header.table as u32;
            let (mut dst, mut oif, mut gateway, mut metric, mut multipath, mut prefsrc) =
                (None, None, None, 0, false, None);
            for attribute in &route.attributes {
                match attribute {
                    RouteAttribute::Table(t) => table = *t,
                    RouteAttribute::Destination(a) => dst = ip_of(a),
                    RouteAttribute::Oif(i) => oif = Some(*i),
                    RouteAttribute::Gateway(g) => gateway = ip_of(g),
                    RouteAttribute::Priority(p) => metric = *p,
                    RouteAttribute::MultiPath(_) => multipath = true,
                    RouteAttribute::PrefSource(a) => prefsrc = ip_of(a),
                    _ => {}
                }
            }
            if table != TABLE_MAIN && table != TABLE_LOCAL {
                continue;
            }
            let via = match route.header.kind {
                RouteType::Local => Via::Local,
                // Broadcast addresses are the kernel's business, and not ours to route.
                RouteType::Broadcast | RouteType::Multicast | RouteType::Anycast => continue,
                RouteType::Unicast if multipath => Via::Kernel,
                RouteType::Unicast => match gateway {
                    Some(g) => Via::Gateway(g),
                    None => Via::Link,
                },
                _ => Via::Kernel,
            };
            let ipv6 = matches!(
                route.header.address_family,
                rtnetlink::packet_route::AddressFamily::Inet6
            );
            let dst = dst.unwrap_or(if ipv6 {
                IpAddr::V6(Ipv6Addr::UNSPECIFIED)
            } else {
                IpAddr::V4(Ipv4Addr::UNSPECIFIED)
            });
            let Ok(dst) = IpNet::new(dst, route.header.destination_prefix_length) else {
                continue;
            };
            topology.routes.push(RouteEntry {
                dst: dst.trunc(),
                oif,
                via,
                metric,
                prefsrc,
            });
        }

        let mut neighbours = handle.neighbours().get().execute();
        while let Some(neighbour) = neighbours.try_next().await.map_err(io::Error::other)? {
            // Entries the kernel would forward to (a MAC it believes, even if stale).
            if !matches!(
                neighbour.header.state,
                NeighbourState::Reachable
                    | NeighbourState::Stale
                    | NeighbourState::Delay
                    | NeighbourState::Probe
                    | NeighbourState::Permanent
                    | NeighbourState::Noarp
            ) {
                continue;
            }
            let (mut addr, mut mac) = (None, None);
            for attribute in &neighbour.attributes {
                match attribute {
                    NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => {
                        addr = Some(IpAddr::V4(*a))
                    }
                    NeighbourAttribute::Destination(NeighbourAddress::Inet6(a)) => {
                        addr = Some(IpAddr::V6(*a))
                    }
                    NeighbourAttribute::LinkLayerAddress(l) if l.len() == 6 => {
                        mac = Some([l[0], l[1], l[2], l[3], l[4], l[5]])
                    }
                    _ => {}
                }
            }
            if let (Some(addr), Some(mac)) = (addr, mac) {
                topology
                    .neighbours
                    .insert((neighbour.header.ifindex, addr), mac);
            }
        }
        Ok(topology)
    }

    /// The route the kernel's main table (or local table) picks for `dst`: longest
    /// prefix, then lowest metric; local addresses first, as the kernel's rules do.
    pub fn route(&self, dst: IpAddr) -> Option<&RouteEntry> {
        let full = if dst.is_ipv4() { 32 } else { 128 };
        let local = self
            .routes
            .iter()
            .find(|r| r.via == Via::Local && r.dst.contains(&dst) && r.dst.prefix_len() == full);
        local.or_else(|| {
            self.routes
                .iter()
                .filter(|r| r.via != Via::Local && r.dst.contains(&dst))
                .max_by_key(|r| (r.dst.prefix_len(), std::cmp::Reverse(r.metric)))
        })
    }

    /// The next hop of a packet to `dst`, if the kernel's tables resolve it fully: a
    /// route through an interface with a resolved neighbour. `None` leaves it to the
    /// FIB (local, unroutable, unresolved, or something only the kernel does).
    pub fn next_hop(&self, dst: IpAddr) -> Option<NextHop> {
        let route = self.route(dst)?;
        let neighbour = match route.via {
            Via::Link => dst,
            Via::Gateway(gateway) => gateway,
            Via::Local | Via::Kernel => return None,
        };
        self.hop(route.oif?, neighbour)
    }

    /// The address this machine sends from toward `dst`, as the kernel picks it: the
    /// route's preferred source, else the egress interface's first address of the
    /// family, else any interface's.
    pub fn source_for(&self, dst: IpAddr) -> Option<IpAddr> {
        let route = self.route(dst)?;
        if let Some(src) = route.prefsrc {
            return Some(src);
        }
        let same_family = |a: &&IpAddr| a.is_ipv4() == dst.is_ipv4();
        route
            .oif
            .and_then(|oif| self.addresses.get(&oif))
            .and_then(|list| list.iter().find(same_family))
            .or_else(|| self.addresses.values().flatten().find(same_family))
            .copied()
    }

    /// The next hop through `oif` to neighbour `addr`, if resolved.
    fn hop(&self, oif: u32, addr: IpAddr) -> Option<NextHop> {
        let link = self.links.get(&oif)?;
        let dmac = *self.neighbours.get(&(oif, addr))?;
        Some(NextHop {
            ifindex: oif,
            mtu: link.mtu.min(u16::MAX as u32) as u16,
            flags: if link.running { NEXT_HOP_VALID } else { 0 },
            smac: link.mac,
            dmac,
        })
    }

    /// What the data plane mirrors of the client side: every route (prefix → route)
    /// and the neighbours on `interfaces` (address → next hop), both families.
    pub fn client_side(
        &self,
        interfaces: &[u32],
    ) -> (BTreeMap<IpNet, Route>, BTreeMap<IpAddr, NextHop>) {
        let mut routes = BTreeMap::new();
        let mut best_metric: BTreeMap<IpNet, u32> = BTreeMap::new();
        for route in &self.routes {
            let key = route.dst;
            let full = route.dst.prefix_len() == route.dst.max_prefix_len();
            let value = match route.via {
                Via::Local if full => Route {
                    kind: ROUTE_LOCAL,
                    gateway: [0; 4],
                },
                Via::Local => continue,
                Via::Link => Route {
                    kind: ROUTE_LINK,
                    gateway: [0; 4],
                },
                Via::Gateway(g) => Route {
                    kind: ROUTE_GATEWAY,
                    gateway: words(g),
                },
                Via::Kernel => Route {
                    kind: ROUTE_KERNEL,
                    gateway: [0; 4],
                },
            };
            // Local routes win over others of the same prefix, then the lowest metric.
            let rank = if value.kind == ROUTE_LOCAL {
                0
            } else {
                route.metric.saturating_add(1)
            };
            if best_metric.get(&key).is_none_or(|&m| rank < m) {
                best_metric.insert(key, rank);
                routes.insert(key, value);
            }
        }
        let neighbours = self
            .neighbours
            .keys()
            .filter(|(oif, _)| interfaces.contains(oif))
            .filter_map(|&(oif, addr)| Some((addr, self.hop(oif, addr)?)))
            .collect();
        (routes, neighbours)
    }
}

/// An address as the data plane keeps it: four network-order words, IPv4 in word 0.
pub fn words(addr: IpAddr) -> [u32; 4] {
    match addr {
        IpAddr::V4(v4) => [u32::from_ne_bytes(v4.octets()), 0, 0, 0],
        IpAddr::V6(v6) => {
            let o = v6.octets();
            std::array::from_fn(|i| {
                u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]])
            })
        }
    }
}

fn ip_of(address: &RouteAddress) -> Option<IpAddr> {
    match address {
        RouteAddress::Inet(a) => Some(IpAddr::V4(*a)),
        RouteAddress::Inet6(a) => Some(IpAddr::V6(*a)),
        _ => None,
    }
}

/// Sends a fresh [`Topology`] now and after every change the kernel announces
/// (links, addresses, routes, neighbours), a burst of changes read once after
/// `settle`. Runs until the receiver is gone.
pub async fn watch(
    settle: Duration,
    changed: tokio::sync::mpsc::Sender<Topology>,
) -> io::Result<()> {
    let groups = [
        MulticastGroup::Link,
        MulticastGroup::Ipv4Ifaddr,
        MulticastGroup::Ipv4Route,
        MulticastGroup::Ipv6Ifaddr,
        MulticastGroup::Ipv6Route,
        MulticastGroup::Neigh,
    ];
    let (connection, handle, mut messages) = rtnetlink::new_multicast_connection(&groups)?;
    let task = tokio::spawn(connection);
    let result = async {
        loop {
            if changed
                .send(Topology::read_with(&handle).await?)
                .await
                .is_err()
            {
                return Ok(());
            }
            // Wait for a change, then for the burst it starts to settle.
            if messages.next().await.is_none() {
                return Err(io::Error::other("the netlink connection closed"));
            }
            tokio::time::sleep(settle).await;
            while let Ok(Some(_)) = tokio::time::timeout(Duration::ZERO, messages.next()).await {}
        }
    }
    .await;
    task.abort();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topology() -> Topology {
        let mut t = Topology::default();
        t.links.insert(
            2,
            Link {
                name: "eth0".into(),
                mac: [2, 0, 0, 0, 0, 2],
                mtu: 1500,
                running: true,
                xdp_program: 0,
            },
        );
        t.links.insert(
            3,
            Link {
                name: "eth1".into(),
                mac: [2, 0, 0, 0, 0, 3],
                mtu: 9000,
                running: true,
                xdp_program: 0,
            },
        );
        let route = |dst: &str, oif, via, metric| RouteEntry {
            dst: dst.parse().unwrap(),
            oif: Some(oif),
            via,
            metric,
            prefsrc: None,
        };
        t.routes = vec![
            route(
                "0.0.0.0/0",
                2,
                Via::Gateway("10.0.0.254".parse().unwrap()),
                100,
            ),
            route(
                "0.0.0.0/0",
                3,
                Via::Gateway("10.1.0.254".parse().unwrap()),
                50,
            ),
            route("10.0.0.0/24", 2, Via::Link, 0),
            route("10.1.0.0/24", 3, Via::Link, 0),
            route("10.1.0.1/32", 3, Via::Local, 0),
            route("10.9.0.0/16", 2, Via::Kernel, 0),
            route("fd00:1::/64", 3, Via::Link, 256),
            route("::/0", 2, Via::Gateway("fd00::fe".parse().unwrap()), 1024),
        ];
        t.neighbours
            .insert((2, "10.0.0.254".parse().unwrap()), [0xaa; 6]);
        t.neighbours
            .insert((3, "10.1.0.11".parse().unwrap()), [0xbb; 6]);
        t.neighbours
            .insert((3, "fd00:1::11".parse().unwrap()), [0xcc; 6]);
        t.addresses.insert(
            3,
            vec!["10.1.0.1".parse().unwrap(), "fd00:1::1".parse().unwrap()],
        );
        t
    }

    #[test]
    fn resolves_next_hops_as_the_kernel_routes() {
        let t = topology();
        let hop = t.next_hop("10.1.0.11".parse().unwrap()).unwrap();
        assert_eq!(
            (hop.ifindex, hop.dmac, hop.smac, hop.mtu),
            (3, [0xbb; 6], [2, 0, 0, 0, 0, 3], 9000)
        );
        // On the link but not resolved: left to the FIB.
        assert_eq!(t.next_hop("10.1.0.12".parse().unwrap()), None);
        // The default route with the lower metric wins: eth1's gateway, unresolved.
        assert_eq!(t.next_hop("198.51.100.1".parse().unwrap()), None);
        assert_eq!(t.next_hop("10.1.0.1".parse().unwrap()), None, "local");
        assert_eq!(
            t.next_hop("10.9.1.1".parse().unwrap()),
            None,
            "the kernel's"
        );
        let hop = t.next_hop("fd00:1::11".parse().unwrap()).unwrap();
        assert_eq!((hop.ifindex, hop.dmac), (3, [0xcc; 6]));
    }

    #[test]
    fn picks_the_source_address_of_the_egress_interface_and_family() {
        let t = topology();
        assert_eq!(
            t.source_for("10.1.0.11".parse().unwrap()),
            Some("10.1.0.1".parse().unwrap())
        );
        assert_eq!(
            t.source_for("fd00:1::11".parse().unwrap()),
            Some("fd00:1::1".parse().unwrap())
        );
    }

    #[test]
    fn mirrors_the_client_side() {
        let t = topology();
        let (routes, neighbours) = t.client_side(&[2]);
        let key = |net: &str| net.parse::<IpNet>().unwrap();
        assert_eq!(
            routes[&key("0.0.0.0/0")].gateway,
            [u32::from_ne_bytes([10, 1, 0, 254]), 0, 0, 0]
        );
        assert_eq!(
            routes[&key("::/0")].gateway,
            words("fd00::fe".parse().unwrap())
        );
        assert_eq!(routes[&key("10.0.0.0/24")].kind, ROUTE_LINK);
        assert_eq!(routes[&key("10.1.0.1/32")].kind, ROUTE_LOCAL);
        assert_eq!(routes[&key("10.9.0.0/16")].kind, ROUTE_KERNEL);
        // Only neighbours on the client-side interfaces.
        assert_eq!(neighbours.len(), 1);
        assert_eq!(
            neighbours[&"10.0.0.254".parse::<IpAddr>().unwrap()].dmac,
            [0xaa; 6]
        );
    }
}

//! The VRRP router's contact with the network: the advertisement socket, the
//! interfaces' state, the moving addresses and gratuitous ARP.
//!
//! Everything is read through the network namespace the agent runs in (netlink and
//! sockets), never through `/sys`, which belongs to whoever mounted it.

use std::{
    io::{self, Read},
    net::{IpAddr, Ipv4Addr, SocketAddrV4},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use futures_util::TryStreamExt;
use ipnet::Ipv4Net;
use nix::{ifaddrs::getifaddrs, net::if_::InterfaceFlags};
use socket2::{Domain, InterfaceIndexOrAddress, Protocol, Socket, Type};
use tokio::io::{Interest, unix::AsyncFd};

use super::packet::{GROUP, PROTOCOL, TTL};

/// What this namespace knows of an interface.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Interface {
    /// Its index.
    pub index: u32,
    /// Its hardware address.
    pub mac: [u8; 6],
    /// Administratively up and with carrier.
    pub running: bool,
    /// Its IPv4 addresses with their prefixes.
    pub networks: Vec<Ipv4Net>,
}

/// Looks an interface up; `None` if it does not exist in this namespace.
pub fn interface(name: &str) -> io::Result<Option<Interface>> {
    let mut found: Option<Interface> = None;
    for entry in getifaddrs().map_err(io::Error::from)? {
        if entry.interface_name != name {
            continue;
        }
        let it = found.get_or_insert_with(Interface::default);
        it.running = entry
            .flags
            .contains(InterfaceFlags::IFF_UP | InterfaceFlags::IFF_RUNNING);
        let Some(address) = entry.address else {
            continue;
        };
        if let Some(link) = address.as_link_addr() {
            it.index = link.ifindex() as u32;
            if let Some(mac) = link.addr() {
                it.mac = mac;
            }
        } else if let Some(ip) = address.as_sockaddr_in() {
            let prefix = entry
                .netmask
                .and_then(|m| m.as_sockaddr_in().map(|m| m.ip().to_bits().count_ones()))
                .unwrap_or(32) as u8;
            if let Ok(net) = Ipv4Net::new(ip.ip(), prefix) {
                it.networks.push(net);
            }
        }
    }
    Ok(found)
}

/// The raw socket advertisements go out of and come in through, on one interface.
pub struct AdvertSocket {
    socket: AsyncFd<Socket>,
}

impl AdvertSocket {
    /// Joins 224.0.0.18 on `interface` and sends from `source` with TTL 255 and the
    /// network-control TOS, without looping our own advertisements back.
    pub fn open(interface: &str, index: u32, source: Ipv4Addr) -> io::Result<AdvertSocket> {
        let socket = Socket::new(
            Domain::IPV4,
            Type::RAW,
            Some(Protocol::from(i32::from(PROTOCOL))),
        )?;
        socket.bind_device(Some(interface.as_bytes()))?;
        socket.join_multicast_v4_n(&GROUP, &InterfaceIndexOrAddress::Index(index))?;
        socket.set_multicast_if_v4(&source)?;
        socket.set_multicast_ttl_v4(u32::from(TTL))?;
        socket.set_multicast_loop_v4(false)?;
        socket.set_tos_v4(0xc0)?;
        socket.set_nonblocking(true)?;
        // SAFETY: the Socket owns its fd and keeps it, unchanged, until it drops with
        // the AsyncFd.
        let socket = unsafe { AsyncFd::register_with_interest(socket, Interest::READABLE) }
            .map_err(io::Error::from)?;
        Ok(AdvertSocket { socket })
    }

    /// The next IPv4 packet of protocol 112, header included.
    pub async fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut ready = self.socket.readable().await?;
            match ready.try_io(|s| s.get_ref().read(buf)) {
                Ok(result) => return result,
                Err(_would_block) => continue,
            }
        }
    }

    /// Sends one VRRP message to the group (the kernel adds the IP header).
    pub fn send(&self, message: &[u8]) -> io::Result<()> {
        let to = SocketAddrV4::new(GROUP, 0);
        self.socket
            .get_ref()
            .send_to(message, &to.into())
            .map(|_| ())
    }
}

/// Adds and removes the moving addresses over rtnetlink: a failover must not wait for
/// `ip` to start.
#[derive(Clone)]
pub struct Addresses {
    handle: rtnetlink::Handle,
}

impl Addresses {
    /// Opens a netlink connection in this namespace (its task runs on tokio).
    pub fn open() -> io::Result<Addresses> {
        let (connection, handle, _) = rtnetlink::new_connection()?;
        tokio::spawn(connection);
        Ok(Addresses { handle })
    }

    /// Adds `address` to interface `index` (no error if it is there already).
    pub async fn add(&self, index: u32, address: Ipv4Net) -> io::Result<()> {
        self.handle
            .address()
            .add(index, IpAddr::V4(address.addr()), address.prefix_len())
            .replace()
            .execute()
            .await
            .map_err(io::Error::other)
    }

    /// Removes `address` from interface `index` if it is there.
    pub async fn remove(&self, index: u32, address: Ipv4Net) -> io::Result<()> {
        let mut found = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .set_address_filter(IpAddr::V4(address.addr()))
            .set_prefix_length_filter(address.prefix_len())
            .execute();
        while let Some(message) = found.try_next().await.map_err(io::Error::other)? {
            self.handle
                .address()
                .del(message)
                .execute()
                .await
                .map_err(io::Error::other)?;
        }
        Ok(())
    }
}

const ETH_P_ARP: u16 = 0x0806;

/// Sends gratuitous ARP. One packet socket for the router's life: closing one waits
/// for an RCU grace period (tens of ms), which a failover must not pay per frame.
pub struct Announcer {
    fd: OwnedFd,
}

impl Announcer {
    /// Opens the packet socket (not bound: each frame names its interface).
    pub fn open() -> io::Result<Announcer> {
        // SAFETY: plain socket(2); the fd is owned at once. Protocol 0: send only.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor nobody else owns.
        Ok(Announcer {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// Broadcasts a gratuitous ARP request for `address` from `interface`, so that
    /// neighbours point their cache entry for it at this machine.
    pub fn announce(&self, interface: &Interface, address: Ipv4Addr) -> io::Result<()> {
        let broadcast = [0xff; 6];
        let mut frame = Vec::with_capacity(42);
        frame.extend_from_slice(&broadcast);
        frame.extend_from_slice(&interface.mac);
        frame.extend_from_slice(&ETH_P_ARP.to_be_bytes());
        // Ethernet, IPv4, 6-byte and 4-byte addresses, request.
        frame.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
        frame.extend_from_slice(&interface.mac);
        frame.extend_from_slice(&address.octets());
        frame.extend_from_slice(&[0; 6]);
        frame.extend_from_slice(&address.octets());

        // SAFETY: sockaddr_ll is plain data; zeroed is a valid value.
        let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        to.sll_family = libc::AF_PACKET as u16;
        to.sll_protocol = ETH_P_ARP.to_be();
        to.sll_ifindex = interface.index as i32;
        to.sll_halen = 6;
        to.sll_addr[..6].copy_from_slice(&broadcast);
        // SAFETY: the buffer and the address live across the call, with their lengths.
        let sent = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&to as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

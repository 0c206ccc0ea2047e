//! Frames built and read with etherparse: no packet is typed as a byte array. Both
//! families, TCP, UDP and ICMP (echo and errors quoting another packet), and frames
//! the balancer encapsulated (IPIP, IPv6 in IPv6, GUE), whose outer and inner
//! headers are read back with every checksum verified.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use etherparse::{
    IpHeaders, Ipv4Header, Ipv6FlowLabel, Ipv6Header, LaxPacketHeaders, LinkExtHeader, NetHeaders,
    PacketBuilder, PacketHeaders, TransportHeader, VlanId, ip_number,
};

use crate::packet_lab::{CLIENT_MAC, LB_CLIENT_MAC};

/// TCP flags of a test packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tcp {
    /// Connection opening.
    Syn,
    /// SYN+ACK (a server's answer).
    SynAck,
    /// A data or ack segment of an open connection.
    Ack,
    /// A reset.
    Rst,
    /// A FIN with its ACK (closing).
    Fin,
}

/// An ICMP error, as a router or host sends it about a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IcmpError {
    /// IPv4 "fragmentation needed" / IPv6 "packet too big", with the MTU.
    TooBig(u16),
    /// Time exceeded in transit.
    TimeExceeded,
    /// Destination (port) unreachable.
    PortUnreachable,
}

/// What a test frame carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum L4 {
    /// A TCP segment.
    Tcp(Tcp),
    /// A UDP datagram with its checksum.
    Udp,
    /// A UDP datagram with checksum 0 (none).
    UdpNoChecksum,
    /// An ICMP(v6) echo request.
    EchoRequest,
    /// An ICMP(v6) error quoting the IP packet inside `quoted` (the bytes from its IP
    /// header on).
    Error(IcmpError, Vec<u8>),
}

/// A frame to build: fields default to a client's TCP SYN to the VIP.
#[derive(Clone, Debug)]
pub struct Frame {
    /// Ethernet source.
    pub src_mac: [u8; 6],
    /// Ethernet destination.
    pub dst_mac: [u8; 6],
    /// One 802.1Q tag.
    pub vlan: Option<u16>,
    /// IP source (the family of both addresses makes the frame's).
    pub src: IpAddr,
    /// IP destination.
    pub dst: IpAddr,
    /// Source port.
    pub sport: u16,
    /// Destination port.
    pub dport: u16,
    /// IPv4 TTL / IPv6 hop limit.
    pub ttl: u8,
    /// IPv4 options (a multiple of 4 bytes).
    pub ip_options: Vec<u8>,
    /// IPv4 DF (IPv6 is never fragmented on the way).
    pub dont_fragment: bool,
    /// Transport.
    pub l4: L4,
    /// Payload after the transport header.
    pub payload: Vec<u8>,
}

impl Frame {
    /// A TCP segment from `src:sport` to `dst:dport`, client MACs.
    pub fn tcp(
        src: impl Into<IpAddr>,
        sport: u16,
        dst: impl Into<IpAddr>,
        dport: u16,
        flags: Tcp,
    ) -> Self {
        Self {
            src_mac: CLIENT_MAC,
            dst_mac: LB_CLIENT_MAC,
            vlan: None,
            src: src.into(),
            dst: dst.into(),
            sport,
            dport,
            ttl: 64,
            ip_options: Vec::new(),
            dont_fragment: true,
            l4: L4::Tcp(flags),
            payload: b"GET / HTTP/1.1\r\n\r\n".to_vec(),
        }
    }

    /// A UDP datagram from `src:sport` to `dst:dport`.
    pub fn udp(src: impl Into<IpAddr>, sport: u16, dst: impl Into<IpAddr>, dport: u16) -> Self {
        Self {
            l4: L4::Udp,
            payload: b"query".to_vec(),
            ..Self::tcp(src, sport, dst, dport, Tcp::Ack)
        }
    }

    /// An echo request ("ping") from `src` to `dst`.
    pub fn echo(src: impl Into<IpAddr>, dst: impl Into<IpAddr>) -> Self {
        Self {
            l4: L4::EchoRequest,
            payload: b"ping payload".to_vec(),
            ..Self::tcp(src, 0, dst, 0, Tcp::Ack)
        }
    }

    /// An ICMP error from `src` to `dst` about `about` (quoted from its IP header,
    /// `quote` bytes of it at most).
    pub fn icmp_error(
        src: impl Into<IpAddr>,
        dst: impl Into<IpAddr>,
        error: IcmpError,
        about: &Frame,
        quote: usize,
    ) -> Self {
        let bytes = about.build();
        let ip = bytes.len() - about.ip_len();
        let quoted = bytes[ip..bytes.len().min(ip + quote)].to_vec();
        Self {
            l4: L4::Error(error, quoted),
            payload: Vec::new(),
            ..Self::tcp(src, 0, dst, 0, Tcp::Ack)
        }
    }

    /// A copy with a larger payload: `len` bytes in all at the IP layer.
    pub fn sized(mut self, ip_len: usize) -> Self {
        let rest = ip_len - (self.ip_len() - self.payload.len());
        self.payload = (0..rest).map(|i| i as u8).collect();
        self
    }

    /// Whether the frame is IPv6.
    pub fn is_ipv6(&self) -> bool {
        self.src.is_ipv6()
    }

    /// The IP packet's length, headers included.
    pub fn ip_len(&self) -> usize {
        let ip = if self.is_ipv6() {
            40
        } else {
            20 + self.ip_options.len()
        };
        let l4 = match &self.l4 {
            L4::Tcp(_) => 20,
            L4::Udp | L4::UdpNoChecksum | L4::EchoRequest => 8,
            L4::Error(_, quoted) => 8 + quoted.len(),
        };
        ip + l4 + self.payload.len()
    }

    /// The frame's bytes.
    pub fn build(&self) -> Vec<u8> {
        let eth = PacketBuilder::ethernet2(self.src_mac, self.dst_mac);
        let transport_len = self.ip_len()
            - if self.is_ipv6() {
                40
            } else {
                20 + self.ip_options.len()
            };
        let protocol = match (&self.l4, self.is_ipv6()) {
            (L4::Tcp(_), _) => ip_number::TCP,
            (L4::Udp | L4::UdpNoChecksum, _) => ip_number::UDP,
            (_, false) => ip_number::ICMP,
            (_, true) => ip_number::IPV6_ICMP,
        };
        let ip = match (self.src, self.dst) {
            (IpAddr::V4(src), IpAddr::V4(dst)) => {
                let mut ip = Ipv4Header::new(
                    transport_len as u16,
                    self.ttl,
                    protocol,
                    src.octets(),
                    dst.octets(),
                )
                .expect("ipv4 header");
                ip.options = self
                    .ip_options
                    .as_slice()
                    .try_into()
                    .expect("ip options: a multiple of 4, at most 40 bytes");
                ip.dont_fragment = self.dont_fragment;
                IpHeaders::Ipv4(ip, Default::default())
            }
            (IpAddr::V6(src), IpAddr::V6(dst)) => IpHeaders::Ipv6(
                Ipv6Header {
                    traffic_class: 0,
                    flow_label: Ipv6FlowLabel::ZERO,
                    payload_length: transport_len as u16,
                    next_header: protocol,
                    hop_limit: self.ttl,
                    source: src.octets(),
                    destination: dst.octets(),
                },
                Default::default(),
            ),
            _ => panic!("mixed families: {} → {}", self.src, self.dst),
        };
        let step = match self.vlan {
            Some(id) => eth
                .single_vlan(VlanId::try_new(id).expect("vlan id"))
                .ip(ip),
            None => eth.ip(ip),
        };
        let mut out = Vec::new();
        match &self.l4 {
            L4::Tcp(flags) => {
                let tcp = step.tcp(self.sport, self.dport, 1_000, 64_000);
                let tcp = match flags {
                    Tcp::Syn => tcp.syn(),
                    Tcp::SynAck => tcp.syn().ack(1),
                    Tcp::Ack => tcp.ack(1),
                    Tcp::Rst => tcp.rst(),
                    Tcp::Fin => tcp.fin().ack(1),
                };
                tcp.write(&mut out, &self.payload).expect("write");
            }
            L4::Udp | L4::UdpNoChecksum => {
                step.udp(self.sport, self.dport)
                    .write(&mut out, &self.payload)
                    .expect("write");
                if self.l4 == L4::UdpNoChecksum {
                    let l4 = out.len() - self.payload.len() - 8;
                    out[l4 + 6..l4 + 8].copy_from_slice(&[0, 0]);
                }
            }
            L4::EchoRequest if self.is_ipv6() => step
                .icmpv6_echo_request(7, 1)
                .write(&mut out, &self.payload)
                .expect("write"),
            L4::EchoRequest => step
                .icmpv4_echo_request(7, 1)
                .write(&mut out, &self.payload)
                .expect("write"),
            L4::Error(error, quoted) => {
                let (kind, code, rest) = match (error, self.is_ipv6()) {
                    (IcmpError::TooBig(mtu), false) => (3, 4, [0, 0, (mtu >> 8) as u8, *mtu as u8]),
                    (IcmpError::TooBig(mtu), true) => (2, 0, (*mtu as u32).to_be_bytes()),
                    (IcmpError::TimeExceeded, false) => (11, 0, [0; 4]),
                    (IcmpError::TimeExceeded, true) => (3, 0, [0; 4]),
                    (IcmpError::PortUnreachable, false) => (3, 3, [0; 4]),
                    (IcmpError::PortUnreachable, true) => (1, 4, [0; 4]),
                };
                if self.is_ipv6() {
                    step.icmpv6_raw(kind, code, rest)
                        .write(&mut out, quoted)
                        .expect("write");
                } else {
                    step.icmpv4_raw(kind, code, rest)
                        .write(&mut out, quoted)
                        .expect("write");
                }
            }
        }
        out
    }
}

/// Inserts IPv6 extension headers of the given kinds (8 bytes each: hop-by-hop 0,
/// routing 43, fragment 44 with `fragment` as its offset-and-M field, destination
/// options 60) between the IPv6 header and what follows, fixing the next-header chain
/// and the payload length. The transport checksum stays right: it does not cover them.
pub fn with_ipv6_extensions(frame: &[u8], kinds: &[u8], fragment: u16) -> Vec<u8> {
    let l3 = if frame[12..14] == [0x81, 0x00] {
        18
    } else {
        14
    };
    let mut out = frame[..l3 + 40].to_vec();
    let transport = out[l3 + 6];
    out[l3 + 6] = kinds[0];
    for (i, &kind) in kinds.iter().enumerate() {
        let following = kinds.get(i + 1).copied().unwrap_or(transport);
        let mut header = [following, 0, 0, 0, 0, 0, 0, 0];
        match kind {
            // Routing: type 0, no segments left.
            43 => header[2..4].copy_from_slice(&[0, 0]),
            44 => header[2..4].copy_from_slice(&fragment.to_be_bytes()),
            // Options: one PadN of 4 bytes.
            _ => header[2..8].copy_from_slice(&[1, 4, 0, 0, 0, 0]),
        }
        out.extend_from_slice(&header);
    }
    out.extend_from_slice(&frame[l3 + 40..]);
    let payload = (out.len() - l3 - 40) as u16;
    out[l3 + 4..l3 + 6].copy_from_slice(&payload.to_be_bytes());
    out
}

/// The outer headers of an encapsulated frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outer {
    /// Outer source and destination.
    pub src: IpAddr,
    pub dst: IpAddr,
    /// The protocol after the outer IP header (4, 41 or 17).
    pub proto: u8,
    /// TTL / hop limit.
    pub ttl: u8,
    /// IPv4 DF.
    pub dont_fragment: bool,
    /// IPv6 flow label.
    pub flow_label: u32,
    /// GUE's UDP ports and checksum.
    pub udp: Option<(u16, u16, u16)>,
}

/// An ICMP message read back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Icmp {
    /// Type and code.
    pub kind: u8,
    pub code: u8,
    /// Bytes 4 to 8 (the MTU of "too big" errors, id and sequence of echoes).
    pub rest: [u8; 4],
    /// An error's quoted packet, read leniently (it is cut short).
    pub quoted: Option<Quoted>,
}

impl Icmp {
    /// The MTU an IPv4 "fragmentation needed" or IPv6 "packet too big" carries.
    pub fn mtu(&self) -> u32 {
        u32::from_be_bytes(self.rest)
    }
}

/// The headers an ICMP error quotes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Quoted {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
}

/// A frame read back, its checksums verified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parsed {
    /// Ethernet source.
    pub src_mac: [u8; 6],
    /// Ethernet destination.
    pub dst_mac: [u8; 6],
    /// 802.1Q tag, if any.
    pub vlan: Option<u16>,
    /// The (inner, when encapsulated) IP source.
    pub src: IpAddr,
    /// The (inner) IP destination.
    pub dst: IpAddr,
    /// Source port (0 for ICMP).
    pub sport: u16,
    /// Destination port.
    pub dport: u16,
    /// TTL / hop limit.
    pub ttl: u8,
    /// IPv4 options.
    pub ip_options: Vec<u8>,
    /// The UDP checksum field (None for TCP).
    pub udp_checksum: Option<u16>,
    /// Transport payload.
    pub payload: Vec<u8>,
    /// ICMP, if that is the transport.
    pub icmp: Option<Icmp>,
    /// The outer headers, if the frame is encapsulated.
    pub outer: Option<Outer>,
}

/// Parses a frame and checks every checksum: IPv4 headers, TCP, UDP (0 means none
/// and is accepted as such), ICMP, ICMPv6; for an encapsulated frame, outer and
/// inner; for an ICMP error, the quoted IPv4 header too.
pub fn parse(frame: &[u8]) -> Parsed {
    let headers = PacketHeaders::from_ethernet_slice(frame).expect("parse output frame");
    let eth = headers
        .link
        .clone()
        .and_then(|l| l.ethernet2())
        .expect("ethernet");
    let vlan = headers.link_exts.iter().find_map(|e| match e {
        LinkExtHeader::Vlan(v) => Some(v.vlan_id.value()),
        _ => None,
    });
    let mut parsed = ip_layer(&headers);
    parsed.src_mac = eth.source;
    parsed.dst_mac = eth.destination;
    parsed.vlan = vlan;
    parsed
}

/// Reads one IP layer (and what it carries) from parsed headers.
fn ip_layer(headers: &PacketHeaders) -> Parsed {
    let payload = headers.payload.slice().to_vec();
    let (src, dst, ttl, ip_options, dont_fragment, flow_label, proto) = match &headers.net {
        Some(NetHeaders::Ipv4(ip, _)) => {
            assert_eq!(
                ip.header_checksum,
                ip.calc_header_checksum(),
                "IPv4 header checksum"
            );
            (
                IpAddr::from(ip.source),
                IpAddr::from(ip.destination),
                ip.time_to_live,
                ip.options.as_slice().to_vec(),
                ip.dont_fragment,
                0,
                ip.protocol,
            )
        }
        Some(NetHeaders::Ipv6(ip, exts)) => (
            IpAddr::from(ip.source),
            IpAddr::from(ip.destination),
            ip.hop_limit,
            Vec::new(),
            true,
            ip.flow_label.value(),
            exts.next_header(ip.next_header).unwrap_or(ip.next_header),
        ),
        other => panic!("not IP: {other:?}"),
    };
    let mut parsed = Parsed {
        src_mac: [0; 6],
        dst_mac: [0; 6],
        vlan: None,
        src,
        dst,
        sport: 0,
        dport: 0,
        ttl,
        ip_options,
        udp_checksum: None,
        payload: payload.clone(),
        icmp: None,
        outer: None,
    };
    // IP in IP: the inner packet is the payload.
    if matches!(proto, ip_number::IPV4 | ip_number::IPV6) && headers.transport.is_none() {
        return encapsulated(&parsed, proto.0, &payload, dont_fragment, flow_label, None);
    }
    match &headers.transport {
        Some(TransportHeader::Tcp(tcp)) => {
            let want = match &headers.net {
                Some(NetHeaders::Ipv4(ip, _)) => tcp.calc_checksum_ipv4(ip, &payload),
                Some(NetHeaders::Ipv6(ip, _)) => tcp.calc_checksum_ipv6(ip, &payload),
                _ => unreachable!(),
            };
            assert_eq!(tcp.checksum, want.unwrap(), "TCP checksum");
            parsed.sport = tcp.source_port;
            parsed.dport = tcp.destination_port;
        }
        Some(TransportHeader::Udp(udp)) => {
            // GUE: the inner IP packet follows the UDP header.
            if payload.first().is_some_and(|b| b >> 4 == 4 || b >> 4 == 6)
                && udp.destination_port == foobar_lb_common::DEFAULT_GUE_PORT
            {
                let ports = Some((udp.source_port, udp.destination_port, udp.checksum));
                return encapsulated(&parsed, proto.0, &payload, dont_fragment, flow_label, ports);
            }
            if udp.checksum != 0 {
                let want = match &headers.net {
                    Some(NetHeaders::Ipv4(ip, _)) => udp.calc_checksum_ipv4(ip, &payload),
                    Some(NetHeaders::Ipv6(ip, _)) => udp.calc_checksum_ipv6(ip, &payload),
                    _ => unreachable!(),
                };
                assert_eq!(udp.checksum, want.unwrap(), "UDP checksum");
            }
            parsed.sport = udp.source_port;
            parsed.dport = udp.destination_port;
            parsed.udp_checksum = Some(udp.checksum);
        }
        Some(TransportHeader::Icmpv4(icmp)) => {
            let want = etherparse::Icmpv4Header::with_checksum(icmp.icmp_type.clone(), &payload);
            assert_eq!(icmp.checksum, want.checksum, "ICMP checksum");
            parsed.icmp = Some(icmp_of(&icmp.to_bytes(), &payload));
        }
        Some(TransportHeader::Icmpv6(icmp)) => {
            let (IpAddr::V6(s), IpAddr::V6(d)) = (src, dst) else {
                unreachable!()
            };
            let want = icmp
                .icmp_type
                .calc_checksum(s.octets(), d.octets(), &payload)
                .unwrap();
            assert_eq!(icmp.checksum, want, "ICMPv6 checksum");
            parsed.icmp = Some(icmp_of(&icmp.to_bytes(), &payload));
        }
        other => panic!("not TCP/UDP/ICMP: {other:?}"),
    }
    parsed
}

/// The inner packet of an encapsulated one, with the outer headers kept aside.
fn encapsulated(
    outer: &Parsed,
    proto: u8,
    inner: &[u8],
    dont_fragment: bool,
    flow_label: u32,
    udp: Option<(u16, u16, u16)>,
) -> Parsed {
    let headers = PacketHeaders::from_ip_slice(inner).expect("parse the inner packet");
    let mut parsed = ip_layer(&headers);
    parsed.outer = Some(Outer {
        src: outer.src,
        dst: outer.dst,
        proto,
        ttl: outer.ttl,
        dont_fragment,
        flow_label,
        udp,
    });
    parsed
}

/// An ICMP header's fields and the packet an error quotes.
fn icmp_of(header: &[u8], payload: &[u8]) -> Icmp {
    let (kind, code) = (header[0], header[1]);
    // Destination unreachable, time exceeded; ICMPv6's too: 1, 2 (too big), 3.
    let error = matches!(kind, 1 | 2 | 3 | 11);
    let quoted = error.then(|| quoted(payload)).flatten();
    Icmp {
        kind,
        code,
        rest: [header[4], header[5], header[6], header[7]],
        quoted,
    }
}

/// The headers of a quoted packet; a quoted IPv4 header's checksum must be right.
fn quoted(bytes: &[u8]) -> Option<Quoted> {
    let headers = LaxPacketHeaders::from_ip(bytes).ok()?;
    let (src, dst) = match &headers.net {
        Some(etherparse::NetHeaders::Ipv4(ip, _)) => {
            assert_eq!(
                ip.header_checksum,
                ip.calc_header_checksum(),
                "quoted IPv4 header checksum"
            );
            (IpAddr::from(ip.source), IpAddr::from(ip.destination))
        }
        Some(etherparse::NetHeaders::Ipv6(ip, _)) => {
            (IpAddr::from(ip.source), IpAddr::from(ip.destination))
        }
        _ => return None,
    };
    let (sport, dport) = match &headers.transport {
        Some(TransportHeader::Tcp(t)) => (t.source_port, t.destination_port),
        Some(TransportHeader::Udp(u)) => (u.source_port, u.destination_port),
        // A quote too short for a whole TCP header: its ports lead it.
        _ => {
            let l4 = headers.payload.slice();
            if l4.len() < 4 {
                return None;
            }
            (
                u16::from_be_bytes([l4[0], l4[1]]),
                u16::from_be_bytes([l4[2], l4[3]]),
            )
        }
    };
    Some(Quoted {
        src,
        dst,
        sport,
        dport,
    })
}

/// An IPv4 address as an [`IpAddr`].
pub fn v4(a: Ipv4Addr) -> IpAddr {
    IpAddr::V4(a)
}

/// An IPv6 address as an [`IpAddr`].
pub fn v6(a: Ipv6Addr) -> IpAddr {
    IpAddr::V6(a)
}

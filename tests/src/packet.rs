//! Frames built and read with etherparse: no packet is typed as a byte array.

use std::net::Ipv4Addr;

use etherparse::{
    IpHeaders, Ipv4Header, LinkExtHeader, NetHeaders, PacketBuilder, PacketHeaders,
    TransportHeader, VlanId, ip_number,
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

/// What a test frame carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L4 {
    /// A TCP segment.
    Tcp(Tcp),
    /// A UDP datagram with its checksum.
    Udp,
    /// A UDP datagram with checksum 0 (none).
    UdpNoChecksum,
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
    /// IPv4 source.
    pub src: Ipv4Addr,
    /// IPv4 destination.
    pub dst: Ipv4Addr,
    /// Source port.
    pub sport: u16,
    /// Destination port.
    pub dport: u16,
    /// IPv4 TTL.
    pub ttl: u8,
    /// IPv4 options (a multiple of 4 bytes).
    pub ip_options: Vec<u8>,
    /// Transport.
    pub l4: L4,
    /// Payload after the transport header.
    pub payload: Vec<u8>,
}

impl Frame {
    /// A TCP segment from `src:sport` to `dst:dport`, client MACs.
    pub fn tcp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, flags: Tcp) -> Self {
        Self {
            src_mac: CLIENT_MAC,
            dst_mac: LB_CLIENT_MAC,
            vlan: None,
            src,
            dst,
            sport,
            dport,
            ttl: 64,
            ip_options: Vec::new(),
            l4: L4::Tcp(flags),
            payload: b"GET / HTTP/1.1\r\n\r\n".to_vec(),
        }
    }

    /// A UDP datagram from `src:sport` to `dst:dport`.
    pub fn udp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Self {
        Self {
            l4: L4::Udp,
            payload: b"query".to_vec(),
            ..Self::tcp(src, sport, dst, dport, Tcp::Ack)
        }
    }

    /// The frame's bytes.
    pub fn build(&self) -> Vec<u8> {
        let eth = PacketBuilder::ethernet2(self.src_mac, self.dst_mac);
        let transport_len = match self.l4 {
            L4::Tcp(_) => 20,
            L4::Udp | L4::UdpNoChecksum => 8,
        };
        let mut ip = Ipv4Header::new(
            (transport_len + self.payload.len()) as u16,
            self.ttl,
            match self.l4 {
                L4::Tcp(_) => ip_number::TCP,
                _ => ip_number::UDP,
            },
            self.src.octets(),
            self.dst.octets(),
        )
        .expect("ipv4 header");
        ip.options = self
            .ip_options
            .as_slice()
            .try_into()
            .expect("ip options: a multiple of 4, at most 40 bytes");
        let ip = IpHeaders::Ipv4(ip, Default::default());
        let step = match self.vlan {
            Some(id) => eth
                .single_vlan(VlanId::try_new(id).expect("vlan id"))
                .ip(ip),
            None => eth.ip(ip),
        };
        let mut out = Vec::new();
        match self.l4 {
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
        }
        out
    }
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
    /// IPv4 source.
    pub src: Ipv4Addr,
    /// IPv4 destination.
    pub dst: Ipv4Addr,
    /// Source port.
    pub sport: u16,
    /// Destination port.
    pub dport: u16,
    /// TTL.
    pub ttl: u8,
    /// IPv4 options.
    pub ip_options: Vec<u8>,
    /// The UDP checksum field (None for TCP).
    pub udp_checksum: Option<u16>,
    /// Transport payload.
    pub payload: Vec<u8>,
}

/// Parses a frame and checks that its IPv4 and TCP/UDP checksums are right
/// (a UDP checksum of 0 means none and is accepted as such).
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
    let Some(NetHeaders::Ipv4(ip, _)) = &headers.net else {
        panic!("not IPv4: {:?}", headers.net)
    };
    assert_eq!(
        ip.header_checksum,
        ip.calc_header_checksum(),
        "IPv4 header checksum"
    );
    let payload = headers.payload.slice().to_vec();
    let (sport, dport, udp_checksum) = match &headers.transport {
        Some(TransportHeader::Tcp(tcp)) => {
            assert_eq!(
                tcp.checksum,
                tcp.calc_checksum_ipv4(ip, &payload).unwrap(),
                "TCP checksum"
            );
            (tcp.source_port, tcp.destination_port, None)
        }
        Some(TransportHeader::Udp(udp)) => {
            if udp.checksum != 0 {
                assert_eq!(
                    udp.checksum,
                    udp.calc_checksum_ipv4(ip, &payload).unwrap(),
                    "UDP checksum"
                );
            }
            (udp.source_port, udp.destination_port, Some(udp.checksum))
        }
        other => panic!("not TCP/UDP: {other:?}"),
    };
    Parsed {
        src_mac: eth.source,
        dst_mac: eth.destination,
        vlan,
        src: ip.source.into(),
        dst: ip.destination.into(),
        sport,
        dport,
        ttl: ip.time_to_live,
        ip_options: ip.options.as_slice().to_vec(),
        udp_checksum,
        payload,
    }
}

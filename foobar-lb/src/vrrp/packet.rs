//! VRRPv3 advertisements for IPv4 (RFC 5798 §5), as they travel inside an IP packet.
//!
//! ```text
//!  0                   1                   2                   3
//!  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
//! |Version| Type  | Virtual Rtr ID|   Priority    |Count IPvX Addr|
//! |(rsvd) |     Max Adver Int     |          Checksum             |
//! |                       IPv4 Address(es)                        |
//! ```
//! The checksum covers the message and an IPv4 pseudo-header (source, destination,
//! protocol 112, length), as keepalived computes it for version 3.

use std::net::Ipv4Addr;

/// IP protocol number of VRRP.
pub const PROTOCOL: u8 = 112;
/// The IPv4 multicast group advertisements are sent to.
pub const GROUP: Ipv4Addr = Ipv4Addr::new(224, 0, 0, 18);
/// The only TTL a valid advertisement arrives with: it has not crossed a router.
pub const TTL: u8 = 255;
/// Version 3, type 1 (advertisement).
const VERSION_TYPE: u8 = 0x31;
const HEADER_LEN: usize = 8;
/// The largest interval the 12-bit field holds, in centiseconds.
pub const MAX_INTERVAL_CS: u16 = 0x0fff;

/// One advertisement.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Advertisement {
    /// The virtual router.
    pub vrid: u8,
    /// The sender's priority; 0 means "I am stopping, take over now".
    pub priority: u8,
    /// The sender's advertisement interval, in centiseconds.
    pub interval_cs: u16,
    /// The virtual router's addresses.
    pub addresses: Vec<Ipv4Addr>,
}

/// Why a received packet was not taken as an advertisement. Each is counted under
/// its [`Rejection::label`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Rejection {
    /// Shorter than its header or its address list, or not IPv4 protocol 112.
    Malformed,
    /// TTL other than 255: it was routed, so it may come from anywhere.
    Ttl,
    /// Not version 3, or not an advertisement.
    Version,
    /// The checksum does not match.
    Checksum,
    /// Another virtual router on the same link.
    Vrid,
    /// The sender is not on one of the interface's subnets.
    SourceNotOnLink,
    /// The address list differs from ours (keepalived drops these too).
    AddressList,
    /// An advertisement interval of 0.
    Interval,
}

impl Rejection {
    /// Every reason, for exporting zeroes.
    pub const ALL: [Rejection; 8] = [
        Rejection::Malformed,
        Rejection::Ttl,
        Rejection::Version,
        Rejection::Checksum,
        Rejection::Vrid,
        Rejection::SourceNotOnLink,
        Rejection::AddressList,
        Rejection::Interval,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Rejection::Malformed => "malformed",
            Rejection::Ttl => "ttl",
            Rejection::Version => "version",
            Rejection::Checksum => "checksum",
            Rejection::Vrid => "vrid",
            Rejection::SourceNotOnLink => "source_not_on_link",
            Rejection::AddressList => "address_list",
            Rejection::Interval => "interval",
        }
    }
}

/// The parts of the IPv4 header that matter here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpInfo {
    /// Sender.
    pub source: Ipv4Addr,
    /// Destination (the group).
    pub destination: Ipv4Addr,
    /// Time to live on arrival.
    pub ttl: u8,
}

impl Advertisement {
    /// The VRRP message (no IP header) as sent from `source` to the group.
    pub fn encode(&self, source: Ipv4Addr) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + 4 * self.addresses.len());
        out.push(VERSION_TYPE);
        out.push(self.vrid);
        out.push(self.priority);
        out.push(self.addresses.len() as u8);
        out.extend_from_slice(&(self.interval_cs & MAX_INTERVAL_CS).to_be_bytes());
        out.extend_from_slice(&[0, 0]);
        for address in &self.addresses {
            out.extend_from_slice(&address.octets());
        }
        let sum = checksum(source, GROUP, &out);
        out[6..8].copy_from_slice(&sum.to_be_bytes());
        out
    }

    /// Parses a VRRP message that arrived in an IP packet described by `ip`, checking
    /// TTL, version, type, length and checksum (RFC 5798 §7.1). The VRID, source and
    /// address-list checks need the router's configuration; the running instance makes them.
    pub fn decode(ip: &IpInfo, message: &[u8]) -> Result<Advertisement, Rejection> {
        if message.len() < HEADER_LEN {
            return Err(Rejection::Malformed);
        }
        if ip.ttl != TTL {
            return Err(Rejection::Ttl);
        }
        if message[0] != VERSION_TYPE {
            return Err(Rejection::Version);
        }
        let count = message[3] as usize;
        if message.len() < HEADER_LEN + 4 * count {
            return Err(Rejection::Malformed);
        }
        // Trailing bytes beyond the address list are covered by the sender's checksum
        // only if it counted them; use exactly the advertised length, as keepalived does.
        let message = &message[..HEADER_LEN + 4 * count];
        if checksum(ip.source, ip.destination, message) != 0 {
            return Err(Rejection::Checksum);
        }
        let interval_cs = u16::from_be_bytes([message[4], message[5]]) & MAX_INTERVAL_CS;
        if interval_cs == 0 {
            return Err(Rejection::Interval);
        }
        let addresses = message[HEADER_LEN..]
            .chunks_exact(4)
            .map(|a| Ipv4Addr::new(a[0], a[1], a[2], a[3]))
            .collect();
        Ok(Advertisement {
            vrid: message[1],
            priority: message[2],
            interval_cs,
            addresses,
        })
    }
}

/// Splits a raw IPv4 packet (as a raw socket delivers it) into header facts and the
/// VRRP message.
pub fn split_ipv4(packet: &[u8]) -> Result<(IpInfo, &[u8]), Rejection> {
    if packet.len() < 20 || packet[0] >> 4 != 4 {
        return Err(Rejection::Malformed);
    }
    let header_len = usize::from(packet[0] & 0x0f) * 4;
    let total_len = usize::from(u16::from_be_bytes([packet[2], packet[3]]));
    if header_len < 20 || total_len < header_len || packet.len() < total_len {
        return Err(Rejection::Malformed);
    }
    if packet[9] != PROTOCOL {
        return Err(Rejection::Malformed);
    }
    let address =
        |at: usize| Ipv4Addr::new(packet[at], packet[at + 1], packet[at + 2], packet[at + 3]);
    let ip = IpInfo {
        ttl: packet[8],
        source: address(12),
        destination: address(16),
    };
    Ok((ip, &packet[header_len..total_len]))
}

/// The Internet checksum of `message` with the IPv4 pseudo-header; 0 over a message
/// whose checksum field is right.
pub fn checksum(source: Ipv4Addr, destination: Ipv4Addr, message: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    let mut add = |bytes: &[u8]| {
        for pair in bytes.chunks(2) {
            let hi = u32::from(pair[0]) << 8;
            let lo = pair.get(1).copied().map(u32::from).unwrap_or(0);
            sum += hi | lo;
        }
    };
    add(&source.octets());
    add(&destination.octets());
    add(&[0, PROTOCOL]);
    add(&(message.len() as u16).to_be_bytes());
    add(message);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SOURCE: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 3);

    fn ip(ttl: u8) -> IpInfo {
        IpInfo {
            source: SOURCE,
            destination: GROUP,
            ttl,
        }
    }

    fn advert() -> Advertisement {
        Advertisement {
            vrid: 51,
            priority: 150,
            interval_cs: 10,
            addresses: vec![Ipv4Addr::new(10, 0, 0, 100), Ipv4Addr::new(10, 1, 0, 1)],
        }
    }

    /// An advertisement Debian's keepalived 2.2.7 sent (vrid 51, priority 100, 100 ms,
    /// one address 10.0.0.100, from 10.0.0.4), captured with tcpdump on a veth.
    const KEEPALIVED: [u8; 12] = [
        0x31, 0x33, 0x64, 0x01, 0x00, 0x0a, 0x75, 0xca, 0x0a, 0x00, 0x00, 0x64,
    ];

    #[test]
    fn decodes_what_keepalived_sends() {
        let from = IpInfo {
            source: Ipv4Addr::new(10, 0, 0, 4),
            ..ip(255)
        };
        let advert = Advertisement::decode(&from, &KEEPALIVED).unwrap();
        assert_eq!(
            advert,
            Advertisement {
                vrid: 51,
                priority: 100,
                interval_cs: 10,
                addresses: vec![Ipv4Addr::new(10, 0, 0, 100)],
            }
        );
        assert_eq!(advert.encode(from.source), KEEPALIVED);
    }

    #[test]
    fn round_trips() {
        let bytes = advert().encode(SOURCE);
        assert_eq!(bytes.len(), 16);
        assert_eq!(Advertisement::decode(&ip(255), &bytes), Ok(advert()));
    }

    #[test]
    fn rejects_each_fault_by_name() {
        let good = advert().encode(SOURCE);
        let decode = |ip: IpInfo, bytes: &[u8]| Advertisement::decode(&ip, bytes).unwrap_err();
        assert_eq!(decode(ip(64), &good), Rejection::Ttl);
        assert_eq!(decode(ip(255), &good[..7]), Rejection::Malformed);
        assert_eq!(decode(ip(255), &good[..12]), Rejection::Malformed);
        let mut v2 = good.clone();
        v2[0] = 0x21;
        assert_eq!(decode(ip(255), &v2), Rejection::Version);
        let mut flipped = good.clone();
        flipped[2] ^= 1;
        assert_eq!(decode(ip(255), &flipped), Rejection::Checksum);
        // The pseudo-header counts: the same bytes from another source fail.
        let other = IpInfo {
            source: Ipv4Addr::new(10, 0, 0, 9),
            ..ip(255)
        };
        assert_eq!(decode(other, &good), Rejection::Checksum);
        let zero = Advertisement {
            interval_cs: 0,
            ..advert()
        }
        .encode(SOURCE);
        assert_eq!(decode(ip(255), &zero), Rejection::Interval);
    }

    #[test]
    fn splits_an_ip_packet() {
        let message = advert().encode(SOURCE);
        let mut packet = vec![0x45, 0, 0, 0, 0, 0, 0, 0, 255, PROTOCOL, 0, 0];
        packet.extend_from_slice(&SOURCE.octets());
        packet.extend_from_slice(&GROUP.octets());
        packet.extend_from_slice(&message);
        let len = packet.len() as u16;
        packet[2..4].copy_from_slice(&len.to_be_bytes());
        let (info, body) = split_ipv4(&packet).unwrap();
        assert_eq!(info, ip(255));
        assert_eq!(body, &message[..]);
        assert_eq!(split_ipv4(&packet[..19]), Err(Rejection::Malformed));
        packet[9] = 6;
        assert_eq!(split_ipv4(&packet), Err(Rejection::Malformed));
    }
}

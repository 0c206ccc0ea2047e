//! The backend's decapsulation program (`foobar-lb decap`) through BPF_PROG_TEST_RUN:
//! it takes exactly the balancer's encapsulations off (the balancer's own output
//! frames are the input here), only for its VIPs, and leaves everything else alone.

use std::net::IpAddr;

use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, HashMap, PerCpuArray,
        lpm_trie::{Key as LpmKey, LpmTrie},
    },
    programs::{TestRun, TestRunOptions, Xdp},
};
use foobar_lb::{
    decap::DECAP_OBJECT,
    state::{Forwarding, Protocol, Scheduler},
    topology::words,
};
use foobar_lb_common::{
    DEFAULT_GUE_PORT, VipAddr,
    decap::{DecapCounters, DecapReason, DecapSettings, map_names as names},
    reason::xdp_action,
};
use tests::{
    packet::{Frame, Tcp, parse},
    packet_lab::*,
};

/// The decapsulation program, loaded, with its VIPs.
struct Decap {
    ebpf: Ebpf,
}

impl Decap {
    fn new(vips: &[IpAddr]) -> Self {
        Self::from_sources(vips, &[])
    }

    /// Decapsulating only packets whose outer source is in one of `sources`.
    fn from_sources(vips: &[IpAddr], sources: &[&str]) -> Self {
        let mut ebpf = EbpfLoader::new().load(DECAP_OBJECT).expect("load");
        {
            let mut map: HashMap<_, VipAddr, u32> =
                HashMap::try_from(ebpf.map_mut(names::DECAP_VIPS).unwrap()).unwrap();
            for vip in vips {
                map.insert(VipAddr { addr: words(*vip) }, 1, 0).unwrap();
            }
            let mut settings: Array<_, DecapSettings> =
                Array::try_from(ebpf.map_mut(names::DECAP_SETTINGS).unwrap()).unwrap();
            let gue_port = DEFAULT_GUE_PORT.to_be();
            let check_sources = u16::from(!sources.is_empty());
            let value = DecapSettings {
                gue_port,
                check_sources,
            };
            settings.set(0, value, 0).unwrap();
            for source in sources {
                let prefix: ipnet::IpNet = source.parse().unwrap();
                let key = words(prefix.network());
                let len = u32::from(prefix.prefix_len());
                if prefix.addr().is_ipv4() {
                    let mut trie: LpmTrie<_, u32, u8> =
                        LpmTrie::try_from(ebpf.map_mut(names::DECAP_SOURCES).unwrap()).unwrap();
                    trie.insert(&LpmKey::new(len, key[0]), 1, 0).unwrap();
                } else {
                    let mut trie: LpmTrie<_, [u32; 4], u8> =
                        LpmTrie::try_from(ebpf.map_mut(names::DECAP_SOURCES6).unwrap()).unwrap();
                    trie.insert(&LpmKey::new(len, key), 1, 0).unwrap();
                }
            }
        }
        let program: &mut Xdp = ebpf.program_mut("decap").unwrap().try_into().unwrap();
        program.load().expect("the verifier takes the program");
        Self { ebpf }
    }

    /// One frame through the program: its action and the frame it left.
    fn run(&mut self, frame: &[u8]) -> (u32, Vec<u8>) {
        let program: &mut Xdp = self.ebpf.program_mut("decap").unwrap().try_into().unwrap();
        let mut out = vec![0u8; frame.len() + 256];
        let result = program
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                repeat: 1,
                ..Default::default()
            })
            .expect("test_run");
        out.truncate(result.data_size_out as usize);
        (result.return_value, out)
    }

    fn count(&self, reason: DecapReason) -> u64 {
        let map: PerCpuArray<_, DecapCounters> =
            PerCpuArray::try_from(self.ebpf.map(names::DECAP_COUNTERS).unwrap()).unwrap();
        let mut total = DecapCounters::default();
        for cpu in map.get(&0, 0).unwrap().iter() {
            total.add(cpu);
        }
        total.get(reason)
    }
}

/// What the balancer sends a DSR backend for `frame`, in `mode`.
fn encapsulated(family: Family, mode: Forwarding, frame: &Frame) -> Vec<u8> {
    let mut lab = PacketLab::new();
    lab.apply(vec![mode_vip(
        family,
        mode,
        80,
        Protocol::Tcp,
        Scheduler::Rr,
        &[1],
    )]);
    let out = lab.run(Side::Client, &frame.build());
    assert_eq!(action_name(out.action), "REDIRECT");
    out.packet
}

/// The IP packet of a frame (after Ethernet and any tag).
fn ip_part(frame: &[u8]) -> &[u8] {
    let l3 = if frame[12..14] == [0x81, 0x00] {
        18
    } else {
        14
    };
    &frame[l3..]
}

fn round_trip(family: Family, mode: Forwarding, vlan: Option<u16>) {
    let client = Frame {
        vlan,
        ..Frame::tcp(family.client(), 40_000, family.vip(), 80, Tcp::Syn)
    };
    let wire = encapsulated(family, mode, &client);
    let mut decap = Decap::new(&[family.vip()]);
    let (action, out) = decap.run(&wire);
    assert_eq!(action, xdp_action::PASS);
    // The client's packet, byte for byte, behind the frame's own Ethernet header.
    assert_eq!(ip_part(&out), ip_part(&client.build()));
    assert_eq!(out[..12], wire[..12], "MACs kept");
    let p = parse(&out);
    assert!(p.outer.is_none());
    assert_eq!(p.vlan, vlan);
    let reason = if mode == Forwarding::DsrGue {
        DecapReason::Gue
    } else {
        DecapReason::Ipip
    };
    assert_eq!(decap.count(reason), 1);
}

#[test]
fn ipip_from_the_balancer_comes_out_as_the_client_sent_it() {
    round_trip(Family::V4, Forwarding::DsrIpip, None);
}

#[test]
fn ipv6_in_ipv6_from_the_balancer_comes_out_as_the_client_sent_it() {
    round_trip(Family::V6, Forwarding::DsrIpip, None);
}

#[test]
fn gue_from_the_balancer_comes_out_as_the_client_sent_it() {
    round_trip(Family::V4, Forwarding::DsrGue, None);
}

#[test]
fn gue_over_ipv6_from_the_balancer_comes_out_as_the_client_sent_it() {
    round_trip(Family::V6, Forwarding::DsrGue, None);
}

#[test]
fn a_vlan_tag_stays_on_the_decapsulated_frame() {
    round_trip(Family::V4, Forwarding::DsrIpip, Some(42));
    round_trip(Family::V6, Forwarding::DsrGue, Some(42));
}

#[test]
fn an_encapsulated_packet_for_another_address_is_dropped() {
    let client = Frame::tcp(Family::V4.client(), 40_000, Family::V4.vip(), 80, Tcp::Syn);
    let wire = encapsulated(Family::V4, Forwarding::DsrIpip, &client);
    // This backend serves another VIP only.
    let mut decap = Decap::new(&["10.0.0.200".parse().unwrap()]);
    let (action, _) = decap.run(&wire);
    assert_eq!(action, xdp_action::DROP);
    assert_eq!(decap.count(DecapReason::DropNotAVip), 1);
}

#[test]
fn only_the_balancers_sources_are_decapsulated_when_named() {
    let client = Frame::tcp(Family::V4.client(), 40_000, Family::V4.vip(), 80, Tcp::Syn);
    let ipip = encapsulated(Family::V4, Forwarding::DsrIpip, &client);
    let gue = encapsulated(Family::V4, Forwarding::DsrGue, &client);
    // IPIP leaves from 172.16.0.0/16, GUE from the balancer's 10.1.0.1.
    let mut decap = Decap::from_sources(&[Family::V4.vip()], &["172.16.0.0/16", "100::/64"]);
    assert_eq!(decap.run(&ipip).0, xdp_action::PASS);
    assert_eq!(decap.run(&gue).0, xdp_action::DROP);
    assert_eq!(decap.count(DecapReason::DropUnknownSource), 1);
    let mut decap = Decap::from_sources(&[Family::V4.vip()], &["10.1.0.0/24"]);
    assert_eq!(decap.run(&gue).0, xdp_action::PASS);
    assert_eq!(decap.run(&ipip).0, xdp_action::DROP);
}

#[test]
fn what_is_not_encapsulated_passes_untouched() {
    let mut decap = Decap::new(&[Family::V4.vip()]);
    for frame in [
        Frame::tcp(
            Family::V4.client(),
            40_000,
            Family::V4.backend(0),
            80,
            Tcp::Syn,
        ),
        Frame::udp(Family::V6.client(), 40_000, Family::V6.backend(0), 53),
        // UDP to another port than GUE's.
        Frame::udp(Family::V4.client(), 40_000, Family::V4.backend(0), 6081),
    ] {
        let bytes = frame.build();
        assert_eq!(decap.run(&bytes), (xdp_action::PASS, bytes));
    }
    let mut arp = Frame::tcp(Family::V4.client(), 1, Family::V4.vip(), 1, Tcp::Syn).build();
    arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    assert_eq!(decap.run(&arp), (xdp_action::PASS, arp));
    assert_eq!(decap.count(DecapReason::PassNotEncapsulated), 4);
}

#[test]
fn a_cut_short_or_malformed_inner_packet_is_dropped() {
    let client = Frame::tcp(Family::V4.client(), 40_000, Family::V4.vip(), 80, Tcp::Syn);
    let wire = encapsulated(Family::V4, Forwarding::DsrIpip, &client);
    let mut decap = Decap::new(&[Family::V4.vip()]);
    // The outer header whole, the inner one cut at its destination address.
    let (action, _) = decap.run(&wire[..14 + 20 + 18]);
    assert_eq!(action, xdp_action::DROP);
    assert_eq!(decap.count(DecapReason::DropTruncated), 1);
    // An inner version that is neither 4 nor 6.
    let mut bad = wire.clone();
    bad[14 + 20] = 0x55;
    let (action, _) = decap.run(&bad);
    assert_eq!(action, xdp_action::DROP);
    assert_eq!(decap.count(DecapReason::DropBadInner), 1);
}

#[test]
fn an_outer_fragment_is_dropped() {
    let client = Frame::tcp(Family::V4.client(), 40_000, Family::V4.vip(), 80, Tcp::Syn);
    let mut wire = encapsulated(Family::V4, Forwarding::DsrIpip, &client);
    wire[14 + 6] |= 0x20; // more fragments
    let mut decap = Decap::new(&[Family::V4.vip()]);
    let (action, _) = decap.run(&wire);
    assert_eq!(action, xdp_action::DROP);
    assert_eq!(decap.count(DecapReason::DropFragment), 1);
}

#[test]
fn random_frames_never_abort_the_decapsulation() {
    use rand::{Rng, SeedableRng, rngs::StdRng};
    let client = Frame::tcp(Family::V4.client(), 40_000, Family::V4.vip(), 80, Tcp::Syn);
    let seeds = [
        encapsulated(Family::V4, Forwarding::DsrIpip, &client),
        encapsulated(Family::V4, Forwarding::DsrGue, &client),
        encapsulated(
            Family::V6,
            Forwarding::DsrIpip,
            &Frame::tcp(Family::V6.client(), 1, Family::V6.vip(), 80, Tcp::Syn),
        ),
    ];
    let mut decap = Decap::new(&[Family::V4.vip(), Family::V6.vip()]);
    let mut rng = StdRng::seed_from_u64(0xdeca);
    for i in 0..100_000 {
        let mut bytes = seeds[i % seeds.len()].clone();
        for _ in 0..rng.random_range(0..4) {
            let at = rng.random_range(0..bytes.len().min(100));
            bytes[at] = rng.random();
        }
        if rng.random_ratio(1, 3) {
            bytes.truncate(rng.random_range(14..=bytes.len()));
        }
        let (action, _) = decap.run(&bytes);
        assert!(
            action == xdp_action::PASS || action == xdp_action::DROP,
            "frame {i}: action {action}: {bytes:02x?}"
        );
    }
}

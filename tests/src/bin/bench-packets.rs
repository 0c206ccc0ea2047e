//! `cargo xtask bench packets`: packets per second through the balancer, on real veths.
//!
//! ```text
//!  gen eth0 ── lbc [balancer] lbs ── eth0 sink (10.1.0.11, 10.1.0.12)
//! ```
//! A generator on the client side (BPF_PROG_TEST_RUN in live-frames mode on the
//! client's veth, the `pktgen` program) sends small TCP packets of many established
//! flows to the VIP; the servers' veth counts what arrives (`sink`, which drops it).
//! Three setups in turn, on the same namespaces: foobar-lb (Maglev over both servers),
//! nftables DNAT in the balancer's namespace, and a control that only forwards (an
//! XDP program that rewrites the MACs and redirects: no lookup at all). One JSON line
//! each, then the ratios.
//!
//! The balancer's work is pinned to CPU 1 and the generator to CPU 0: the balancer's
//! client-side veth runs its receive path in a threaded NAPI kthread, bound to CPU 1
//! (the servers' veth is served on that CPU too, from the balancer's redirect).

use std::{
    net::Ipv4Addr,
    process::{Command, ExitCode},
    time::{Duration, Instant},
};

use aya::{
    Ebpf,
    maps::{Array, DevMap, PerCpuArray},
    programs::{TestRun, TestRunAttrs, TestRunOptions, Xdp, XdpMode},
};
use foobar_lb::{
    dataplane::{Dataplane, FORWARD_OBJECT, LoadOptions, PKTGEN_OBJECT, SINK_OBJECT},
    reconcile::{Balancer, Environment},
    state::{BackendSpec, DesiredState, Protocol, Scheduler, VipSpec},
    topology::Topology,
};
use foobar_lb_common::{ROLE_BACKEND, ROLE_CLIENT, Settings};
use serde_json::json;
use tests::{
    netns::{Netns, ifindex},
    packet::{Frame, Tcp},
};

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 100);
const SERVERS: [Ipv4Addr; 2] = [Ipv4Addr::new(10, 1, 0, 11), Ipv4Addr::new(10, 1, 0, 12)];
const GEN_MAC: [u8; 6] = [0x02, 0x9e, 0, 0, 0, 2];
const LBC_MAC: [u8; 6] = [0x02, 0x9e, 0, 0, 1, 1];
const LBS_MAC: [u8; 6] = [0x02, 0x9e, 0, 0, 2, 1];
const SINK_MAC: [u8; 6] = [0x02, 0x9e, 0, 0, 3, 11];
/// Flows the generator cycles through.
const FLOWS: u32 = 4096;
fn flows() -> u32 {
    std::env::var("FLOWS")
        .map(|f| f.parse().unwrap())
        .unwrap_or(FLOWS)
}
const FIRST_PORT: u32 = 20_000;

fn mac(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The namespaces and veths.
struct Lab {
    gen_ns: Netns,
    lb: Netns,
    sink: Netns,
    /// The balancer's veths (unique names: the NAPI kthread is found by name).
    lbc: String,
    lbs: String,
}

impl Lab {
    fn up() -> Lab {
        let (gen_ns, lb, sink) = (
            Netns::new("pkgen"),
            Netns::new("pklb"),
            Netns::new("pksink"),
        );
        let id = std::process::id() % 100_000;
        let (lbc, lbs) = (format!("pkc{id}"), format!("pks{id}"));
        for (ns, inner, peer, peer_ns, inner_mac, peer_mac) in [
            (&gen_ns, "eth0", lbc.as_str(), &lb, GEN_MAC, LBC_MAC),
            (&sink, "eth0", lbs.as_str(), &lb, SINK_MAC, LBS_MAC),
        ] {
            ns.ip(&[
                "link",
                "add",
                inner,
                "type",
                "veth",
                "peer",
                "name",
                peer,
                "netns",
                peer_ns.name(),
            ]);
            ns.ip(&["link", "set", inner, "address", &mac(inner_mac), "up"]);
            peer_ns.ip(&["link", "set", peer, "address", &mac(peer_mac), "up"]);
        }
        gen_ns.ip(&["addr", "add", &format!("{CLIENT}/24"), "dev", "eth0"]);
        lb.ip(&["addr", "add", "10.0.0.1/24", "dev", &lbc]);
        lb.ip(&["addr", "add", &format!("{VIP}/32"), "dev", &lbc]);
        lb.ip(&["addr", "add", "10.1.0.1/24", "dev", &lbs]);
        lb.ip(&[
            "neigh",
            "replace",
            &CLIENT.to_string(),
            "lladdr",
            &mac(GEN_MAC),
            "dev",
            &lbc,
            "nud",
            "permanent",
        ]);
        for server in SERVERS {
            sink.ip(&["addr", "add", &format!("{server}/24"), "dev", "eth0"]);
            lb.ip(&[
                "neigh",
                "replace",
                &server.to_string(),
                "lladdr",
                &mac(SINK_MAC),
                "dev",
                &lbs,
                "nud",
                "permanent",
            ]);
        }
        lb.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"]);
        Lab {
            gen_ns,
            lb,
            sink,
            lbc,
            lbs,
        }
    }

    /// Runs the balancer's receive path in a kthread of its own (a veth has NAPI once
    /// XDP or GRO is on) and binds it to CPU 1; returns how many kthreads were bound.
    fn pin_balancer(&self) -> usize {
        // `ip netns exec` mounts the namespace's own /sys.
        let _ = Command::new("ip")
            .args(["netns", "exec", self.lb.name(), "sh", "-c"])
            .arg(format!("echo 1 > /sys/class/net/{}/threaded", self.lbc))
            .output();
        let out = Command::new("pgrep")
            .args(["-f", &format!("napi/{}-", self.lbc)])
            .output()
            .expect("pgrep");
        let pids: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .map(str::to_owned)
            .collect();
        for pid in &pids {
            let _ = Command::new("taskset").args(["-pc", "1", pid]).output();
        }
        pids.len()
    }
}

/// The servers' counter.
struct Sink {
    ebpf: Ebpf,
}

impl Sink {
    fn attach(lab: &Lab) -> Sink {
        let _inside = lab.sink.enter();
        let mut ebpf = Ebpf::load(SINK_OBJECT).expect("load sink");
        let program: &mut Xdp = ebpf.program_mut("sink").unwrap().try_into().unwrap();
        program.load().expect("sink verifies");
        program
            .attach("eth0", XdpMode::Driver)
            .expect("attach sink");
        Sink { ebpf }
    }

    fn received(&self) -> u64 {
        let m: PerCpuArray<_, u64> =
            PerCpuArray::try_from(self.ebpf.map("RECEIVED").unwrap()).unwrap();
        m.get(&0, 0).unwrap().iter().sum()
    }
}

/// The generator, loaded in the client's namespace.
struct Generator {
    ebpf: Ebpf,
    frame: Vec<u8>,
    ifindex: u32,
}

impl Generator {
    fn new(lab: &Lab) -> Generator {
        let _inside = lab.gen_ns.enter();
        let mut ebpf = Ebpf::load(PKTGEN_OBJECT).expect("load pktgen");
        // 54 bytes of headers and 6 of payload: a minimum-size Ethernet frame.
        let frame = Frame {
            src_mac: GEN_MAC,
            dst_mac: LBC_MAC,
            payload: vec![0; 6],
            ..Frame::tcp(CLIENT, FIRST_PORT as u16, VIP, 80, Tcp::Ack)
        }
        .build();
        {
            let mut flows: Array<_, u32> = Array::try_from(ebpf.map_mut("FLOWS").unwrap()).unwrap();
            flows.set(0, FIRST_PORT, 0).unwrap();
            flows.set(1, self::flows(), 0).unwrap();
            let mut words = [0u64; 7];
            for (i, word) in words.iter_mut().enumerate() {
                let mut bytes = [0u8; 8];
                let end = (i * 8 + 8).min(frame.len());
                bytes[..end - i * 8].copy_from_slice(&frame[i * 8..end]);
                *word = u64::from_ne_bytes(bytes);
            }
            let mut template: Array<_, [u64; 7]> =
                Array::try_from(ebpf.map_mut("TEMPLATE").unwrap()).unwrap();
            template.set(0, words, 0).unwrap();
        }
        let program: &mut Xdp = ebpf.program_mut("pktgen").unwrap().try_into().unwrap();
        program.load().expect("pktgen verifies");
        Generator {
            ebpf,
            frame,
            ifindex: ifindex_in(&lab.gen_ns, "eth0"),
        }
    }

    /// Sends `frames` frames from CPU 0; returns how long it took.
    fn send(&mut self, lab: &Lab, frames: u32) -> Duration {
        let _inside = lab.gen_ns.enter();
        pin_to_cpu(0);
        #[repr(C)]
        struct XdpMd {
            data: u32,
            data_end: u32,
            data_meta: u32,
            ingress_ifindex: u32,
            rx_queue_index: u32,
            egress_ifindex: u32,
        }
        let ctx = XdpMd {
            data: 0,
            data_end: self.frame.len() as u32,
            data_meta: 0,
            ingress_ifindex: self.ifindex,
            rx_queue_index: 0,
            egress_ifindex: 0,
        };
        // SAFETY: a plain repr(C) struct viewed as its bytes.
        let ctx = unsafe {
            std::slice::from_raw_parts((&ctx as *const XdpMd).cast::<u8>(), size_of::<XdpMd>())
        };
        let program: &Xdp = self.ebpf.program("pktgen").unwrap().try_into().unwrap();
        let started = Instant::now();
        program
            .test_run(TestRunOptions {
                data_in: Some(&self.frame),
                ctx_in: Some(ctx),
                repeat: frames,
                attrs: TestRunAttrs::new().xdp_live_frames(64),
                ..Default::default()
            })
            .expect("generate");
        started.elapsed()
    }
}

/// A program's own mean time per packet, as the kernel accounts it while run-time
/// statistics are on (they cost two clock reads a run, so they are on only for this
/// extra run, not while packets per second are measured).
fn program_cost(
    lab: &Lab,
    generator: &mut Generator,
    mut info: impl FnMut() -> aya::programs::ProgramInfo,
) -> f64 {
    let stats =
        aya::sys::enable_stats(aya::sys::Stats::RunTime).expect("enable BPF run-time statistics");
    let before = info();
    generator.send(lab, 2_000_000);
    let after = info();
    drop(stats);
    let runs = after.run_count().saturating_sub(before.run_count()).max(1);
    let ns = (after.run_time() - before.run_time()).as_nanos() as f64 / runs as f64;
    (ns * 10.0).round() / 10.0
}

fn ifindex_in(ns: &Netns, name: &str) -> u32 {
    let _inside = ns.enter();
    ifindex(name)
}

fn pin_to_cpu(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t with one bit set, for this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set);
    }
}

/// One setup's figure.
struct Figure {
    setup: &'static str,
    delivered_pps: f64,
    generated_pps: f64,
    delivered: u64,
}

fn measure(
    setup: &'static str,
    lab: &Lab,
    generator: &mut Generator,
    sink: &Sink,
    frames: u32,
) -> Figure {
    // Warm up: every flow seen once (flow entries, conntrack entries).
    generator.send(lab, flows() * 4);
    std::thread::sleep(Duration::from_millis(200));
    let pinned = lab.pin_balancer();
    let before = sink.received();
    let took = generator.send(lab, frames);
    // Frames still in the veths' rings arrive a moment later.
    std::thread::sleep(Duration::from_millis(200));
    let delivered = sink.received() - before;
    let figure = Figure {
        setup,
        delivered_pps: delivered as f64 / took.as_secs_f64(),
        generated_pps: frames as f64 / took.as_secs_f64(),
        delivered,
    };
    println!(
        "{}",
        json!({
            "bench": "packets",
            "setup": setup,
            "packets_per_second": figure.delivered_pps.round(),
            "generated_per_second": figure.generated_pps.round(),
            "sent": frames,
            "delivered": delivered,
            "seconds": (took.as_secs_f64() * 1000.0).round() / 1000.0,
            "flows": FLOWS,
            "balancer_kthreads_pinned": pinned,
        })
    );
    figure
}

fn main() -> ExitCode {
    let frames: u32 = std::env::args()
        .nth(1)
        .map(|n| n.parse().expect("frames: a number"))
        .unwrap_or(20_000_000);
    let lab = Lab::up();
    let sink = Sink::attach(&lab);
    let mut generator = Generator::new(&lab);
    let mut figures = Vec::new();

    let only = std::env::var("SETUPS").unwrap_or_default();
    let wanted = |setup: &str| only.is_empty() || only.split(',').any(|s| s == setup);
    // foobar-lb.
    if wanted("foobar-lb") {
        let _inside = lab.lb.enter();
        let mut dataplane = Dataplane::load(&LoadOptions::default()).expect("load the data plane");
        let (lbc, lbs) = (ifindex(&lab.lbc), ifindex(&lab.lbs));
        for (name, index) in [(&lab.lbc, lbc), (&lab.lbs, lbs)] {
            dataplane.add_tx_port(index).expect("tx port");
            dataplane.attach(name, XdpMode::Driver).expect("attach");
        }
        let mut balancer = Balancer::new(dataplane);
        let env = Environment::new(
            Topology::read_blocking().expect("routes"),
            &[(lbc, ROLE_CLIENT), (lbs, ROLE_BACKEND)],
            Settings::default(),
        );
        balancer.stage_environment(env);
        balancer
            .apply(&DesiredState {
                vips: vec![VipSpec {
                    name: "www".into(),
                    address: VIP.into(),
                    port: 80,
                    protocol: Protocol::Tcp,
                    scheduler: Scheduler::Maglev,
                    forwarding: Default::default(),
                    maglev_table_size: foobar_lb::schedule::DEFAULT_MAGLEV_SIZE,
                    hash: None,
                    hash_prefix_v4: 32,
                    hash_prefix_v6: 128,
                    backends: SERVERS
                        .iter()
                        .map(|&s| BackendSpec {
                            address: s.into(),
                            port: 8080,
                            weight: 1,
                        })
                        .collect(),
                    health_check: None,
                    on_backend_down: Default::default(),
                    acl: Default::default(),
                    new_flow_limit: None,
                }],
                ..Default::default()
            })
            .expect("apply");
        drop(_inside);
        figures.push(measure("foobar-lb", &lab, &mut generator, &sink, frames));
        let counters = balancer.dataplane().counters().expect("counters");
        let nonzero: serde_json::Map<String, serde_json::Value> = foobar_lb_common::Reason::ALL
            .iter()
            .filter(|r| counters.get(**r) > 0)
            .map(|r| (r.name().to_owned(), json!(counters.get(*r))))
            .collect();
        let ns = program_cost(&lab, &mut generator, || {
            balancer
                .dataplane()
                .program_mut()
                .expect("program")
                .info()
                .expect("info")
        });
        println!(
            "{}",
            json!({ "bench": "packets", "setup": "foobar-lb", "program_ns_per_packet": ns, "counters": nonzero })
        );
        // Dropping the balancer detaches its program.
    }

    // nftables DNAT: the kernel's forwarding path, with GRO taking the generator's
    // frames (a veth without XDP takes redirected frames only with GRO on).
    if wanted("nftables") {
        lab.lb.exec("ethtool", &["-K", &lab.lbc, "gro", "on"]);
        let rules = format!(
            "table ip fblb_pkts {{\n  chain pre {{\n    type nat hook prerouting priority dstnat;\n    \
             ip daddr {VIP} tcp dport 80 dnat to jhash ip saddr . tcp sport mod 2 map {{ 0 : {} . 8080, 1 : {} . 8080 }}\n  }}\n}}\n",
            SERVERS[0], SERVERS[1]
        );
        let file = std::env::temp_dir().join(format!("fblb-pkts-{}.nft", std::process::id()));
        std::fs::write(&file, rules).unwrap();
        lab.lb.exec("nft", &["-f", file.to_str().unwrap()]);
        figures.push(measure("nftables", &lab, &mut generator, &sink, frames / 4));
        lab.lb.exec("nft", &["delete", "table", "ip", "fblb_pkts"]);
        let _ = std::fs::remove_file(file);
    }

    // The control: forward only.
    if wanted("forward") {
        let _inside = lab.lb.enter();
        let mut ebpf = Ebpf::load(FORWARD_OBJECT).expect("load forward");
        let lbs = ifindex(&lab.lbs);
        {
            let mut target: Array<_, [u8; 16]> =
                Array::try_from(ebpf.map_mut("TARGET").unwrap()).unwrap();
            let mut value = [0u8; 16];
            value[4..10].copy_from_slice(&SINK_MAC);
            value[10..16].copy_from_slice(&LBS_MAC);
            target.set(0, value, 0).unwrap();
            let mut egress: DevMap<_> = DevMap::try_from(ebpf.map_mut("EGRESS").unwrap()).unwrap();
            egress.set(0, lbs, None, 0).unwrap();
        }
        let program: &mut Xdp = ebpf.program_mut("forward").unwrap().try_into().unwrap();
        program.load().expect("forward verifies");
        program
            .attach(&lab.lbc, XdpMode::Driver)
            .expect("attach forward");
        drop(_inside);
        figures.push(measure("forward", &lab, &mut generator, &sink, frames));
        let ns = program_cost(&lab, &mut generator, || {
            let program: &Xdp = ebpf.program("forward").unwrap().try_into().unwrap();
            program.info().expect("info")
        });
        println!(
            "{}",
            json!({ "bench": "packets", "setup": "forward", "program_ns_per_packet": ns })
        );
    }

    let pps = |setup: &str| {
        figures
            .iter()
            .find(|f| f.setup == setup)
            .map(|f| f.delivered_pps)
            .unwrap_or(f64::NAN)
    };
    let ratio = |a: f64, b: f64| (a / b * 100.0).round() / 100.0;
    println!(
        "{}",
        json!({
            "bench": "packets",
            "foobar_lb_over_nftables": ratio(pps("foobar-lb"), pps("nftables")),
            "target_over_nftables": 3.0,
            "foobar_lb_over_forward": ratio(pps("foobar-lb"), pps("forward")),
            "target_over_forward": 0.8,
        })
    );
    let lost = figures.iter().any(|f| f.delivered == 0);
    drop(lab);
    if lost {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

//! The forwarding modes end to end: real curl from the lab's client (IPv4 and IPv6)
//! through each mode to the lab's web servers, DSR backends running `foobar-lb decap`
//! and answering clients through a router beside the balancer, a full-NAT VIP used
//! from the backends' own network, uploads bigger than the path MTU, and pings of
//! VIPs answered by the balancer.

use std::{path::Path, process::Child, time::Duration};

use foobar_lab::{
    lab::{
        DATAPLANE_INTERFACES, LB_SERVER_IF, Lab, LabSpec, ROUTER_SERVER_SIDE, ROUTER_SERVER_SIDE6,
        WEB_PORT, vip_addr, vip_addr6, web_addr, web_addr6,
    },
    netns::Netns,
    process::{bin, spawn_logged, terminate, wait_until},
};
use tests::e2e::{counter, json, one_at_a_time};

/// Which VIP address each mode uses (IPv4 and IPv6 alike): `vip_addr(i)`.
const NAT: u8 = 0;
const DSR_IPIP: u8 = 1;
const DSR_GUE: u8 = 2;
const FULLNAT: u8 = 3;

/// A VIP's `[[vips]]` section over both web servers of its family on `backend_port`.
fn vip(name: &str, mode: &str, index: u8, ipv6: bool, port: u16, backend_port: u16) -> String {
    let (address, backends): (String, Vec<String>) = if ipv6 {
        (
            vip_addr6(index).to_string(),
            (0..2).map(|i| web_addr6(i).to_string()).collect(),
        )
    } else {
        (
            vip_addr(index).to_string(),
            (0..2).map(|i| web_addr(i).to_string()).collect(),
        )
    };
    let backends: Vec<String> = backends
        .iter()
        .map(|a| format!("{{ address = \"{a}\", port = {backend_port} }}"))
        .collect();
    format!(
        "\n[[vips]]\nname = \"{name}\"\naddress = \"{address}\"\nport = {port}\nforwarding = \"{mode}\"\n\
         backends = [{}]\n",
        backends.join(", ")
    )
}

/// The balancer's config: the lab's interfaces (the servers' side with both roles
/// when `servers_are_clients`) and these VIPs.
fn config(servers_are_clients: bool, vips: &[String]) -> String {
    let interfaces = if servers_are_clients {
        "[{ name = \"eth-client\", role = \"client\" }, \"eth-servers\"]".to_owned()
    } else {
        DATAPLANE_INTERFACES.to_owned()
    };
    format!(
        "[dataplane]\ninterfaces = {interfaces}\nxdp_mode = \"native\"\n{}",
        vips.concat()
    )
}

/// `curl` from `ns`; the body, or None.
fn curl(ns: &Netns, url: &str, extra: &[&str]) -> Option<String> {
    let out = ns
        .command("curl")
        .args(["-sf", "-m", "5", "-g"])
        .args(extra)
        .arg(url)
        .output()
        .expect("run curl");
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Runs `foobar-lb decap` on every web server for the DSR VIPs, and sends their
/// replies from those VIPs to the clients through the router, not the balancer
/// (policy routing by source, as LVS-DR backends do).
fn dsr_backends(lab: &Lab) -> Vec<Child> {
    let dsr = [DSR_IPIP, DSR_GUE];
    let mut children = Vec::new();
    for (i, web) in lab.webs.iter().enumerate() {
        for v in dsr {
            web.ip(&[
                "rule",
                "add",
                "from",
                &vip_addr(v).to_string(),
                "lookup",
                "100",
            ]);
            web.ip(&[
                "-6",
                "rule",
                "add",
                "from",
                &vip_addr6(v).to_string(),
                "lookup",
                "100",
            ]);
        }
        web.ip(&[
            "route",
            "add",
            "default",
            "via",
            &ROUTER_SERVER_SIDE.to_string(),
            "table",
            "100",
        ]);
        let via6 = ROUTER_SERVER_SIDE6.to_string();
        web.ip(&[
            "-6", "route", "add", "default", "via", &via6, "table", "100",
        ]);
        let mut command = web.command(&bin(&lab.spec().bin_dir, "foobar-lb"));
        command.args(["decap", "--interface", "eth0"]);
        // The balancer's IPIP sources and its own addresses (GUE's source).
        for from in ["172.16.0.0/16", "100::/64", "10.1.0.0/24", "fd00:1::/64"] {
            command.args(["--from", from]);
        }
        for v in dsr {
            command.args(["--vip", &vip_addr(v).to_string()]);
            command.args(["--vip", &vip_addr6(v).to_string()]);
        }
        let log = decap_log(lab, i);
        children.push(spawn_logged(&mut command, &log));
        wait_until(Duration::from_secs(10), "decap to attach", || {
            std::fs::read_to_string(&log).is_ok_and(|l| l.contains("decapsulating"))
        });
    }
    children
}

fn decap_log(lab: &Lab, i: usize) -> std::path::PathBuf {
    lab.dir.join(format!("decap-{i}.log"))
}

/// Stops the decapsulators; the counters each printed (as JSON) on its way out.
fn stop_decap(lab: &Lab, children: Vec<Child>) -> Vec<serde_json::Value> {
    children
        .into_iter()
        .enumerate()
        .map(|(i, mut child)| {
            let status = terminate(&mut child);
            let log = std::fs::read_to_string(decap_log(lab, i)).unwrap_or_default();
            assert!(status.success(), "decap {i} failed:\n{log}");
            let line = log
                .lines()
                .find(|l| l.starts_with("{\"decap\""))
                .unwrap_or_else(|| panic!("no counters in:\n{log}"));
            serde_json::from_str(line).expect("counters JSON")
        })
        .collect()
}

/// A VIP's traffic counters from `stats`.
fn vip_stats(lab: &Lab, name: &str) -> serde_json::Value {
    let stats = json(lab, &["stats"]);
    stats["vips"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == name)
        .unwrap_or_else(|| panic!("no VIP {name} in {stats}"))
        .clone()
}

fn lab_with_router(tag: &str, config_text: &str) -> Lab {
    let mut lab = Lab::up(LabSpec {
        router: true,
        ..LabSpec::for_test(tag, 2)
    });
    lab.write_config(config_text);
    lab.start_agent();
    lab
}

#[test]
fn every_mode_serves_real_clients_in_both_families() {
    let _turn = one_at_a_time();
    let mut vips = Vec::new();
    for (ipv6, family) in [(false, "4"), (true, "6")] {
        vips.push(vip(&format!("nat{family}"), "nat", NAT, ipv6, 80, WEB_PORT));
        vips.push(vip(
            &format!("fullnat{family}"),
            "fullnat",
            FULLNAT,
            ipv6,
            80,
            WEB_PORT,
        ));
        // DSR cannot change the port: the VIP's is the servers'.
        vips.push(vip(
            &format!("ipip{family}"),
            "dsr-ipip",
            DSR_IPIP,
            ipv6,
            WEB_PORT,
            WEB_PORT,
        ));
        vips.push(vip(
            &format!("gue{family}"),
            "dsr-gue",
            DSR_GUE,
            ipv6,
            WEB_PORT,
            WEB_PORT,
        ));
    }
    let lab = lab_with_router("modes", &config(false, &vips));
    let decap = dsr_backends(&lab);
    for (name, index, port) in [
        ("nat", NAT, 80),
        ("fullnat", FULLNAT, 80),
        ("ipip", DSR_IPIP, WEB_PORT),
        ("gue", DSR_GUE, WEB_PORT),
    ] {
        for (family, url) in [
            ("4", format!("http://{}:{port}/", vip_addr(index))),
            ("6", format!("http://[{}]:{port}/", vip_addr6(index))),
        ] {
            // Round robin over two servers: two connections, both answer.
            let mut answers: Vec<String> = (0..2)
                .map(|_| {
                    curl(&lab.client, &url, &[])
                        .unwrap_or_else(|| panic!("{name}{family}: no answer from {url}"))
                })
                .collect();
            answers.sort();
            assert_eq!(answers, ["web1", "web2"], "{name}{family}");
            let stats = vip_stats(&lab, &format!("{name}{family}"));
            assert!(stats["packets"].as_u64().unwrap() > 0, "{stats}");
            let replies = stats["reply_packets"].as_u64().unwrap();
            if name.starts_with("ipip") || name.starts_with("gue") {
                // The servers answered the client through the router.
                assert_eq!(replies, 0, "{name}{family}: the balancer saw replies");
            } else {
                assert!(replies > 0, "{name}{family}: {stats}");
            }
        }
    }
    assert!(counter(&lab, "fullnat") > 0);
    assert!(counter(&lab, "encap_ipip") > 0);
    assert!(counter(&lab, "encap_gue") > 0);
    let decapsulated = stop_decap(&lab, decap);
    for (name, kind) in [("ipip", "decapsulated_ipip"), ("gue", "decapsulated_gue")] {
        let total: u64 = decapsulated
            .iter()
            .map(|d| d["decap"][kind].as_u64().unwrap())
            .sum();
        assert!(total > 0, "{name}: {decapsulated:?}");
    }
    // What decap changed on the servers is put back.
    for web in &lab.webs {
        assert!(
            !web.ip(&["addr", "show", "dev", "lo"])
                .contains(&vip_addr(DSR_IPIP).to_string())
        );
    }
}

#[test]
fn a_full_nat_vip_serves_a_client_on_its_backends_own_network() {
    let _turn = one_at_a_time();
    // Both VIPs over web2 alone; web1 is the client, a neighbour of its backend.
    let only_web2 = |name: &str, mode: &str, index: u8, ipv6: bool| {
        let (address, backend) = if ipv6 {
            (format!("{}", vip_addr6(index)), web_addr6(1).to_string())
        } else {
            (format!("{}", vip_addr(index)), web_addr(1).to_string())
        };
        format!(
            "\n[[vips]]\nname = \"{name}\"\naddress = \"{address}\"\nport = 80\nforwarding = \"{mode}\"\n\
             backends = [{{ address = \"{backend}\", port = {WEB_PORT} }}]\n"
        )
    };
    let vips = vec![
        only_web2("fullnat4", "fullnat", FULLNAT, false),
        only_web2("fullnat6", "fullnat", FULLNAT, true),
        only_web2("nat4", "nat", NAT, false),
    ];
    let mut lab = Lab::up(LabSpec::for_test("samenet", 2));
    lab.write_config(&config(true, &vips));
    lab.start_agent();
    let web1 = &lab.webs[0];
    assert_eq!(
        curl(web1, &format!("http://{}/", vip_addr(FULLNAT)), &[]).as_deref(),
        Some("web2")
    );
    assert_eq!(
        curl(web1, &format!("http://[{}]/", vip_addr6(FULLNAT)), &[]).as_deref(),
        Some("web2")
    );
    // The same through NAT: web2 answers web1 directly, from its own address, and
    // web1 drops it. This is the case full NAT exists for.
    assert_eq!(
        curl(web1, &format!("http://{}/", vip_addr(NAT)), &["-m", "2"]),
        None
    );
    // The client network is served as ever.
    assert_eq!(
        curl(&lab.client, &format!("http://{}/", vip_addr(FULLNAT)), &[]).as_deref(),
        Some("web2")
    );
}

/// An upload sink on each web server: reads a PUT body whole, answers with its size.
const UPLOAD_SINK: &str = r#"
import socket, sys, threading
port, name = int(sys.argv[1]), sys.argv[2]
s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.bind(("::", port))
s.listen(64)
def serve(c):
    with c:
        buf = b""
        while b"\r\n\r\n" not in buf:
            data = c.recv(65536)
            if not data:
                return
            buf += data
        head, body = buf.split(b"\r\n\r\n", 1)
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        got = len(body)
        while got < length:
            data = c.recv(65536)
            if not data:
                break
            got += len(data)
        msg = ("received %d by %s\n" % (got, name)).encode()
        c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(msg) + msg)
print("listening", flush=True)
while True:
    conn, _ = s.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"#;

const UPLOAD_PORT: u16 = 9000;

fn upload_sinks(lab: &Lab) -> Vec<Child> {
    lab.webs
        .iter()
        .enumerate()
        .map(|(i, web)| {
            let log = lab.dir.join(format!("sink-{i}.log"));
            let child = spawn_logged(
                web.command("python3").args([
                    "-c",
                    UPLOAD_SINK,
                    &UPLOAD_PORT.to_string(),
                    &format!("web{}", i + 1),
                ]),
                &log,
            );
            wait_until(Duration::from_secs(10), "the upload sink", || {
                std::fs::read_to_string(&log).is_ok_and(|l| l.contains("listening"))
            });
            child
        })
        .collect()
}

/// `curl -T` of `size` bytes to `url` from the client: the sink's answer.
fn upload(lab: &Lab, url: &str, size: usize, file: &Path) -> String {
    if !file.exists() {
        std::fs::write(file, vec![b'u'; size]).expect("upload file");
    }
    let file = file.display().to_string();
    // No "Expect: 100-continue": the body goes at once.
    curl(&lab.client, url, &["-T", &file, "-H", "Expect:"]).unwrap_or_else(|| {
        panic!(
            "upload to {url} failed; the balancer's counters: {}",
            tests::e2e::json(lab, &["stats"])
        )
    })
}

#[test]
fn uploads_bigger_than_the_path_mtu_get_through_in_every_mode() {
    let _turn = one_at_a_time();
    let vips = vec![
        vip("nat4", "nat", NAT, false, UPLOAD_PORT, UPLOAD_PORT),
        vip(
            "fullnat6",
            "fullnat",
            FULLNAT,
            true,
            UPLOAD_PORT,
            UPLOAD_PORT,
        ),
        vip(
            "ipip4",
            "dsr-ipip",
            DSR_IPIP,
            false,
            UPLOAD_PORT,
            UPLOAD_PORT,
        ),
        vip(
            "ipip6",
            "dsr-ipip",
            DSR_IPIP,
            true,
            UPLOAD_PORT,
            UPLOAD_PORT,
        ),
        vip("gue4", "dsr-gue", DSR_GUE, false, UPLOAD_PORT, UPLOAD_PORT),
        vip("gue6", "dsr-gue", DSR_GUE, true, UPLOAD_PORT, UPLOAD_PORT),
    ];
    let lab = lab_with_router("pmtu", &config(false, &vips));
    // DSR: the outer header makes a full-size segment too big for the servers'
    // 1500 bytes. NAT: the balancer's server side is made narrower than the servers
    // think (they advertise a 1460-byte MSS).
    lab.lb().ip(&["link", "set", LB_SERVER_IF, "mtu", "1400"]);
    let decap = dsr_backends(&lab);
    let sinks = upload_sinks(&lab);
    let file = lab.dir.join("upload.bin");
    let size = 2 * 1024 * 1024;
    for url in [
        format!("http://{}:{UPLOAD_PORT}/", vip_addr(NAT)),
        format!("http://[{}]:{UPLOAD_PORT}/", vip_addr6(FULLNAT)),
        format!("http://{}:{UPLOAD_PORT}/", vip_addr(DSR_IPIP)),
        format!("http://[{}]:{UPLOAD_PORT}/", vip_addr6(DSR_IPIP)),
        format!("http://{}:{UPLOAD_PORT}/", vip_addr(DSR_GUE)),
        format!("http://[{}]:{UPLOAD_PORT}/", vip_addr6(DSR_GUE)),
    ] {
        let answer = upload(&lab, &url, size, &file);
        let _ = &lab;
        assert!(
            answer.starts_with(&format!("received {size} by web")),
            "{url}: {answer}"
        );
    }
    // The balancer told the client what fits, and the client believed it.
    assert!(counter(&lab, "icmp_too_big") > 0);
    let cached = lab
        .client
        .ip(&["-6", "route", "get", &vip_addr6(DSR_GUE).to_string()]);
    assert!(cached.contains("mtu"), "no path MTU learnt: {cached}");
    for mut sink in sinks {
        terminate(&mut sink);
    }
    stop_decap(&lab, decap);
}

#[test]
fn a_ping_of_a_vip_is_answered_by_the_balancer() {
    let _turn = one_at_a_time();
    let vips = vec![
        vip("nat4", "nat", NAT, false, 80, WEB_PORT),
        vip("nat6", "nat", NAT, true, 80, WEB_PORT),
    ];
    let mut lab = Lab::up(LabSpec::for_test("ping", 2));
    lab.write_config(&config(false, &vips));
    lab.start_agent();
    for (flag, address) in [
        ("-4", vip_addr(NAT).to_string()),
        ("-6", vip_addr6(NAT).to_string()),
    ] {
        let out = lab
            .client
            .command("ping")
            .args([flag, "-c", "3", "-i", "0.2", "-W", "2", &address])
            .output()
            .expect("run ping");
        assert!(
            out.status.success(),
            "ping {address}: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            json(&lab, &["stats"])
        );
    }
    assert_eq!(
        counter(&lab, "icmp_echo_reply"),
        6,
        "answered in XDP, not by the kernel"
    );
}

//! Edge protection through the lab: a VIP address closed to all but its VIP ports, a
//! malformed frame from the client reaching the program, access lists changed live
//! (an open connection cut when its source is kept out), and a source over its
//! new-flow limit cut while another is not.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    process::Stdio,
    time::Duration,
};

use tests::{
    e2e::{counter, json, one_at_a_time},
    http::{connect_from, get},
    lab::{
        CLIENT, DATAPLANE_INTERFACES, LB_CLIENT_IF, LB_CLIENT_SIDE, Lab, LabSpec, VIP, WEB_PORT,
        web_addr,
    },
    process::{spawn_logged, terminate, wait_until},
};

/// A second address of the client namespace: another source.
const OTHER_CLIENT: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 3);
/// How long a connection that should fail is given.
const REFUSED_WITHIN: Duration = Duration::from_millis(300);

fn config(vip_extra: &str, edge: &str) -> String {
    let backends: Vec<String> = (0..2)
        .map(|i| format!("{{ address = \"{}\", port = {WEB_PORT} }}", web_addr(i)))
        .collect();
    format!(
        "[dataplane]\ninterfaces = {DATAPLANE_INTERFACES}\nxdp_mode = \"native\"\n\n{edge}\n\n\
         [[vips]]\nname = \"www\"\naddress = \"{VIP}\"\nport = 80\nbackends = [{}]\n{vip_extra}\n",
        backends.join(", ")
    )
}

fn lab(tag: &str, config_text: &str) -> Lab {
    let mut lab = Lab::up(LabSpec::for_test(tag, 2));
    lab.client
        .ip(&["addr", "add", &format!("{OTHER_CLIENT}/24"), "dev", "eth0"]);
    lab.write_config(config_text);
    lab.start_agent();
    lab
}

/// Whether a TCP connection from `from` to the VIP's `port` opens.
fn opens(lab: &Lab, from: Ipv4Addr, port: u16) -> bool {
    let from = SocketAddrV4::new(from, 0);
    connect_from(
        &lab.client,
        from,
        SocketAddrV4::new(VIP, port),
        REFUSED_WITHIN,
    )
    .is_ok()
}

/// One request from `from` on a new connection.
fn request_from(lab: &Lab, from: Ipv4Addr) -> std::io::Result<String> {
    let to = SocketAddrV4::new(VIP, 80);
    let mut stream = connect_from(&lab.client, SocketAddrV4::new(from, 0), to, REFUSED_WITHIN)?;
    get(&mut stream)
}

/// A keep-alive connection from the client's first address, one request answered.
fn held_open(lab: &Lab) -> std::net::TcpStream {
    let to = SocketAddrV4::new(VIP, 80);
    let from = SocketAddrV4::new(CLIENT, 0);
    let mut held = connect_from(&lab.client, from, to, Duration::from_secs(2)).expect("connect");
    get(&mut held).expect("first answer");
    held
}

#[test]
fn a_vip_address_shows_only_its_vip_ports_and_malformed_frames_reach_the_program() {
    let _turn = one_at_a_time();
    let lab = lab("edge-closed", &config("", ""));
    // A service of the balancer itself, listening on every address (as sshd does).
    let mut own = spawn_logged(
        lab.balancer()
            .ns
            .command("python3")
            .args(["-m", "http.server", "2222", "--bind", "0.0.0.0"])
            .stdout(Stdio::null()),
        &lab.dir.join("own-service.log"),
    );
    wait_until(
        Duration::from_secs(10),
        "the balancer's own service",
        || {
            lab.balancer()
                .ns
                .exec("ss", &["-Hltn", "sport = :2222"])
                .contains("2222")
        },
    );

    // A scan of the VIP address: only the VIP's port answers.
    let scanned = [22, 80, 443, 2222, 8080, 9100];
    let open: Vec<u16> = scanned
        .into_iter()
        .filter(|&port| opens(&lab, CLIENT, port))
        .collect();
    assert_eq!(open, vec![80], "ports open on the VIP address");
    assert!(counter(&lab, "drop_closed_address") >= 5);
    // The balancer's own address still reaches its own service.
    let own_address = SocketAddrV4::new(LB_CLIENT_SIDE, 2222);
    assert!(
        connect_from(
            &lab.client,
            SocketAddrV4::new(CLIENT, 0),
            own_address,
            Duration::from_secs(2)
        )
        .is_ok(),
        "the balancer's own address must stay reachable"
    );

    // Open, as before edge protection: the service answers through the VIP address.
    lab.write_config(&config(
        "",
        &format!("[edge]\nopen_addresses = [\"{VIP}\"]"),
    ));
    lab.cli_ok(&["reload"]);
    assert!(
        opens(&lab, CLIENT, 2222),
        "an open address passes other ports"
    );
    terminate(&mut own);

    // A frame with an IPv4 header length of 4 words, sent raw from the client: the
    // lab's switch hands it on as it is, and the program drops and counts it.
    let before = counter(&lab, "drop_bad_ihl");
    let mac = lab
        .balancer()
        .ns
        .exec("cat", &[&format!("/sys/class/net/{LB_CLIENT_IF}/address")]);
    let script = "import socket, sys\n\
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)\n\
        s.bind(('eth0', 0))\n\
        dst = bytes.fromhex(sys.argv[1].strip().replace(':', ''))\n\
        src = bytes.fromhex(open('/sys/class/net/eth0/address').read().strip().replace(':', ''))\n\
        frame = dst + src + b'\\x08\\x00' + bytes([0x44]) + bytes(45)\n\
        for _ in range(10): s.send(frame)\n";
    lab.client.exec("python3", &["-c", script, mac.trim()]);
    wait_until(
        Duration::from_secs(5),
        "the malformed frames counted",
        || counter(&lab, "drop_bad_ihl") >= before + 10,
    );
}

#[test]
fn access_lists_change_live_and_cut_open_connections() {
    let _turn = one_at_a_time();
    let lab = lab(
        "edge-acl",
        &config(&format!("acl = {{ allow = [\"{CLIENT}/32\"] }}"), ""),
    );
    // The allow list lets the client in, and keeps the other address out.
    assert!(request_from(&lab, CLIENT).is_ok());
    assert!(request_from(&lab, OTHER_CLIENT).is_err());
    assert!(counter(&lab, "drop_acl") > 0);

    // A connection held open while the lists change.
    let mut held = held_open(&lab);

    // Let the other address in live: the held connection goes on.
    lab.cli_ok(&[
        "acl",
        "add",
        "allow",
        &format!("{OTHER_CLIENT}/32"),
        "--vip",
        "www",
    ]);
    assert!(request_from(&lab, OTHER_CLIENT).is_ok());
    get(&mut held).expect("the held connection, after an unrelated change");

    // A bad prefix is refused, naming it, and changes nothing.
    let before = json(&lab, &["acl", "list"]);
    let refused = lab.cli(&["acl", "add", "deny", "10.0.0.1/8", "--vip", "www"]);
    assert!(!refused.status.success());
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(said.contains("10.0.0.1/8"), "{said}");
    let rules = |v: &serde_json::Value| -> Vec<(String, String, String)> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|r| {
                let s = |k: &str| r[k].as_str().unwrap().to_owned();
                (s("list"), s("action"), s("prefix"))
            })
            .collect()
    };
    assert_eq!(rules(&json(&lab, &["acl", "list"])), rules(&before));

    // The global list keeps the client out: its open connection is cut at once.
    lab.cli_ok(&["acl", "add", "deny", &format!("{CLIENT}/32")]);
    assert!(
        get(&mut held).is_err(),
        "a denied source's open connection must stop"
    );
    assert!(request_from(&lab, CLIENT).is_err());
    assert!(request_from(&lab, OTHER_CLIENT).is_ok());

    // Each rule counts what it decided, in `acl list`, `stats` and /metrics alike.
    let listed = json(&lab, &["acl", "list"]);
    let global_deny = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["list"] == "global")
        .expect("the global rule");
    assert_eq!(global_deny["action"], "deny");
    assert!(global_deny["packets"].as_u64().unwrap() > 0);
    let stats = json(&lab, &["stats"]);
    assert_eq!(stats["acl"].as_array().unwrap().len(), 3);

    // Removed, the client is back.
    lab.cli_ok(&["acl", "remove", &format!("{CLIENT}/32")]);
    assert!(request_from(&lab, CLIENT).is_ok());
    let missing = lab.cli(&["acl", "remove", "192.0.2.0/24"]);
    assert!(!missing.status.success());
}

#[test]
fn a_source_over_its_new_flow_limit_is_cut_and_others_are_not() {
    let _turn = one_at_a_time();
    let lab = lab(
        "edge-limit",
        &config("new_flow_limit = { rate = 1, burst = 3 }", ""),
    );
    // An established connection of the limited source, opened first.
    let mut held = held_open(&lab);

    let (mut accepted, mut refused) = (0, 0);
    for i in 0..20 {
        if opens(&lab, CLIENT, 80) {
            accepted += 1;
        } else {
            refused += 1;
        }
        // Another source, within its own limit, is not cut by this one's flows.
        if i % 5 == 0 {
            assert!(
                request_from(&lab, OTHER_CLIENT).is_ok(),
                "the other source was cut"
            );
        }
        // Established flows are never limited.
        get(&mut held).expect("the limited source's established connection");
    }
    eprintln!("limited source: {accepted} connections accepted, {refused} refused");
    assert!(refused >= 5, "{refused} refused of 20");
    assert!(accepted >= 2, "{accepted} accepted of 20");
    assert!(counter(&lab, "drop_source_limit") >= refused);
}

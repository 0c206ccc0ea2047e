//! The servers' host firewalls in the stack lab. Each node of a server (web,
//! application, database) keeps the rules of its role in an nftables table of its own;
//! every forbidden path is refused (dropped: the connection times out rather than
//! meeting a reset, and the refusing rule's counter grows), every allowed path still
//! works, and a node stopped cleanly takes its table away while the others keep the
//! host closed.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    thread,
    time::Duration,
};

use serde_json::Value;
use socket2::{Domain, Socket, Type};
use tests::{
    e2e::{counter, json, one_at_a_time},
    lab::{Lab, LabSpec, web_addr, web_addr6},
    netns::Netns,
    process::wait_until,
    stack::{
        APP_PORT, DB_AGENT_PORT, DB_PORT, DB_SCHEMA, FIREWALL_TABLES, HTTPS_PORT, SERVER_PORTS,
        SITE, db_write_vip,
    },
};

/// Long enough for an answer across the lab (about a millisecond), far too short for
/// a retransmitted SYN (the first after one second): a timeout is a drop.
const DROP_TIMEOUT: Duration = Duration::from_millis(1000);

/// What the client scans on server1: the usual suspects and the stack's own ports,
/// all but the site's two (the NAT VIPs bring clients to those with their own
/// addresses, so a server cannot tell a direct connection there from one through
/// the VIP: keeping clients off the server network is the balancer's, the gateway's).
const SCANNED: [u16; 38] = [
    21, 22, 23, 25, 53, 110, 111, 135, 139, 143, 389, 445, 465, 587, 631, 993, 995, 1433, 1521,
    2049, 2375, 3000, 3306, 3389, 5000, 5432, 5900, 6379, 8000, 8080, 8306, 8443, 8888, 9000, 9100,
    9200, 11211, 27017,
];

/// A stack lab with its balancer running and every server up on its VIPs.
fn stack_lab(tag: &str) -> Lab {
    let mut lab = Lab::up(LabSpec::stack_for_test(tag));
    lab.start_agent();
    lab.wait_for_backends_up();
    lab
}

/// A TCP connection from inside `ns` to `to`, from the address `from` if given, given
/// up after `timeout`: how it failed, if it did (`TimedOut`: no answer at all, dropped;
/// `ConnectionRefused`: a reset, the packet reached the host and no socket took it).
fn connect(
    ns: &Netns,
    from: Option<IpAddr>,
    to: SocketAddr,
    timeout: Duration,
) -> Result<(), io::ErrorKind> {
    // A socket belongs to the namespace it was created in.
    let _inside = ns.enter();
    let attempt = || -> io::Result<()> {
        let socket = Socket::new(Domain::for_address(to), Type::STREAM, None)?;
        // Closed with a reset: nothing lingers on the server.
        socket.set_linger(Some(Duration::ZERO))?;
        if let Some(from) = from {
            socket.bind(&SocketAddr::new(from, 0).into())?;
        }
        socket.connect_timeout(&to.into(), timeout)
    };
    attempt().map_err(|e| e.kind())
}

/// What a dropped connection comes to.
const DROPPED: Result<(), io::ErrorKind> = Err(io::ErrorKind::TimedOut);

/// Every rule's counter of one server: (table, rule, packets), in each chain's order.
type Counters = Vec<(String, String, u64)>;

/// The (rule, packets) of table `inet <table>` in `ns`, from `nft -j list table`; none
/// when there is no such table.
fn table_counters(ns: &Netns, table: &str) -> Option<Vec<(String, u64)>> {
    let out = ns
        .command("nft")
        .args(["-j", "list", "table", "inet", table])
        .output()
        .expect("nft (nftables; cargo xtask setup installs it)");
    if !out.status.success() {
        return None;
    }
    let listing: Value = serde_json::from_slice(&out.stdout).expect("nft's JSON");
    let items = listing["nftables"].as_array().expect("an nftables list");
    Some(
        items
            .iter()
            .filter_map(|item| {
                let rule = item.get("rule")?;
                let counter = rule["expr"]
                    .as_array()?
                    .iter()
                    .find_map(|e| e.get("counter"))?;
                Some((
                    rule["comment"].as_str()?.to_owned(),
                    counter["packets"].as_u64()?,
                ))
            })
            .collect(),
    )
}

/// Every rule's counter of server `i`'s nodes' tables, each of which must be there.
fn counters(lab: &Lab, i: usize) -> Counters {
    FIREWALL_TABLES
        .iter()
        .flat_map(|&table| {
            let rules = table_counters(&lab.webs[i], table)
                .unwrap_or_else(|| panic!("{}: no table inet {table}", lab.server_name(i)));
            rules
                .into_iter()
                .map(move |(rule, packets)| (table.to_owned(), rule, packets))
        })
        .collect()
}

/// The packets of rule `rule` of table `table`.
fn packets(counters: &Counters, table: &str, rule: &str) -> u64 {
    counters
        .iter()
        .find(|(t, r, _)| t == table && r == rule)
        .map(|(_, _, p)| *p)
        .unwrap_or_else(|| panic!("no rule {rule:?} in table {table}: {counters:?}"))
}

/// The packets to closed ports: counted by whichever table saw them first.
fn closed(counters: &Counters) -> u64 {
    counters
        .iter()
        .filter(|(_, r, _)| r == "closed")
        .map(|(_, _, p)| p)
        .sum()
}

/// Checks that `attempt`, a connection `what`, is dropped by server `i`'s rule
/// `table`/`rule`: it times out, and the rule counted it.
fn assert_dropped(
    lab: &Lab,
    i: usize,
    (table, rule): (&str, &str),
    what: &str,
    attempt: impl FnOnce() -> Result<(), io::ErrorKind>,
) {
    let before = packets(&counters(lab, i), table, rule);
    let outcome = attempt();
    let after = packets(&counters(lab, i), table, rule);
    assert_eq!(outcome, DROPPED, "{what}: not dropped");
    assert!(
        after > before,
        "{what}: timed out, but {table}'s {rule:?} counted nothing ({before} → {after})"
    );
    println!("refused: {what} ({table} {rule:?}: {before} → {after})");
}

/// `GET url` from the balancer: the body. Over HTTPS the certificate, the site's, is
/// not checked against the server's address.
fn from_balancer(lab: &Lab, url: &str) -> String {
    let out = lab
        .lb()
        .command("curl")
        .args(["-skf", "-m", "2", url])
        .output()
        .expect("curl");
    assert!(
        out.status.success(),
        "{url}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn each_server_refuses_what_its_nodes_do_not_serve_and_the_site_still_works() {
    let _turn = one_at_a_time();
    let mut lab = stack_lab("firewall");
    let server1 = IpAddr::V4(web_addr(0));
    let at = |port: u16| SocketAddr::new(server1, port);
    let start = counters(&lab, 0);

    // Allowed: the page over HTTPS through the VIP, and an API write and read (a web
    // node, an application node, the write and read VIPs, MariaDB)...
    let page = lab.site_curl(&[
        "-f",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        &format!("https://{SITE}/"),
    ]);
    assert_eq!(
        String::from_utf8_lossy(&page.stdout),
        "200",
        "{}",
        String::from_utf8_lossy(&page.stderr)
    );
    let posted = lab
        .post_through_site("past every firewall", &[])
        .unwrap_or_else(|e| panic!("a post through the site: {e}"));
    let post: Value = serde_json::from_str(&posted).expect("the post, as JSON");
    let read = lab.site_curl(&["-f", &format!("https://{SITE}/api/posts/{}", post["id"])]);
    assert_eq!(
        serde_json::from_slice::<Value>(&read.stdout).ok().as_ref(),
        Some(&post),
        "{}",
        String::from_utf8_lossy(&read.stderr)
    );
    // ...and replication, straight from server2's database node to server1's MariaDB.
    let id = post["id"].as_u64().expect("an id");
    let query = format!("SELECT COUNT(*) FROM {DB_SCHEMA}.posts WHERE id = {id}");
    wait_until(Duration::from_secs(10), "the post on the replica", || {
        lab.db_sql(1, &query).is_ok_and(|n| n == "1")
    });

    // Refused: the client reaching server1's application node directly, over IPv4
    // and IPv6 (it is for the web nodes only)...
    assert_dropped(
        &lab,
        0,
        ("foobar_app", &format!("refuse {APP_PORT}")),
        "the client to server1's application node",
        || connect(&lab.client, None, at(APP_PORT), DROP_TIMEOUT),
    );
    assert_dropped(
        &lab,
        0,
        ("foobar_app", &format!("refuse {APP_PORT}")),
        "the client to server1's application node over IPv6",
        || {
            let to = SocketAddr::new(web_addr6(0).into(), APP_PORT);
            connect(&lab.client, None, to, DROP_TIMEOUT)
        },
    );
    // ...the client reaching MariaDB directly...
    assert_dropped(
        &lab,
        0,
        ("foobar_db", &format!("refuse {DB_PORT}")),
        "the client to server1's MariaDB",
        || connect(&lab.client, None, at(DB_PORT), DROP_TIMEOUT),
    );
    // ...and a web node reaching it. In the lab a server's web, application and
    // database nodes share one address, and server2's database node replicates from
    // server1 from exactly that address, which must pass (the unit of a rule is an
    // address). What the rule keeps out is a web server with an address of its own:
    // server2 takes one more, 10.1.0.21, for it, a server-network address that is
    // neither a balancer's nor a database node's.
    let web_only = IpAddr::V4(Ipv4Addr::new(10, 1, 0, 21));
    lab.webs[1].ip(&["addr", "add", "10.1.0.21/24", "dev", "eth0"]);
    assert_dropped(
        &lab,
        0,
        ("foobar_db", &format!("refuse {DB_PORT}")),
        "a web node (10.1.0.21) to server1's MariaDB",
        || connect(&lab.webs[1], Some(web_only), at(DB_PORT), DROP_TIMEOUT),
    );
    // Nor does it get there through the write VIP: behind its full NAT MariaDB sees
    // the balancer, so the VIP's access list, which names the application nodes only,
    // keeps everyone else out, the client too.
    let write_vip = SocketAddr::new(db_write_vip().into(), DB_PORT);
    for (what, ns, from) in [
        (
            "a web node (10.1.0.21) to the write VIP",
            &lab.webs[1],
            Some(web_only),
        ),
        ("the client to the write VIP", &lab.client, None),
    ] {
        let before = counter(&lab, "drop_acl");
        assert_eq!(
            connect(ns, from, write_vip, DROP_TIMEOUT),
            DROPPED,
            "{what}: not dropped"
        );
        let after = counter(&lab, "drop_acl");
        assert!(
            after > before,
            "{what}: the balancer's drop_acl counted nothing"
        );
        println!("refused: {what} (the balancer's drop_acl: {before} → {after})");
    }
    lab.webs[1].ip(&["addr", "del", "10.1.0.21/24", "dev", "eth0"]);

    // The client scanning server1: every port times out, none is even refused. The
    // closed ones count in "closed" (of whichever table saw them first), the nodes'
    // own ports in their "refuse" rules.
    let before = counters(&lab, 0);
    let outcomes: Vec<(u16, Result<(), io::ErrorKind>)> = thread::scope(|scope| {
        let scans: Vec<_> = SCANNED
            .iter()
            .map(|&port| {
                let client = &lab.client;
                scope.spawn(move || {
                    let timeout = Duration::from_millis(500);
                    (port, connect(client, None, at(port), timeout))
                })
            })
            .collect();
        scans
            .into_iter()
            .map(|s| s.join().expect("a scan"))
            .collect()
    });
    let answered: Vec<&(u16, Result<(), io::ErrorKind>)> = outcomes
        .iter()
        .filter(|(_, outcome)| *outcome != DROPPED)
        .collect();
    assert!(
        answered.is_empty(),
        "ports of server1 that answered the scan: {answered:?}"
    );
    let after = counters(&lab, 0);
    let closed_ports = SCANNED
        .iter()
        .filter(|&&p| !SERVER_PORTS.contains(&p))
        .count() as u64;
    assert!(
        closed(&after) - closed(&before) >= closed_ports,
        "{closed_ports} closed ports scanned, {} counted",
        closed(&after) - closed(&before)
    );
    for (table, port) in [
        ("foobar_app", APP_PORT),
        ("foobar_db", DB_PORT),
        ("foobar_db", DB_AGENT_PORT),
    ] {
        let rule = format!("refuse {port}");
        assert!(
            packets(&after, table, &rule) > packets(&before, table, &rule),
            "the scan of {port} not counted by {table}'s {rule:?}"
        );
    }
    println!(
        "the client's scan of {} ports of server1: all dropped ({} in \"closed\")",
        SCANNED.len(),
        closed(&after) - closed(&before)
    );

    // Still allowed, after all that: the balancer sees every backend up (its checks of
    // the web nodes and of the database agents), the application nodes answer it.
    lab.wait_for_backends_up();
    let status = json(&lab, &["status"]);
    for vip in status["vips"].as_array().expect("vips") {
        for backend in vip["backends"].as_array().expect("backends") {
            println!(
                "{:<8} {:<16} {}",
                vip["name"].as_str().unwrap_or("?"),
                backend["address"].as_str().unwrap_or("?"),
                backend["health"].as_str().unwrap_or("?")
            );
        }
    }
    // Every node shows its table's counters in its metrics.
    for (scheme, port, series) in [
        (
            "https",
            HTTPS_PORT,
            "foobar_web_firewall_packets_total{rule=\"refuse 443\"}",
        ),
        (
            "http",
            APP_PORT,
            "foobar_app_firewall_packets_total{rule=\"refuse 8000\"}",
        ),
        (
            "http",
            DB_AGENT_PORT,
            "foobar_db_firewall_packets_total{rule=\"refuse 3306\"}",
        ),
    ] {
        let url = format!("{scheme}://{}/metrics", at(port));
        let metrics = from_balancer(&lab, &url);
        assert!(
            metrics.contains(series),
            "{url} has no {series}:\n{metrics}"
        );
    }

    // Every rule's counter, from the lab's start to now; the allowed sources counted too.
    let end = counters(&lab, 0);
    println!("server1's firewall tables: packets per rule, from the lab's start to now");
    for (table, rule, now) in &end {
        let then = start
            .iter()
            .find(|(t, r, _)| t == table && r == rule)
            .map_or(0, |(_, _, p)| *p);
        println!("  {table:<11} {rule:<16} {then:>8} → {now:>8}");
    }
    for (table, what) in [
        ("foobar_web", "the balancer's checks and the clients"),
        ("foobar_app", "the balancer's requests"),
        ("foobar_db", "the balancer's checks and full NAT"),
    ] {
        assert!(
            packets(&end, table, "allow[0] ipv4") > packets(&start, table, "allow[0] ipv4"),
            "{table}'s \"allow[0] ipv4\" did not count {what}"
        );
    }

    // A clean stop removes the node's table; the others keep the host closed.
    lab.stop_web(0);
    assert!(
        table_counters(&lab.webs[0], "foobar_web").is_none(),
        "server1's web node stopped, its table is still there"
    );
    let before = counters_without_web(&lab);
    assert_eq!(
        connect(&lab.client, None, at(22), DROP_TIMEOUT),
        DROPPED,
        "a closed port of server1 with its web node stopped"
    );
    assert!(
        closed(&counters_without_web(&lab)) > closed(&before),
        "the application and database nodes' tables did not count the closed port"
    );
    // Started again, it writes its table again, and the site is whole.
    lab.start_web(0);
    assert!(table_counters(&lab.webs[0], "foobar_web").is_some());
    lab.wait_for_backends_up();
    let page = lab.site_curl(&["-f", "-o", "/dev/null", &format!("https://{SITE}/")]);
    assert!(
        page.status.success(),
        "{}",
        String::from_utf8_lossy(&page.stderr)
    );
}

/// Server1's counters while its web node is stopped: its application and database
/// nodes' tables.
fn counters_without_web(lab: &Lab) -> Counters {
    ["foobar_app", "foobar_db"]
        .into_iter()
        .flat_map(|table| {
            table_counters(&lab.webs[0], table)
                .unwrap_or_else(|| panic!("server1: no table inet {table}"))
                .into_iter()
                .map(move |(rule, packets)| (table.to_owned(), rule, packets))
        })
        .collect()
}

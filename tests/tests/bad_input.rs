//! Bad input is refused with a message a person can act on, and the running state
//! stays exactly as it was.

use std::{process::Command, time::Duration};

use tests::{
    e2e::{lab_with, one_at_a_time, running_state},
    lab::{Lab, WEB_PORT, default_config, vrrp_section, wait_until, web_addr},
};

/// Runs the CLI; returns (exit code, stderr).
fn refused(lab: &Lab, args: &[&str]) -> (i32, String) {
    let out = lab.cli(args);
    assert!(!out.status.success(), "{args:?} was accepted");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn malformed_cli_arguments_and_refused_changes_leave_the_state_alone() {
    let _turn = one_at_a_time();
    let lab = lab_with("badcli", 2, None);
    let before = running_state(&lab);
    let web1 = format!("{}:{WEB_PORT}", web_addr(0));
    // (arguments, exit code, words the message must contain)
    let cases: &[(&[&str], i32, &[&str])] = &[
        (
            &["backend", "add", "www", "10.1.0.300:80"],
            2,
            &["invalid value", "10.1.0.300:80"],
        ),
        (
            &["backend", "add", "www", &web1, "--weight", "300"],
            2,
            &["300", "0..=256"],
        ),
        (
            &["backend", "weight", "www", &web1, "-1"],
            2,
            &["unexpected argument"],
        ),
        (&["vip", "add", "x", "10.0.0.101"], 2, &["invalid value"]),
        (
            &["vip", "add", "x", "10.0.0.101:80", "--backend", "10.1.0.9"],
            2,
            &["not an address:port"],
        ),
        (&["explain", "www", "10.0.0.2"], 2, &["invalid value"]),
        (&["status", "-o", "yaml"], 2, &["possible values"]),
        (
            &["backend", "drain", "nosuch", &web1],
            1,
            &["no VIP named \"nosuch\"", "known: www"],
        ),
        (
            &["backend", "remove", "www", "10.1.0.99:8080"],
            1,
            &["10.1.0.99:8080 is not a backend of www"],
        ),
        (&["backend", "add", "www", &web1], 1, &["already a backend"]),
        (
            &["vip", "add", "dup", "10.0.0.100:80"],
            1,
            &["same address, port and protocol"],
        ),
        (
            &["vip", "add", "x", "10.0.0.101:80", "--backend", &web1],
            1,
            &["a backend endpoint serves one NAT VIP"],
        ),
        (
            &[
                "vip",
                "add",
                "x",
                "10.0.0.101:80",
                "--scheduler",
                "maglev",
                "--maglev-table-size",
                "1000",
            ],
            1,
            &["maglev_table_size"],
        ),
        (
            &[
                "vip",
                "add",
                "v6",
                "[2001:db8::1]:80",
                "--backend",
                "10.1.0.11:80",
            ],
            1,
            &["address family"],
        ),
        (
            &[
                "vip",
                "add",
                "dsr",
                "10.0.0.101:80",
                "--forwarding",
                "dsr-ipip",
                "--backend",
                "10.1.0.11:8080",
            ],
            1,
            &["VIP's port"],
        ),
        (
            &["vip", "add", "x", "10.0.0.102:80", "--forwarding", "tunnel"],
            2,
            &["tunnel"],
        ),
        (&["vip", "remove", "nosuch"], 1, &["no VIP named"]),
    ];
    for (args, code, words) in cases {
        let (got, message) = refused(&lab, args);
        assert_eq!(got, *code, "{args:?}: {message}");
        for w in *words {
            assert!(message.contains(w), "{args:?}: {message:?} lacks {w:?}");
        }
        assert_eq!(running_state(&lab), before, "{args:?} changed the state");
    }
    assert_eq!(lab.get().as_deref(), Some("web1"));
}

#[test]
fn bad_config_files_are_refused_on_reload_and_sighup() {
    let _turn = one_at_a_time();
    let lab = lab_with("badconf", 2, None);
    let before = running_state(&lab);
    let good = default_config(2, "rr");
    let cases: &[(String, &[&str])] = &[
        (
            good.replacen("weight = 1 }", "weight = 300 }", 1),
            &["vips[0].backends[0].weight", "above 256"],
        ),
        (
            good.replace("address = \"10.0.0.100\"", "address = 10.0.0.100"),
            &["line"],
        ),
        (
            good.replace("scheduler = \"rr\"", "scheduler = \"random\""),
            &["random"],
        ),
        (
            good.replace("name = \"www\"", "name = \"www\"\ncolour = \"red\""),
            &["colour"],
        ),
        (
            good.replace("\"eth-servers\"", "\"eth-client\""),
            &["dataplane.interfaces[1]", "listed twice"],
        ),
        (
            good.replace("\"eth-servers\"", "\"no-such-if\""),
            &["no-such-if", "no such interface"],
        ),
        (
            good.replace(
                "xdp_mode = \"native\"",
                "xdp_mode = \"native\"\nflow_capacity = 4096",
            ),
            &["dataplane.flow_capacity", "restart"],
        ),
        (
            format!("{good}[vips.health_check]\ninterval_ms = 5\n"),
            &["vips[0].health_check.interval_ms"],
        ),
        (
            format!("{good}[vips.health_check]\ntype = \"ping\"\n"),
            &["ping"],
        ),
        (
            good.clone() + &vrrp_section(150, true).replace("[\"10.0.0.100\"]", "[\"10.0.0.9\"]"),
            &[
                "vrrp.vips[0]",
                "10.0.0.9 is not the address of any [[vips]] entry",
            ],
        ),
        (
            good.clone() + &vrrp_section(255, true),
            &["vrrp.priority", "1..=254"],
        ),
        (
            good.clone()
                + &vrrp_section(150, true)
                    .replace("interface = \"eth-client\"", "interface = \"eth9\""),
            &["vrrp.interface", "dataplane.interfaces"],
        ),
        // Valid, but failover cannot start or stop under a running agent.
        (
            good.clone() + &vrrp_section(150, true),
            &["vrrp", "restart"],
        ),
        (String::new(), &["dataplane"]),
    ];
    for (text, words) in cases {
        lab.write_config(text);
        let (code, message) = refused(&lab, &["reload"]);
        assert_eq!(code, 1, "{message}");
        for w in *words {
            assert!(message.contains(w), "{message:?} lacks {w:?}");
        }
        assert_eq!(running_state(&lab), before, "{text}");
        assert!(
            lab.lb()
                .ip(&["link", "show", "eth-servers"])
                .contains("xdp"),
            "a refused reload detached an interface"
        );
    }
    // SIGHUP with a bad file: logged, refused, nothing changes.
    lab.write_config(&cases[0].0);
    // SAFETY: signalling our own child.
    unsafe { libc::kill(lab.agent_pid().expect("agent") as i32, libc::SIGHUP) };
    wait_until(Duration::from_secs(10), "the refusal in the log", || {
        lab.agent_log().contains("reload refused")
    });
    assert_eq!(running_state(&lab), before);
    let answers: Vec<_> = (0..2).map(|_| lab.get().expect("curl")).collect();
    assert_eq!(answers, ["web1", "web2"]);
}

#[test]
fn the_daemon_refuses_to_start_on_a_bad_config_and_says_why() {
    let _turn = one_at_a_time();
    let lab = Lab::up(tests::lab::LabSpec::for_test("badstart", 1));
    let good = default_config(1, "rr");
    let cases = [
        (
            good.replace("port = 80\n", "port = 0\n"),
            "vips[0].port: must be 1-65535",
        ),
        (
            good.clone() + &vrrp_section(150, true).replace("[\"10.0.0.100\"]", "[\"10.0.0.9\"]"),
            "vrrp.vips[0]: 10.0.0.9 is not the address of any [[vips]] entry",
        ),
    ];
    for (text, expected) in cases {
        lab.write_config(&text);
        let out = lab.agent_command(&[]).output().expect("run");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains(expected), "{stderr}");
        assert!(!lab.lb().ip(&["link", "show", "eth-client"]).contains("xdp"));
        assert!(!lab.socket().exists());
    }
}

#[test]
fn the_cli_says_when_the_daemon_is_absent_or_the_socket_is_roots() {
    let _turn = one_at_a_time();
    let lab = lab_with("access", 1, None);
    let bin = lab.spec().bin_dir.join("foobar-lb");
    let out = Command::new(&bin)
        .args(["--socket", "/nonexistent/foobar-lb.sock", "status"])
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr.contains("daemon is not running"), "{stderr}");
    assert!(stderr.contains("foobar-lb run --config"), "{stderr}");

    // As nobody, the 0600 socket is out of reach (its directory is world-readable).
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&bin)
        .arg("--socket")
        .arg(lab.socket())
        .arg("status")
        .output()
        .expect("run setpriv");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("permission denied"), "{stderr}");
    assert!(stderr.contains("sudo"), "{stderr}");

    // `run` as nobody is refused before it touches anything.
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&bin)
        .args(["--socket", "/tmp/never.sock", "run", "--config"])
        .arg(lab.config_path())
        .output()
        .expect("run setpriv");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("needs root"), "{stderr}");

    // A raw client sending garbage gets an error line, and the daemon lives on.
    use std::io::{BufRead, BufReader, Write};
    let mut raw = std::os::unix::net::UnixStream::connect(lab.socket()).expect("connect");
    raw.write_all(b"{\"op\":\"explode\"}\n").expect("write");
    let mut line = String::new();
    BufReader::new(&raw).read_line(&mut line).expect("read");
    assert!(line.contains("bad_request"), "{line}");
    assert!(lab.cli(&["status"]).status.success());
}

#[test]
fn completions_and_man_page_come_from_the_cli_definitions() {
    let bin = tests::lab::bin_dir_of_this_test().join("foobar-lb");
    let out = Command::new(&bin)
        .args(["completions", "bash"])
        .output()
        .expect("run");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    for word in ["foobar-lb", "backend", "drain", "explain", "--output"] {
        assert!(text.contains(word), "bash completion lacks {word}");
    }
    let out = Command::new(&bin).arg("man").output().expect("run");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with(".ie") || text.contains(".TH foobar-lb"),
        "{text}"
    );
    assert!(text.contains("reload"));
}

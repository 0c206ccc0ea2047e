//! Changes made through the CLI outlive a restart of the agent (the state file), a
//! reload makes the configuration file the truth again, and `foobar-lb save` writes
//! the running state as a configuration file that starts the same state.

use std::path::PathBuf;

use foobar_lb::config::Config;
use tests::{
    e2e::{json, lab_with, one_at_a_time, running_state, tally, vip},
    http::get_once,
    lab::{Lab, WEB_PORT, config, web_addr},
};

fn backend(i: usize) -> String {
    format!("{}:{WEB_PORT}", web_addr(i))
}

/// Where the lab's agent keeps its state (`run --state-file`, beside its config).
fn state_file(lab: &Lab) -> PathBuf {
    lab.config_path().with_file_name("state.json")
}

/// A backend of www as `status` shows it: address, weight, state.
type Row = (String, u64, String);

fn row(i: usize, weight: u64, state: &str) -> Row {
    (backend(i), weight, state.to_owned())
}

/// The backends of www, in order.
fn backends(lab: &Lab) -> Vec<Row> {
    let vips = running_state(lab);
    let www = vips
        .as_array()
        .expect("vips")
        .iter()
        .find(|v| v["name"] == "www")
        .unwrap_or_else(|| panic!("no VIP www: {vips}"));
    www["backends"]
        .as_array()
        .expect("backends")
        .iter()
        .map(|b| {
            (
                b["address"].as_str().expect("address").to_owned(),
                b["weight"].as_u64().expect("weight"),
                b["state"].as_str().expect("state").to_owned(),
            )
        })
        .collect()
}

/// The access-list rules: list, action, prefix.
fn acl(lab: &Lab) -> Vec<(String, String, String)> {
    json(lab, &["acl", "list"])
        .as_array()
        .expect("rules")
        .iter()
        .map(|r| {
            let field = |k: &str| r[k].as_str().expect(k).to_owned();
            (field("list"), field("action"), field("prefix"))
        })
        .collect()
}

/// Which server answered each of `n` new connections to the VIP.
fn answers(lab: &Lab, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| get_once(&lab.client, vip(), None).unwrap_or_else(|e| panic!("request {i}: {e}")))
        .collect()
}

#[test]
fn cli_changes_outlive_a_restart_until_a_reload() {
    let _turn = one_at_a_time();
    let mut lab = lab_with("persist", 3, Some(config("rr", &[(0, 1), (1, 1)])));
    let state = state_file(&lab);
    assert!(!state.exists(), "a state file before any change");

    // Before maintenance: web1 drained, web2 disabled, web3 added.
    lab.cli_ok(&["backend", "drain", "www", &backend(0)]);
    lab.cli_ok(&["backend", "disable", "www", &backend(1)]);
    lab.cli_ok(&["backend", "add", "www", &backend(2)]);
    let changed = vec![
        row(0, 0, "draining"),
        row(1, 1, "disabled"),
        row(2, 1, "active"),
    ];
    assert_eq!(backends(&lab), changed);
    assert!(state.exists(), "no state file after changes");

    lab.stop_agent();
    lab.start_agent();
    assert_eq!(backends(&lab), changed, "after a restart");
    assert_eq!(json(&lab, &["status"])["changed_since_reload"], true);
    let after = answers(&lab, 10);
    assert!(
        after.iter().all(|a| a == "web3"),
        "a drained or disabled backend got new connections after a restart: {after:?}"
    );
    let log = lab.agent_log();
    assert!(
        log.contains("applying again the changes made through the API"),
        "{log}"
    );
    assert!(
        log.contains(&format!("www {} weight 0 (file: 1)", backend(0))),
        "{log}"
    );

    // A reload makes the file the truth again: the drain and web3 go. The disable
    // stays (admin state: no file holds it), in the state file too.
    lab.cli_ok(&["reload"]);
    let reloaded = vec![row(0, 1, "active"), row(1, 1, "disabled")];
    assert_eq!(backends(&lab), reloaded, "after a reload");
    lab.stop_agent();
    lab.start_agent();
    assert_eq!(backends(&lab), reloaded, "after a reload and a restart");

    // Enabled again, the running state is the file's: no state file is kept.
    lab.cli_ok(&["backend", "enable", "www", &backend(1)]);
    assert!(!state.exists(), "a state file equal to the config file");
    lab.stop_agent();
    lab.start_agent();
    assert_eq!(
        backends(&lab),
        [row(0, 1, "active"), row(1, 1, "active")],
        "the file's state after a restart"
    );
    assert_eq!(json(&lab, &["status"])["changed_since_reload"], false);
    assert_eq!(tally(answers(&lab, 4)).len(), 2);
}

#[test]
fn a_saved_running_state_starts_as_the_same_state() {
    let _turn = one_at_a_time();
    let mut lab = lab_with("save", 3, Some(config("rr", &[(0, 1), (1, 1)])));
    lab.cli_ok(&["backend", "weight", "www", &backend(0), "0"]);
    lab.cli_ok(&["backend", "add", "www", &backend(2), "--weight", "2"]);
    lab.cli_ok(&["acl", "add", "deny", "192.0.2.0/24"]);
    let running = (backends(&lab), acl(&lab));
    assert_eq!(
        running.0,
        [
            row(0, 0, "draining"),
            row(1, 1, "active"),
            row(2, 2, "active")
        ]
    );

    // To stdout: a configuration file with the changes.
    let text = lab.cli_ok(&["save"]);
    let saved = Config::parse(&text).unwrap_or_else(|e| panic!("{e}:\n{text}"));
    assert_eq!(saved.vips[0].backends.len(), 3, "{text}");
    assert_eq!(saved.vips[0].backends[0].weight, 0, "{text}");
    assert_eq!(saved.edge.acl.deny.len(), 1, "{text}");

    // Over the agent's own file, then a restart. The file was edited since the state
    // was saved, so the file (now the saved state) wins and the state file goes.
    let config_file = lab.config_path();
    let out = lab.cli_ok(&["save", config_file.to_str().expect("a UTF-8 path")]);
    assert!(out.contains("saved 1 VIPs and 3 backends"), "{out}");
    let written = std::fs::read_to_string(&config_file).expect("the saved file");
    assert_eq!(written.trim_end(), text.trim_end());
    lab.stop_agent();
    lab.start_agent();
    let log = lab.agent_log();
    assert!(
        log.contains("the configuration file changed since the runtime state was saved"),
        "{log}"
    );
    assert!(!state_file(&lab).exists());
    assert_eq!(
        (backends(&lab), acl(&lab)),
        running,
        "started from the saved file"
    );
    assert_eq!(json(&lab, &["status"])["changed_since_reload"], false);
    let after = answers(&lab, 6);
    assert!(after.iter().all(|a| a != "web1"), "{after:?}");
}

#[test]
fn an_unusable_state_file_is_set_aside_and_the_config_file_used() {
    let _turn = one_at_a_time();
    let mut lab = lab_with("badstate", 2, None);
    lab.cli_ok(&["backend", "drain", "www", &backend(0)]);
    lab.stop_agent();
    let state = state_file(&lab);
    std::fs::write(&state, "{ half a state").expect("write the state file");
    lab.start_agent();
    assert_eq!(backends(&lab), [row(0, 1, "active"), row(1, 1, "active")]);
    let bad = state.with_file_name("state.json.bad");
    assert_eq!(
        std::fs::read_to_string(&bad).expect("the bad state file, set aside"),
        "{ half a state"
    );
    assert!(lab.agent_log().contains("not a state file"));
    // The next change writes a good one again.
    lab.cli_ok(&["backend", "drain", "www", &backend(0)]);
    assert!(state.exists());
}

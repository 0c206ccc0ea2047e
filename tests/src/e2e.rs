//! Shared pieces of the end-to-end tests: a lab with its agent running, the VIP,
//! and the daemon's answers as JSON.

use std::{
    collections::BTreeMap,
    net::SocketAddrV4,
    sync::{Mutex, MutexGuard},
};

use crate::lab::{Balancer, Lab, LabSpec, VIP, VIP_PORT, default_config};

/// The lab's VIP.
pub fn vip() -> SocketAddrV4 {
    SocketAddrV4::new(VIP, VIP_PORT)
}

/// Tests of one binary take turns: each builds a whole lab, and on two cores their
/// timing is clearer one at a time.
pub fn one_at_a_time() -> MutexGuard<'static, ()> {
    static TURN: Mutex<()> = Mutex::new(());
    TURN.lock().unwrap_or_else(|p| p.into_inner())
}

/// A lab with `webs` servers and its agent started with `config` (the default
/// round-robin config over every server when `None`).
pub fn lab_with(tag: &str, webs: usize, config: Option<String>) -> Lab {
    let mut lab = Lab::up(LabSpec::for_test(tag, webs));
    lab.write_config(&config.unwrap_or_else(|| default_config(webs, "rr")));
    lab.start_agent();
    lab
}

/// `foobar-lb -o json <args>` against the lab's (first) balancer, parsed.
pub fn json(lab: &Lab, args: &[&str]) -> serde_json::Value {
    json_of(lab.balancer(), args)
}

/// `foobar-lb -o json <args>` against one balancer, parsed.
pub fn json_of(balancer: &Balancer, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["-o", "json"];
    all.extend_from_slice(args);
    let out = balancer.cli_ok(&all);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?} gave no JSON ({e}): {out}"))
}

/// A balancer's `/metrics` (its listener on 127.0.0.1:9100 in its namespace); empty
/// when it does not answer.
pub fn metrics_of(balancer: &Balancer) -> String {
    let out = balancer
        .ns
        .command("curl")
        .args(["-sf", "-m", "2", "http://127.0.0.1:9100/metrics"])
        .output()
        .expect("curl");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// How many answers each server gave.
pub fn tally(answers: impl IntoIterator<Item = String>) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for a in answers {
        *counts.entry(a).or_default() += 1;
    }
    counts
}

/// The running VIPs and backends with their weights, as `status -o json` reports
/// them (traffic left out): what a refused change must leave as it was.
pub fn running_state(lab: &Lab) -> serde_json::Value {
    let mut status = json(lab, &["status"]);
    let vips = status["vips"].as_array_mut().expect("vips");
    for vip in vips.iter_mut() {
        vip.as_object_mut().expect("vip").remove("traffic");
        for b in vip["backends"].as_array_mut().expect("backends") {
            b.as_object_mut().expect("backend").remove("traffic");
        }
    }
    status["vips"].take()
}

/// One outcome or event counter from `stats`.
pub fn counter(lab: &Lab, name: &str) -> u64 {
    let stats = json(lab, &["stats"]);
    ["outcomes", "events"]
        .iter()
        .flat_map(|k| stats[k].as_array().unwrap().iter())
        .find(|c| c["name"] == name)
        .map_or(0, |c| c["value"].as_u64().unwrap())
}

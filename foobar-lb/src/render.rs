//! How the CLI shows the daemon's answers to people.

use comfy_table::{Cell, CellAlignment, Table, presets::NOTHING};

use crate::{
    api::{AclRuleStatus, BackendStatus, Changed, Explanation, Stats, Status, Traffic, VipStatus},
    bgp::status::{BfdState, BgpStatus, SessionState},
};

fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(NOTHING)
        .set_header(header.iter().map(Cell::new));
    t
}

fn right(value: impl ToString) -> Cell {
    Cell::new(value.to_string()).set_alignment(CellAlignment::Right)
}

/// A count with a unit prefix: 1234567 → "1.2M".
pub fn si(value: f64) -> String {
    let (v, unit) = match value.abs() {
        x if x >= 1e9 => (value / 1e9, "G"),
        x if x >= 1e6 => (value / 1e6, "M"),
        x if x >= 1e3 => (value / 1e3, "k"),
        _ => (value, ""),
    };
    if unit.is_empty() {
        format!("{v:.0}")
    } else {
        format!("{v:.1}{unit}")
    }
}

fn duration(seconds: u64) -> String {
    match seconds {
        s if s >= 86_400 => format!("{}d{}h", s / 86_400, s % 86_400 / 3600),
        s if s >= 3600 => format!("{}h{}m", s / 3600, s % 3600 / 60),
        s if s >= 60 => format!("{}m{}s", s / 60, s % 60),
        s => format!("{s}s"),
    }
}

fn traffic_cells(t: &Traffic) -> [Cell; 4] {
    [
        right(t.active_flows),
        right(si(t.packets_per_second)),
        right(si(t.bits_per_second)),
        right(si(t.new_flows_per_second)),
    ]
}

/// `status`: a header line, then each VIP with its backends under it.
pub fn status(s: &Status) -> String {
    let mut out = format!(
        "foobar-lb on {} ({} XDP), up {}, flows {}/{}",
        s.interfaces.join(", "),
        s.xdp_mode,
        duration(s.uptime_seconds),
        s.flows,
        s.flow_capacity,
    );
    if let Some(dir) = &s.pin_dir {
        out += &format!(", pinned at {}", dir.display());
    }
    if s.resumed {
        out += " (took over a running data plane)";
    }
    if s.changed_since_reload {
        out += &format!(
            "\nchanged through the API since {} was read",
            s.config.display()
        );
    }
    if let Some(v) = &s.vrrp {
        out += &format!(
            "\nvrrp vrid {} on {}: {} for {}, priority {}/{}, master {}, moves {}",
            v.vrid,
            v.interface,
            v.role.label().to_uppercase(),
            duration(v.seconds_in_role as u64),
            v.priority,
            v.configured_priority,
            v.master.map_or("unknown".into(), |m| m.to_string()),
            v.addresses.join(", "),
        );
        for fault in &v.faults {
            out += &format!("\n  priority lowered: {fault}");
        }
    }
    if let Some(b) = &s.bgp {
        out += &bgp_status(b);
    }
    out.push_str("\n\n");
    out + &status_table(&s.vips).to_string()
}

/// The BGP speaker's lines of `status`: its state, each session, each address.
fn bgp_status(b: &BgpStatus) -> String {
    let mut out = format!(
        "\nbgp: BIRD {}, {} announcements and {} withdrawals so far",
        b.speaker.label(),
        b.announcements,
        b.withdrawals
    );
    if b.speaker_restarts > 0 {
        out += &format!(", restarted {} times", b.speaker_restarts);
    }
    for session in &b.sessions {
        out += &format!(
            "\n  neighbour {} as {}: {}",
            session.neighbour,
            session.remote_as,
            session.state.label()
        );
        if let Some(since) = &session.since {
            out += &format!(" since {since}");
        }
        if let Some(bfd) = session.bfd {
            out += if bfd == BfdState::Up {
                ", bfd up"
            } else {
                ", bfd down"
            };
        }
        let info = session.info.trim();
        if session.state != SessionState::Established && !info.is_empty() {
            out += &format!(" ({info})");
        }
    }
    for vip in &b.vips {
        if vip.announced {
            out += &format!("\n  announces {}", vip.address);
        } else {
            out += &format!("\n  withholds {}: {}", vip.address, vip.reason);
        }
    }
    out
}

/// Each VIP with its backends under it.
fn status_table(vips: &[VipStatus]) -> Table {
    let mut t = table(&[
        "VIP", "ADDRESS", "PROTO", "SCHED", "WEIGHT", "STATE", "CHECK", "SHARE", "FLOWS", "PKT/S",
        "BIT/S", "NEW/S",
    ]);
    for vip in vips {
        let mut row = vec![
            Cell::new(&vip.name),
            Cell::new(vip.address),
            Cell::new(format!("{:?}", vip.protocol).to_lowercase()),
            Cell::new(format!("{:?}", vip.scheduler).to_lowercase()),
            Cell::new(""),
            Cell::new(if vip.backends.iter().any(|b| b.weight > 0) {
                "up"
            } else {
                "no backend"
            }),
            Cell::new(""),
            Cell::new(""),
        ];
        row.extend(traffic_cells(&vip.traffic));
        t.add_row(row);
        for b in &vip.backends {
            let mut row = vec![
                Cell::new(""),
                Cell::new(format!("└ {}", b.address)),
                Cell::new(""),
                Cell::new(""),
                right(b.weight),
                Cell::new(&b.state),
                Cell::new(check(b)),
                right(format!("{:.0}%", b.share * 100.0)),
            ];
            row.extend(traffic_cells(&b.traffic));
            t.add_row(row);
        }
    }
    t
}

/// A backend's last check, short: `ok 0.3ms`, the failure, or `-` when unchecked.
fn check(b: &BackendStatus) -> String {
    match (b.last_check.as_deref(), b.check_latency_ms) {
        (Some("ok"), Some(ms)) => format!("ok {ms:.1}ms"),
        (Some(e), _) => e.to_owned(),
        (None, _) if b.health == "unchecked" => "-".into(),
        (None, _) => "pending".into(),
    }
}

/// `vip list`.
pub fn vips(vips: &[VipStatus]) -> String {
    vip_table(vips).to_string()
}

fn vip_table(vips: &[VipStatus]) -> Table {
    let mut t = table(&[
        "VIP", "ADDRESS", "PROTO", "SCHED", "BACKENDS", "SLOTS", "FLOWS",
    ]);
    for v in vips {
        t.add_row(vec![
            Cell::new(&v.name),
            Cell::new(v.address),
            Cell::new(format!("{:?}", v.protocol).to_lowercase()),
            Cell::new(format!("{:?}", v.scheduler).to_lowercase()),
            right(v.backends.len()),
            right(v.schedule_len),
            right(v.traffic.active_flows),
        ]);
    }
    t
}

/// `backend list`.
pub fn backends(vips: &[VipStatus]) -> String {
    backend_table(vips).to_string()
}

fn backend_table(vips: &[VipStatus]) -> Table {
    let mut t = table(&[
        "VIP", "BACKEND", "WEIGHT", "STATE", "SHARE", "FLOWS", "PACKETS", "BYTES",
    ]);
    for v in vips {
        for b in &v.backends {
            t.add_row(vec![
                Cell::new(&v.name),
                Cell::new(b.address),
                right(b.weight),
                Cell::new(&b.state),
                right(format!("{:.0}%", b.share * 100.0)),
                right(b.traffic.active_flows),
                right(b.traffic.packets + b.traffic.reply_packets),
                right(b.traffic.bytes + b.traffic.reply_bytes),
            ]);
        }
    }
    t
}

/// `stats`.
pub fn stats(s: &Stats) -> String {
    let (counts, traffic) = (count_table(s), traffic_table(s));
    if s.acl.is_empty() {
        return format!("{counts}\n\n{traffic}");
    }
    format!("{counts}\n\n{traffic}\n\n{}", acl(&s.acl))
}

/// Packets per XDP action, outcome and flow event.
fn count_table(s: &Stats) -> Table {
    let mut counts = table(&["COUNTER", "PACKETS"]);
    for (group, list) in [
        ("action", &s.actions),
        ("outcome", &s.outcomes),
        ("event", &s.events),
    ] {
        for c in list {
            counts.add_row(vec![
                Cell::new(format!("{group} {}", c.name)),
                right(c.value),
            ]);
        }
    }
    counts
}

/// Counters of each VIP and backend.
fn traffic_table(s: &Stats) -> Table {
    let mut traffic = table(&[
        "VIP / BACKEND",
        "PACKETS",
        "BYTES",
        "NEW FLOWS",
        "REPLY PKTS",
        "REPLY BYTES",
    ]);
    for c in s.vips.iter().chain(&s.backends) {
        traffic.add_row(vec![
            Cell::new(&c.name),
            right(c.packets),
            right(c.bytes),
            right(c.new_flows),
            right(c.reply_packets),
            right(c.reply_bytes),
        ]);
    }
    traffic
}

/// Access-list rules and what each decided.
pub fn acl(rules: &[AclRuleStatus]) -> String {
    if rules.is_empty() {
        return "no access-list rules: every source is let in".into();
    }
    acl_table(rules).to_string()
}

fn acl_table(rules: &[AclRuleStatus]) -> Table {
    let mut t = table(&["LIST", "ACTION", "PREFIX", "PACKETS"]);
    for r in rules {
        t.add_row(vec![
            Cell::new(&r.list),
            Cell::new(r.action.name()),
            Cell::new(r.prefix),
            right(r.packets),
        ]);
    }
    t
}

/// Any change: what it wrote.
pub fn changed(c: &Changed) -> String {
    let mut parts = Vec::new();
    for (n, what) in [
        (c.maps.vips_added, "VIPs added"),
        (c.maps.vips_removed, "VIPs removed"),
        (c.maps.backends_added, "backends added"),
        (c.maps.backends_removed, "backends removed"),
        (c.maps.slots_written, "schedule slots written"),
        (c.maps.next_hops_written, "next hops written"),
        (
            c.maps.client_side_written,
            "client-side routes and neighbours written",
        ),
    ] {
        if n > 0 {
            parts.push(format!("{n} {what}"));
        }
    }
    if !c.interfaces_attached.is_empty() {
        parts.push(format!("attached to {}", c.interfaces_attached.join(", ")));
    }
    if !c.interfaces_detached.is_empty() {
        parts.push(format!(
            "detached from {}",
            c.interfaces_detached.join(", ")
        ));
    }
    if parts.is_empty() {
        "applied: nothing to change".into()
    } else {
        format!("applied: {}", parts.join(", "))
    }
}

/// `explain`.
pub fn explanation(e: &Explanation) -> String {
    match e.backend {
        Some(b) => format!("{b} (by {})", format!("{:?}", e.scheduler).to_lowercase()),
        None => format!(
            "no backend: {} has none in its schedule; the packet would be dropped",
            e.vip
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        api::{Count, TrafficCount},
        edge::Action,
        state::{Protocol, Scheduler},
    };

    /// One VIP with one backend, a count of each kind and an access-list rule: rows
    /// in every table.
    fn fixture() -> (Vec<VipStatus>, Stats) {
        let backend = BackendStatus {
            address: "10.1.0.11:80".parse().unwrap(),
            weight: 1,
            state: "active".into(),
            health: "up".into(),
            last_check: Some("ok".into()),
            check_latency_ms: Some(0.3),
            health_transitions: 0,
            checks_skipped: 0,
            share: 1.0,
            next_hop: None,
            traffic: Traffic::default(),
        };
        let vip = VipStatus {
            name: "www".into(),
            address: "10.0.0.100:80".parse().unwrap(),
            protocol: Protocol::Tcp,
            scheduler: Scheduler::Rr,
            schedule_len: 1,
            traffic: Traffic::default(),
            backends: vec![backend],
        };
        let count = |name: &str| {
            vec![Count {
                name: name.into(),
                value: 1,
            }]
        };
        let traffic = |name: &str| {
            vec![TrafficCount {
                name: name.into(),
                packets: 1,
                bytes: 1,
                new_flows: 1,
                reply_packets: 1,
                reply_bytes: 1,
            }]
        };
        let stats = Stats {
            actions: count("tx"),
            outcomes: count("sent"),
            events: count("new"),
            vips: traffic("www"),
            backends: traffic("www/10.1.0.11:80"),
            acl: vec![AclRuleStatus {
                list: "global".into(),
                action: Action::Deny,
                prefix: "192.0.2.0/24".parse().unwrap(),
                packets: 1,
            }],
        };
        (vec![vip], stats)
    }

    #[test]
    fn every_row_has_a_cell_under_each_heading() {
        let (vips, stats) = fixture();
        for t in [
            status_table(&vips),
            vip_table(&vips),
            backend_table(&vips),
            count_table(&stats),
            traffic_table(&stats),
            acl_table(&stats.acl),
        ] {
            let headings = t.header().expect("a header").cell_count();
            assert!(t.row_iter().count() > 0, "no row to check:\n{t}");
            for row in t.row_iter() {
                assert_eq!(
                    row.cell_count(),
                    headings,
                    "a row whose cells do not match the headings:\n{t}"
                );
            }
        }
    }

    #[test]
    fn bgp_lines() {
        let config: crate::bgp::BgpConfig = toml::from_str(
            "local_as = 65001\nannounce_from = \"10.0.0.3\"\n\
             neighbours = [{ address = \"10.0.0.254\", remote_as = 65000 }]",
        )
        .unwrap_or_else(|e| panic!("a [bgp] section: {e}"));
        let mut b = BgpStatus::new(&config);
        b.vips.push(crate::bgp::status::VipAnnouncement {
            address: "10.0.0.100".parse().unwrap_or_else(|e| panic!("{e}")),
            announced: false,
            reason: "no VIP has this address".into(),
        });
        let text = bgp_status(&b);
        assert!(text.contains("bgp: BIRD starting"), "{text}");
        assert!(
            text.contains("neighbour 10.0.0.254 as 65000: idle"),
            "{text}"
        );
        assert!(
            text.contains("withholds 10.0.0.100: no VIP has this address"),
            "{text}"
        );
    }

    #[test]
    fn si_prefixes() {
        assert_eq!(si(999.0), "999");
        assert_eq!(si(1234.0), "1.2k");
        assert_eq!(si(2_500_000.0), "2.5M");
        assert_eq!(duration(3725), "1h2m");
    }
}

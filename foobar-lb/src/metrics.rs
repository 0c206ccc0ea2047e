//! Prometheus metrics, rendered on each scrape from the agent's status and counters
//! (the maps are the source; nothing is kept twice), in the classic text format unless
//! the scraper asks for OpenMetrics ([`Format::negotiate`]).

// One source for the agent and the nodes, until the agent's listener moves onto
// foobar-node (DESIGN.md) and can use it from there.
#[path = "../../foobar-node/src/observe/exposition.rs"]
mod exposition;

pub use exposition::Format;

use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use crate::{
    api::{Stats, Status, Traffic},
    bgp::status::SessionState,
    vrrp::Role,
};

type Labels = Vec<(&'static str, String)>;

/// Registers counter and gauge families and fills them.
struct Builder {
    registry: Registry,
}

impl Builder {
    fn counter(&mut self, name: &str, help: &str, values: Vec<(Labels, u64)>) {
        let family = Family::<Labels, Counter>::default();
        for (labels, v) in values {
            family.get_or_create(&labels).inc_by(v);
        }
        self.registry.register(name, help, family);
    }

    /// A counter without labels.
    fn single_counter(&mut self, name: &str, help: &str, value: u64) {
        let counter: Counter = Counter::default();
        counter.inc_by(value);
        self.registry.register(name, help, counter);
    }

    /// A gauge without labels.
    fn single(&mut self, name: &str, help: &str, value: f64) {
        let gauge = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        gauge.set(value);
        self.registry.register(name, help, gauge);
    }

    fn gauge(&mut self, name: &str, help: &str, values: Vec<(Labels, f64)>) {
        let family = Family::<Labels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        for (labels, v) in values {
            family.get_or_create(&labels).set(v);
        }
        self.registry.register(name, help, family);
    }
}

/// Per-direction packet and byte counts of a VIP or backend.
fn traffic(labels: &Labels, t: &Traffic) -> [(Labels, u64, u64); 2] {
    let with = |direction: &str| {
        let mut l = labels.clone();
        l.push(("direction", direction.to_owned()));
        l
    };
    [
        (with("to_backend"), t.packets, t.bytes),
        (with("to_client"), t.reply_packets, t.reply_bytes),
    ]
}

/// The whole exposition, in `format`.
pub fn render(status: &Status, stats: &Stats, format: Format) -> String {
    let mut b = Builder {
        registry: Registry::default(),
    };
    let vip_labels = |name: &str| vec![("vip", name.to_owned())];
    let mut vip_rows = Vec::new();
    let mut backend_rows = Vec::new();
    for vip in &status.vips {
        vip_rows.push((vip_labels(&vip.name), &vip.traffic));
        for be in &vip.backends {
            let labels = vec![
                ("vip", vip.name.clone()),
                ("backend", be.address.to_string()),
            ];
            backend_rows.push((labels, be));
        }
    }

    for (scope, rows) in [
        (
            "vip",
            vip_rows
                .iter()
                .map(|(l, t)| (l.clone(), *t))
                .collect::<Vec<_>>(),
        ),
        (
            "backend",
            backend_rows
                .iter()
                .map(|(l, be)| (l.clone(), &be.traffic))
                .collect(),
        ),
    ] {
        let per_direction: Vec<(Labels, u64, u64)> =
            rows.iter().flat_map(|(l, t)| traffic(l, t)).collect();
        b.counter(
            &format!("foobar_lb_{scope}_packets"),
            &format!("Packets steered per {scope}, by direction"),
            per_direction
                .iter()
                .map(|(l, p, _)| (l.clone(), *p))
                .collect(),
        );
        b.counter(
            &format!("foobar_lb_{scope}_bytes"),
            &format!("Bytes steered per {scope}, by direction"),
            per_direction
                .iter()
                .map(|(l, _, by)| (l.clone(), *by))
                .collect(),
        );
        b.counter(
            &format!("foobar_lb_{scope}_new_flows"),
            &format!("Flows scheduled per {scope}"),
            rows.iter().map(|(l, t)| (l.clone(), t.new_flows)).collect(),
        );
        b.gauge(
            &format!("foobar_lb_{scope}_active_flows"),
            &format!("Flow-table entries per {scope}"),
            rows.iter()
                .map(|(l, t)| (l.clone(), t.active_flows as f64))
                .collect(),
        );
    }
    b.gauge(
        "foobar_lb_backend_up",
        "1 if the backend passes its health checks (or has none), 0 if down",
        backend_rows
            .iter()
            .map(|(l, be)| (l.clone(), if be.health == "down" { 0.0 } else { 1.0 }))
            .collect(),
    );
    b.gauge(
        "foobar_lb_backend_disabled",
        "1 if an operator disabled the backend",
        backend_rows
            .iter()
            .map(|(l, be)| (l.clone(), if be.state == "disabled" { 1.0 } else { 0.0 }))
            .collect(),
    );
    b.gauge(
        "foobar_lb_backend_weight",
        "Configured weight (0: draining)",
        backend_rows
            .iter()
            .map(|(l, be)| (l.clone(), be.weight as f64))
            .collect(),
    );
    b.gauge(
        "foobar_lb_backend_check_latency_seconds",
        "Latency of the backend's last successful health check",
        backend_rows
            .iter()
            .filter_map(|(l, be)| be.check_latency_ms.map(|ms| (l.clone(), ms / 1e3)))
            .collect(),
    );
    b.counter(
        "foobar_lb_backend_health_transitions",
        "Up/down changes of the backend's health",
        backend_rows
            .iter()
            .map(|(l, be)| (l.clone(), be.health_transitions))
            .collect(),
    );
    b.counter(
        "foobar_lb_backend_checks_skipped",
        "Health checks not run because this machine could not (descriptors, buffers or \
         addresses ran out); they count neither for nor against the backend",
        backend_rows
            .iter()
            .map(|(l, be)| (l.clone(), be.checks_skipped))
            .collect(),
    );
    b.gauge(
        "foobar_lb_dataplane_attached",
        "1 while the kernel reports the agent's XDP program on the configured interface \
         and the interface is running, else 0",
        status
            .dataplane
            .iter()
            .map(|i| {
                let up = i.running && i.attached;
                (vec![("interface", i.name.clone())], f64::from(u8::from(up)))
            })
            .collect(),
    );
    b.counter(
        "foobar_lb_xdp_actions",
        "Packets per XDP action",
        stats
            .actions
            .iter()
            .map(|c| (vec![("action", c.name.clone())], c.value))
            .collect(),
    );
    b.counter(
        "foobar_lb_packets",
        "Packets per outcome: why each was passed, dropped or sent",
        stats
            .outcomes
            .iter()
            .map(|c| (vec![("reason", c.name.clone())], c.value))
            .collect(),
    );
    b.counter(
        "foobar_lb_flow_events",
        "Flow-table events",
        stats
            .events
            .iter()
            .map(|c| (vec![("event", c.name.clone())], c.value))
            .collect(),
    );
    b.counter(
        "foobar_lb_acl_packets",
        "Packets each access-list rule decided (its prefix was the source's longest match)",
        stats
            .acl
            .iter()
            .map(|r| {
                let labels = vec![
                    ("list", r.list.clone()),
                    ("action", r.action.name().to_owned()),
                    ("prefix", r.prefix.to_string()),
                ];
                (labels, r.packets)
            })
            .collect(),
    );
    b.single(
        "foobar_lb_flow_table_entries",
        "Entries in the flow table",
        status.flows as f64,
    );
    b.single(
        "foobar_lb_flow_table_capacity",
        "Capacity of the flow table",
        status.flow_capacity as f64,
    );
    if let Some(v) = &status.vrrp {
        b.gauge(
            "foobar_lb_vrrp_role",
            "1 for the VRRP role this balancer is in, 0 for the others",
            Role::ALL
                .iter()
                .map(|r| {
                    let on = if *r == v.role { 1.0 } else { 0.0 };
                    (vec![("role", r.label().to_owned())], on)
                })
                .collect(),
        );
        b.single(
            "foobar_lb_vrrp_priority",
            "The priority advertised now (lowered while tracked faults last)",
            f64::from(v.priority),
        );
        b.single(
            "foobar_lb_vrrp_tracked_faults",
            "Tracked faults lowering the priority",
            v.faults.len() as f64,
        );
        b.counter(
            "foobar_lb_vrrp_transitions",
            "Entries into each VRRP role",
            Role::ALL
                .iter()
                .map(|r| {
                    let n = v.transitions.get(r).copied().unwrap_or(0);
                    (vec![("role", r.label().to_owned())], n)
                })
                .collect(),
        );
        b.counter(
            "foobar_lb_vrrp_advertisements",
            "VRRP advertisements sent, and valid ones received",
            vec![
                (vec![("direction", "sent".to_owned())], v.adverts_sent),
                (
                    vec![("direction", "received".to_owned())],
                    v.adverts_received,
                ),
            ],
        );
        b.counter(
            "foobar_lb_vrrp_rejected_packets",
            "VRRP packets refused, by reason",
            v.rejected
                .iter()
                .map(|(reason, n)| (vec![("reason", reason.clone())], *n))
                .collect(),
        );
    }
    if let Some(bgp) = &status.bgp {
        let on = |yes: bool| if yes { 1.0 } else { 0.0 };
        b.gauge(
            "foobar_lb_bgp_session_established",
            "1 while the BGP session with the neighbour is established, 0 otherwise",
            bgp.sessions
                .iter()
                .map(|s| {
                    let labels = vec![("neighbour", s.neighbour.to_string())];
                    (labels, on(s.state == SessionState::Established))
                })
                .collect(),
        );
        // Labelled by address, not by VIP name: one address may carry several VIPs.
        b.gauge(
            "foobar_lb_bgp_vip_announced",
            "1 while BIRD, the BGP speaker, has the route to the VIP address, whether or \
             not a BGP session is up to carry it (see foobar_lb_bgp_session_established), \
             0 otherwise",
            bgp.vips
                .iter()
                .map(|v| (vec![("address", v.address.to_string())], on(v.announced)))
                .collect(),
        );
        b.single_counter(
            "foobar_lb_bgp_announcements",
            "VIP addresses that started to be announced over BGP",
            bgp.announcements,
        );
        b.single_counter(
            "foobar_lb_bgp_withdrawals",
            "VIP addresses withdrawn from the BGP neighbours",
            bgp.withdrawals,
        );
        b.single_counter(
            "foobar_lb_bgp_speaker_restarts",
            "Times BIRD, the BGP speaker, was started again after it exited",
            bgp.speaker_restarts,
        );
    }
    b.single(
        "foobar_lb_uptime_seconds",
        "Seconds since the agent started",
        status.uptime_seconds as f64,
    );
    let mut out = String::new();
    encode(&mut out, &b.registry).expect("writing to a String");
    format.convert(out)
}

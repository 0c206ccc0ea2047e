//! `bird.conf`, written by the agent: a pure function of `[bgp]` and the addresses
//! announced now. The announcements are blackhole routes of a static protocol, which
//! BIRD reconfigures without touching the BGP sessions; nothing goes to the kernel.

use std::{collections::BTreeSet, fmt::Write, net::IpAddr};

use super::config::{BgpConfig, Neighbour};

/// The static protocol holding the IPv4 announcements.
pub const STATIC_V4: &str = "vips4";
/// The static protocol holding the IPv6 announcements.
pub const STATIC_V6: &str = "vips6";

/// BIRD's name for the session with `neighbour`: `peer_` and the address, its dots
/// and colons made underscores (a BIRD symbol), so that `birdc show protocols` reads.
pub fn protocol_name(neighbour: IpAddr) -> String {
    let address: String = neighbour
        .to_string()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    format!("peer_{address}")
}

/// The whole configuration. `ipv6` adds the IPv6 static protocol and channels: it is
/// fixed when the speaker starts (see [`BgpConfig::announces_ipv6`]), whatever is
/// announced now, so that no change of the announcements ever changes the channels
/// (which would reset the sessions).
pub fn config_text(bgp: &BgpConfig, announced: &BTreeSet<IpAddr>, ipv6: bool) -> String {
    let mut out = String::new();
    let mut line = |text: &str| {
        out.push_str(text);
        out.push('\n');
    };
    line("# Written by foobar-lb from its [bgp] section, and rewritten whenever the VIP");
    line("# addresses it announces change. Do not edit: the agent owns this file.");
    line("log stderr { info, remote, warning, error, auth, fatal, bug };");
    line(&format!("router id {};", bgp.router_id()));
    line("");
    line("protocol device {");
    line("}");
    line("");
    let v4: Vec<&IpAddr> = announced.iter().filter(|a| a.is_ipv4()).collect();
    let v6: Vec<&IpAddr> = announced.iter().filter(|a| a.is_ipv6()).collect();
    line(&static_protocol(STATIC_V4, "ipv4", &v4, 32));
    if ipv6 {
        line(&static_protocol(STATIC_V6, "ipv6", &v6, 128));
    }
    if let Some(bfd) = &bgp.bfd {
        let timers = format!(
            "    interval {} ms;\n    multiplier {};\n",
            bfd.interval_ms, bfd.multiplier
        );
        // Single-hop sessions take the interface options, multihop ones the others.
        line(&format!(
            "protocol bfd {{\n  interface \"*\" {{\n{timers}  }};\n  multihop {{\n{timers}  }};\n}}\n"
        ));
    }
    for neighbour in &bgp.neighbours {
        line(&bgp_protocol(bgp, neighbour, ipv6));
    }
    out
}

/// A static protocol with one blackhole route per address: the routes exist only to
/// be exported to the routers.
fn static_protocol(name: &str, channel: &str, addresses: &[&IpAddr], prefix: u8) -> String {
    let mut out = format!("protocol static {name} {{\n  {channel};\n");
    for address in addresses {
        let _ = writeln!(out, "  route {address}/{prefix} blackhole;");
    }
    out.push_str("}\n");
    out
}

/// The session with one router. (`writeln!` into a String cannot fail.)
fn bgp_protocol(bgp: &BgpConfig, neighbour: &Neighbour, ipv6: bool) -> String {
    let retry = bgp.connect_retry_s;
    let mut out = String::new();
    let _ = writeln!(out, "protocol bgp {} {{", protocol_name(neighbour.address));
    let _ = writeln!(out, "  local {} as {};", bgp.announce_from, bgp.local_as);
    let _ = writeln!(
        out,
        "  neighbor {} as {};",
        neighbour.address, neighbour.remote_as
    );
    let _ = writeln!(out, "  hold time {};", bgp.hold_time_s);
    let _ = writeln!(out, "  keepalive time {};", bgp.keepalive_s());
    // BIRD waits 5 s before the first attempt, and 60 s to 300 s after an error (a
    // router restarting, a BFD failure) unless told otherwise: both follow the retry.
    let _ = writeln!(out, "  connect delay time {retry};");
    let _ = writeln!(out, "  connect retry time {retry};");
    let _ = writeln!(
        out,
        "  error wait time {retry}, {};",
        retry.saturating_mul(10)
    );
    // A dead balancer's routes must go at once, not linger as a restarting peer's.
    let _ = writeln!(out, "  graceful restart off;");
    let bfd = if bgp.uses_bfd(neighbour) { "on" } else { "off" };
    let _ = writeln!(out, "  bfd {bfd};");
    out.push_str(&channel(bgp, "ipv4", STATIC_V4));
    if ipv6 {
        out.push_str(&channel(bgp, "ipv6", STATIC_V6));
    }
    out.push_str("}\n");
    out
}

/// A channel exporting its static protocol's routes alone, with the communities and
/// this balancer as next hop; nothing is imported.
fn channel(bgp: &BgpConfig, family: &str, source: &str) -> String {
    let mut out = format!("  {family} {{\n    import none;\n    export filter {{\n");
    let _ = writeln!(out, "      if proto != \"{source}\" then reject;");
    for (asn, value) in bgp.parsed_communities() {
        let _ = writeln!(out, "      bgp_community.add(({asn}, {value}));");
    }
    out.push_str("      accept;\n    };\n    next hop self;\n  };\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> BgpConfig {
        toml::from_str(&format!(
            r#"
            local_as = 65001
            announce_from = "10.0.0.3"
            communities = ["65001:100", "65001:200"]
            hold_time_s = 3
            connect_retry_s = 1
            {extra}

            [[neighbours]]
            address = "10.0.0.254"
            remote_as = 65000

            [[neighbours]]
            address = "10.0.0.253"
            remote_as = 65000
            bfd = false
            "#
        ))
        .unwrap_or_else(|e| panic!("a [bgp] section: {e}"))
    }

    fn addresses(list: &[&str]) -> BTreeSet<IpAddr> {
        list.iter()
            .map(|a| a.parse().unwrap_or_else(|e| panic!("{a}: {e}")))
            .collect()
    }

    #[test]
    fn names_protocols_after_the_neighbour() {
        assert_eq!(
            protocol_name("10.0.0.254".parse().expect("an address")),
            "peer_10_0_0_254"
        );
        assert_eq!(
            protocol_name("2001:db8::1".parse().expect("an address")),
            "peer_2001_db8__1"
        );
    }

    #[test]
    fn announces_blackhole_routes_from_one_static_protocol() {
        let text = config_text(
            &config(""),
            &addresses(&["10.0.0.100", "10.0.0.101"]),
            false,
        );
        assert!(text.contains("router id 10.0.0.3;\n"), "{text}");
        assert!(text.contains("protocol device {\n}\n"), "{text}");
        assert!(
            text.contains(
                "protocol static vips4 {\n  ipv4;\n  route 10.0.0.100/32 blackhole;\n  \
                 route 10.0.0.101/32 blackhole;\n}\n"
            ),
            "{text}"
        );
        assert!(
            !text.contains("vips6"),
            "no IPv6 channel without IPv6 VIPs:\n{text}"
        );
        assert!(
            !text.contains("protocol bfd"),
            "no BFD without [bgp.bfd]:\n{text}"
        );
        assert!(
            !text.contains("kernel"),
            "nothing goes to the kernel:\n{text}"
        );
    }

    #[test]
    fn an_empty_announcement_keeps_the_sessions() {
        let some = config_text(&config(""), &addresses(&["10.0.0.100"]), false);
        let none = config_text(&config(""), &BTreeSet::new(), false);
        assert!(
            none.contains("protocol static vips4 {\n  ipv4;\n}\n"),
            "{none}"
        );
        // Only the static protocol differs: BIRD reconfigures it alone.
        let strip = |t: &str| t.replace("  route 10.0.0.100/32 blackhole;\n", "");
        assert_eq!(strip(&some), none);
    }

    #[test]
    fn one_bgp_protocol_per_neighbour() {
        let text = config_text(&config(""), &addresses(&["10.0.0.100"]), false);
        let expected = "protocol bgp peer_10_0_0_254 {\n\
            \x20 local 10.0.0.3 as 65001;\n\
            \x20 neighbor 10.0.0.254 as 65000;\n\
            \x20 hold time 3;\n\
            \x20 keepalive time 1;\n\
            \x20 connect delay time 1;\n\
            \x20 connect retry time 1;\n\
            \x20 error wait time 1, 10;\n\
            \x20 graceful restart off;\n\
            \x20 bfd off;\n\
            \x20 ipv4 {\n\
            \x20   import none;\n\
            \x20   export filter {\n\
            \x20     if proto != \"vips4\" then reject;\n\
            \x20     bgp_community.add((65001, 100));\n\
            \x20     bgp_community.add((65001, 200));\n\
            \x20     accept;\n\
            \x20   };\n\
            \x20   next hop self;\n\
            \x20 };\n\
            }\n";
        assert!(text.contains(expected), "expected\n{expected}\nin\n{text}");
        assert!(text.contains("protocol bgp peer_10_0_0_253 {"), "{text}");
    }

    #[test]
    fn bfd_where_asked() {
        let text = config_text(
            &config("[bfd]\ninterval_ms = 50\nmultiplier = 3"),
            &addresses(&["10.0.0.100"]),
            false,
        );
        assert!(
            text.contains(
                "protocol bfd {\n  interface \"*\" {\n    interval 50 ms;\n    multiplier 3;\n  };\n  \
                 multihop {\n    interval 50 ms;\n    multiplier 3;\n  };\n}\n"
            ),
            "{text}"
        );
        let first = text
            .split("protocol bgp ")
            .find(|p| p.starts_with("peer_10_0_0_254"))
            .expect("the first neighbour");
        assert!(first.contains("  bfd on;\n"), "BFD by default:\n{first}");
        let second = text
            .split("protocol bgp ")
            .find(|p| p.starts_with("peer_10_0_0_253"))
            .expect("the second neighbour");
        assert!(second.contains("  bfd off;\n"), "bfd = false:\n{second}");
    }

    #[test]
    fn ipv6_vips_get_their_own_static_protocol_and_channel() {
        let text = config_text(
            &config(""),
            &addresses(&["10.0.0.100", "2001:db8::100"]),
            true,
        );
        assert!(
            text.contains(
                "protocol static vips6 {\n  ipv6;\n  route 2001:db8::100/128 blackhole;\n}\n"
            ),
            "{text}"
        );
        assert!(!text.contains("route 2001:db8::100/32"), "{text}");
        assert!(text.contains("  ipv6 {\n    import none;\n"), "{text}");
        assert!(
            text.contains("if proto != \"vips6\" then reject;"),
            "{text}"
        );
        // Withdrawn, the channel stays.
        let empty = config_text(&config(""), &BTreeSet::new(), true);
        assert!(
            empty.contains("protocol static vips6 {\n  ipv6;\n}\n"),
            "{empty}"
        );
    }
}

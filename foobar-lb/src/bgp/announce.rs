//! The announce rule: a VIP address is announced while the data plane is attached on
//! every configured interface and at least one VIP on that address has a usable
//! backend (up, enabled, weighted). A pure function of what the agent tracks.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use crate::agent::Tracked;

/// For each address that may be announced: `None` to announce it, or why not.
pub type Wanted = BTreeMap<IpAddr, Option<String>>;

/// What to announce, of `candidates`, given what tracking found.
pub fn decide(candidates: &BTreeSet<IpAddr>, tracked: &Tracked) -> Wanted {
    candidates
        .iter()
        .map(|&address| {
            let why_not = if !tracked.dataplane.is_empty() {
                Some(format!(
                    "the data plane is not serving: {}",
                    tracked.dataplane.join("; ")
                ))
            } else {
                match tracked.addresses.get(&address) {
                    None => Some("no VIP has this address".to_owned()),
                    Some(vips) if vips.iter().any(|(_, usable)| *usable) => None,
                    Some(vips) => {
                        let names: Vec<&str> = vips.iter().map(|(name, _)| name.as_str()).collect();
                        Some(format!(
                            "no usable backend (all down, disabled or drained) in vip {}",
                            names.join(", ")
                        ))
                    }
                }
            };
            (address, why_not)
        })
        .collect()
}

/// The addresses to announce.
pub fn announced(wanted: &Wanted) -> BTreeSet<IpAddr> {
    wanted
        .iter()
        .filter(|(_, why_not)| why_not.is_none())
        .map(|(address, _)| *address)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    fn tracked(vips: &[(&str, &str, bool)]) -> Tracked {
        let mut t = Tracked::default();
        for &(address, name, usable) in vips {
            t.addresses
                .entry(ip(address))
                .or_default()
                .push((name.to_owned(), usable));
        }
        t
    }

    #[test]
    fn one_usable_vip_is_enough() {
        let candidates = BTreeSet::from([ip("10.0.0.100"), ip("10.0.0.101"), ip("10.0.0.102")]);
        let t = tracked(&[
            ("10.0.0.100", "www", false),
            ("10.0.0.100", "dns", true),
            ("10.0.0.101", "mail", false),
        ]);
        let wanted = decide(&candidates, &t);
        assert_eq!(wanted[&ip("10.0.0.100")], None);
        let mail = wanted[&ip("10.0.0.101")]
            .as_deref()
            .expect("mail has no backend");
        assert!(
            mail.contains("no usable backend") && mail.contains("mail"),
            "{mail}"
        );
        let gone = wanted[&ip("10.0.0.102")].as_deref().expect("no VIP there");
        assert_eq!(gone, "no VIP has this address");
        assert_eq!(announced(&wanted), BTreeSet::from([ip("10.0.0.100")]));
    }

    #[test]
    fn a_data_plane_fault_withdraws_everything() {
        let candidates = BTreeSet::from([ip("10.0.0.100")]);
        let mut t = tracked(&[("10.0.0.100", "www", true)]);
        t.dataplane.push("interface lbc is down".into());
        let wanted = decide(&candidates, &t);
        let why = wanted[&ip("10.0.0.100")].as_deref().expect("withdrawn");
        assert!(why.contains("interface lbc is down"), "{why}");
        assert!(announced(&wanted).is_empty());
    }
}

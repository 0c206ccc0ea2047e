//! The announce rule: a VIP address is announced while the data plane is attached on
//! every configured interface and at least one VIP on that address has a usable
//! backend (up, enabled, weighted), once every health-checked VIP on it has had a
//! first check of each backend. A pure function of what the agent tracks.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
};

use crate::{
    agent::{BackendKey, Tracked},
    health::BackendHealth,
    state::VipSpec,
};

/// What the agent asks of one address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Want {
    /// Announce it.
    Announce,
    /// Do not start announcing it, but keep it announced if it is: a health-checked
    /// VIP on it waits for a first check of a backend. At start, backends are up until
    /// checked, so this balancer's Maglev table may differ from its peers'; a backend
    /// added at runtime must not withdraw an address that serves.
    Hold(String),
    /// Withdraw it (or do not announce it), for this reason.
    Withdraw(String),
}

impl Want {
    /// Why it is not to be announced (or not yet); none for [`Want::Announce`].
    pub fn reason(&self) -> Option<&str> {
        match self {
            Want::Announce => None,
            Want::Hold(why) | Want::Withdraw(why) => Some(why.as_str()),
        }
    }
}

/// For each address that may be announced, what to do with it.
pub type Wanted = BTreeMap<IpAddr, Want>;

/// What to announce, of `candidates`, given what tracking found.
pub fn decide(candidates: &BTreeSet<IpAddr>, tracked: &Tracked) -> Wanted {
    candidates
        .iter()
        .map(|&address| {
            let want = if !tracked.dataplane.is_empty() {
                Want::Withdraw(format!(
                    "the data plane is not serving: {}",
                    tracked.dataplane.join("; ")
                ))
            } else {
                match tracked.addresses.get(&address) {
                    None => Want::Withdraw("no VIP has this address".to_owned()),
                    Some(vips) if !vips.iter().any(|(_, usable)| *usable) => {
                        let names: Vec<&str> = vips.iter().map(|(name, _)| name.as_str()).collect();
                        Want::Withdraw(format!(
                            "no usable backend (all down, disabled or drained) in vip {}",
                            names.join(", ")
                        ))
                    }
                    Some(_) => match tracked.awaiting_checks.get(&address) {
                        Some(names) if !names.is_empty() => Want::Hold(format!(
                            "waiting for the first health checks of vip {}",
                            names.join(", ")
                        )),
                        _ => Want::Announce,
                    },
                }
            };
            (address, want)
        })
        .collect()
}

/// The addresses the agent asks to announce (held ones not included).
pub fn announced(wanted: &Wanted) -> BTreeSet<IpAddr> {
    wanted
        .iter()
        .filter(|(_, want)| **want == Want::Announce)
        .map(|(address, _)| *address)
        .collect()
}

/// The health-checked VIPs, by address, of which a backend has had no check result
/// yet (a check this machine could not run is no result). Unchecked VIPs never wait.
pub fn awaiting_first_checks(
    vips: &[VipSpec],
    health: &BTreeMap<BackendKey, BackendHealth>,
) -> BTreeMap<IpAddr, Vec<String>> {
    let mut waiting: BTreeMap<IpAddr, Vec<String>> = BTreeMap::new();
    for vip in vips.iter().filter(|v| v.health_check.is_some()) {
        let unchecked = vip.backends.iter().any(|b| {
            let key = (vip.name.clone(), SocketAddr::new(b.address, b.port));
            health.get(&key).is_none_or(|h| h.last_ok.is_none())
        });
        if unchecked {
            waiting
                .entry(vip.address)
                .or_default()
                .push(vip.name.clone());
        }
    }
    waiting
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::health::CheckFailure;

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
        assert_eq!(wanted[&ip("10.0.0.100")], Want::Announce);
        let mail = wanted[&ip("10.0.0.101")]
            .reason()
            .expect("mail has no backend");
        assert!(
            mail.contains("no usable backend") && mail.contains("mail"),
            "{mail}"
        );
        assert_eq!(
            wanted[&ip("10.0.0.102")],
            Want::Withdraw("no VIP has this address".to_owned())
        );
        assert_eq!(announced(&wanted), BTreeSet::from([ip("10.0.0.100")]));
    }

    #[test]
    fn a_data_plane_fault_withdraws_everything() {
        let candidates = BTreeSet::from([ip("10.0.0.100")]);
        let mut t = tracked(&[("10.0.0.100", "www", true)]);
        t.dataplane.push("interface lbc is down".into());
        t.awaiting_checks
            .insert(ip("10.0.0.100"), vec!["www".to_owned()]);
        let wanted = decide(&candidates, &t);
        let Want::Withdraw(why) = &wanted[&ip("10.0.0.100")] else {
            panic!("withdrawn, not held: {wanted:?}");
        };
        assert!(why.contains("interface lbc is down"), "{why}");
        assert!(announced(&wanted).is_empty());
    }

    #[test]
    fn an_address_waits_for_the_first_checks_of_every_checked_vip_on_it() {
        let candidates = BTreeSet::from([ip("10.0.0.100"), ip("10.0.0.101")]);
        // www is unchecked and usable, dns checked and waiting: the address waits.
        let mut t = tracked(&[
            ("10.0.0.100", "www", true),
            ("10.0.0.100", "dns", true),
            ("10.0.0.101", "mail", false),
        ]);
        t.awaiting_checks
            .insert(ip("10.0.0.100"), vec!["dns".to_owned()]);
        t.awaiting_checks
            .insert(ip("10.0.0.101"), vec!["mail".to_owned()]);
        let wanted = decide(&candidates, &t);
        let Want::Hold(why) = &wanted[&ip("10.0.0.100")] else {
            panic!("held: {wanted:?}");
        };
        assert!(
            why.starts_with("waiting for the first health checks") && why.contains("dns"),
            "{why}"
        );
        assert!(
            matches!(&wanted[&ip("10.0.0.101")], Want::Withdraw(why) if why.contains("no usable backend")),
            "no usable backend at all withdraws, checked or not: {wanted:?}"
        );
        assert!(announced(&wanted).is_empty());
        t.awaiting_checks.clear();
        assert_eq!(decide(&candidates, &t)[&ip("10.0.0.100")], Want::Announce);
    }

    fn vips(text: &str) -> Vec<VipSpec> {
        #[derive(serde::Deserialize)]
        struct File {
            vips: Vec<VipSpec>,
        }
        toml::from_str::<File>(text)
            .unwrap_or_else(|e| panic!("VIPs: {e}"))
            .vips
    }

    #[test]
    fn checked_vips_wait_until_every_backend_has_a_result() {
        let vips = vips(
            r#"
            [[vips]]
            name = "www"
            address = "10.0.0.100"
            port = 80
            scheduler = "maglev"
            backends = [{ address = "10.1.0.11", port = 80 }, { address = "10.1.0.12", port = 80 }]
            health_check = {}

            [[vips]]
            name = "dns"
            address = "10.0.0.101"
            port = 53
            scheduler = "maglev"
            backends = [{ address = "10.1.0.21", port = 53 }]
            "#,
        );
        let key = |vip: &str, backend: &str| -> BackendKey {
            (
                vip.to_owned(),
                backend.parse().unwrap_or_else(|e| panic!("{backend}: {e}")),
            )
        };
        let mut health = BTreeMap::new();
        let www = BTreeMap::from([(ip("10.0.0.100"), vec!["www".to_owned()])]);
        // Nothing checked yet; dns has no check and never waits.
        assert_eq!(awaiting_first_checks(&vips, &health), www);
        // One backend checked (a failure is a result too), a check of the other skipped
        // (this machine could not run it): still waiting.
        let mut first = BackendHealth::default();
        first.record(&Err(CheckFailure::Backend("refused".into())), 2, 1);
        health.insert(key("www", "10.1.0.11:80"), first);
        let mut second = BackendHealth::default();
        second.record(&Err(CheckFailure::Local("out of files".into())), 2, 1);
        health.insert(key("www", "10.1.0.12:80"), second.clone());
        assert_eq!(awaiting_first_checks(&vips, &health), www);
        second.record(&Ok(Duration::from_millis(1)), 2, 1);
        health.insert(key("www", "10.1.0.12:80"), second);
        assert!(awaiting_first_checks(&vips, &health).is_empty());
    }
}

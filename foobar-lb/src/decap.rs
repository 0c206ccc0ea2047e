//! `foobar-lb decap`: the backend side of direct server return. The XDP program
//! `decap` takes the balancer's outer header off packets for this backend's VIPs;
//! the VIPs go on the loopback so the kernel accepts the inner packets and answers
//! from them, and ARP is told not to answer for them on other interfaces (the
//! balancer does; LVS-DR's `arp_ignore`/`arp_announce`). On the way out everything
//! it changed is put back.

use std::{
    future::Future,
    io,
    net::IpAddr,
    path::{Path, PathBuf},
};

use anyhow::{Context, anyhow};
use aya::{
    EbpfLoader,
    maps::{
        Array, HashMap, PerCpuArray,
        lpm_trie::{Key as LpmKey, LpmTrie},
    },
    programs::{Xdp, XdpMode},
};
use foobar_lb_common::{
    VipAddr,
    decap::{DecapCounters, DecapReason, DecapSettings, map_names as names},
};
use futures_util::TryStreamExt;
use tracing::{info, warn};

use crate::topology::words;

/// The decapsulation program, built by `build.rs`.
pub static DECAP_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/decap"));

/// What `foobar-lb decap` does.
#[derive(Clone, Debug)]
pub struct DecapOptions {
    /// Where encapsulated packets arrive.
    pub interfaces: Vec<String>,
    /// The VIPs this backend serves.
    pub vips: Vec<IpAddr>,
    /// GUE's UDP port; 0: none.
    pub gue_port: u16,
    /// How to attach.
    pub xdp_mode: XdpMode,
    /// Put the VIPs on the loopback and keep ARP from answering for them elsewhere.
    pub configure_loopback: bool,
    /// The outer sources accepted (the balancers' prefixes); empty: any.
    pub sources: Vec<ipnet::IpNet>,
}

/// Runs until `shutdown`, then undoes what it did; returns the counters.
pub async fn run(
    options: DecapOptions,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<DecapCounters> {
    let mut ebpf = EbpfLoader::new()
        .load(DECAP_OBJECT)
        .context("loading the decapsulation program")?;
    {
        let mut vips: HashMap<_, VipAddr, u32> = HashMap::try_from(
            ebpf.map_mut(names::DECAP_VIPS)
                .ok_or_else(|| anyhow!("no map {}", names::DECAP_VIPS))?,
        )?;
        for vip in &options.vips {
            vips.insert(VipAddr { addr: words(*vip) }, 1, 0)?;
        }
        let mut settings: Array<_, DecapSettings> = Array::try_from(
            ebpf.map_mut(names::DECAP_SETTINGS)
                .ok_or_else(|| anyhow!("no map {}", names::DECAP_SETTINGS))?,
        )?;
        let gue_port = options.gue_port.to_be();
        let check_sources = u16::from(!options.sources.is_empty());
        settings.set(
            0,
            DecapSettings {
                gue_port,
                check_sources,
            },
            0,
        )?;
        for prefix in &options.sources {
            let len = u32::from(prefix.prefix_len());
            let words = words(prefix.network());
            if prefix.addr().is_ipv4() {
                let mut trie: LpmTrie<_, u32, u8> = LpmTrie::try_from(
                    ebpf.map_mut(names::DECAP_SOURCES)
                        .ok_or_else(|| anyhow!("no map {}", names::DECAP_SOURCES))?,
                )?;
                trie.insert(&LpmKey::new(len, words[0]), 1, 0)?;
            } else {
                let mut trie: LpmTrie<_, [u32; 4], u8> = LpmTrie::try_from(
                    ebpf.map_mut(names::DECAP_SOURCES6)
                        .ok_or_else(|| anyhow!("no map {}", names::DECAP_SOURCES6))?,
                )?;
                trie.insert(&LpmKey::new(len, words), 1, 0)?;
            }
        }
    }
    if options.sources.is_empty() {
        warn!(
            "decapsulating from any source: name the balancers' source prefixes with --from \
             (their ipip_source prefixes and their addresses toward this host)"
        );
    }
    let program: &mut Xdp = ebpf
        .program_mut("decap")
        .ok_or_else(|| anyhow!("no program decap"))?
        .try_into()?;
    program.load().context("the verifier refused the program")?;
    for interface in &options.interfaces {
        program
            .attach(interface, options.xdp_mode)
            .with_context(|| format!("attaching to {interface}"))?;
    }
    let mut host = if options.configure_loopback {
        Some(Host::configure(&options).await?)
    } else {
        None
    };
    info!(
        interfaces = ?options.interfaces,
        vips = ?options.vips,
        gue_port = options.gue_port,
        "decapsulating"
    );
    shutdown.await;
    let counters = counters(&ebpf)?;
    // Detaching is dropping the program's links (with `ebpf`).
    drop(ebpf);
    if let Some(host) = host.take() {
        host.restore().await;
    }
    Ok(counters)
}

/// The counters summed over CPUs.
fn counters(ebpf: &aya::Ebpf) -> anyhow::Result<DecapCounters> {
    let map: PerCpuArray<_, DecapCounters> = PerCpuArray::try_from(
        ebpf.map(names::DECAP_COUNTERS)
            .ok_or_else(|| anyhow!("no map {}", names::DECAP_COUNTERS))?,
    )?;
    let mut total = DecapCounters::default();
    for cpu in map.get(&0, 0)?.iter() {
        total.add(cpu);
    }
    Ok(total)
}

/// The counters by name, as `foobar-lb decap` prints them.
pub fn counters_json(counters: &DecapCounters) -> serde_json::Value {
    let by_reason: serde_json::Map<String, serde_json::Value> = DecapReason::ALL
        .iter()
        .map(|&r| (r.name().to_owned(), counters.get(r).into()))
        .collect();
    serde_json::json!({ "decap": by_reason })
}

/// What was changed on the host, to be put back.
struct Host {
    handle: rtnetlink::Handle,
    loopback: u32,
    /// VIP addresses added to the loopback (not those that were there).
    added: Vec<IpAddr>,
    /// Sysctl files and their values before.
    sysctls: Vec<(PathBuf, String)>,
}

impl Host {
    async fn configure(options: &DecapOptions) -> anyhow::Result<Host> {
        let (connection, handle, _) = rtnetlink::new_connection()?;
        tokio::spawn(connection);
        let loopback = crate::topology::Topology::read()
            .await?
            .links
            .iter()
            .find(|(_, l)| l.name == "lo")
            .map(|(&i, _)| i)
            .ok_or_else(|| anyhow!("no loopback interface"))?;
        let mut host = Host {
            handle,
            loopback,
            added: Vec::new(),
            sysctls: Vec::new(),
        };
        for &vip in &options.vips {
            if host.has_address(vip).await? {
                continue;
            }
            let prefix = if vip.is_ipv4() { 32 } else { 128 };
            host.handle
                .address()
                .add(loopback, vip, prefix)
                .execute()
                .await
                .with_context(|| format!("adding {vip} to the loopback"))?;
            host.added.push(vip);
        }
        // Linux answers ARP for any of its addresses on any interface: the VIPs must
        // be answered for by the balancer alone.
        if options.vips.iter().any(IpAddr::is_ipv4) {
            let scopes =
                std::iter::once("all").chain(options.interfaces.iter().map(String::as_str));
            for scope in scopes {
                host.set_sysctl(&format!("net/ipv4/conf/{scope}/arp_ignore"), "1")?;
                host.set_sysctl(&format!("net/ipv4/conf/{scope}/arp_announce"), "2")?;
            }
        }
        Ok(host)
    }

    async fn has_address(&self, vip: IpAddr) -> anyhow::Result<bool> {
        let mut found = self
            .handle
            .address()
            .get()
            .set_link_index_filter(self.loopback)
            .set_address_filter(vip)
            .execute();
        Ok(found.try_next().await?.is_some())
    }

    fn set_sysctl(&mut self, name: &str, value: &str) -> io::Result<()> {
        let path = Path::new("/proc/sys").join(name);
        let before = std::fs::read_to_string(&path)?.trim().to_owned();
        if before != value {
            std::fs::write(&path, value)?;
            self.sysctls.push((path, before));
        }
        Ok(())
    }

    async fn restore(self) {
        for (path, before) in self.sysctls.iter().rev() {
            if let Err(e) = std::fs::write(path, before) {
                warn!(path = %path.display(), error = %e, "restoring a sysctl");
            }
        }
        for vip in &self.added {
            let mut found = self
                .handle
                .address()
                .get()
                .set_link_index_filter(self.loopback)
                .set_address_filter(*vip)
                .execute();
            while let Ok(Some(message)) = found.try_next().await {
                if let Err(e) = self.handle.address().del(message).execute().await {
                    warn!(%vip, error = %e, "taking a VIP off the loopback");
                }
            }
        }
    }
}

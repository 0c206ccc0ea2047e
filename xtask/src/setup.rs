//! `cargo xtask setup`: brings a fresh machine to where the workspace builds and its
//! tests run, and does nothing on a machine that is already there.

use std::{path::Path, process::Command};

use anyhow::{Context, Result, bail};

use crate::run as run_command;

/// Debian packages the tests use: `ip` and `sysctl` for the namespaces.
/// Debian packages: namespaces and links (iproute2, ethtool, nsenter from util-linux),
/// real clients (curl, wrk), the balancers we compare against (nftables, haproxy) and
/// a headless browser for the status page (chromium).
const PACKAGES: &[&str] = &[
    "iproute2",
    "procps",
    "util-linux",
    "ethtool",
    "curl",
    "wrk",
    "nftables",
    "haproxy",
    "chromium",
    // The VRRP peer foobar-lb must interoperate with (failover tests).
    "keepalived",
    // An HTTPS backend and its certificate for the HTTPS health-check test.
    "openssl",
    // The stack behind the balancer: MariaDB without a system service of its own
    // (foobar-db runs it), the site's DNS server, nginx to compare foobar-web with,
    // and certutil to make headless Chromium trust the lab's CA.
    "mariadb-server-core",
    "mariadb-client",
    "dnsmasq-base",
    "nginx",
    "libnss3-tools",
    // dig, to check the lab's DNS answers.
    "bind9-dnsutils",
    // Floods of SYNs and ACKs from random sources.
    "hping3",
    // Pings of VIPs (answered by the balancer); python3 for the upload sink of the
    // path-MTU test.
    "iputils-ping",
    "python3",
    // Let's Encrypt's test ACME server, and captures that show what crosses a link.
    "pebble",
    "tcpdump",
    // `systemd-analyze verify` of the package's unit (dpkg-deb, which builds the
    // package, comes with dpkg itself).
    "systemd",
    // BIRD 2: the BGP speaker the agent runs for `[bgp]`, and the BGP lab's router.
    "bird2",
];

/// Debian packages installed without the packages they recommend.
const WITHOUT_RECOMMENDS: &[&str] = &[
    // promtool, Prometheus's checker of /metrics (tests/promtool.rs). Debian ships it
    // only with the server, which is not started here: the container has no init
    // system and its policy-rc.d refuses service starts. Its recommended node
    // exporter is not needed.
    "prometheus",
];

/// Where bpf-linker finds the nightly's libLLVM; it keeps an rpath to it, so it must
/// outlive the build (not /tmp).
const LLVM_PREFIX: &str = "/opt/foobar-lb/llvm";

/// bpf-linker release known to build against this machine's nightly.
const BPF_LINKER_VERSION: &str = "0.13.0";

/// Installs whatever is missing; says so when nothing is.
pub fn ensure() -> Result<()> {
    let mut did = Vec::new();
    if rust_src_missing()? {
        run_command(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
        did.push("installed nightly rust-src");
    }
    if !works("bpf-linker", &["--version"]) {
        install_bpf_linker()?;
        did.push("installed bpf-linker");
    }
    let installed = install_missing_packages()?;
    if !installed.is_empty() {
        did.push("installed Debian packages");
    }
    // Only a bird.service this very install enabled: a host's own BIRD is its own.
    if installed.contains(&"bird2") && disable_host_bird()? {
        did.push("disabled the host's bird.service (the agent runs its own BIRD)");
    }
    if did.is_empty() {
        eprintln!("setup: nothing to do, everything is installed");
    } else {
        eprintln!("setup: {}", did.join(", "));
    }
    Ok(())
}

/// Installs the Debian packages that are not installed yet; which there were.
fn install_missing_packages() -> Result<Vec<&'static str>> {
    let not_installed = |list: &[&'static str]| -> Vec<&'static str> {
        list.iter()
            .copied()
            .filter(|p| !package_installed(p))
            .collect()
    };
    let batches = [
        (not_installed(PACKAGES), None),
        (
            not_installed(WITHOUT_RECOMMENDS),
            Some("--no-install-recommends"),
        ),
    ];
    let names: Vec<&'static str> = batches
        .iter()
        .flat_map(|(p, _)| p.iter().copied())
        .collect();
    if names.is_empty() {
        return Ok(names);
    }
    eprintln!("setup: installing {}", names.join(" "));
    run_quietly(Command::new("apt-get").args(["update", "-qq"]))?;
    for (packages, option) in batches.iter().filter(|(p, _)| !p.is_empty()) {
        run_quietly(
            Command::new("apt-get")
                .args(["install", "-y", "-qq"])
                .args(option)
                .args(packages)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
    }
    Ok(names)
}

/// Debian's bird2 enables a `bird.service` that would run BIRD for the host itself;
/// the agent runs its own BIRD, and the lab's router one of its own. Where systemd is
/// the init system and the service is enabled or running, it is stopped and disabled;
/// whether it was.
fn disable_host_bird() -> Result<bool> {
    let systemd_is_init =
        std::fs::read_to_string("/proc/1/comm").is_ok_and(|c| c.trim() == "systemd");
    if !systemd_is_init {
        return Ok(false);
    }
    let enabled = works("systemctl", &["is-enabled", "--quiet", "bird.service"]);
    let active = works("systemctl", &["is-active", "--quiet", "bird.service"]);
    if !enabled && !active {
        return Ok(false);
    }
    run_quietly(Command::new("systemctl").args(["disable", "--now", "bird.service"]))?;
    Ok(true)
}

/// Runs `cmd` with its output kept back, and shown only if it fails: apt-get and dpkg
/// print lines for every package even with `-qq`.
fn run_quietly(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("spawning {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

fn works(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .output()
        .is_ok_and(|o| o.status.success())
}

fn output(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8(out.stdout)?)
}

fn rust_src_missing() -> Result<bool> {
    if !works("rustc", &["+nightly", "--version"]) {
        bail!(
            "the nightly toolchain is missing: `rustup toolchain install nightly` (the eBPF program needs it)"
        );
    }
    let installed = output(
        "rustup",
        &["component", "list", "--toolchain", "nightly", "--installed"],
    )?;
    Ok(!installed.lines().any(|l| l.starts_with("rust-src")))
}

fn package_installed(name: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", name])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

/// Builds bpf-linker against the nightly's own libLLVM (see shared/TOOLCHAIN.md):
/// the LLVM major comes from `rustc +nightly -vV`, never hard-coded.
fn install_bpf_linker() -> Result<()> {
    let version = output("rustc", &["+nightly", "-vV"])?;
    let major = version
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .context("no LLVM version in `rustc +nightly -vV`")?
        .to_owned();
    let sysroot = output("rustc", &["+nightly", "--print", "sysroot"])?;
    let lib_dir = Path::new(sysroot.trim()).join("lib");
    // The real shared object (libLLVM-*-rust-*.so beside it is a linker script).
    let lib = std::fs::read_dir(&lib_dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM.so."))
        })
        .with_context(|| format!("no libLLVM.so.* in {}", lib_dir.display()))?;
    let prefix_lib = Path::new(LLVM_PREFIX).join("lib");
    std::fs::create_dir_all(&prefix_lib)?;
    for link in [
        prefix_lib.join("libLLVM.so"),
        prefix_lib.join(lib.file_name().unwrap()),
    ] {
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&lib, &link)?;
    }
    eprintln!(
        "setup: building bpf-linker {BPF_LINKER_VERSION} against the nightly's LLVM {major} (about a minute)"
    );
    run_command(
        Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--no-default-features",
                "--features",
            ])
            .arg(format!("llvm-{major}"))
            .env("LLVM_PREFIX", LLVM_PREFIX),
    )
}

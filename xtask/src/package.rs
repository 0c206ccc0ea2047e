//! `cargo xtask package`: the Debian package of the balancer, built with dpkg-deb
//! itself (no cargo-deb to fetch): the release binary, its systemd unit, an example
//! configuration (a conffile), the man page, shell completions and the copyright.
//!
//! The tree is staged under `target/package/foobar-lb_<version>_<arch>/` and built by
//! `dpkg-deb --root-owner-group`, so every file is root's whoever builds it. The unit
//! and the example configuration live in `deploy/`; `tests/tests/package.rs` installs
//! the package into a scratch root and checks it, the unit with `systemd-analyze
//! verify`.

use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

/// The package's name, and the binary's.
const NAME: &str = "foobar-lb";
/// The workspace's version (xtask shares it with foobar-lb).
const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The systemd unit.
const UNIT: &str = include_str!("../../deploy/systemd/foobar-lb.service");
/// The example configuration, installed as /etc/foobar-lb/foobar-lb.toml.
const CONFIG: &str = include_str!("../../deploy/foobar-lb.toml");
/// The workspace's `license`, which [`COPYRIGHT`] spells out.
const LICENSE: &str = "MIT OR Apache-2.0";

/// Builds the release binary and the package; returns the package's path.
pub fn build() -> Result<PathBuf> {
    let root = workspace_root();
    let manifest = fs::read_to_string(root.join("Cargo.toml")).context("reading Cargo.toml")?;
    if !manifest.contains(&format!("license = \"{LICENSE}\"")) {
        bail!(
            "the workspace's license is no longer {LICENSE}: update COPYRIGHT in xtask/src/package.rs"
        );
    }
    // The whole workspace, as the benchmarks build it: a subset would unify the
    // dependencies' features differently and rebuild them (see NODE_BINS).
    crate::run(
        Command::new("cargo")
            .current_dir(&root)
            .args(["build", "--release", "--bins"]),
    )?;
    let binary = root.join("target/release").join(NAME);
    let executable = fs::read(&binary).with_context(|| format!("reading {}", binary.display()))?;
    let arch = output(Command::new("dpkg").arg("--print-architecture"))?;
    let arch = arch.trim();
    let stage = root.join(format!("target/package/{NAME}_{VERSION}_{arch}"));
    let deb = root.join(format!("target/package/{NAME}_{VERSION}_{arch}.deb"));
    if stage.exists() {
        fs::remove_dir_all(&stage).with_context(|| format!("removing {}", stage.display()))?;
    }

    put(&stage, "usr/sbin/foobar-lb", &executable, 0o755)?;
    put(
        &stage,
        "usr/lib/systemd/system/foobar-lb.service",
        UNIT,
        0o644,
    )?;
    put(&stage, "etc/foobar-lb/foobar-lb.toml", CONFIG, 0o644)?;
    let man = in_section_8(&output(Command::new(&binary).arg("man"))?)?;
    put_gzipped(&stage, "usr/share/man/man8/foobar-lb.8", &man)?;
    for (shell, path) in [
        ("bash", "usr/share/bash-completion/completions/foobar-lb"),
        ("zsh", "usr/share/zsh/vendor-completions/_foobar-lb"),
        ("fish", "usr/share/fish/vendor_completions.d/foobar-lb.fish"),
    ] {
        let script = output(Command::new(&binary).args(["completions", shell]))?;
        put(&stage, path, &script, 0o644)?;
    }
    put(
        &stage,
        "usr/share/doc/foobar-lb/copyright",
        COPYRIGHT,
        0o644,
    )?;
    let readme = fs::read_to_string(root.join("README.md")).context("reading README.md")?;
    put_gzipped(&stage, "usr/share/doc/foobar-lb/README.md", &readme)?;
    // Prometheus alert rules, for an operator's `rule_files`.
    for name in ["foobar-lb.yml", "certificates.yml"] {
        let rules = fs::read_to_string(root.join("deploy/alerts").join(name))
            .with_context(|| format!("reading deploy/alerts/{name}"))?;
        put(
            &stage,
            &format!("usr/share/foobar-lb/alerts/{name}"),
            rules,
            0o644,
        )?;
    }

    let control = control(arch, installed_size_kib(&stage)?, &depends(&executable));
    put(&stage, "DEBIAN/control", &control, 0o644)?;
    put(
        &stage,
        "DEBIAN/conffiles",
        "/etc/foobar-lb/foobar-lb.toml\n",
        0o644,
    )?;
    put(&stage, "DEBIAN/postinst", POSTINST, 0o755)?;
    put(&stage, "DEBIAN/prerm", PRERM, 0o755)?;
    put(&stage, "DEBIAN/postrm", POSTRM, 0o755)?;
    directories_0755(&stage)?;

    crate::run(
        Command::new("dpkg-deb")
            .args(["--root-owner-group", "--build"])
            .arg(&stage)
            .arg(&deb),
    )?;
    Ok(deb)
}

/// The workspace's root: xtask's parent.
fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask sits in the workspace")
        .to_owned()
}

/// A command's standard output, failing with its command line if it fails.
fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("spawning {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8(out.stdout).with_context(|| format!("{cmd:?} printed other than UTF-8"))
}

/// Writes `contents` at `path` under `stage` with `mode` (whatever the umask).
fn put(stage: &Path, path: &str, contents: impl AsRef<[u8]>, mode: u32) -> Result<()> {
    let path = stage.join(path);
    let dir = path.parent().expect("a file in a directory");
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    fs::write(&path, contents).with_context(|| format!("writing {}", path.display()))?;
    fs::set_permissions(&path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", path.display()))
}

/// Writes `contents` at `path.gz`, as Debian wants man pages and long documents:
/// `gzip -9n` (no name or time stamp inside, so the same input gives the same bytes).
fn put_gzipped(stage: &Path, path: &str, contents: &str) -> Result<()> {
    put(stage, path, contents, 0o644)?;
    crate::run(Command::new("gzip").arg("-9nf").arg(stage.join(path)))
}

/// clap_mangen's page titled for section 8 (system administration: the binary is in
/// /usr/sbin), with the source and manual in their places.
fn in_section_8(roff: &str) -> Result<String> {
    let mut page = String::with_capacity(roff.len());
    let mut titled = false;
    for line in roff.lines() {
        if !titled && let Some(args) = line.strip_prefix(".TH ") {
            let title = args.split(' ').next().unwrap_or(NAME);
            page.push_str(&format!(
                ".TH {title} 8 \"\" \"{NAME} {VERSION}\" \"System Administration\"\n"
            ));
            titled = true;
        } else {
            page.push_str(line);
            page.push('\n');
        }
    }
    if !titled {
        bail!("`foobar-lb man` printed no .TH line");
    }
    Ok(page)
}

/// Installed-Size: the files' sizes in KiB, each rounded up, as dpkg-gencontrol counts.
fn installed_size_kib(stage: &Path) -> Result<u64> {
    fn walk(dir: &Path, total: &mut u64) -> Result<()> {
        for entry in fs::read_dir(dir)? {
            let entry = entry?;
            let meta = entry.metadata()?;
            if meta.is_dir() {
                if entry.file_name() != "DEBIAN" {
                    walk(&entry.path(), total)?;
                }
            } else {
                *total += meta.len().div_ceil(1024);
            }
        }
        Ok(())
    }
    let mut total = 0;
    walk(stage, &mut total)?;
    Ok(total)
}

/// Depends: what the binary is linked against (glibc at the newest symbol version it
/// uses, libgcc_s for unwinding), and /bin/kill for the unit's ExecReload. Not
/// iproute2: the agent talks rtnetlink itself and runs no command.
fn depends(binary: &[u8]) -> String {
    let libc = match glibc_needed(binary) {
        Some(version) => format!("libc6 (>= {version})"),
        None => "libc6".to_owned(),
    };
    format!("{libc}, libgcc-s1, procps")
}

/// The newest `GLIBC_x.y[.z]` symbol version named in the binary (its dynamic string
/// table names every version it needs).
fn glibc_needed(binary: &[u8]) -> Option<String> {
    const TAG: &[u8] = b"GLIBC_";
    binary
        .windows(TAG.len())
        .enumerate()
        .filter(|(_, window)| *window == TAG)
        .filter_map(|(at, _)| {
            let text: String = binary[at + TAG.len()..]
                .iter()
                .take_while(|b| b.is_ascii_digit() || **b == b'.')
                .map(|&b| char::from(b))
                .collect();
            let version: Vec<u32> = text
                .split('.')
                .map(str::parse::<u32>)
                .collect::<Result<_, _>>()
                .ok()?;
            (version.len() >= 2).then_some(version)
        })
        .max()
        .map(|version| {
            version
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(".")
        })
}

/// DEBIAN/control.
fn control(arch: &str, installed_size: u64, depends: &str) -> String {
    // DEBFULLNAME and DEBEMAIL are how Debian's tools learn who packages.
    let maintainer = format!(
        "{} <{}>",
        std::env::var("DEBFULLNAME").unwrap_or_else(|_| "foobar-lb developers".into()),
        std::env::var("DEBEMAIL").unwrap_or_else(|_| "root@localhost".into())
    );
    format!(
        "Package: {NAME}
Version: {VERSION}
Architecture: {arch}
Maintainer: {maintainer}
Installed-Size: {installed_size}
Depends: {depends}
Suggests: bird2
Section: net
Priority: optional
Description: XDP layer-4 load balancer: agent and command line
 foobar-lb steers packets for virtual IPs to backends inside the network
 driver's receive path (XDP): weighted round robin, least connections or
 Maglev consistent hashing, with NAT, full NAT or direct server return, IPv4
 and IPv6, a flow table that keeps each connection on its backend.
 .
 The agent (the foobar-lb service) owns the data plane, checks the backends'
 health and fails the VIPs over to a peer with VRRP; the other commands drive
 it over its control socket. Edit /etc/foobar-lb/foobar-lb.toml, then
 systemctl enable --now foobar-lb.
"
    )
}

/// After unpacking: systemd learns the unit. An upgrade restarts a running agent,
/// which keeps the data plane (--on-exit keep): the new one takes the pins over, no
/// flow lost. A first install starts nothing: the configuration needs its interface.
const POSTINST: &str = r#"#!/bin/sh
set -e
if [ "$1" = configure ]; then
    if [ -d /run/systemd/system ]; then
        systemctl daemon-reload || true
        if [ -n "$2" ]; then
            systemctl try-restart foobar-lb.service ||
                echo "foobar-lb: the agent did not restart; see journalctl -u foobar-lb (the pinned data plane keeps forwarding)" >&2
        fi
    fi
    if [ -z "$2" ]; then
        echo "foobar-lb: edit /etc/foobar-lb/foobar-lb.toml (its interface is a placeholder), then: systemctl enable --now foobar-lb"
    fi
fi
exit 0
"#;

/// Before removal (not before an upgrade): a real stop. The agent keeps the data
/// plane when it exits, so it is restarted as one that detaches (invisible: the one
/// stopping keeps), then stopped: it detaches, removes its pins and hands VRRP over
/// (see the unit). Pins left anyway (that restart failed, an agent stopped without a
/// real stop, one run by hand) are removed, which detaches the program. Only where
/// systemd runs: in a chroot, /sys/fs/bpf may be the host's.
const PRERM: &str = r#"#!/bin/sh
set -e
if [ "$1" = remove ] && [ -d /run/systemd/system ]; then
    if systemctl is-active --quiet foobar-lb.service; then
        echo FOOBAR_LB_ON_EXIT=detach > /run/foobar-lb/on-exit || true
        systemctl restart foobar-lb.service || true
        systemctl stop foobar-lb.service || true
    fi
    if [ -d /sys/fs/bpf/foobar-lb ]; then
        rm -rf /sys/fs/bpf/foobar-lb
        echo "foobar-lb: removed the pinned data plane in /sys/fs/bpf/foobar-lb" >&2
    fi
fi
exit 0
"#;

/// After removal: systemd forgets the unit; a purge also removes the state file and
/// the enablement link (the unit file it came from is gone, so `systemctl disable`
/// no longer can).
const POSTRM: &str = r#"#!/bin/sh
set -e
if [ "$1" = remove ] || [ "$1" = purge ]; then
    if [ -d /run/systemd/system ]; then
        systemctl daemon-reload || true
    fi
fi
if [ "$1" = purge ]; then
    rm -rf /var/lib/foobar-lb
    rm -f /etc/systemd/system/multi-user.target.wants/foobar-lb.service
fi
exit 0
"#;

/// /usr/share/doc/foobar-lb/copyright, in Debian's machine-readable format: the
/// workspace's license, MIT (Expat) or Apache-2.0.
const COPYRIGHT: &str = "\
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: foobar-lb

Files: *
Copyright: the foobar-lb authors
License: Expat or Apache-2.0

License: Expat
 Permission is hereby granted, free of charge, to any person obtaining a copy
 of this software and associated documentation files (the \"Software\"), to deal
 in the Software without restriction, including without limitation the rights
 to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
 copies of the Software, and to permit persons to whom the Software is
 furnished to do so, subject to the following conditions:
 .
 The above copyright notice and this permission notice shall be included in
 all copies or substantial portions of the Software.
 .
 THE SOFTWARE IS PROVIDED \"AS IS\", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
 IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
 FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
 AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
 LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
 OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN
 THE SOFTWARE.

License: Apache-2.0
 Licensed under the Apache License, Version 2.0 (the \"License\"); you may not
 use this software except in compliance with the License.
 .
 On Debian systems, the complete text of the Apache License, Version 2.0, is in
 /usr/share/common-licenses/Apache-2.0.
";

/// Directories 0755 whatever the umask made them (dpkg-deb refuses a DEBIAN it
/// cannot trust, and the installed tree must be readable).
fn directories_0755(dir: &Path) -> Result<()> {
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755))?;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            directories_0755(&entry.path())?;
        }
    }
    Ok(())
}

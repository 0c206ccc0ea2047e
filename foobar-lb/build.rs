//! Builds the XDP program (`foobar-lb-ebpf`) for the BPF target with aya-build and
//! leaves the objects in OUT_DIR, where `dataplane` embeds them.
//!
//! aya-build passes on every line the nested cargo prints as a `cargo:warning`, so a
//! good build would show a warning per crate compiled. The build runs in a child
//! (this same program), and cargo gets its directives, the compiler's diagnostics,
//! and everything when the build fails.
use std::process::Command;

use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

/// The argument that makes this program build rather than filter.
const BUILD: &str = "--build-ebpf";

fn main() -> anyhow::Result<()> {
    if std::env::args().nth(1).as_deref() == Some(BUILD) {
        return build();
    }
    let out = Command::new(std::env::current_exe()?)
        .arg(BUILD)
        // Progress lines without colour codes, so they can be told apart.
        .env("CARGO_TERM_COLOR", "never")
        .output()
        .context("running the eBPF build")?;
    let failed = !out.status.success();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let progress = line.strip_prefix("cargo:warning=").is_some_and(is_progress);
        if failed || !progress {
            println!("{line}");
        }
    }
    if failed {
        eprint!("{}", String::from_utf8_lossy(&out.stderr));
        return Err(anyhow!("the eBPF build failed ({})", out.status));
    }
    Ok(())
}

/// Whether a line is one of cargo's progress lines (`   Compiling aya-ebpf v0.2.1`,
/// `    Finished ...`): a capitalised verb right-aligned in twelve columns.
fn is_progress(line: &str) -> bool {
    let verb = line.trim_start().split(' ').next().unwrap_or_default();
    let indent = line.len() - line.trim_start().len();
    indent > 0
        && indent + verb.len() == 12
        && verb.starts_with(|c: char| c.is_ascii_uppercase())
        && verb[1..].chars().all(|c| c.is_ascii_lowercase())
}

fn build() -> anyhow::Result<()> {
    let cargo_metadata::Metadata { packages, .. } = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("MetadataCommand::exec")?;
    let ebpf = packages
        .iter()
        .find(|p| p.name.as_str() == "foobar-lb-ebpf")
        .ok_or_else(|| anyhow!("foobar-lb-ebpf package not found"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("no parent for {}", ebpf.manifest_path))?;
    // The upgrade test's build passes its feature on to the program.
    let features: &[&str] = if std::env::var_os("CARGO_FEATURE_LAYOUT_TEST").is_some() {
        &["layout-test"]
    } else {
        &[]
    };
    let package = Package {
        name: ebpf.name.as_str(),
        root_dir: root_dir.as_str(),
        features,
        ..Default::default()
    };
    aya_build::build_ebpf([package], Toolchain::default())?;
    // The pass-through program, where the lab finds it beside the binaries
    // (target/<profile>/xdp-pass.o): iproute2 loads it onto the lab's bridge ports.
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    if let Some(profile_dir) = out.ancestors().nth(3) {
        std::fs::copy(out.join("pass"), profile_dir.join("xdp-pass.o"))
            .context("copying the pass-through program")?;
    }
    Ok(())
}

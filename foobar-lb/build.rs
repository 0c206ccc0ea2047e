//! Builds the XDP program (`foobar-lb-ebpf`) for the BPF target with aya-build and
//! leaves the objects in OUT_DIR, where `dataplane` embeds them.
use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
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
    let package = Package {
        name: ebpf.name.as_str(),
        root_dir: root_dir.as_str(),
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

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
    aya_build::build_ebpf([package], Toolchain::default())
}

//! Pinning on bpffs, so the data plane outlives the agent.
//!
//! Maps are pinned by name in `maps-v<layout>` under the pin directory and XDP links
//! as `link-<interface>`. A new agent (or a new version of the program) reopens the
//! maps as they are, with every flow and counter, and swaps its program into the
//! pinned links atomically (`bpf_link_update`), so forwarding never stops. A build of
//! another map layout migrates the maps first (see `migrate`).

use std::{
    ffi::CString,
    mem::size_of,
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
};

use aya::maps::MapInfo;
use foobar_lb_common::{
    ACL_SCOPE_COUNT, AclKey, AclRule, AddrUse, Backend, Counters, Endpoint, FlowKey, FlowKey6,
    FlowState, Iface, LAYOUT_VERSION, MAX_ACL_RULES, MAX_BACKENDS, MAX_IFINDEX, MAX_NEIGHBOURS,
    MAX_ROUTES, MAX_TX_PORTS, MAX_VIPS, NatTarget, NextHop, RateWindow, ReplyTarget, Route,
    SCHEDULE_STRIDE, SOURCE_LIMIT_CAPACITY, Settings, SourceKey, TrafficStats, VipAddr, VipInfo,
    map_names as names,
};

use crate::migrate::Shape;

/// The magic number `statfs` reports for bpffs.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Failures around the pin directory.
#[derive(Debug, thiserror::Error)]
pub enum PinError {
    /// The directory could not be prepared.
    #[error("pin directory {path}: {message}")]
    Directory {
        /// The directory.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// A pinned map was made by an incompatible build or configuration.
    #[error(
        "pinned map {path} has (key {found_key} B, value {found_value} B, {found_entries} entries) \
         but this agent needs (key {key} B, value {value} B, {entries} entries); \
         restore the old flow_capacity or version, or remove {dir} to start the data plane empty"
    )]
    Layout {
        /// Path of the map.
        path: PathBuf,
        /// Its directory.
        dir: PathBuf,
        /// Key size found.
        found_key: u32,
        /// Value size found.
        found_value: u32,
        /// Entries found.
        found_entries: u32,
        /// Key size needed.
        key: u32,
        /// Value size needed.
        value: u32,
        /// Entries needed.
        entries: u32,
    },
}

fn dir_error(path: &Path, message: impl Into<String>) -> PinError {
    PinError::Directory {
        path: path.to_owned(),
        message: message.into(),
    }
}

/// Makes sure `dir` exists on a bpf filesystem, mounting bpffs on `/sys/fs/bpf` if
/// that is where it belongs and nothing is mounted there yet.
pub fn prepare_dir(dir: &Path) -> Result<(), PinError> {
    if !dir.is_absolute() {
        return Err(dir_error(dir, "must be an absolute path"));
    }
    let bpffs_root = Path::new("/sys/fs/bpf");
    if dir.starts_with(bpffs_root) && !is_bpffs(bpffs_root) {
        mount_bpffs(bpffs_root)?;
    }
    std::fs::create_dir_all(dir).map_err(|e| dir_error(dir, e.to_string()))?;
    if !is_bpffs(dir) {
        return Err(dir_error(
            dir,
            "is not on a bpf filesystem (mount -t bpf bpf <dir>)",
        ));
    }
    Ok(())
}

fn is_bpffs(path: &Path) -> bool {
    let Ok(c_path) = CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: statfs writes into the zeroed struct we own; the path is NUL-terminated.
    unsafe {
        let mut fs: libc::statfs = std::mem::zeroed();
        libc::statfs(c_path.as_ptr(), &mut fs) == 0 && fs.f_type as i64 == BPF_FS_MAGIC
    }
}

fn mount_bpffs(at: &Path) -> Result<(), PinError> {
    let target = CString::new(at.as_os_str().as_bytes()).expect("static path");
    // SAFETY: every pointer is a NUL-terminated string that outlives the call.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(dir_error(
            at,
            format!("mounting bpffs: {}", std::io::Error::last_os_error()),
        ));
    }
    Ok(())
}

/// Where this build's maps are pinned: `maps-v<LAYOUT_VERSION>` in the pin directory.
pub fn maps_dir(pin_dir: &Path) -> PathBuf {
    maps_dir_of(pin_dir, LAYOUT_VERSION)
}

/// Where the maps of layout `version` are pinned (layout 1: the pin directory itself).
pub fn maps_dir_of(pin_dir: &Path, version: u32) -> PathBuf {
    if version <= 1 {
        return pin_dir.to_owned();
    }
    pin_dir.join(format!("maps-v{version}"))
}

/// The layouts (2 and later) with a map directory under the pin directory.
pub fn layout_versions(pin_dir: &Path) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir(pin_dir) else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_prefix("maps-v"))
                .and_then(|v| v.parse().ok())
        })
        .collect()
}

/// The path of a pinned map.
pub fn map_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}

/// The path of the pinned XDP link of an interface.
pub fn link_path(dir: &Path, interface: &str) -> PathBuf {
    dir.join(format!("link-{interface}"))
}

/// Interfaces with a pinned link in `dir`.
pub fn pinned_interfaces(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut found: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_prefix("link-"))
                .map(str::to_owned)
        })
        .collect();
    found.sort();
    found
}

/// Whether any map of ours is pinned in `dir`.
pub fn has_pinned_maps(dir: &Path) -> bool {
    names::ALL.iter().any(|n| map_path(dir, n).exists())
}

/// The key size, value size (`None`: not checked) and entries this build gives a map.
pub fn expected_shape(name: &str, flow_capacity: u32) -> Shape {
    let (key, value, entries) = expected_layout(name, flow_capacity);
    Shape {
        key: key as u32,
        value: value.map(|v| v as u32),
        entries,
    }
}

/// Key size, value size (`None`: not checked) and entries this build expects of a map.
fn expected_layout(name: &str, flow_capacity: u32) -> (usize, Option<usize>, u32) {
    match name {
        names::VIPS => (size_of::<Endpoint>(), Some(size_of::<VipInfo>()), MAX_VIPS),
        names::VIP_ADDRS => (size_of::<VipAddr>(), Some(size_of::<AddrUse>()), MAX_VIPS),
        // The trie's key: prefix length, scope word and address.
        names::ACLS => (
            4 + size_of::<AclKey>(),
            Some(size_of::<AclRule>()),
            MAX_ACL_RULES,
        ),
        names::ACL_SCOPES => (4, Some(4), ACL_SCOPE_COUNT),
        names::ACL_STATS => (4, Some(8), MAX_ACL_RULES),
        names::SOURCE_LIMITS => (size_of::<SourceKey>(), Some(8), SOURCE_LIMIT_CAPACITY),
        names::PROXIED => (4, Some(8), 2),
        names::BACKENDS => (4, Some(size_of::<Backend>()), MAX_BACKENDS),
        names::SCHEDULES => (4, Some(4), MAX_VIPS * SCHEDULE_STRIDE),
        names::RR_CURSORS => (4, Some(4), MAX_VIPS),
        names::FLOWS => (
            size_of::<FlowKey>(),
            Some(size_of::<FlowState>()),
            flow_capacity,
        ),
        names::FLOWS6 => (
            size_of::<FlowKey6>(),
            Some(size_of::<FlowState>()),
            flow_capacity,
        ),
        names::NAT_FLOWS => (
            size_of::<FlowKey>(),
            Some(size_of::<NatTarget>()),
            flow_capacity,
        ),
        names::NAT_FLOWS6 => (
            size_of::<FlowKey6>(),
            Some(size_of::<NatTarget>()),
            flow_capacity,
        ),
        names::BACKEND_ADDRS => (size_of::<VipAddr>(), Some(4), MAX_BACKENDS),
        names::REPLIES => (
            size_of::<Endpoint>(),
            Some(size_of::<ReplyTarget>()),
            MAX_BACKENDS,
        ),
        // The devmap's value layout belongs to the kernel.
        names::TX_PORTS => (4, None, MAX_TX_PORTS),
        names::COUNTERS => (4, Some(size_of::<Counters>()), 1),
        names::VIP_STATS => (4, Some(size_of::<TrafficStats>()), MAX_VIPS),
        names::BACKEND_STATS => (4, Some(size_of::<TrafficStats>()), MAX_BACKENDS),
        names::INTERFACES => (4, Some(size_of::<Iface>()), MAX_IFINDEX),
        // The trie's key: prefix length and address.
        names::ROUTES => (8, Some(size_of::<Route>()), MAX_ROUTES),
        names::ROUTES6 => (20, Some(size_of::<Route>()), MAX_ROUTES),
        names::NEIGHBOURS => (4, Some(size_of::<NextHop>()), MAX_NEIGHBOURS),
        names::NEIGHBOURS6 => (16, Some(size_of::<NextHop>()), MAX_NEIGHBOURS),
        names::SETTINGS => (4, Some(size_of::<Settings>()), 1),
        names::FLOOD | names::ICMP_RATE => (4, Some(size_of::<RateWindow>()), 1),
        _ => unreachable!("map {name} has no expected layout"),
    }
}

/// Refuses pinned maps whose layout differs from what this build would create, so an
/// incompatible upgrade fails loudly instead of misreading memory.
pub fn check_pinned_layout(dir: &Path, flow_capacity: u32) -> Result<(), PinError> {
    for name in names::ALL {
        let path = map_path(dir, name);
        if !path.exists() {
            continue;
        }
        let info = MapInfo::from_pin(&path).map_err(|e| dir_error(&path, e.to_string()))?;
        let (key, value, entries) = expected_layout(name, flow_capacity);
        let value_ok = value.is_none_or(|v| v as u32 == info.value_size());
        if info.key_size() != key as u32 || !value_ok || info.max_entries() != entries {
            return Err(PinError::Layout {
                path,
                dir: dir.to_owned(),
                found_key: info.key_size(),
                found_value: info.value_size(),
                found_entries: info.max_entries(),
                key: key as u32,
                value: value.map_or(info.value_size(), |v| v as u32),
                entries,
            });
        }
    }
    Ok(())
}

/// Removes the maps pinned in `dir` (links stay).
pub fn remove_all_maps(dir: &Path) -> Result<(), PinError> {
    for name in names::ALL {
        match std::fs::remove_file(map_path(dir, name)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(dir_error(&map_path(dir, name), e.to_string()));
            }
            _ => {}
        }
    }
    Ok(())
}

/// Removes every pin of ours from `dir` (links first, so the program stops before its
/// maps go), the maps of every layout, then the directory if it is empty.
pub fn remove_all(dir: &Path) -> std::io::Result<()> {
    for interface in pinned_interfaces(dir) {
        std::fs::remove_file(link_path(dir, &interface))?;
    }
    for version in layout_versions(dir) {
        std::fs::remove_dir_all(maps_dir_of(dir, version))?;
    }
    for name in names::ALL {
        match std::fs::remove_file(map_path(dir, name)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    // Someone else's files keep the directory.
    let _ = std::fs::remove_dir(dir);
    Ok(())
}

//! Upgrades that keep flows: the pinned maps of an older layout are carried into
//! maps of this build's layout, instead of refused.
//!
//! Maps of layout `N` ([`LAYOUT_VERSION`]) are pinned in `maps-vN` under the pin
//! directory (layout 1 had them in the directory itself). A build that finds an
//! older layout there:
//! 1. plans the whole migration before it changes anything ([`plan`], pure): each map
//!    is copied as it is, or widened (a counter map whose values gained counters at
//!    their end, carried over with the new ones at 0), or it cannot be carried, and
//!    the upgrade is refused, saying what starting empty would lose;
//! 2. loads its program with fresh maps pinned under its own layout and copies every
//!    entry into them, before anything is attached ([`Migration::copy`]);
//! 3. once its program is in the pinned links, removes the old pins and copies what
//!    the old program wrote meanwhile ([`Migration::finish`]): flows opened during
//!    the copy, and the counts made.
//!
//! An agent stopped part-way leaves the old pins, which the old program still uses:
//! the next start discards the half-made maps and migrates again. A newer layout
//! than this build's is refused: an older build cannot know what changed.

mod raw;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use aya::{
    maps::MapInfo,
    programs::links::{FdLink, PinnedLink},
};
use foobar_lb_common::{LAYOUT_VERSION, OLDEST_CARRIED_LAYOUT, map_names as names};
use tracing::info;

use crate::pin::{self, PinError};
use raw::{Entries, NO_EXIST, RawMap};

/// A map's key size, value size and entries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    /// Key size in bytes.
    pub key: u32,
    /// Value size in bytes (`None`: the kernel's layout, not checked).
    pub value: Option<u32>,
    /// Most entries.
    pub entries: u32,
}

impl std::fmt::Display for Shape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.value {
            Some(value) => write!(
                f,
                "key {} B, value {value} B, {} entries",
                self.key, self.entries
            ),
            None => write!(f, "key {} B, {} entries", self.key, self.entries),
        }
    }
}

/// How one map is carried to the new layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Carry {
    /// Entries copied byte for byte: the layout did not change.
    Copy,
    /// Counters appended to the value: the old ones copied, the new ones start at 0.
    Widen {
        /// The old value size.
        from: u32,
        /// The new one.
        to: u32,
    },
    /// A map this build adds: it starts empty.
    Fresh,
}

/// Why an upgrade is refused.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// The pins are of a layout newer than this build's.
    #[error(
        "the data plane pinned in {dir} has map layout v{found}, newer than this build's \
         v{ours}: an older build cannot know what changed. Run the newer build, or stop \
         the data plane for real (`foobar-lb run --on-exit detach`, or remove {dir}) and \
         start this one empty, which loses every open flow and the counters"
    )]
    Newer {
        /// The pin directory.
        dir: PathBuf,
        /// The layout found.
        found: u32,
        /// This build's.
        ours: u32,
    },
    /// The pins are of a layout older than this build still carries.
    #[error(
        "the data plane pinned in {dir} has map layout v{found}; this build carries maps \
         of layout v{oldest} and later only (a layout since changed what a map's bytes \
         mean). Upgrade through an intermediate release, or stop the data plane for real \
         (`foobar-lb run --on-exit detach`, or remove {dir}) and start this one empty, \
         which loses every open flow and the counters"
    )]
    TooOld {
        /// The pin directory.
        dir: PathBuf,
        /// The layout found.
        found: u32,
        /// The oldest this build carries.
        oldest: u32,
    },
    /// A map changed in a way no migration carries.
    #[error(
        "pinned map {map} (layout v{found_version}: {found}) cannot be carried to this \
         build's layout v{ours} ({needed}); starting empty would lose {loses}. Keep the \
         old build, or stop the data plane for real (`foobar-lb run --on-exit detach`, \
         or remove {dir}) and start this one empty"
    )]
    Unmigratable {
        /// The map.
        map: &'static str,
        /// The pin directory.
        dir: PathBuf,
        /// The layout found.
        found_version: u32,
        /// Its shape there.
        found: Shape,
        /// This build's layout.
        ours: u32,
        /// The shape this build needs.
        needed: Shape,
        /// What an operator loses by starting empty instead.
        loses: &'static str,
    },
    /// Reading or writing a map failed.
    #[error("migrating pinned map {map}: {source}")]
    Map {
        /// The map.
        map: &'static str,
        /// What the kernel said.
        source: std::io::Error,
    },
    /// The pins could not be read or removed.
    #[error(transparent)]
    Pin(#[from] PinError),
}

/// Maps whose values are only u64 counters, new ones appended at the end: they can
/// be widened, and what the old program counted during the upgrade is added after.
const COUNTER_MAPS: [&str; 4] = [
    names::COUNTERS,
    names::VIP_STATS,
    names::BACKEND_STATS,
    names::ACL_STATS,
];

/// Maps whose entries the old program makes while the copy runs: the flows.
const FLOW_MAPS: [&str; 4] = [
    names::FLOWS,
    names::FLOWS6,
    names::NAT_FLOWS,
    names::NAT_FLOWS6,
];

/// What starting without a map's contents costs, for a refusal.
fn loses(map: &str) -> &'static str {
    match map {
        names::FLOWS | names::FLOWS6 => {
            "every open flow (connections of ring-scheduled VIPs break; Maglev ones are \
             hashed again)"
        }
        names::NAT_FLOWS | names::NAT_FLOWS6 => "every full-NAT connection",
        m if COUNTER_MAPS.contains(&m) => "the counters",
        _ => {
            "the VIPs, backends and routes the running agent wrote, and with them every \
             flow's backend"
        }
    }
}

/// How each map of this build is carried from `found` (the maps pinned with layout
/// `found_version`), or why the upgrade is refused. Checks everything before
/// anything changes.
pub fn plan(
    dir: &Path,
    found_version: u32,
    found: &BTreeMap<&'static str, Shape>,
    needed: &BTreeMap<&'static str, Shape>,
) -> Result<BTreeMap<&'static str, Carry>, MigrateError> {
    if found_version > LAYOUT_VERSION {
        return Err(MigrateError::Newer {
            dir: dir.to_owned(),
            found: found_version,
            ours: LAYOUT_VERSION,
        });
    }
    if found_version < OLDEST_CARRIED_LAYOUT {
        return Err(MigrateError::TooOld {
            dir: dir.to_owned(),
            found: found_version,
            oldest: OLDEST_CARRIED_LAYOUT,
        });
    }
    let mut steps = BTreeMap::new();
    for (&map, &need) in needed {
        let Some(&have) = found.get(map) else {
            steps.insert(map, Carry::Fresh);
            continue;
        };
        let same_value = need.value.is_none() || need.value == have.value;
        let carry = if have.key == need.key && have.entries == need.entries && same_value {
            Some(Carry::Copy)
        } else {
            widen(map, have, need)
        };
        let Some(carry) = carry else {
            return Err(MigrateError::Unmigratable {
                map,
                dir: dir.to_owned(),
                found_version,
                found: have,
                ours: LAYOUT_VERSION,
                needed: need,
                loses: loses(map),
            });
        };
        steps.insert(map, carry);
    }
    Ok(steps)
}

/// A counter map whose values grew by whole counters.
fn widen(map: &str, have: Shape, need: Shape) -> Option<Carry> {
    let (Some(from), Some(to)) = (have.value, need.value) else {
        return None;
    };
    let counters = COUNTER_MAPS.contains(&map) && from % 8 == 0 && to % 8 == 0;
    (counters && have.key == need.key && have.entries == need.entries && to > from)
        .then_some(Carry::Widen { from, to })
}

/// An upgrade under way: the old maps, open, and what was copied from them.
pub struct Migration {
    from_version: u32,
    /// The links run this build's layout already: an upgrade that swapped its
    /// program in and stopped before removing the old pins. Nothing is copied again;
    /// only the old flows the new maps lack are added.
    swapped: bool,
    steps: BTreeMap<&'static str, Carry>,
    /// Where the old pins are; `None` once removed.
    old_pins: Option<OldPins>,
    /// Each carried map: the old one and the new one.
    maps: Vec<(&'static str, RawMap, RawMap)>,
    /// The counter maps' values at the copy, to add what was counted after.
    counted: BTreeMap<&'static str, Entries>,
}

/// Where an older layout's pins are.
struct OldPins {
    /// The directory holding them.
    dir: PathBuf,
    /// Whether the directory is `maps-vN` (removed with them) or the pin directory
    /// itself (layout 1: only the maps go).
    versioned: bool,
}

impl OldPins {
    fn path(&self, map: &str) -> PathBuf {
        pin::map_path(&self.dir, map)
    }

    fn remove(&self) -> std::io::Result<()> {
        if self.versioned {
            return std::fs::remove_dir_all(&self.dir);
        }
        for name in names::ALL {
            match std::fs::remove_file(self.path(name)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        Ok(())
    }
}

/// The older layout pinned under `pin_dir`, if any: its version and where it is.
fn find_older(pin_dir: &Path) -> Result<Option<(u32, OldPins)>, MigrateError> {
    let older = pin::layout_versions(pin_dir)
        .into_iter()
        .filter(|&v| v != LAYOUT_VERSION)
        .max();
    if let Some(version) = older {
        if version > LAYOUT_VERSION {
            return Err(MigrateError::Newer {
                dir: pin_dir.to_owned(),
                found: version,
                ours: LAYOUT_VERSION,
            });
        }
        let dir = pin::maps_dir_of(pin_dir, version);
        return Ok(Some((
            version,
            OldPins {
                dir,
                versioned: true,
            },
        )));
    }
    // Layout 1: the maps in the pin directory itself.
    Ok(pin::has_pinned_maps(pin_dir).then(|| {
        let dir = pin_dir.to_owned();
        (
            1,
            OldPins {
                dir,
                versioned: false,
            },
        )
    }))
}

fn map_error(map: &'static str) -> impl FnOnce(std::io::Error) -> MigrateError {
    move |source| MigrateError::Map { map, source }
}

impl Migration {
    /// Plans the migration of an older layout found under `pin_dir` to this build's,
    /// or `None` when there is none. Refuses what cannot be carried, changing nothing.
    pub fn prepare(pin_dir: &Path, flow_capacity: u32) -> Result<Option<Self>, MigrateError> {
        let Some((from_version, old)) = find_older(pin_dir)? else {
            return Ok(None);
        };
        let mut found = BTreeMap::new();
        for name in names::ALL {
            let path = old.path(name);
            if !path.exists() {
                continue;
            }
            let info =
                MapInfo::from_pin(&path).map_err(|e| map_error(name)(std::io::Error::other(e)))?;
            let shape = Shape {
                key: info.key_size(),
                value: Some(info.value_size()),
                entries: info.max_entries(),
            };
            found.insert(name, shape);
        }
        let needed: BTreeMap<&'static str, Shape> = names::ALL
            .into_iter()
            .map(|name| (name, pin::expected_shape(name, flow_capacity)))
            .collect();
        let steps = plan(pin_dir, from_version, &found, &needed)?;
        let ours = pin::maps_dir(pin_dir);
        let swapped = pin::has_pinned_maps(&ours) && links_use(pin_dir, &ours);
        Ok(Some(Self {
            from_version,
            swapped,
            steps,
            old_pins: Some(old),
            maps: Vec::new(),
            counted: BTreeMap::new(),
        }))
    }

    /// Whether the maps of this build's layout pinned beside the old ones are half
    /// made (the links still run the old program on the old maps): they are then
    /// removed and made again. Otherwise the links run on them already.
    pub fn redo(&self) -> bool {
        !self.swapped
    }

    /// Copies every carried map into the new maps pinned in `maps_dir` (loaded, not
    /// attached yet).
    pub fn copy(&mut self, maps_dir: &Path) -> Result<(), MigrateError> {
        let old_pins = self.old_pins.as_ref().expect("copy before finish");
        let mut copied = BTreeMap::new();
        for (&name, &carry) in &self.steps {
            if carry == Carry::Fresh || (self.swapped && !FLOW_MAPS.contains(&name)) {
                continue;
            }
            let old = RawMap::open(&old_pins.path(name)).map_err(map_error(name))?;
            let new = RawMap::open(&pin::map_path(maps_dir, name)).map_err(map_error(name))?;
            if self.swapped {
                // Only what `finish` adds: the old flows the new maps lack.
                self.maps.push((name, old, new));
                continue;
            }
            let entries = old.entries().map_err(map_error(name))?;
            new.put_all(&carried(&entries, &old, &new))
                .map_err(map_error(name))?;
            copied.insert(name, entries.len());
            if COUNTER_MAPS.contains(&name) {
                self.counted.insert(name, entries);
            }
            self.maps.push((name, old, new));
        }
        if self.swapped {
            info!(
                from = self.from_version,
                to = LAYOUT_VERSION,
                "an upgrade stopped after its program swap: the links run this layout's maps already; finishing it"
            );
        } else {
            info!(
                from = self.from_version,
                to = LAYOUT_VERSION,
                entries = ?copied,
                "pinned maps of an older layout copied into this build's"
            );
        }
        Ok(())
    }

    /// Once the new program is in every pinned link: removes the old pins, then adds
    /// what the old program did since the copy (its flows, its counts).
    pub fn finish(mut self) -> Result<(), MigrateError> {
        if let Some(old) = self.old_pins.take() {
            old.remove().map_err(|e| {
                MigrateError::Pin(PinError::Directory {
                    path: old.dir.clone(),
                    message: format!("removing the old layout's pins: {e}"),
                })
            })?;
        }
        let mut late_flows = 0;
        for (name, old, new) in &self.maps {
            if FLOW_MAPS.contains(name) {
                let entries = old.entries().map_err(map_error(name))?;
                for (key, value) in entries.iter() {
                    // A flow the new program has seen since keeps what it has.
                    late_flows += new.put(key, value, NO_EXIST).map_err(map_error(name))? as u64;
                }
            } else if let Some(before) = self.counted.get(name) {
                add_counted_since(before, old, new).map_err(map_error(name))?;
            }
        }
        info!(
            from = self.from_version,
            to = LAYOUT_VERSION,
            late_flows,
            "upgrade of the pinned maps done: the old layout's pins are removed"
        );
        Ok(())
    }
}

/// Whether a link pinned in `pin_dir` runs a program on the maps pinned in
/// `maps_dir` (the program's maps include its flow table).
fn links_use(pin_dir: &Path, maps_dir: &Path) -> bool {
    let Ok(flows) = MapInfo::from_pin(pin::map_path(maps_dir, names::FLOWS)) else {
        return false;
    };
    let programs: Vec<u32> = pin::pinned_interfaces(pin_dir)
        .iter()
        .filter_map(|interface| PinnedLink::from_pin(pin::link_path(pin_dir, interface)).ok())
        .filter_map(|link| FdLink::from(link).info().ok())
        .map(|info| info.program_id())
        .collect();
    aya::programs::loaded_programs().flatten().any(|program| {
        programs.contains(&program.id())
            && program
                .map_ids()
                .ok()
                .flatten()
                .is_some_and(|ids| ids.contains(&flows.id()))
    })
}

/// `entries` of `old` as values of `new`: each CPU's value cut to the old size and
/// padded with zeros to the new (counters appended start at 0).
fn carried(entries: &Entries, old: &RawMap, new: &RawMap) -> Entries {
    if old.value_size() == new.value_size() {
        return entries.clone();
    }
    let mut out = Entries::like(old, new);
    for (key, value) in entries.iter() {
        out.push_widened(key, value, old, new);
    }
    out
}

/// Adds to `new` what the old program counted after `before` was read: per CPU and
/// per counter, the old map's value now less its value then.
fn add_counted_since(before: &Entries, old: &RawMap, new: &RawMap) -> std::io::Result<()> {
    let then: BTreeMap<&[u8], &[u8]> = before.iter().collect();
    let now = old.entries()?;
    for (key, value) in now.iter() {
        let earlier = then.get(key).copied();
        let Some(mut sum) = new.get(key)? else {
            continue;
        };
        let mut changed = false;
        for cpu in 0..old.cpus().min(new.cpus()) {
            for word in 0..old.value_size() / 8 {
                let at = |map: &RawMap| cpu * map.value_size().next_multiple_of(8) + word * 8;
                let read = |bytes: &[u8], i: usize| {
                    u64::from_ne_bytes(bytes[i..i + 8].try_into().expect("8 bytes"))
                };
                let delta =
                    read(value, at(old)).wrapping_sub(earlier.map_or(0, |e| read(e, at(old))));
                if delta != 0 {
                    let i = at(new);
                    let total = read(&sum, i).wrapping_add(delta);
                    sum[i..i + 8].copy_from_slice(&total.to_ne_bytes());
                    changed = true;
                }
            }
        }
        if changed {
            new.put(key, &sum, 0)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(key: u32, value: u32, entries: u32) -> Shape {
        Shape {
            key,
            value: Some(value),
            entries,
        }
    }

    fn layout(maps: &[(&'static str, Shape)]) -> BTreeMap<&'static str, Shape> {
        maps.iter().copied().collect()
    }

    #[test]
    fn an_unchanged_layout_is_copied_and_a_new_map_starts_empty() {
        let found = layout(&[(names::FLOWS, shape(16, 20, 1024))]);
        let needed = layout(&[
            (names::FLOWS, shape(16, 20, 1024)),
            (names::VIP_STATS, shape(4, 56, 64)),
        ]);
        let steps = plan(Path::new("/p"), 1, &found, &needed).expect("planned");
        assert_eq!(steps[names::FLOWS], Carry::Copy);
        assert_eq!(steps[names::VIP_STATS], Carry::Fresh);
    }

    #[test]
    fn counters_appended_are_widened() {
        let found = layout(&[(names::VIP_STATS, shape(4, 56, 64))]);
        let needed = layout(&[(names::VIP_STATS, shape(4, 64, 64))]);
        let steps = plan(Path::new("/p"), 1, &found, &needed).expect("planned");
        assert_eq!(steps[names::VIP_STATS], Carry::Widen { from: 56, to: 64 });
    }

    #[test]
    fn a_changed_flow_entry_is_refused_saying_what_is_lost() {
        let found = layout(&[(names::FLOWS, shape(16, 16, 1024))]);
        let needed = layout(&[(names::FLOWS, shape(16, 20, 1024))]);
        let e = plan(Path::new("/p"), 1, &found, &needed).expect_err("refused");
        let text = e.to_string();
        assert!(matches!(
            e,
            MigrateError::Unmigratable {
                map: names::FLOWS,
                ..
            }
        ));
        assert!(text.contains("every open flow"), "{text}");
        assert!(
            text.contains("value 16 B") && text.contains("value 20 B"),
            "{text}"
        );
    }

    #[test]
    fn shrunk_counters_and_another_capacity_are_refused() {
        let found = layout(&[(names::VIP_STATS, shape(4, 64, 64))]);
        let needed = layout(&[(names::VIP_STATS, shape(4, 56, 64))]);
        assert!(plan(Path::new("/p"), 1, &found, &needed).is_err());
        let found = layout(&[(names::FLOWS, shape(16, 20, 1024))]);
        let needed = layout(&[(names::FLOWS, shape(16, 20, 2048))]);
        assert!(plan(Path::new("/p"), 1, &found, &needed).is_err());
    }

    #[test]
    fn a_layout_older_than_the_oldest_carried_is_refused() {
        if OLDEST_CARRIED_LAYOUT == 0 {
            return;
        }
        let e = plan(
            Path::new("/p"),
            OLDEST_CARRIED_LAYOUT - 1,
            &BTreeMap::new(),
            &BTreeMap::new(),
        )
        .expect_err("refused");
        assert!(matches!(e, MigrateError::TooOld { .. }), "{e}");
    }

    #[test]
    fn a_newer_layout_is_refused() {
        let e = plan(
            Path::new("/p"),
            LAYOUT_VERSION + 1,
            &BTreeMap::new(),
            &BTreeMap::new(),
        )
        .expect_err("refused");
        assert!(matches!(e, MigrateError::Newer { .. }), "{e}");
    }
}

//! What one agent leaves the next across a restart, so that restarting the agent on
//! the MASTER is invisible to clients.
//!
//! With `--on-exit keep` and pins, the data plane keeps forwarding while the agent
//! restarts. The router does the same with the addresses: instead of priority 0 (a
//! handover), the stopping MASTER keeps its addresses, advertises once more at its own
//! priority, which restarts the backup's Master_Down_Timer, and leaves a [`Note`] of
//! when. The next agent resumes as MASTER at once ([`Start::Resume`]) if the backup
//! cannot have taken over yet: the note is younger than [`resume_window`], the
//! addresses are still there and the data plane is still attached from the pins. Its
//! first advertisement comes before the backup's timer runs out, and nothing moves.
//!
//! A restart slower than that starts as BACKUP and spares the peer that took over
//! meanwhile ([`Start::Late`]): one failover for one restart, not two. A crash leaves
//! no note: the next agent drops the killed agent's addresses, starts as BACKUP and
//! preempts as configured ([`Start::Fresh`]). A real stop (`--on-exit detach`, or
//! running unpinned) hands over with priority 0 and leaves no note either.
//!
//! An agent stopped for a restart that does not come back leaves the addresses on
//! this machine while the peer takes them over too: both data planes forward, and
//! the peer's gratuitous ARP draws the clients, until the next start here drops them.
//! A machine leaving service is stopped for real.
//!
//! Why a note and not the addresses alone: addresses left on the interface cannot
//! tell a restart from a crash, nor how long the backup has been counting. It lives
//! beside the control socket, not with the pins: bpffs holds only BPF objects, and the
//! socket names exactly the daemon that comes next (a second one cannot bind it while
//! the first runs). Under `/run` it goes with a reboot, as the addresses do.

use std::{
    collections::BTreeSet,
    io,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::{VrrpConfig, net};
use crate::pin;

/// How the router starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    /// As BACKUP, after removing addresses a killed agent left: a first start, or one
    /// after a crash or a real stop.
    Fresh,
    /// As MASTER at once, with the addresses the last agent kept for this restart.
    Resume {
        /// When the last agent's final advertisement went out, as time since boot.
        last_advert: Duration,
    },
    /// As BACKUP without the addresses, sparing the master that took over while the
    /// restart took too long to resume.
    Late,
}

/// What a MASTER stepping aside for a restart leaves the next agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Note {
    /// The virtual router (a changed `[vrrp]` section does not resume).
    pub vrid: u8,
    /// Its interface.
    pub interface: String,
    /// When the final advertisement went out: milliseconds since boot.
    pub last_advert_ms: u64,
}

impl Note {
    /// A note for `config`, stamped now: written just before the final advertisement,
    /// so the age the next agent reads is never less than the backup's wait.
    pub fn now(config: &VrrpConfig) -> Note {
        Note {
            vrid: config.vrid,
            interface: config.interface.clone(),
            last_advert_ms: since_boot().as_millis() as u64,
        }
    }
}

/// Where the daemon on `socket` keeps its note: `<socket>.vrrp-handoff`.
pub fn note_path(socket: &Path) -> PathBuf {
    let mut path = socket.as_os_str().to_owned();
    path.push(".vrrp-handoff");
    PathBuf::from(path)
}

/// Writes the note (a temporary file renamed over it: never half a note).
pub fn write(path: &Path, note: &Note) -> io::Result<()> {
    let text = serde_json::to_string(note).map_err(io::Error::other)?;
    let mut partial = path.as_os_str().to_owned();
    partial.push(".partial");
    std::fs::write(&partial, text)?;
    std::fs::rename(&partial, path)
}

/// Reads and removes the note: it is good for one start only.
fn take(path: &Path) -> Option<Note> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
        Err(e) => {
            warn!(path = %path.display(), "vrrp: reading the last agent's note: {e}");
            return None;
        }
    };
    if let Err(e) = std::fs::remove_file(path) {
        warn!(path = %path.display(), "vrrp: removing the last agent's note: {e}");
    }
    serde_json::from_str(&text)
        .inspect_err(|e| warn!(path = %path.display(), "vrrp: ignoring an unreadable note: {e}"))
        .ok()
}

/// The time since boot, suspend included: one clock for both agents, which does not
/// jump with the wall clock.
pub(super) fn since_boot() -> Duration {
    // SAFETY: timespec is plain data; zeroed is a valid value.
    let mut now: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: clock_gettime writes one timespec, which we own, and nothing else.
    // CLOCK_BOOTTIME exists since Linux 2.6.39, far below what XDP needs.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut now) };
    Duration::new(now.tv_sec as u64, now.tv_nsec as u32)
}

/// How long after the last agent's final advertisement the next one may still resume.
///
/// A backup that heard that advertisement declares the master down 3 × interval +
/// its skew later (more than 3 × interval, whatever its priority). Two and a half
/// intervals leave half of one for the new agent's first advertisement to go out and
/// arrive. Later, the backup may have taken over already, and an advertisement from
/// us would make it yield again: the second failover this module exists to avoid.
pub fn resume_window(interval: Duration) -> Duration {
    interval * 5 / 2
}

/// How to start, from the note the last agent left (if any), the time since boot, and
/// whether the addresses are still there and the data plane still attached.
pub fn decide(
    note: Option<&Note>,
    config: &VrrpConfig,
    now: Duration,
    held: bool,
    forwarding: bool,
) -> Start {
    let Some(note) = note.filter(|n| n.vrid == config.vrid && n.interface == config.interface)
    else {
        return Start::Fresh;
    };
    let last_advert = Duration::from_millis(note.last_advert_ms);
    // A note from the future (a clock that went back) is treated as too old.
    let young = now
        .checked_sub(last_advert)
        .is_some_and(|age| age < resume_window(config.interval()));
    if young && held && forwarding {
        Start::Resume { last_advert }
    } else {
        Start::Late
    }
}

/// Takes the note the last agent on `note` left, looks at the addresses and the pins
/// in `pin_dir` (`None`: unpinned, nothing forwards across a restart), and decides.
pub fn plan_start(config: &VrrpConfig, note: &Path, pin_dir: Option<&Path>) -> Start {
    let Some(left) = take(note) else {
        return Start::Fresh;
    };
    let held = holds_addresses(config);
    let forwarding = pin_dir.is_some_and(|dir| attached_from_pins(config, dir));
    let now = since_boot();
    let start = decide(Some(&left), config, now, held, forwarding);
    let age_ms = now
        .saturating_sub(Duration::from_millis(left.last_advert_ms))
        .as_millis() as u64;
    match start {
        Start::Resume { .. } => info!(
            age_ms,
            "vrrp: the last agent stepped aside as MASTER for this restart; resuming"
        ),
        Start::Late => warn!(
            age_ms,
            window_ms = resume_window(config.interval()).as_millis() as u64,
            addresses_held = held,
            data_plane_attached = forwarding,
            "vrrp: too late or too much changed to resume as MASTER; starting as BACKUP, \
             sparing a peer that took over meanwhile"
        ),
        Start::Fresh => info!("vrrp: the last agent's note is for another router; ignored"),
    }
    start
}

/// Whether every moving address is on its interface, with its prefix.
fn holds_addresses(config: &VrrpConfig) -> bool {
    config.addresses().iter().all(|(dev, address)| {
        matches!(net::interface(dev), Ok(Some(link)) if link.networks.contains(address))
    })
}

/// Whether the program is attached from the pins to every interface the addresses
/// live on: what lets the MASTER forward before this agent has loaded anything.
fn attached_from_pins(config: &VrrpConfig, pin_dir: &Path) -> bool {
    let pinned: BTreeSet<String> = pin::pinned_interfaces(pin_dir).into_iter().collect();
    config
        .addresses()
        .iter()
        .all(|(dev, _)| pinned.contains(dev))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn config() -> VrrpConfig {
        toml::from_str(
            r#"
            interface = "lbc"
            vrid = 51
            priority = 150
            advert_interval_ms = 100
            vips = ["10.0.0.100"]
            "#,
        )
        .unwrap()
    }

    fn note_at(ms: u64) -> Note {
        Note {
            vrid: 51,
            interface: "lbc".into(),
            last_advert_ms: ms,
        }
    }

    #[test]
    fn a_young_note_with_everything_in_place_resumes() {
        let c = config();
        let start = decide(Some(&note_at(10_000)), &c, 10_249 * MS, true, true);
        assert_eq!(
            start,
            Start::Resume {
                last_advert: 10_000 * MS
            }
        );
    }

    #[test]
    fn an_old_note_or_missing_pieces_start_late() {
        let c = config();
        // The window is 2.5 intervals: 250 ms here.
        assert_eq!(resume_window(c.interval()), 250 * MS);
        let n = note_at(10_000);
        assert_eq!(decide(Some(&n), &c, 10_250 * MS, true, true), Start::Late);
        assert_eq!(decide(Some(&n), &c, 10_010 * MS, false, true), Start::Late);
        assert_eq!(decide(Some(&n), &c, 10_010 * MS, true, false), Start::Late);
        // A clock that went back.
        assert_eq!(decide(Some(&n), &c, 9_000 * MS, true, true), Start::Late);
    }

    #[test]
    fn no_note_or_another_routers_starts_fresh() {
        let c = config();
        assert_eq!(decide(None, &c, 10_010 * MS, true, true), Start::Fresh);
        let mut other = note_at(10_000);
        other.vrid = 52;
        assert_eq!(
            decide(Some(&other), &c, 10_010 * MS, true, true),
            Start::Fresh
        );
        other = note_at(10_000);
        other.interface = "eth9".into();
        assert_eq!(
            decide(Some(&other), &c, 10_010 * MS, true, true),
            Start::Fresh
        );
    }

    #[test]
    fn the_note_sits_beside_the_socket_and_is_read_once() {
        assert_eq!(
            note_path(Path::new("/run/foobar-lb/control.sock")),
            PathBuf::from("/run/foobar-lb/control.sock.vrrp-handoff")
        );
        let dir = std::env::temp_dir().join(format!("vrrp-handoff-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = note_path(&dir.join("control.sock"));
        let note = Note::now(&config());
        write(&path, &note).unwrap();
        assert_eq!(take(&path), Some(note));
        assert_eq!(take(&path), None);
        std::fs::write(&path, "not json").unwrap();
        assert_eq!(take(&path), None);
        assert!(!path.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_boot_clock_moves_forward() {
        let a = since_boot();
        std::thread::sleep(2 * MS);
        assert!(since_boot() >= a + 2 * MS);
    }
}

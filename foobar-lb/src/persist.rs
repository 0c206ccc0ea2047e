//! Runtime changes that outlive the agent: the state file, and `foobar-lb save`.
//!
//! Changes made through the control API (weights, drains, disables, VIPs, backends,
//! access-list rules) edit the running state only. Without this module a restarted
//! agent starts from the configuration file and, for one, sends new flows to a backend
//! an operator drained before maintenance. So after every change the agent writes the
//! running state to a state file, and on start it applies it again. Where: `run
//! --state-file`, by default [`DEFAULT_STATE_FILE`] (under /var/lib, where daemons keep
//! their state). Not derived from the pin directory: that is on bpffs, which holds BPF
//! objects only, and a path next to it would move whenever the pins do. The lab passes
//! one in each balancer's directory, so tests never share one.
//!
//! **What the file holds** (JSON, [`SavedState`]):
//! - the running desired state: VIPs with their backends, weights and access lists, and
//!   the `[edge]` section. Whole, not as a log of edits: re-applying it is one ordinary
//!   validated apply, and an operator can read it;
//! - the disabled backends (admin state, which no configuration field holds);
//! - a fingerprint of the configuration file the running state grew from: FNV-1a of its
//!   bytes. It has to notice an edit, not resist an attacker (who could edit the file
//!   itself), and unlike std's `DefaultHasher` it is the same in every build, so an
//!   upgrade of the agent keeps a drain.
//!
//! **Which is newer, the configuration file or the state file.**
//! - Start, state saved from the same configuration bytes: the runtime state is applied
//!   again (the log lists how it differs from the file).
//! - Start, configuration file edited since: the operator edited the file and restarted,
//!   so the file wins. The state file is removed and the log lists the changes dropped.
//!   Bytes, not meaning, are compared: any edit counts, which is the predictable rule.
//! - Reload keeps its meaning, the file is the truth: runtime edits of VIPs, backends,
//!   weights and lists go, and the state file is rewritten against the new file or removed.
//! - No state file means the configuration file is the whole truth: the agent removes it
//!   rather than keep one equal to the file.
//!
//! Disables outlive a reload, as they did before this module: a disable says "this
//! machine is in maintenance", which no configuration file says, and a reload for an
//! unrelated edit must not put the machine back in the schedule. `backend enable` ends it.
//!
//! A state file that cannot be read, parsed or applied never keeps the agent from
//! starting: it starts from the configuration file and renames the state file
//! `<name>.bad` for the operator.
//!
//! **Writes are atomic** ([`write_atomically`]): a temporary file in the same directory,
//! fsync, rename over the old one, fsync of the directory; a crash leaves the old state
//! or the new, never half of one. The agent writes after a change is applied, never
//! before: the data plane does not wait for a disk, and when the write fails (disk full)
//! the change keeps running, logged, and the reply says it was not saved
//! ([`crate::api::Changed::not_persisted`]), so the operator knows a restart forgets it.
//!
//! **`foobar-lb save`** turns the running state into a configuration file
//! ([`config_file_text`]): the running `[dataplane]`, `[metrics]` and `[vrrp]` with the
//! running VIPs and `[edge]`, checked to load back as the same configuration before it
//! is written. The disabled backends are listed in a comment: they are not configuration.

use std::{
    collections::BTreeSet,
    ffi::OsString,
    fs::{self, File, OpenOptions},
    io::{self, Write},
    net::SocketAddr,
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::{
    api::RunningConfig,
    config::Config,
    state::{BackendSpec, DesiredState, VipSpec},
};

/// Where the agent keeps its runtime state unless told otherwise.
pub const DEFAULT_STATE_FILE: &str = "/var/lib/foobar-lb/state.json";

/// The state file's format; another one is set aside, not misread.
const FORMAT: u32 = 1;

/// A disabled backend, by VIP name and backend address.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DisabledBackend {
    /// The VIP's name.
    pub vip: String,
    /// The backend's `address:port`.
    pub backend: SocketAddr,
}

/// What the state file holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedState {
    /// The format's version (1); a state file of another is set aside, not misread.
    pub format: u32,
    /// The configuration file it grew from, for people.
    pub config_file: PathBuf,
    /// [`fingerprint`] of that file's bytes when the agent loaded it.
    pub config_fingerprint: String,
    /// The running VIPs and edge section.
    pub desired: DesiredState,
    /// Backends disabled through the API.
    pub disabled: Vec<DisabledBackend>,
}

/// The state the API changes: what the agent re-applies on start.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RuntimeState {
    /// The running VIPs and edge section.
    pub desired: DesiredState,
    /// Disabled backends, as (VIP name, backend address).
    pub disabled: BTreeSet<(String, SocketAddr)>,
}

/// Why the state could not be kept, or a configuration file not written.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    /// The state file (or a saved configuration file) could not be written.
    #[error("writing {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// What failed.
        source: io::Error,
    },
    /// An obsolete state file could not be removed.
    #[error("removing {path}: {source}")]
    Remove {
        /// The file.
        path: PathBuf,
        /// What failed.
        source: io::Error,
    },
    /// The configuration file was unreadable when the agent fingerprinted it, so a
    /// state file would never be recognised as its.
    #[error("the configuration file {0} could not be read to fingerprint it; not saving")]
    NoFingerprint(PathBuf),
    /// The running state does not make a configuration file that loads back the same.
    #[error("the running state does not make a loadable configuration file: {0}")]
    NotAConfig(String),
}

/// A fingerprint of a configuration file's bytes (64-bit FNV-1a and the length).
pub fn fingerprint(bytes: &[u8]) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &byte in bytes {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("fnv1a64:{hash:016x}:{}", bytes.len())
}

/// The agent's state file, bound to the configuration file as the agent loaded it.
#[derive(Clone, Debug)]
pub struct StateFile {
    path: PathBuf,
    config_file: PathBuf,
    /// `None`: the configuration file could not be read again after loading.
    config_fingerprint: Option<String>,
}

impl StateFile {
    /// The state file at `path` for `config_file`, fingerprinted as it is now (just
    /// after the agent loaded it).
    pub fn new(path: PathBuf, config_file: &Path) -> Self {
        let mut file = Self {
            path,
            config_file: config_file.to_owned(),
            config_fingerprint: None,
        };
        file.config_reloaded();
        file
    }

    /// Where it is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Fingerprints the configuration file again, after a reload applied it.
    pub fn config_reloaded(&mut self) {
        self.config_fingerprint = match fs::read(&self.config_file) {
            Ok(bytes) => Some(fingerprint(&bytes)),
            Err(e) => {
                warn!(config = %self.config_file.display(), "reading it to fingerprint it: {e}");
                None
            }
        };
    }

    /// The runtime state to apply on start, if a usable one was saved from this very
    /// configuration file; `from_file` is the file's desired state (to log the
    /// difference). Never fails: anything else is logged, and a stale state file
    /// removed, a bad one set aside.
    pub fn restore(&self, from_file: &DesiredState) -> Option<RuntimeState> {
        let at = self.path.display();
        let bytes = match fs::read(&self.path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
            Err(e) => {
                warn!(state_file = %at, "unreadable ({e}); starting from the configuration file");
                self.set_aside();
                return None;
            }
        };
        let saved: SavedState = match serde_json::from_slice(&bytes) {
            Ok(saved) => saved,
            Err(e) => {
                warn!(state_file = %at, "not a state file ({e}); starting from the configuration file");
                self.set_aside();
                return None;
            }
        };
        if saved.format != FORMAT {
            warn!(
                state_file = %at,
                "format {} is not this agent's ({FORMAT}); starting from the configuration file",
                saved.format
            );
            self.set_aside();
            return None;
        }
        let runtime = RuntimeState {
            disabled: saved
                .disabled
                .into_iter()
                .filter(|d| has_backend(&saved.desired, &d.vip, d.backend))
                .map(|d| (d.vip, d.backend))
                .collect(),
            desired: saved.desired,
        };
        let changes = runtime_changes(from_file, &runtime);
        if self.config_fingerprint.as_ref() != Some(&saved.config_fingerprint) {
            warn!(
                state_file = %at,
                config = %self.config_file.display(),
                dropped = ?changes,
                "the configuration file changed since the runtime state was saved: the file wins, \
                 runtime changes are dropped"
            );
            if let Err(e) = self.remove() {
                warn!("{e}");
            }
            return None;
        }
        if let Err(e) = runtime.desired.plan() {
            warn!(state_file = %at, "refused ({e}); starting from the configuration file");
            self.set_aside();
            return None;
        }
        info!(state_file = %at, ?changes, "applying again the changes made through the API");
        Some(runtime)
    }

    /// Saves the running state, or removes the state file when the running state is
    /// the configuration file's (`from_file`) and nothing is disabled.
    pub fn record(
        &self,
        running: &RuntimeState,
        from_file: &DesiredState,
    ) -> Result<(), PersistError> {
        if running.desired == *from_file && running.disabled.is_empty() {
            return self.remove();
        }
        let fingerprint = self
            .config_fingerprint
            .clone()
            .ok_or_else(|| PersistError::NoFingerprint(self.config_file.clone()))?;
        let saved = SavedState {
            format: FORMAT,
            config_file: self.config_file.clone(),
            config_fingerprint: fingerprint,
            desired: running.desired.clone(),
            disabled: disabled_list(&running.disabled),
        };
        let mut json = serde_json::to_vec_pretty(&saved).expect("the state serializes");
        json.push(b'\n');
        // Root's only, as the control socket is.
        write_atomically(&self.path, &json, 0o600).map_err(|source| PersistError::Write {
            path: self.path.clone(),
            source,
        })
    }

    /// Removes the state file; one already gone is fine.
    pub fn remove(&self) -> Result<(), PersistError> {
        match fs::remove_file(&self.path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(PersistError::Remove {
                path: self.path.clone(),
                source: e,
            }),
            _ => Ok(()),
        }
    }

    /// Renames a state file the agent cannot use to `<name>.bad`, for the operator.
    pub fn set_aside(&self) {
        let mut bad = self.path.clone().into_os_string();
        bad.push(".bad");
        match fs::rename(&self.path, &bad) {
            Ok(()) => warn!(
                state_file = %self.path.display(),
                "set aside as {}",
                Path::new(&bad).display()
            ),
            Err(e) => warn!(state_file = %self.path.display(), "setting it aside: {e}"),
        }
    }
}

/// The disabled set as the API and the state file list it, sorted.
pub fn disabled_list(disabled: &BTreeSet<(String, SocketAddr)>) -> Vec<DisabledBackend> {
    disabled
        .iter()
        .map(|(vip, backend)| DisabledBackend {
            vip: vip.clone(),
            backend: *backend,
        })
        .collect()
}

/// The running configuration for `save`: the loaded file's settings with the running
/// VIPs and edge section.
pub fn running_config(
    config_file: &Path,
    loaded: &Config,
    running: &RuntimeState,
) -> RunningConfig {
    RunningConfig {
        config_file: config_file.to_owned(),
        config: Config {
            vips: running.desired.vips.clone(),
            edge: running.desired.edge.clone(),
            ..loaded.clone()
        },
        disabled: disabled_list(&running.disabled),
    }
}

/// The text of a configuration file holding `running`, checked to load back as the
/// same configuration (a VIP removed through the API that `[vrrp]` still moves, for
/// one, would not).
pub fn config_file_text(running: &RunningConfig) -> Result<String, PersistError> {
    let body = toml::to_string_pretty(&running.config)
        .map_err(|e| PersistError::NotAConfig(e.to_string()))?;
    let loaded = Config::parse(&body).map_err(|e| PersistError::NotAConfig(e.to_string()))?;
    if loaded != running.config {
        return Err(PersistError::NotAConfig(
            "it reads back as a different configuration".into(),
        ));
    }
    let mut text = format!(
        "# The running state of foobar-lb, written by `foobar-lb save`: {}\n\
         # with the changes made through the control API.\n",
        running.config_file.display()
    );
    if !running.disabled.is_empty() {
        text.push_str("# Disabled when saved (admin state: the agent keeps it, not this file):\n");
        for d in &running.disabled {
            text.push_str(&format!(
                "#   foobar-lb backend disable {} {}\n",
                d.vip, d.backend
            ));
        }
    }
    text.push('\n');
    text.push_str(&body);
    Ok(text)
}

/// Replaces `path` with `bytes` so that a crash leaves the old content or the new:
/// a temporary file in the same directory (a rename is atomic only within one file
/// system), fsync, rename, fsync of the directory (which makes the rename durable).
pub fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not a file name"))?;
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    fs::create_dir_all(dir)?;
    let mut temporary = OsString::from(".");
    temporary.push(name);
    temporary.push(format!(".{}.tmp", std::process::id()));
    let temporary = dir.join(temporary);
    let written = write_then_rename(&temporary, bytes, mode, path);
    if written.is_err() {
        let _ = fs::remove_file(&temporary);
    }
    written?;
    File::open(dir)?.sync_all()
}

fn write_then_rename(temporary: &Path, bytes: &[u8], mode: u32, path: &Path) -> io::Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(temporary)?;
    // `mode` applies only to a new file; a leftover temporary keeps its own.
    file.set_permissions(fs::Permissions::from_mode(mode))?;
    file.write_all(bytes)?;
    file.sync_all()?;
    fs::rename(temporary, path)
}

fn has_backend(desired: &DesiredState, vip: &str, at: SocketAddr) -> bool {
    desired
        .vips
        .iter()
        .filter(|v| v.name == vip)
        .flat_map(|v| &v.backends)
        .any(|b| SocketAddr::new(b.address, b.port) == at)
}

/// How the runtime state differs from the file's, one line per change, for the log.
pub fn runtime_changes(from_file: &DesiredState, runtime: &RuntimeState) -> Vec<String> {
    let mut changes = Vec::new();
    for vip in &runtime.desired.vips {
        match from_file.vips.iter().find(|v| v.name == vip.name) {
            None => changes.push(format!("vip {} added", vip.name)),
            Some(was) => vip_changes(was, vip, &mut changes),
        }
    }
    for was in &from_file.vips {
        if !runtime.desired.vips.iter().any(|v| v.name == was.name) {
            changes.push(format!("vip {} removed", was.name));
        }
    }
    if runtime.desired.edge != from_file.edge {
        changes.push("edge (global access list) changed".into());
    }
    for (vip, at) in &runtime.disabled {
        changes.push(format!("{vip} {at} disabled"));
    }
    changes
}

fn vip_changes(was: &VipSpec, now: &VipSpec, changes: &mut Vec<String>) {
    let before = changes.len();
    let at = |b: &BackendSpec| SocketAddr::new(b.address, b.port);
    for b in &now.backends {
        match was.backends.iter().find(|o| at(o) == at(b)) {
            None => changes.push(format!(
                "{} {} added (weight {})",
                now.name,
                at(b),
                b.weight
            )),
            Some(o) if o.weight != b.weight => changes.push(format!(
                "{} {} weight {} (file: {})",
                now.name,
                at(b),
                b.weight,
                o.weight
            )),
            Some(_) => {}
        }
    }
    for o in &was.backends {
        if !now.backends.iter().any(|b| at(b) == at(o)) {
            changes.push(format!("{} {} removed", now.name, at(o)));
        }
    }
    if now.acl != was.acl {
        changes.push(format!("{} access list changed", now.name));
    }
    if changes.len() == before && now != was {
        changes.push(format!("vip {} changed", now.name));
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;
    use crate::{config::tests::GOOD, edge::Action};

    /// A directory of its own under the system's temporary one, removed on drop.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(tag: &str) -> Self {
            let dir = std::env::temp_dir()
                .join(format!("foobar-lb-persist-{tag}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).expect("scratch dir");
            Self(dir)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn backend(address: &str, weight: u32) -> BackendSpec {
        BackendSpec {
            address: address.parse().expect("an address"),
            port: 8080,
            weight,
        }
    }

    /// GOOD's state drained, with a backend added and web1 disabled.
    fn changed(from_file: &DesiredState) -> RuntimeState {
        let mut desired = from_file.clone();
        desired.vips[0].backends[0].weight = 0;
        desired.vips[0].backends.push(backend("10.1.0.12", 2));
        RuntimeState {
            disabled: BTreeSet::from([(
                "www".to_owned(),
                "10.1.0.12:8080".parse().expect("an address"),
            )]),
            desired,
        }
    }

    #[test]
    fn fingerprints_are_fnv1a_of_the_bytes() {
        // The published FNV-1a 64 test vectors: the same in every build.
        assert_eq!(fingerprint(b""), "fnv1a64:cbf29ce484222325:0");
        assert_eq!(fingerprint(b"a"), "fnv1a64:af63dc4c8601ec8c:1");
        assert_ne!(
            fingerprint(GOOD.as_bytes()),
            fingerprint(format!("{GOOD} ").as_bytes())
        );
    }

    #[test]
    fn a_saved_state_comes_back_for_the_same_configuration_file() {
        let scratch = Scratch::new("same");
        let config = scratch.0.join("lb.toml");
        fs::write(&config, GOOD).unwrap();
        let from_file = Config::parse(GOOD).unwrap().desired_state();
        let file = StateFile::new(scratch.0.join("state/state.json"), &config);
        assert_eq!(file.restore(&from_file), None, "no file yet");

        let running = changed(&from_file);
        file.record(&running, &from_file).unwrap();
        let text = fs::read_to_string(file.path()).unwrap();
        assert!(text.contains("10.1.0.12:8080"), "{text}");
        let mode = fs::metadata(file.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // No temporary left behind.
        assert_eq!(fs::read_dir(scratch.0.join("state")).unwrap().count(), 1);

        // A new agent on the same file gets it back.
        let restarted = StateFile::new(file.path().to_owned(), &config);
        assert_eq!(restarted.restore(&from_file), Some(running));
        let changes = runtime_changes(&from_file, &changed(&from_file));
        assert_eq!(
            changes,
            [
                "www 10.1.0.11:8080 weight 0 (file: 1)",
                "www 10.1.0.12:8080 added (weight 2)",
                "www 10.1.0.12:8080 disabled",
            ]
        );
    }

    #[test]
    fn an_edited_configuration_file_wins_and_the_state_file_goes() {
        let scratch = Scratch::new("edited");
        let config = scratch.0.join("lb.toml");
        fs::write(&config, GOOD).unwrap();
        let from_file = Config::parse(GOOD).unwrap().desired_state();
        let file = StateFile::new(scratch.0.join("state.json"), &config);
        file.record(&changed(&from_file), &from_file).unwrap();

        fs::write(&config, format!("{GOOD}\n# edited\n")).unwrap();
        let restarted = StateFile::new(file.path().to_owned(), &config);
        assert_eq!(restarted.restore(&from_file), None);
        assert!(!file.path().exists());
    }

    #[test]
    fn the_file_state_alone_needs_no_state_file() {
        let scratch = Scratch::new("equal");
        let config = scratch.0.join("lb.toml");
        fs::write(&config, GOOD).unwrap();
        let from_file = Config::parse(GOOD).unwrap().desired_state();
        let file = StateFile::new(scratch.0.join("state.json"), &config);
        file.record(&changed(&from_file), &from_file).unwrap();
        assert!(file.path().exists());
        let as_file = RuntimeState {
            desired: from_file.clone(),
            disabled: BTreeSet::new(),
        };
        file.record(&as_file, &from_file).unwrap();
        assert!(!file.path().exists());
        // Removing what is gone already is fine.
        file.record(&as_file, &from_file).unwrap();
    }

    #[test]
    fn a_bad_state_file_is_set_aside_and_the_file_used() {
        let scratch = Scratch::new("bad");
        let config = scratch.0.join("lb.toml");
        fs::write(&config, GOOD).unwrap();
        let from_file = Config::parse(GOOD).unwrap().desired_state();
        let file = StateFile::new(scratch.0.join("state.json"), &config);

        fs::write(file.path(), "{ not json").unwrap();
        assert_eq!(file.restore(&from_file), None);
        assert!(!file.path().exists());
        assert_eq!(
            fs::read_to_string(scratch.0.join("state.json.bad")).unwrap(),
            "{ not json"
        );

        // Valid JSON, but a state the agent refuses (a weight above 256).
        let mut running = changed(&from_file);
        running.desired.vips[0].backends[1].weight = 300;
        let saved = SavedState {
            format: FORMAT,
            config_file: config.clone(),
            config_fingerprint: fingerprint(GOOD.as_bytes()),
            desired: running.desired,
            disabled: Vec::new(),
        };
        fs::write(file.path(), serde_json::to_vec(&saved).unwrap()).unwrap();
        assert_eq!(file.restore(&from_file), None);
        assert!(scratch.0.join("state.json.bad").exists());
        assert!(!file.path().exists());
    }

    #[test]
    fn atomic_writes_replace_the_whole_file() {
        let scratch = Scratch::new("atomic");
        let path = scratch.0.join("a/b/out.toml");
        write_atomically(&path, b"first, and longer", 0o644).unwrap();
        write_atomically(&path, b"second", 0o644).unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), "second");
        assert_eq!(fs::read_dir(path.parent().unwrap()).unwrap().count(), 1);
    }

    /// A configuration with every section and most optional fields set.
    const FULL: &str = r#"
        [dataplane]
        interfaces = [{ name = "lbc", role = "client" }, "lbb"]
        xdp_mode = "native"
        fullnat_ports = "20000-29999"

        [metrics]
        listen = "127.0.0.1:9100"

        [edge]
        acl = { deny = ["192.0.2.0/24"] }
        open_addresses = ["10.0.0.100"]

        [[vips]]
        name = "www"
        address = "10.0.0.100"
        port = 80
        scheduler = "maglev"
        forwarding = "fullnat"
        acl = { allow = ["198.51.100.0/24"] }
        new_flow_limit = { rate = 50 }
        health_check = { type = "http", path = "/healthz", port = 9000 }
        backends = [
          { address = "10.1.0.11", port = 8080, weight = 3 },
          { address = "10.1.0.12", port = 8080 },
        ]

        [[vips]]
        name = "dns"
        address = "fd00::100"
        port = 53
        protocol = "udp"
        scheduler = "sh"
        hash_prefix_v6 = 64
        backends = []

        [vrrp]
        interface = "lbc"
        vrid = 51
        priority = 150
        vips = ["10.0.0.100"]
        virtual_addresses = [{ interface = "lbb", address = "10.1.0.1/24" }]
    "#;

    #[test]
    fn a_saved_configuration_loads_back_as_the_running_state() {
        let loaded = Config::parse(FULL).unwrap();
        let mut running = RuntimeState {
            desired: loaded.desired_state(),
            disabled: BTreeSet::new(),
        };
        // Changes through the API: a drain, a backend, a rule, a disable.
        running.desired.vips[0].backends[1].weight = 0;
        running.desired.vips[1].backends.push(BackendSpec {
            address: "fd00:1::11".parse().unwrap(),
            port: 53,
            weight: 1,
        });
        running
            .desired
            .edge
            .acl
            .list_mut(Action::Deny)
            .push("203.0.113.0/24".parse().unwrap());
        running.disabled.insert((
            "www".to_owned(),
            SocketAddr::new(IpAddr::from([10, 1, 0, 11]), 8080),
        ));
        let saved = running_config(
            Path::new("/etc/foobar-lb/foobar-lb.toml"),
            &loaded,
            &running,
        );
        // As the API carries it.
        let json = serde_json::to_string(&saved).unwrap();
        let saved: RunningConfig = serde_json::from_str(&json).unwrap();

        let text = config_file_text(&saved).unwrap();
        let again = Config::parse(&text).unwrap_or_else(|e| panic!("{e}:\n{text}"));
        assert_eq!(again.desired_state(), running.desired, "{text}");
        assert_eq!(again.dataplane, loaded.dataplane);
        assert_eq!(
            (&again.metrics, &again.vrrp),
            (&loaded.metrics, &loaded.vrrp)
        );
        assert!(
            text.contains("#   foobar-lb backend disable www 10.1.0.11:8080"),
            "{text}"
        );

        // The small file too (no optional section at all).
        let small = Config::parse(GOOD).unwrap();
        let plain = RuntimeState {
            desired: small.desired_state(),
            disabled: BTreeSet::new(),
        };
        let text = config_file_text(&running_config(Path::new("lb.toml"), &small, &plain)).unwrap();
        assert_eq!(Config::parse(&text).unwrap(), small, "{text}");
    }

    #[test]
    fn a_running_state_that_would_not_load_is_not_saved() {
        let loaded = Config::parse(FULL).unwrap();
        // The VIP that [vrrp] moves and [edge] keeps open, removed through the API.
        let mut running = RuntimeState {
            desired: loaded.desired_state(),
            disabled: BTreeSet::new(),
        };
        running.desired.vips.remove(0);
        let saved = running_config(Path::new("lb.toml"), &loaded, &running);
        match config_file_text(&saved) {
            Err(PersistError::NotAConfig(message)) => {
                assert!(message.contains("10.0.0.100"), "{message}")
            }
            other => panic!("expected NotAConfig, got {other:?}"),
        }
    }
}

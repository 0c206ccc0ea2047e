//! The Debian package `cargo xtask package` builds, installed into a scratch root: its
//! files where Debian wants them, root's and with the right modes; the man page, the
//! completions and the example configuration sound; the unit accepted by
//! `systemd-analyze verify`; and the packaged agent started as a user that is not root
//! with exactly the unit's capabilities, which load and verify the program before the
//! example's placeholder interface stops it.
//!
//! The package is built here (`cargo xtask package`), so it is never older than the
//! sources: after CI's benchmarks, which build the same release binaries, that is a
//! check of the build and a few seconds of packing.

use std::{
    fs,
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::OnceLock,
    time::{Duration, Instant},
};

use foobar_lb::config::Config;

/// What the package installs, with its mode.
const FILES: [(&str, u32); 11] = [
    ("usr/sbin/foobar-lb", 0o755),
    ("usr/lib/systemd/system/foobar-lb.service", 0o644),
    ("etc/foobar-lb/foobar-lb.toml", 0o644),
    ("usr/share/man/man8/foobar-lb.8.gz", 0o644),
    ("usr/share/bash-completion/completions/foobar-lb", 0o644),
    ("usr/share/zsh/vendor-completions/_foobar-lb", 0o644),
    ("usr/share/fish/vendor_completions.d/foobar-lb.fish", 0o644),
    ("usr/share/doc/foobar-lb/copyright", 0o644),
    ("usr/share/doc/foobar-lb/README.md.gz", 0o644),
    ("usr/share/foobar-lb/alerts/foobar-lb.yml", 0o644),
    ("usr/share/foobar-lb/alerts/certificates.yml", 0o644),
];
const UNIT: &str = "usr/lib/systemd/system/foobar-lb.service";
const CONFIG: &str = "etc/foobar-lb/foobar-lb.toml";
const BINARY: &str = "usr/sbin/foobar-lb";
/// The example's placeholder, which the agent refuses.
const PLACEHOLDER: &str = "CHANGE-ME";

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace")
        .to_owned()
}

/// Runs a command that must succeed.
fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout(cmd: &mut Command) -> String {
    String::from_utf8(run(cmd).stdout).expect("UTF-8 output")
}

/// The package, built once for all the tests here.
fn deb() -> &'static Path {
    static DEB: OnceLock<PathBuf> = OnceLock::new();
    DEB.get_or_init(|| {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let printed = stdout(
            Command::new(cargo)
                .current_dir(workspace())
                .args(["xtask", "package"]),
        );
        // dpkg-deb says what it builds; the path comes last.
        let deb = PathBuf::from(printed.lines().last().expect("a path").trim());
        assert!(
            deb.extension().is_some_and(|e| e == "deb") && deb.is_file(),
            "cargo xtask package printed {printed:?}"
        );
        deb
    })
}

/// The package unpacked into a root of its own, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn install(tag: &str) -> Scratch {
        let root =
            std::env::temp_dir().join(format!("foobar-lb-package-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(&root).expect("scratch root");
        run(Command::new("dpkg-deb").arg("-x").arg(deb()).arg(&root));
        // Others may need to reach the files (the capability test runs as nobody).
        fs::set_permissions(&root, fs::Permissions::from_mode(0o755)).expect("chmod");
        Scratch(root)
    }

    fn path(&self, path: &str) -> PathBuf {
        self.0.join(path)
    }

    fn read(&self, path: &str) -> String {
        fs::read_to_string(self.path(path)).unwrap_or_else(|e| panic!("reading {path}: {e}"))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// The unit's lines that are not comments.
fn settings(unit: &str) -> Vec<&str> {
    unit.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with(';'))
        .collect()
}

/// The value of a key of the unit (the last assignment wins, as in systemd).
fn setting<'a>(unit: &'a str, key: &str) -> Option<&'a str> {
    settings(unit)
        .into_iter()
        .filter_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .next_back()
}

#[test]
fn the_package_holds_the_agent_its_unit_config_man_page_and_completions() {
    let deb = deb();
    let fields = stdout(Command::new("dpkg-deb").arg("--field").arg(deb).args([
        "Package",
        "Version",
        "Architecture",
        "Depends",
        "Section",
    ]));
    let arch = stdout(Command::new("dpkg").arg("--print-architecture"));
    for field in [
        "Package: foobar-lb".to_owned(),
        format!("Version: {}", env!("CARGO_PKG_VERSION")),
        format!("Architecture: {}", arch.trim()),
        "Section: net".to_owned(),
    ] {
        assert!(fields.lines().any(|l| l == field), "{field} in {fields}");
    }
    assert!(fields.contains("libc6 (>= 2."), "{fields}");
    let conffiles = stdout(
        Command::new("dpkg-deb")
            .arg("--info")
            .arg(deb)
            .arg("conffiles"),
    );
    assert_eq!(conffiles.trim(), "/etc/foobar-lb/foobar-lb.toml");

    // Every file root's, with its mode.
    let listing = stdout(Command::new("dpkg-deb").arg("--contents").arg(deb));
    for line in listing.lines() {
        assert_eq!(
            line.split_whitespace().nth(1),
            Some("root/root"),
            "not root's: {line}"
        );
    }
    let scratch = Scratch::install("files");
    for (path, mode) in FILES {
        let symbolic = if mode == 0o755 {
            "-rwxr-xr-x"
        } else {
            "-rw-r--r--"
        };
        assert!(
            listing
                .lines()
                .any(|l| l.starts_with(symbolic) && l.ends_with(&format!(" ./{path}"))),
            "{symbolic} ./{path} is not in the package:\n{listing}"
        );
        let meta = fs::metadata(scratch.path(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
        assert_eq!(meta.permissions().mode() & 0o7777, mode, "{path}");
        assert!(meta.len() > 0, "{path} is empty");
    }

    // The binary is the agent of this version.
    let version = stdout(Command::new(scratch.path(BINARY)).arg("--version"));
    assert_eq!(
        version.trim(),
        format!("foobar-lb {}", env!("CARGO_PKG_VERSION"))
    );

    // The man page: gzip, in section 8.
    let man = stdout(
        Command::new("gzip")
            .arg("-dc")
            .arg(scratch.path("usr/share/man/man8/foobar-lb.8.gz")),
    );
    let title = man
        .lines()
        .find(|l| l.starts_with(".TH "))
        .unwrap_or_else(|| panic!("no .TH line in the man page:\n{man}"));
    assert_eq!(title.split(' ').nth(2), Some("8"), "{title}");
    assert!(man.contains("completions"), "the subcommands are missing");

    // Completions, each in its shell's own form.
    let bash = scratch.read("usr/share/bash-completion/completions/foobar-lb");
    assert!(
        bash.contains("complete") && bash.contains("foobar-lb"),
        "{bash}"
    );
    let zsh = scratch.read("usr/share/zsh/vendor-completions/_foobar-lb");
    assert!(zsh.starts_with("#compdef foobar-lb"), "{zsh}");
    let fish = scratch.read("usr/share/fish/vendor_completions.d/foobar-lb.fish");
    assert!(fish.contains("complete -c foobar-lb"), "{fish}");

    // The example configuration: deploy/'s, valid, and saying what to edit.
    let example = scratch.read(CONFIG);
    assert_eq!(
        example,
        fs::read_to_string(workspace().join("deploy/foobar-lb.toml")).unwrap()
    );
    let config = Config::load(&scratch.path(CONFIG)).expect("the example configuration loads");
    assert_eq!(config.dataplane.interface_names(), [PLACEHOLDER]);
    assert!(!config.vips.is_empty());
    assert!(example.contains("EDIT IT BEFORE THE FIRST START"));

    let copyright = scratch.read("usr/share/doc/foobar-lb/copyright");
    assert!(copyright.contains("Apache-2.0") && copyright.contains("Expat"));
}

#[test]
fn systemd_analyze_verifies_the_unit() {
    let scratch = Scratch::install("unit");
    let unit = scratch.read(UNIT);
    assert_eq!(
        unit,
        fs::read_to_string(workspace().join("deploy/systemd/foobar-lb.service")).unwrap()
    );

    // What the unit promises.
    let expect = [
        ("Type", "notify"),
        (
            "ExecStart",
            "/usr/sbin/foobar-lb run --config /etc/foobar-lb/foobar-lb.toml --on-exit ${FOOBAR_LB_ON_EXIT}",
        ),
        ("Environment", "FOOBAR_LB_ON_EXIT=keep"),
        ("ExecReload", "/bin/kill -HUP $MAINPID"),
        ("Restart", "on-failure"),
        (
            "CapabilityBoundingSet",
            "CAP_BPF CAP_PERFMON CAP_NET_ADMIN CAP_NET_RAW CAP_NET_BIND_SERVICE",
        ),
        (
            "AmbientCapabilities",
            "CAP_BPF CAP_PERFMON CAP_NET_ADMIN CAP_NET_RAW CAP_NET_BIND_SERVICE",
        ),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ReadWritePaths", "/sys/fs/bpf"),
        ("RuntimeDirectory", "foobar-lb"),
        ("RuntimeDirectoryPreserve", "restart"),
        ("StateDirectory", "foobar-lb"),
        ("WantedBy", "multi-user.target"),
    ];
    for (key, value) in expect {
        assert_eq!(setting(&unit, key), Some(value), "{key}");
    }
    assert!(
        !settings(&unit).iter().any(|l| l.contains("CAP_SYS_ADMIN")),
        "the unit grants CAP_SYS_ADMIN"
    );
    // The paths the unit names are where the package puts them (and the agent's
    // defaults: the control socket in /run/foobar-lb, the state in /var/lib/foobar-lb).
    assert!(scratch.path(BINARY).is_file() && scratch.path(CONFIG).is_file());
    assert_eq!(
        foobar_lb::api::DEFAULT_SOCKET,
        "/run/foobar-lb/control.sock"
    );
    assert_eq!(
        foobar_lb::persist::DEFAULT_STATE_FILE,
        "/var/lib/foobar-lb/state.json"
    );

    // What verify needs besides the package: the targets the unit is ordered with
    // (systemd's) and /bin/kill (procps, a dependency).
    let units = scratch.path("usr/lib/systemd/system");
    for entry in fs::read_dir("/usr/lib/systemd/system").expect("systemd's units") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "target") {
            // A dangling alias is no loss.
            let _ = fs::copy(&path, units.join(path.file_name().unwrap()));
        }
    }
    fs::create_dir_all(scratch.path("bin")).unwrap();
    fs::copy("/bin/kill", scratch.path("bin/kill")).expect("/bin/kill (procps)");

    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg("--man=no")
        .arg(format!("--root={}", scratch.0.display()))
        .arg(format!("/{UNIT}"))
        .output()
        .expect("systemd-analyze (systemd)");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "systemd-analyze verify: {said}");
    // Unknown keys and unparsable values are only warnings: none may name the unit.
    let complaints: Vec<&str> = said.lines().filter(|l| l.contains("foobar-lb")).collect();
    assert!(complaints.is_empty(), "{complaints:#?}");
}

/// Waits for `child` at most `limit`, killing it then.
fn wait(mut child: Child, limit: Duration) -> Output {
    let started = Instant::now();
    while child.try_wait().expect("wait").is_none() {
        if started.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().expect("wait");
            panic!(
                "still running after {limit:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().expect("output")
}

#[test]
fn the_packaged_agent_runs_on_the_units_capabilities_without_root() {
    tests::netns::require_root();
    let scratch = Scratch::install("caps");
    // The unit's capabilities, as setpriv names them.
    let unit = scratch.read(UNIT);
    let capabilities: Vec<String> = setting(&unit, "AmbientCapabilities")
        .expect("AmbientCapabilities")
        .split_whitespace()
        .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase()))
        .collect();
    let capabilities = capabilities.join(",");
    let run_dir = scratch.path("run");
    fs::create_dir_all(&run_dir).unwrap();
    std::os::unix::fs::chown(&run_dir, Some(65534), Some(65534)).expect("chown");

    // As nobody, with the unit's capabilities in every set and nothing else; unpinned
    // and stateless, so nothing outside the scratch root is touched.
    let agent = |capabilities: &str| {
        let mut cmd = Command::new("setpriv");
        cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups"]);
        if !capabilities.is_empty() {
            cmd.arg(format!("--inh-caps={capabilities}"))
                .arg(format!("--ambient-caps={capabilities}"));
        }
        cmd.arg(scratch.path(BINARY))
            .arg("--socket")
            .arg(run_dir.join("control.sock"))
            .arg("run")
            .arg("--config")
            .arg(scratch.path(CONFIG))
            .args(["--no-pin", "--no-state-file"])
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let out = wait(cmd.spawn().expect("setpriv"), Duration::from_secs(120));
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };

    let (code, stderr) = agent(&capabilities);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(!stderr.contains("needs root"), "{stderr}");
    // It got past loading the program (verified with these capabilities alone) to the
    // interfaces, and names the one to edit.
    assert!(
        stderr.contains(&format!("dataplane.interfaces: {PLACEHOLDER}")),
        "{stderr}"
    );
    assert!(!run_dir.join("control.sock").exists());

    // Without CAP_NET_RAW (VRRP's sockets) it is refused before it starts, by name.
    let fewer = capabilities.replace(",+net_raw", "");
    let (code, stderr) = agent(&fewer);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("needs root") && stderr.contains("CAP_NET_RAW"),
        "{stderr}"
    );
    assert!(!stderr.contains(PLACEHOLDER), "{stderr}");

    // Extracted as root, the files are root's.
    assert_eq!(fs::metadata(scratch.path(BINARY)).unwrap().uid(), 0);
}

//! Network namespaces made by a test, removed when it ends, even by a panic.

use std::{
    fs::File,
    os::fd::AsRawFd,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

/// Runs a command, panicking with its output if it fails.
pub fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program} {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A network namespace, deleted on drop unless made persistent.
pub struct Netns {
    name: String,
    persistent: bool,
}

/// Panics unless we are root.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    assert!(
        unsafe { libc::geteuid() } == 0,
        "network tests and the lab need root (CAP_NET_ADMIN, CAP_BPF): run them as root"
    );
}

impl Netns {
    /// Creates `fblb-<tag>-<pid>-<n>` with its loopback up.
    pub fn new(tag: &str) -> Self {
        Self::create(unique_name(tag), false)
    }

    /// Creates a namespace with exactly this name, deleted on drop.
    pub fn new_named(name: &str) -> Self {
        Self::create(name.to_owned(), false)
    }

    /// Creates a namespace with exactly this name that outlives this process
    /// (`ip netns del` removes it).
    pub fn persistent(name: &str) -> Self {
        Self::create(name.to_owned(), true)
    }

    fn create(name: String, persistent: bool) -> Self {
        require_root();
        run("ip", &["netns", "add", &name]);
        let ns = Self { name, persistent };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// Another handle to the same namespace that does not delete it on drop (for a
    /// thread that outlives a borrow).
    pub fn handle(&self) -> Netns {
        Netns {
            name: self.name.clone(),
            persistent: true,
        }
    }

    /// The path `nsenter --net=` and `setns` take.
    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// A command that runs `program` inside the namespace but keeps this process's
    /// mounts (so bpffs pins are the host's), unlike `ip netns exec`.
    pub fn command(&self, program: &str) -> Command {
        let mut command = Command::new("nsenter");
        command
            .arg(format!("--net={}", self.path()))
            .arg("--")
            .arg(program);
        command
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `ip -n <ns> ...`.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// Runs a command inside the namespace.
    pub fn exec(&self, program: &str, args: &[&str]) -> String {
        let mut all = vec!["netns", "exec", &self.name, program];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// Moves the calling thread into the namespace until the guard drops.
    pub fn enter(&self) -> Entered {
        let original = File::open("/proc/thread-self/ns/net").expect("open own netns");
        let target = File::open(format!("/run/netns/{}", self.name)).expect("open netns");
        let rc = unsafe { libc::setns(target.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        Entered { original }
    }
}

/// `fblb-<tag>-<pid>-<n>`: unique across processes and calls.
pub fn unique_name(tag: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("fblb-{tag}-{}-{n}", std::process::id())
}

impl Drop for Netns {
    fn drop(&mut self) {
        if self.persistent {
            return;
        }
        // Deleting the namespace removes its veths and anything attached to them.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// The calling thread is inside a namespace; dropping returns it to where it was.
pub struct Entered {
    original: File,
}

impl Drop for Entered {
    fn drop(&mut self) {
        unsafe { libc::setns(self.original.as_raw_fd(), libc::CLONE_NEWNET) };
    }
}

/// The index of an interface as seen from the calling thread's namespace.
pub fn ifindex(name: &str) -> u32 {
    let c = std::ffi::CString::new(name).unwrap();
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    assert_ne!(index, 0, "no interface {name}");
    index
}

//! A sandbox for the stack's nodes: a network namespace of its own (so fixed ports do
//! not collide between tests), a directory for configurations and logs, and the
//! processes started in it, all removed when the sandbox drops.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    process::{Child, Output},
    time::Duration,
};

use crate::{
    lab::{bin_dir_of_this_test, terminate, wait_until},
    netns::{Netns, unique_name},
};
use foobar_lab::process::{bin, spawn_logged};

/// A namespace, a directory and named processes.
pub struct Sandbox {
    /// The namespace (loopback up).
    pub ns: Netns,
    /// Configurations and logs.
    pub dir: PathBuf,
    children: BTreeMap<String, Child>,
}

impl Sandbox {
    /// A fresh sandbox; `tag` names it.
    pub fn new(tag: &str) -> Self {
        let ns = Netns::new(tag);
        let dir = std::env::temp_dir().join(unique_name(tag));
        std::fs::create_dir_all(&dir).expect("sandbox dir");
        Self {
            ns,
            dir,
            children: BTreeMap::new(),
        }
    }

    /// Writes a file of the sandbox; returns its path.
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).expect("dir");
        }
        std::fs::write(&path, text).expect("write");
        path
    }

    /// Starts one of the workspace's binaries as `name`, its output in `<name>.log`.
    pub fn start(&mut self, name: &str, program: &str, args: &[&str]) {
        let path = bin(&bin_dir_of_this_test(), program);
        let child = spawn_logged(
            self.ns.command(&path).args(args),
            &self.dir.join(format!("{name}.log")),
        );
        self.children.insert(name.to_owned(), child);
    }

    /// Starts a node (`foobar-web`, `foobar-app`) on a configuration written as
    /// `<name>.toml`, and waits until `health_url` answers.
    pub fn start_node(&mut self, name: &str, program: &str, config: &str, health_url: &str) {
        let path = self.write(&format!("{name}.toml"), config);
        self.start(name, program, &["--config", path.to_str().expect("utf-8")]);
        self.wait_for(name, health_url);
    }

    /// Waits until `url` answers at all (any status), or panics with `name`'s log.
    pub fn wait_for(&mut self, name: &str, url: &str) {
        let ns = self.ns.handle();
        let log = self.dir.join(format!("{name}.log"));
        let child = self.children.get_mut(name).expect("started");
        wait_until(Duration::from_secs(30), &format!("{name} at {url}"), || {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "{name} exited ({status}):\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            ns.command("curl")
                .args(["-sk", "-o", "/dev/null", "-m", "1", url])
                .output()
                .is_ok_and(|o| o.status.success())
        });
    }

    /// Stops `name` with SIGTERM (SIGKILL after 10 s).
    pub fn stop(&mut self, name: &str) {
        if let Some(mut child) = self.children.remove(name) {
            terminate(&mut child);
        }
    }

    /// Kills `name` with SIGKILL, as a crash does.
    pub fn kill(&mut self, name: &str) {
        if let Some(mut child) = self.children.remove(name) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends a signal to `name`.
    pub fn signal(&self, name: &str, signal: i32) {
        let child = self.children.get(name).expect("running");
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, signal) };
    }

    /// `name`'s log so far.
    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default()
    }

    /// Runs curl in the namespace.
    pub fn curl(&self, args: &[&str]) -> Output {
        self.ns
            .command("curl")
            .args(["-sS", "-m", "5"])
            .args(args)
            .output()
            .expect("run curl")
    }

    /// Runs curl and returns `(status code, headers, body)`.
    pub fn fetch(&self, args: &[&str]) -> (u16, String, String) {
        let head = self.dir.join(format!("head-{}", unique_name("h")));
        let mut all = vec!["-D", head.to_str().expect("utf-8"), "-w", "\n%{http_code}"];
        all.extend_from_slice(args);
        let out = self.curl(&all);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
        let headers = std::fs::read_to_string(&head).unwrap_or_default();
        let _ = std::fs::remove_file(head);
        (code.trim().parse().unwrap_or(0), headers, body.to_owned())
    }

    /// A path in the sandbox's directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        for (_, mut child) in std::mem::take(&mut self.children) {
            terminate(&mut child);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A header's value from `fetch`'s headers (the last response's, if redirected).
pub fn header<'a>(headers: &'a str, name: &str) -> Option<&'a str> {
    headers.lines().find_map(|line| {
        let (n, v) = line.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

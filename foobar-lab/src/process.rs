//! Processes of the lab: spawned with their output in a log, stopped with SIGTERM
//! then SIGKILL, and waited for with a deadline.

use std::{
    fs::File,
    os::unix::process::CommandExt,
    path::Path,
    process::{Child, Command, Stdio},
    thread::sleep,
    time::{Duration, Instant},
};

/// The path of a built binary, checked to exist.
pub fn bin(dir: &Path, name: &str) -> String {
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is not built; run `cargo build` first",
        path.display()
    );
    path.display().to_string()
}

/// Spawns `command` in a process group of its own, stdin closed, stdout and stderr
/// appended to `log`.
pub fn spawn_logged(command: &mut Command, log: &Path) -> Child {
    let file = File::options()
        .create(true)
        .append(true)
        .open(log)
        .expect("log file");
    command
        .stdin(Stdio::null())
        .stdout(file.try_clone().expect("log"))
        .stderr(file)
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {:?}: {e}", command.get_program()))
}

/// SIGTERM, then SIGKILL after 10 s; waits.
pub fn terminate(child: &mut Child) -> std::process::ExitStatus {
    // SAFETY: signalling a child we own.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            return child.wait().expect("wait");
        }
        sleep(Duration::from_millis(20));
    }
}

/// Polls `done` every 50 ms until it holds; panics after `limit`.
pub fn wait_until(limit: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < limit, "timed out waiting for {what}");
        sleep(Duration::from_millis(50));
    }
}

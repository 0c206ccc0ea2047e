//! Telling systemd how the daemon is doing, as `sd_notify(3)` does, without libsystemd.
//!
//! A `Type=notify` service (`deploy/systemd/foobar-lb.service`) is started only once it
//! says `READY=1`: for foobar-lb, once the data plane is attached and the control socket
//! answers, so that `systemctl start` and units ordered after it wait for a balancer that
//! works. The protocol is one datagram of `KEY=VALUE` lines to the Unix socket systemd
//! names in `$NOTIFY_SOCKET`: a path, or an abstract name written with a leading `@`.
//! Outside systemd the variable is unset and nothing is sent.

use std::{
    ffi::OsStr,
    io,
    os::{
        linux::net::SocketAddrExt,
        unix::{
            ffi::OsStrExt,
            net::{SocketAddr, UnixDatagram},
        },
    },
};

use tracing::warn;

/// The state systemd waits for before a start counts as done.
pub const READY: &str = "READY=1";
/// Tells systemd the stop it sees is the daemon's own doing, under way.
pub const STOPPING: &str = "STOPPING=1";

/// Why a notification could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    /// `$NOTIFY_SOCKET` is neither a path nor an abstract name.
    #[error("NOTIFY_SOCKET={0:?} is neither an absolute path nor an abstract name (@name)")]
    Address(String),
    /// The datagram could not be sent.
    #[error("notifying systemd at {socket:?}: {source}")]
    Send {
        /// `$NOTIFY_SOCKET`.
        socket: String,
        /// The socket error.
        source: io::Error,
    },
}

/// Sends `state` (newline-separated `KEY=VALUE` assignments) to systemd if it asked
/// for notifications; whether it did.
pub fn notify(state: &str) -> Result<bool, NotifyError> {
    let Some(socket) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(false);
    };
    notify_to(&socket, state)?;
    Ok(true)
}

/// Sends `state` to the notification socket `socket` (`$NOTIFY_SOCKET`'s syntax).
pub fn notify_to(socket: &OsStr, state: &str) -> Result<(), NotifyError> {
    let bytes = socket.as_bytes();
    let send_error = |source| NotifyError::Send {
        socket: socket.to_string_lossy().into_owned(),
        source,
    };
    let sender = UnixDatagram::unbound().map_err(send_error)?;
    let sent = match bytes.first() {
        Some(b'/') => sender.send_to(state.as_bytes(), socket),
        // An abstract socket: no file, the name is the rest after the `@`.
        Some(b'@') => SocketAddr::from_abstract_name(&bytes[1..])
            .and_then(|address| sender.send_to_addr(state.as_bytes(), &address)),
        _ => return Err(NotifyError::Address(socket.to_string_lossy().into_owned())),
    };
    // A datagram socket sends all or nothing.
    sent.map(drop).map_err(send_error)
}

/// Tells systemd the daemon is up; a failure is logged, never fatal (the daemon works
/// without it, and systemd's start timeout reports it).
pub fn ready() {
    notify_or_warn(READY);
}

/// Tells systemd the daemon is stopping.
pub fn stopping() {
    notify_or_warn(STOPPING);
}

fn notify_or_warn(state: &str) {
    if let Err(e) = notify(state) {
        warn!("{e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_to_a_socket_path() {
        let dir = std::env::temp_dir().join(format!("foobar-lb-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let systemd = UnixDatagram::bind(&path).unwrap();
        notify_to(path.as_os_str(), READY).unwrap();
        let mut buffer = [0u8; 64];
        let n = systemd.recv(&mut buffer).unwrap();
        assert_eq!(&buffer[..n], b"READY=1");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn sends_to_an_abstract_socket() {
        let name = format!("foobar-lb-notify-test-{}", std::process::id());
        let systemd =
            UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap())
                .unwrap();
        notify_to(OsStr::new(&format!("@{name}")), STOPPING).unwrap();
        let mut buffer = [0u8; 64];
        let n = systemd.recv(&mut buffer).unwrap();
        assert_eq!(&buffer[..n], b"STOPPING=1");
    }

    #[test]
    fn refuses_other_addresses() {
        for socket in ["", "relative/path", "vsock:2:1234"] {
            assert!(
                matches!(
                    notify_to(OsStr::new(socket), READY),
                    Err(NotifyError::Address(_))
                ),
                "{socket:?} was accepted"
            );
        }
    }
}

//! What every HTTP service of the foobar.com stack needs, written once: the web node,
//! the application node and the database agent all read a TOML file that is refused
//! whole with the bad field named ([`config`]), serve HTTP and HTTPS with limits and
//! timeouts and reload their certificate on SIGHUP ([`server`], [`tls`]), write a
//! combined access log and Prometheus metrics ([`observe`]), stop gracefully
//! ([`signals`]), and keep their host's firewall rules for their role in a table of
//! their own ([`firewall`]).

/// The memory allocator of the services: mimalloc, whose per-thread heaps cost a
/// request's many small allocations less than glibc's arenas do. Each binary sets it:
/// `#[global_allocator] static ALLOCATOR: foobar_node::Allocator = foobar_node::Allocator;`
pub use mimalloc::MiMalloc as Allocator;

pub mod config;
pub mod firewall;
pub mod observe;
pub mod server;
pub mod signals;
pub mod tls;

/// Logs to stderr, filtered by `RUST_LOG` (default `info`).
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

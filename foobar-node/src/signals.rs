//! SIGTERM and SIGINT stop a service gracefully; SIGHUP asks it to re-read what it can.

use tokio::{
    signal::unix::{SignalKind, signal},
    sync::watch,
};

/// Resolves once shutdown was asked for; cheap to clone into every task.
#[derive(Clone, Debug)]
pub struct Shutdown(watch::Receiver<bool>);

impl Shutdown {
    /// A shutdown that `trigger` starts (tests, and services that stop themselves).
    pub fn new() -> (watch::Sender<bool>, Shutdown) {
        let (tx, rx) = watch::channel(false);
        (tx, Shutdown(rx))
    }

    /// Waits until shutdown is asked for (at once if it already was).
    pub async fn wait(&mut self) {
        let _ = self.0.wait_for(|stop| *stop).await;
    }

    /// Whether shutdown was asked for.
    pub fn requested(&self) -> bool {
        *self.0.borrow()
    }
}

/// A [`Shutdown`] triggered by SIGTERM or SIGINT, and a stream of SIGHUPs.
pub fn install() -> std::io::Result<(Shutdown, Hangups)> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let hup = signal(SignalKind::hangup())?;
    let (tx, shutdown) = Shutdown::new();
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("shutting down");
        let _ = tx.send(true);
    });
    Ok((shutdown, Hangups(hup)))
}

/// SIGHUPs, as they arrive.
pub struct Hangups(tokio::signal::unix::Signal);

impl Hangups {
    /// Waits for the next SIGHUP.
    pub async fn next(&mut self) -> Option<()> {
        self.0.recv().await
    }
}

//! Process signals for the long-running commands: SIGTERM and SIGINT stop, SIGHUP reloads.
//!
//! SIGHUP is always caught, so it never kills a process by default; what a reload does is up
//! to the command (the server re-reads its token keys; more reloadable state hooks in there).

use tokio::signal::unix::{signal, Signal, SignalKind};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    Stop,
    Reload,
}

pub struct Signals {
    term: Signal,
    int: Signal,
    hup: Signal,
}

impl Signals {
    pub fn new() -> std::io::Result<Self> {
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    pub async fn next(&mut self) -> Event {
        tokio::select! {
            _ = self.term.recv() => Event::Stop,
            _ = self.int.recv() => Event::Stop,
            _ = self.hup.recv() => Event::Reload,
        }
    }

    /// Waits for a stop signal, passing every reload to `on_reload`.
    pub async fn until_stop(&mut self, mut on_reload: impl FnMut()) {
        loop {
            match self.next().await {
                Event::Stop => return,
                Event::Reload => {
                    tracing::info!("SIGHUP: reloading");
                    on_reload();
                }
            }
        }
    }
}

//! Accepting connections on TCP and unix sockets.

use crate::{session, Shared};
use std::sync::Arc;
use tokio::net::{TcpListener, UnixListener};
use tokio::task::JoinSet;

/// A bound listening socket.
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, std::path::PathBuf),
}

impl Listener {
    /// Binds an address as runzeo understands it: a path (containing `/`) is a unix
    /// socket, anything else is `HOST:PORT` (or just `PORT`, on all interfaces).
    pub async fn bind(address: &str) -> std::io::Result<Listener> {
        if address.contains('/') {
            let path = std::path::PathBuf::from(address);
            if path.exists() {
                // A stale socket from an earlier run; a live server would hold the pid file.
                std::fs::remove_file(&path)?;
            }
            Ok(Listener::Unix(UnixListener::bind(&path)?, path))
        } else {
            let addr = if address.contains(':') {
                address.to_string()
            } else {
                format!("0.0.0.0:{address}")
            };
            Ok(Listener::Tcp(TcpListener::bind(addr).await?))
        }
    }

    /// The bound address, for logs and for tests that bind port 0.
    pub fn local_addr(&self) -> String {
        match self {
            Listener::Tcp(l) => l.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            Listener::Unix(_, p) => p.display().to_string(),
        }
    }
}

pub(crate) async fn accept_loop(listener: Listener, shared: Arc<Shared>) {
    let mut shutdown = shared.shutdown.clone();
    let mut sessions = JoinSet::new();
    tracing::info!(address = %listener.local_addr(), "listening");
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
            accepted = accept(&listener) => match accepted {
                Ok((Accepted::Tcp(stream), peer)) => {
                    sessions.spawn(session::run(stream, peer, shared.clone()));
                }
                Ok((Accepted::Unix(stream), peer)) => {
                    sessions.spawn(session::run(stream, peer, shared.clone()));
                }
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            },
        }
    }
    // Sessions see the shutdown flag too; wait for them to wind down.
    while sessions.join_next().await.is_some() {}
    if let Listener::Unix(_, path) = &listener {
        let _ = std::fs::remove_file(path);
    }
}

enum Accepted {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

async fn accept(listener: &Listener) -> std::io::Result<(Accepted, String)> {
    match listener {
        Listener::Tcp(l) => {
            let (s, addr) = l.accept().await?;
            let _ = s.set_nodelay(true);
            Ok((Accepted::Tcp(s), addr.to_string()))
        }
        Listener::Unix(l, path) => {
            let (s, _) = l.accept().await?;
            Ok((Accepted::Unix(s), path.display().to_string()))
        }
    }
}

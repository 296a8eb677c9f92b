//! Accepting connections on TCP and unix sockets.

use crate::{session, Shared};
use std::sync::Arc;
use tokio::net::{TcpListener, TcpSocket, UnixListener, UnixSocket};
use tokio::task::JoinSet;

/// How long a client may take to complete the TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// A bound listening socket.
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, std::path::PathBuf),
    /// TCP with TLS from the first byte.
    Tls(TcpListener, tokio_rustls::TlsAcceptor),
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
            let listener = UnixListener::bind(&path)?;
            // Local-only deployments control who may connect with the socket's
            // permissions: owner and group.
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o660))?;
            Ok(Listener::Unix(listener, path))
        } else {
            let addr = if address.contains(':') {
                address.to_string()
            } else {
                format!("0.0.0.0:{address}")
            };
            Ok(Listener::Tcp(TcpListener::bind(addr).await?))
        }
    }

    /// Binds `address` (as [`Listener::bind`] reads it) without listening yet: whatever
    /// makes an address unusable — a port in use, an invalid port, an unknown host, a
    /// missing socket directory, a privileged port — fails here, before the caller creates
    /// or opens anything, while clients are refused until [`Reserved::listen`] (their
    /// connection attempts are not queued behind a storage that is still opening).
    pub async fn reserve(address: &str) -> std::io::Result<Reserved> {
        if address.contains('/') {
            let path = std::path::PathBuf::from(address);
            if path.exists() {
                // A stale socket from an earlier run; a live server would hold the pid file.
                std::fs::remove_file(&path)?;
            }
            let socket = UnixSocket::new_stream()?;
            socket.bind(&path)?;
            return Ok(Reserved::Unix(socket, path));
        }
        let addr = if address.contains(':') {
            address.to_string()
        } else {
            format!("0.0.0.0:{address}")
        };
        let mut last = None;
        for a in tokio::net::lookup_host(&addr).await? {
            let socket = if a.is_ipv4() {
                TcpSocket::new_v4()?
            } else {
                TcpSocket::new_v6()?
            };
            // As std's and tokio's `bind` do: a restart must not wait for TIME_WAIT.
            socket.set_reuseaddr(true)?;
            match socket.bind(a) {
                Ok(()) => return Ok(Reserved::Tcp(socket)),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "could not resolve to any address",
            )
        }))
    }

    /// Wraps a TCP listener in TLS (unix sockets rely on file permissions instead).
    pub fn with_tls(self, acceptor: tokio_rustls::TlsAcceptor) -> std::io::Result<Listener> {
        match self {
            Listener::Tcp(l) => Ok(Listener::Tls(l, acceptor)),
            Listener::Unix(_, path) => Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("TLS on the unix socket {} is not supported", path.display()),
            )),
            other => Ok(other),
        }
    }

    /// The bound address, for logs and for tests that bind port 0.
    pub fn local_addr(&self) -> String {
        match self {
            Listener::Tcp(l) | Listener::Tls(l, _) => {
                l.local_addr().map(|a| a.to_string()).unwrap_or_default()
            }
            Listener::Unix(_, p) => p.display().to_string(),
        }
    }
}

/// A socket bound by [`Listener::reserve`], not listening yet.
pub enum Reserved {
    Tcp(TcpSocket),
    Unix(UnixSocket, std::path::PathBuf),
}

/// Pending connections the kernel queues, as tokio's `TcpListener::bind` sets it.
const BACKLOG: u32 = 1024;

impl Reserved {
    /// Starts listening: connections are queued from now on.
    pub fn listen(self) -> std::io::Result<Listener> {
        match self {
            Reserved::Tcp(socket) => Ok(Listener::Tcp(socket.listen(BACKLOG)?)),
            Reserved::Unix(socket, path) => {
                let listener = socket.listen(BACKLOG)?;
                // Local-only deployments control who may connect with the socket's
                // permissions: owner and group.
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o660))?;
                Ok(Listener::Unix(listener, path))
            }
        }
    }

    /// Starts listening, for a plain TCP endpoint (the metrics).
    pub fn listen_tcp(self) -> std::io::Result<TcpListener> {
        match self {
            Reserved::Tcp(socket) => socket.listen(BACKLOG),
            Reserved::Unix(_, path) => Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{} is not a TCP address", path.display()),
            )),
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
            accepted = accept(&listener) => match accepted.inspect(|_| {
                shared.metrics.connections_accepted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }) {
                Ok((Accepted::Tcp(stream), peer)) => {
                    sessions.spawn(session::run(stream, peer, shared.clone()));
                }
                Ok((Accepted::Unix(stream), peer)) => {
                    sessions.spawn(session::run(stream, peer, shared.clone()));
                }
                Ok((Accepted::Tls(stream, acceptor), peer)) => {
                    let shared = shared.clone();
                    sessions.spawn(async move {
                        match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                            Ok(Ok(tls)) => session::run(tls, peer, shared).await,
                            Ok(Err(e)) => tracing::warn!(%peer, error = %e, "TLS handshake failed"),
                            Err(_) => tracing::warn!(%peer, "TLS handshake timed out"),
                        }
                    });
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
    Tls(tokio::net::TcpStream, tokio_rustls::TlsAcceptor),
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
        Listener::Tls(l, acceptor) => {
            let (s, addr) = l.accept().await?;
            let _ = s.set_nodelay(true);
            Ok((Accepted::Tls(s, acceptor.clone()), addr.to_string()))
        }
    }
}

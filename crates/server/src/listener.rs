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
    /// A unix socket, its path and the identity (device, inode) of the socket file this
    /// listener made: only that file is removed at shutdown.
    Unix(UnixListener, std::path::PathBuf, (u64, u64)),
    /// TCP with TLS from the first byte.
    Tls(TcpListener, tokio_rustls::TlsAcceptor),
}

impl Listener {
    /// Binds an address as runzeo understands it: a path (containing `/`) is a unix
    /// socket, anything else is `HOST:PORT` (or just `PORT`, on all interfaces). A unix
    /// socket gets the process's umask (as the stock server's does: owner only with the
    /// usual umasks); [`Listener::bind_with_mode`] sets another mode.
    pub async fn bind(address: &str) -> std::io::Result<Listener> {
        Self::bind_with_mode(address, None).await
    }

    /// [`Listener::bind`], with `socket_mode` as the permissions of a unix socket
    /// (`None`: as the umask makes it). Who may connect to a unix socket is decided by
    /// them: connecting needs write permission on the socket file.
    pub async fn bind_with_mode(
        address: &str,
        socket_mode: Option<u32>,
    ) -> std::io::Result<Listener> {
        if address.contains('/') {
            let path = std::path::PathBuf::from(address);
            remove_stale_socket(&path)?;
            let listener = UnixListener::bind(&path)?;
            if let Some(mode) = socket_mode {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode & 0o7777))?;
            }
            use std::os::unix::fs::MetadataExt;
            let meta = std::fs::symlink_metadata(&path)?;
            Ok(Listener::Unix(listener, path, (meta.dev(), meta.ino())))
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
    /// missing socket directory, a privileged port, a unix socket a live server answers
    /// on — fails here, before the caller creates or opens anything, while clients are
    /// refused until [`Reserved::listen`] (their connection attempts are not queued
    /// behind a storage that is still opening). `socket_mode`: as for
    /// [`Listener::bind_with_mode`], set before listening.
    pub async fn reserve(address: &str, socket_mode: Option<u32>) -> std::io::Result<Reserved> {
        if address.contains('/') {
            let path = std::path::PathBuf::from(address);
            remove_stale_socket(&path)?;
            let socket = UnixSocket::new_stream()?;
            socket.bind(&path)?;
            if let Some(mode) = socket_mode {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode & 0o7777))?;
            }
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
            Listener::Unix(_, path, _) => Err(std::io::Error::new(
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
            Listener::Unix(_, p, _) => p.display().to_string(),
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
                use std::os::unix::fs::MetadataExt;
                let meta = std::fs::symlink_metadata(&path)?;
                Ok(Listener::Unix(listener, path, (meta.dev(), meta.ino())))
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

/// Makes way for a unix socket at `path`: nothing there is fine; a socket nobody answers
/// on (left by a crash) is removed; a socket a live server answers on is "address already
/// in use", as binding a TCP port twice is (a second instance must not take the socket
/// over from a running server); anything that is not a socket is never removed.
pub fn remove_stale_socket(path: &std::path::Path) -> std::io::Result<()> {
    use std::io::{Error, ErrorKind};
    use std::os::unix::fs::FileTypeExt;
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !meta.file_type().is_socket() {
        return Err(Error::new(
            ErrorKind::AlreadyExists,
            format!("{} exists and is not a socket", path.display()),
        ));
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(Error::new(
            ErrorKind::AddrInUse,
            format!(
                "address already in use: a server is answering on {}",
                path.display()
            ),
        )),
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
            tracing::info!(path = %path.display(), "removing a stale socket");
            std::fs::remove_file(path)
        }
        Err(e) => Err(Error::new(
            e.kind(),
            format!("checking the existing socket {}: {e}", path.display()),
        )),
    }
}

pub(crate) async fn accept_loop(listener: Listener, shared: Arc<Shared>) {
    let mut shutdown = shared.shutdown.clone();
    let mut sessions = JoinSet::new();
    // Refusals are logged at most every 10 s, with how many there were.
    let mut refused = 0u64;
    let mut last_refusal_log = std::time::Instant::now() - std::time::Duration::from_secs(60);
    tracing::info!(address = %listener.local_addr(), "listening");
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
            accepted = accept(&listener) => match accepted.inspect(|_| {
                shared.metrics.connections_accepted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }) {
                Ok((stream, peer)) => {
                    let Some(slot) = ConnectionSlot::take(&shared) else {
                        drop(stream);
                        refused += 1;
                        if last_refusal_log.elapsed() >= std::time::Duration::from_secs(10) {
                            tracing::warn!(%peer, limit = shared.config.max_connections, refused,
                                "too many connections: closing new ones (max-connections)");
                            last_refusal_log = std::time::Instant::now();
                            refused = 0;
                        }
                        continue;
                    };
                    let shared = shared.clone();
                    match stream {
                        Accepted::Tcp(stream) => {
                            sessions.spawn(async move {
                                session::run(stream, peer, shared, false).await;
                                drop(slot);
                            });
                        }
                        Accepted::Unix(stream) => {
                            sessions.spawn(async move {
                                session::run(stream, peer, shared, false).await;
                                drop(slot);
                            });
                        }
                        Accepted::Tls(stream, acceptor) => {
                            sessions.spawn(async move {
                                match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                                    Ok(Ok(tls)) => session::run(tls, peer, shared, true).await,
                                    Ok(Err(e)) => tracing::warn!(%peer, error = %e, "TLS handshake failed"),
                                    Err(_) => tracing::warn!(%peer, "TLS handshake timed out"),
                                }
                                drop(slot);
                            });
                        }
                    }
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
    if let Listener::Unix(_, path, id) = &listener {
        // Only the socket this listener made: another server may have replaced it since.
        use std::os::unix::fs::MetadataExt;
        if std::fs::symlink_metadata(path).is_ok_and(|m| (m.dev(), m.ino()) == *id) {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// One of the `max_connections` places, held by a session for as long as it runs.
struct ConnectionSlot(Arc<Shared>);

impl ConnectionSlot {
    fn take(shared: &Arc<Shared>) -> Option<ConnectionSlot> {
        use std::sync::atomic::Ordering;
        let open = &shared.metrics.connections_open;
        if open.fetch_add(1, Ordering::AcqRel) >= shared.config.max_connections as u64 {
            open.fetch_sub(1, Ordering::AcqRel);
            shared
                .metrics
                .connections_refused
                .fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some(ConnectionSlot(shared.clone()))
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0
            .metrics
            .connections_open
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
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
        Listener::Unix(l, path, _) => {
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

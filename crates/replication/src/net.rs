//! Addresses of replication links: `HOST:PORT`, `PORT` (all interfaces, for listening),
//! or a unix socket path (anything containing `/`), as zc.zrs's `replicate-to` and
//! `replicate-from` accept them.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

/// A connected replication link.
pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    /// Connects to `address`.
    pub async fn connect(address: &str) -> io::Result<Stream> {
        if address.contains('/') {
            return Ok(Stream::Unix(UnixStream::connect(address).await?));
        }
        let s = TcpStream::connect(address).await?;
        s.set_nodelay(true)?;
        Ok(Stream::Tcp(s))
    }

    /// The peer, for logs.
    pub fn peer(&self) -> String {
        match self {
            Stream::Tcp(s) => s
                .peer_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|_| "?".into()),
            Stream::Unix(_) => "unix socket".into(),
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
            Stream::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// Where a primary listens for replicas.
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, std::path::PathBuf),
}

impl Listener {
    /// Binds `address` (`HOST:PORT`, `PORT` for every interface, or a socket path). A
    /// socket file already at the path is "address in use": the caller decides whether it
    /// is stale (the server binary checks that nobody answers on it first, so a second
    /// instance never takes the socket over from a running primary).
    pub async fn bind(address: &str) -> io::Result<Listener> {
        if address.contains('/') {
            let path = std::path::PathBuf::from(address);
            return Ok(Listener::Unix(UnixListener::bind(&path)?, path));
        }
        let address = if address.parse::<u16>().is_ok() {
            format!("0.0.0.0:{address}")
        } else if let Some(port) = address.strip_prefix(':') {
            format!("0.0.0.0:{port}")
        } else {
            address.to_string()
        };
        Ok(Listener::Tcp(TcpListener::bind(address).await?))
    }

    pub async fn accept(&self) -> io::Result<Stream> {
        match self {
            Listener::Tcp(l) => {
                let (s, _) = l.accept().await?;
                s.set_nodelay(true)?;
                Ok(Stream::Tcp(s))
            }
            Listener::Unix(l, _) => Ok(Stream::Unix(l.accept().await?.0)),
        }
    }

    /// The bound address, for logs (and a port chosen by the system).
    pub fn local(&self) -> String {
        match self {
            Listener::Tcp(l) => l
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|_| "?".into()),
            Listener::Unix(_, p) => p.display().to_string(),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, p) = self {
            let _ = std::fs::remove_file(p);
        }
    }
}

//! The byte stream under a connection: plain TCP, TLS over TCP (`wss://`), or a stream
//! carried inside another protocol (a WebSocket over an HTTP/2 stream, RFC 8441).

use std::io::IoSlice;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// A byte stream inside another protocol's connection (an HTTP/2 stream, say).
pub trait Tunnel: AsyncRead + AsyncWrite + Send + Unpin + std::fmt::Debug {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin + std::fmt::Debug> Tunnel for T {}

/// A [`Tunnel`], shareable across threads as the other streams are: it is only ever
/// used through `&mut`, so its lock is never waited on.
#[derive(Debug)]
pub struct Tunneled(std::sync::Mutex<Box<dyn Tunnel>>);

impl Tunneled {
    fn io(self: Pin<&mut Self>) -> Pin<&mut dyn Tunnel> {
        let inner = self
            .get_mut()
            .0
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Pin::new(inner.as_mut())
    }
}

impl AsyncRead for Tunneled {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        self.io().poll_read(cx, buf)
    }
}

impl AsyncWrite for Tunneled {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.io().poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        self.io().poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.lock().is_ok_and(|inner| inner.is_write_vectored())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.io().poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.io().poll_shutdown(cx)
    }
}

/// A TCP stream, with or without TLS, or a tunnel. The TLS states are boxed: a plain
/// connection keeps only its socket.
#[derive(Debug)]
#[non_exhaustive]
pub enum Stream {
    Plain(TcpStream),
    /// The client end of a TLS session.
    TlsClient(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    /// The server end of a TLS session.
    TlsServer(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    /// A stream of a connection that carries others (HTTP/2, over TLS).
    Tunnel(Tunneled),
}

impl Stream {
    /// A stream carried inside another connection.
    pub fn tunnel(io: impl Tunnel + 'static) -> Self {
        Self::Tunnel(Tunneled(std::sync::Mutex::new(Box::new(io))))
    }

    /// The TCP socket underneath, when the stream has one of its own.
    pub fn tcp(&self) -> Option<&TcpStream> {
        match self {
            Self::Plain(tcp) => Some(tcp),
            Self::TlsClient(tls) => Some(tls.get_ref().0),
            Self::TlsServer(tls) => Some(tls.get_ref().0),
            Self::Tunnel(_) => None,
        }
    }

    /// Whether the bytes are encrypted (a tunnel: its connection is TLS, the only one
    /// HTTP/2 is served over).
    pub fn is_tls(&self) -> bool {
        !matches!(self, Self::Plain(_))
    }
}

impl From<TcpStream> for Stream {
    fn from(tcp: TcpStream) -> Self {
        Self::Plain(tcp)
    }
}

/// Calls the same method on whichever stream is inside.
macro_rules! each {
    ($self:ident, $s:ident => $call:expr) => {
        match $self.get_mut() {
            Stream::Plain($s) => $call,
            Stream::TlsClient($s) => $call,
            Stream::TlsServer($s) => $call,
            Stream::Tunnel($s) => $call,
        }
    };
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        each!(self, s => Pin::new(s).poll_read(cx, buf))
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        each!(self, s => Pin::new(s).poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        each!(self, s => Pin::new(s).poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Plain(s) => s.is_write_vectored(),
            Self::TlsClient(s) => s.is_write_vectored(),
            Self::TlsServer(s) => s.is_write_vectored(),
            Self::Tunnel(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        each!(self, s => Pin::new(s).poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        each!(self, s => Pin::new(s).poll_shutdown(cx))
    }
}

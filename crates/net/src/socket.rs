//! [`WebSocket`]: one connection's I/O loop around a [`switchboard_wire::Connection`].

use std::pin::Pin;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use switchboard_wire::deflate::DeflateParams;
use switchboard_wire::{CloseFrame, Connection, Message, OpCode, Role};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::{sleep_until, Instant, Sleep};

use crate::config::Config;
use crate::error::Error;

/// A WebSocket connection over a stream `S`.
///
/// [`WebSocket::recv`] is cancel-safe: it can sit in `tokio::select!` beside other work
/// (an outgoing queue, a shutdown signal) and lose nothing when another branch wins.
#[derive(Debug)]
pub struct WebSocket<S> {
    io: S,
    conn: Connection,
    config: Config,
    read_buf: BytesMut,
    last_read: Instant,
    last_write: Instant,
    /// Wakes the connection to ping a quiet peer or free idle memory.
    timer: Option<Pin<Box<Sleep>>>,
    ping_outstanding: bool,
    peer_close: Option<CloseFrame>,
    finished: bool,
}

impl<S: AsyncRead + AsyncWrite + Unpin> WebSocket<S> {
    /// Wraps a stream whose handshake is complete. `leftover` holds bytes read past the
    /// handshake (frames the peer sent right after its request or response).
    pub fn from_upgraded(io: S, conn: Connection, leftover: &[u8], config: Config) -> Self {
        let mut read_buf = BytesMut::with_capacity(config.read_buffer_size.max(leftover.len()));
        read_buf.extend_from_slice(leftover);
        let now = Instant::now();
        let timer = first_wake(&config).map(|after| Box::pin(sleep_until(now + after)));
        Self {
            io,
            conn,
            config,
            read_buf,
            last_read: now,
            last_write: now,
            timer,
            ping_outstanding: false,
            peer_close: None,
            finished: false,
        }
    }

    /// Wraps a stream as the server end of a connection, with permessage-deflate when
    /// the handshake agreed on it.
    pub fn server(io: S, leftover: &[u8], config: Config, deflate: Option<DeflateParams>) -> Self {
        let mut conn = Connection::server(config.wire.clone());
        if let Some(params) = deflate {
            conn = conn.with_deflate(params, &config.deflate.clone().unwrap_or_default());
        }
        Self::from_upgraded(io, conn, leftover, config)
    }

    /// The protocol state (for inspection: compression state, close state).
    pub fn protocol(&self) -> &Connection {
        &self.conn
    }

    /// Receives the next text or binary message. Pings, pongs and the close handshake are
    /// handled inside. `Ok(None)` once the connection closed cleanly (see
    /// [`WebSocket::peer_close`]); an error when the peer broke the protocol (it was sent
    /// the matching close code), vanished, or stopped answering pings.
    pub async fn recv(&mut self) -> Result<Option<Message>, Error> {
        loop {
            if self.finished {
                return Ok(None);
            }
            match self.conn.read(&mut self.read_buf) {
                Ok(Some(Message::Ping(_) | Message::Pong(_))) => continue,
                Ok(Some(Message::Close(frame))) => {
                    self.peer_close = frame;
                    continue;
                }
                Ok(Some(message)) => return Ok(Some(message)),
                Ok(None) => {}
                Err(error) => {
                    // The close frame with the error's code is queued; send it and hang up.
                    self.finish().await;
                    return Err(error.into());
                }
            }
            if self.conn.is_done() {
                // The peer's Close arrived (and was answered): complete the handshake.
                self.finish().await;
                return Ok(None);
            }
            // Everything buffered is decoded: write what was queued in one go, then wait.
            if self.conn.has_output() {
                self.flush().await?;
            }
            self.fill().await?;
        }
    }

    /// Reads more bytes, pinging quiet peers and dropping dead ones meanwhile.
    async fn fill(&mut self) -> Result<(), Error> {
        let want = self
            .conn
            .read_hint()
            .clamp(self.config.read_buffer_size, 1 << 20);
        self.read_buf.reserve(want);
        let read = match self.timer.as_mut() {
            None => self.io.read_buf(&mut self.read_buf).await,
            Some(timer) => {
                tokio::select! {
                    biased;
                    read = self.io.read_buf(&mut self.read_buf) => read,
                    () = timer.as_mut() => {
                        return self.on_timer().await;
                    }
                }
            }
        };
        match read {
            Ok(0) => {
                self.finished = true;
                if self.conn.is_done() {
                    Ok(())
                } else {
                    Err(Error::ConnectionLost)
                }
            }
            Ok(_) => {
                self.last_read = Instant::now();
                self.ping_outstanding = false;
                Ok(())
            }
            Err(error) => {
                self.finished = true;
                Err(error.into())
            }
        }
    }

    /// Pings a peer that has been quiet for the ping interval, drops one that stayed
    /// quiet past the pong timeout, and frees compression memory on an idle connection.
    async fn on_timer(&mut self) -> Result<(), Error> {
        let now = Instant::now();
        let mut next: Option<Instant> = None;
        if let Some(interval) = self.config.ping_interval {
            let quiet_since = self.last_read;
            let due = if now >= quiet_since + interval + self.config.pong_timeout {
                self.finished = true;
                // Best effort: the peer is presumed gone, so a failed write says nothing new.
                let _ = self.io.shutdown().await;
                return Err(Error::PingTimeout);
            } else if now >= quiet_since + interval {
                if !self.ping_outstanding && !self.conn.close_sent() {
                    self.conn.send(OpCode::Ping, b"")?;
                    self.ping_outstanding = true;
                    self.flush().await?;
                }
                quiet_since + interval + self.config.pong_timeout
            } else {
                quiet_since + interval
            };
            next = Some(due);
        }
        if let Some(idle) = self.config.idle_release {
            let active = self.last_read.max(self.last_write);
            let due = if now >= active + idle {
                self.conn.release_memory();
                if self.read_buf.is_empty() {
                    // The next read allocates again; an idle connection holds no buffer.
                    self.read_buf = BytesMut::new();
                }
                now + idle
            } else {
                active + idle
            };
            next = Some(next.map_or(due, |n| n.min(due)));
        }
        if let (Some(timer), Some(next)) = (self.timer.as_mut(), next) {
            timer.as_mut().reset(next);
        }
        Ok(())
    }

    /// Sends what is queued and closes the transport: a server hangs up at once; a client
    /// waits (bounded) for the server to hang up first, as RFC 6455 asks.
    async fn finish(&mut self) {
        if self.finished {
            return;
        }
        self.finished = true;
        // The peer may already be gone; there is nobody left to tell.
        let _ = self.flush().await;
        if self.conn.role() == Role::Client && !self.conn.is_failed() {
            let wait = self.config.close_timeout;
            let mut sink = [0u8; 1024];
            let _ = tokio::time::timeout(wait, async {
                while matches!(self.io.read(&mut sink).await, Ok(n) if n > 0) {}
            })
            .await;
        }
        let _ = self.io.shutdown().await;
    }

    /// Writes every queued frame.
    pub async fn flush(&mut self) -> Result<(), Error> {
        if !self.conn.has_output() {
            return Ok(());
        }
        while self.conn.has_output() {
            self.io.write_buf(self.conn.output()).await?;
        }
        self.last_write = Instant::now();
        self.io.flush().await?;
        Ok(())
    }

    /// Queues a message without writing it; it goes out with the next [`flush`], or when
    /// [`recv`] runs out of input. Waits for the socket only when more than
    /// `max_write_buffer` bytes are queued.
    ///
    /// [`flush`]: WebSocket::flush
    /// [`recv`]: WebSocket::recv
    pub async fn feed(&mut self, message: &Message) -> Result<(), Error> {
        match message {
            Message::Text(text) => self.conn.send(OpCode::Text, text.as_bytes())?,
            Message::Binary(data) => self.conn.send(OpCode::Binary, data)?,
            Message::Ping(data) => self.conn.send(OpCode::Ping, data)?,
            Message::Pong(data) => self.conn.send(OpCode::Pong, data)?,
            Message::Close(frame) => self.conn.close(frame.clone()),
        }
        self.relieve().await
    }

    /// Queues a frame encoded once for many connections (servers only).
    pub async fn feed_encoded(&mut self, frame: &Bytes) -> Result<(), Error> {
        self.conn.send_encoded(frame)?;
        self.relieve().await
    }

    async fn relieve(&mut self) -> Result<(), Error> {
        if self.conn.output().len() > self.config.max_write_buffer {
            self.flush().await?;
        }
        Ok(())
    }

    /// Sends a message now.
    pub async fn send(&mut self, message: &Message) -> Result<(), Error> {
        self.feed(message).await?;
        self.flush().await
    }

    /// Sends a text message now.
    pub async fn send_text(&mut self, text: &str) -> Result<(), Error> {
        self.conn.send_text(text)?;
        self.flush().await
    }

    /// Sends a Close frame and returns at once; keep calling [`WebSocket::recv`] to get
    /// the messages still in flight until it returns `Ok(None)` with the peer's answer.
    pub async fn start_close(&mut self, frame: Option<CloseFrame>) -> Result<(), Error> {
        self.conn.close(frame);
        if self.finished {
            return Ok(());
        }
        self.flush().await
    }

    /// Runs the close handshake: sends Close, waits (bounded by `close_timeout`) for the
    /// peer's Close, discarding data that arrives meanwhile, then closes the transport.
    /// Returns the peer's Close frame.
    pub async fn close(&mut self, frame: Option<CloseFrame>) -> Result<Option<CloseFrame>, Error> {
        self.start_close(frame).await?;
        if self.finished {
            return Ok(self.peer_close.clone());
        }
        let timeout = self.config.close_timeout;
        let waited = tokio::time::timeout(timeout, async {
            loop {
                match self.recv().await {
                    Ok(Some(_)) => continue,
                    Ok(None) => return Ok(()),
                    Err(error) => return Err(error),
                }
            }
        })
        .await;
        match waited {
            Ok(result) => result.map(|()| self.peer_close.clone()),
            Err(_) => {
                self.finished = true;
                let _ = self.io.shutdown().await;
                Err(Error::Timeout("waiting for the peer's close frame"))
            }
        }
    }

    /// The peer's Close frame, once it arrived.
    pub fn peer_close(&self) -> Option<&CloseFrame> {
        self.peer_close.as_ref()
    }

    /// Whether the connection is over (closed cleanly, failed or lost).
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    pub fn get_ref(&self) -> &S {
        &self.io
    }

    /// Changes the ping interval from now on.
    pub fn set_ping_interval(&mut self, interval: Option<Duration>) {
        self.config.ping_interval = interval;
        self.timer =
            first_wake(&self.config).map(|after| Box::pin(sleep_until(Instant::now() + after)));
    }
}

/// When the timer first fires: the sooner of the ping interval and the idle release.
fn first_wake(config: &Config) -> Option<Duration> {
    match (config.ping_interval, config.idle_release) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

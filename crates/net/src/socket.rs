//! [`WebSocket`]: one connection's I/O loop around a [`switchboard_wire::Connection`].

use std::future::Future;
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io::IoSlice;

use bytes::{Buf, Bytes, BytesMut};
use switchboard_wire::deflate::DeflateParams;
use switchboard_wire::{CloseFrame, Connection, Message, OpCode, Role};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::{sleep_until, Instant, Sleep};
use tokio_util::io::poll_read_buf;

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
    /// What was read and not yet decoded: a view into this thread's shared read chunk
    /// right after a read (`read_view`), otherwise a buffer of its own.
    read_buf: BytesMut,
    read_view: bool,
    /// When the timer last saw reads (or writes) happen: kept to the timer's precision.
    /// The hot path only counts (`reads`, `writes`), with no clock read per message;
    /// the timer notices a changed count, so silence is detected at most one timer
    /// period late.
    last_read: Instant,
    last_write: Instant,
    reads: u64,
    writes: u64,
    reads_seen: u64,
    writes_seen: u64,
    /// Wakes the connection to ping a quiet peer or free idle memory.
    timer: Option<Pin<Box<Sleep>>>,
    /// When the unanswered ping went out; cleared by any byte from the peer.
    ping_sent: Option<Instant>,
    /// A protocol failure not yet reported (kept across a cancelled `recv`).
    failure: Option<switchboard_wire::Error>,
    peer_close: Option<CloseFrame>,
    finished: bool,
    /// Outgoing bytes ahead of the protocol's own output: earlier output frozen, then a
    /// large payload written as it is (no copy), in order.
    ahead: VecDeque<Bytes>,
    ahead_len: usize,
    /// Bytes asked of the socket per read: doubles (to `MAX_READ`) while reads come
    /// back full, so large messages take one read rather than several; back to the
    /// configured size when the connection goes idle.
    read_size: usize,
}

const MAX_READ: usize = 64 * 1024;

/// The size of the chunks reads go into, shared by the connections polled on a thread.
const READ_CHUNK: usize = 64 * 1024;

thread_local! {
    /// The unfilled rest of this thread's current read chunk. Each read takes what it
    /// filled as a view (payloads are split off it without copying); the chunk is freed
    /// when its last view is dropped. So connections between messages hold no buffer,
    /// as with a single receive buffer per event loop.
    static SHARED_READ: RefCell<BytesMut> = RefCell::new(BytesMut::new());
}

/// Reads once into this thread's shared chunk, with room for at least `want` bytes:
/// the bytes read (a view of the chunk), and the room the read had.
fn read_shared<S: AsyncRead + Unpin>(
    io: &mut S,
    want: usize,
) -> impl Future<Output = std::io::Result<(BytesMut, usize)>> + '_ {
    std::future::poll_fn(move |cx| {
        SHARED_READ.with(|chunk| {
            let mut chunk = chunk.borrow_mut();
            if chunk.capacity() - chunk.len() < want.max(1) {
                *chunk = BytesMut::with_capacity(READ_CHUNK.max(want));
            }
            let spare = chunk.capacity() - chunk.len();
            match poll_read_buf(Pin::new(&mut *io), cx, &mut *chunk) {
                Poll::Ready(Ok(_)) => Poll::Ready(Ok((chunk.split(), spare))),
                Poll::Ready(Err(error)) => Poll::Ready(Err(error)),
                Poll::Pending => Poll::Pending,
            }
        })
    })
}

/// Payloads from this size on are written from their own buffer (a vectored write)
/// instead of being copied behind their frame header.
const WRITE_IN_PLACE: usize = 4096;

impl<S: AsyncRead + AsyncWrite + Unpin> WebSocket<S> {
    /// Wraps a stream whose handshake is complete. `leftover` holds bytes read past the
    /// handshake (frames the peer sent right after its request or response).
    pub fn from_upgraded(io: S, conn: Connection, leftover: &[u8], config: Config) -> Self {
        let config_read_size = config.read_buffer_size.max(1);
        let read_buf = BytesMut::from(leftover);
        let now = Instant::now();
        let timer = first_wake(&config).map(|after| Box::pin(sleep_until(now + after)));
        Self {
            io,
            conn,
            config,
            read_buf,
            read_view: false,
            last_read: now,
            last_write: now,
            reads: 0,
            writes: 0,
            reads_seen: 0,
            writes_seen: 0,
            timer,
            ping_sent: None,
            failure: None,
            peer_close: None,
            finished: false,
            ahead: VecDeque::new(),
            ahead_len: 0,
            read_size: config_read_size,
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
                return match self.failure.take() {
                    Some(failure) => Err(failure.into()),
                    None => Ok(None),
                };
            }
            if self.conn.is_done() {
                // The peer's Close arrived (and was answered), or the peer broke the
                // protocol (and its close frame is queued): send what is left, hang up.
                // Re-entered if a cancelled call left it half done.
                // Boxed, like the timer's work below: rare paths that would otherwise
                // make every connection's receive future (and task) larger.
                Box::pin(self.finish()).await;
                continue;
            }
            match self.conn.read(&mut self.read_buf) {
                Ok(Some(Message::Ping(_) | Message::Pong(_))) => continue,
                Ok(Some(Message::Close(frame))) => {
                    self.peer_close = frame;
                    continue;
                }
                Ok(Some(message)) => return Ok(Some(message)),
                Ok(None) => {}
                Err(failure) => {
                    self.failure = Some(failure);
                    continue;
                }
            }
            // Everything buffered is decoded: write what was queued in one go, then wait.
            self.flush().await?;
            self.fill().await?;
        }
    }

    /// Reads more bytes, pinging quiet peers and dropping dead ones meanwhile.
    async fn fill(&mut self) -> Result<(), Error> {
        let want = self.conn.read_hint().min(1 << 20).max(self.read_size);
        // A connection that waits holds no read buffer of its own: nothing when every
        // byte it read was decoded, else an exact copy of the partial frame (never a
        // view that would pin a shared chunk while the peer takes its time).
        if self.read_buf.is_empty() {
            self.read_buf = BytesMut::new();
        } else if self.read_view {
            let mut owned = BytesMut::with_capacity(self.read_buf.len() + want);
            owned.extend_from_slice(&self.read_buf);
            self.read_buf = owned;
        }
        self.read_view = false;
        let read = match self.timer.as_mut() {
            None => read_shared(&mut self.io, want).await,
            Some(timer) => {
                tokio::select! {
                    biased;
                    read = read_shared(&mut self.io, want) => read,
                    () = timer.as_mut() => {
                        return Box::pin(self.on_timer()).await;
                    }
                }
            }
        };
        let read = read.map(|(data, spare)| {
            let n = data.len();
            if self.read_buf.is_empty() {
                self.read_buf = data;
                self.read_view = true;
            } else {
                self.read_buf.extend_from_slice(&data);
            }
            (n, spare)
        });
        match read {
            Ok((0, _)) => {
                self.finished = true;
                if self.conn.is_done() {
                    Ok(())
                } else {
                    Err(Error::ConnectionLost)
                }
            }
            Ok((n, spare)) => {
                if n == spare && self.read_size < MAX_READ {
                    self.read_size *= 2;
                }
                self.reads = self.reads.wrapping_add(1);
                if self.ping_sent.take().is_some() {
                    // Answered: the timer waited for the pong timeout; the next ping is
                    // due one interval of quiet from now, not after that timeout.
                    self.reads_seen = self.reads;
                    self.last_read = Instant::now();
                    if let (Some(timer), Some(after)) =
                        (self.timer.as_mut(), first_wake(&self.config))
                    {
                        timer.as_mut().reset(Instant::now() + after);
                    }
                }
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
        if self.reads != self.reads_seen {
            self.reads_seen = self.reads;
            self.last_read = now;
        }
        if self.writes != self.writes_seen {
            self.writes_seen = self.writes;
            self.last_write = now;
        }
        let mut next: Option<Instant> = None;
        if let Some(interval) = self.config.ping_interval {
            let due = match self.ping_sent {
                // The deadline runs from the ping, so a caller that was busy elsewhere
                // never drops a peer it did not ask.
                Some(sent) if now >= sent + self.config.pong_timeout => {
                    self.finished = true;
                    // Best effort: the peer is presumed gone; a failed shutdown says nothing new.
                    let _ = self.io.shutdown().await;
                    return Err(Error::PingTimeout);
                }
                Some(sent) => sent + self.config.pong_timeout,
                None if now >= self.last_read + interval && !self.conn.close_sent() => {
                    self.conn.send(OpCode::Ping, b"")?;
                    self.ping_sent = Some(now);
                    self.flush().await?;
                    now + self.config.pong_timeout
                }
                None => self.last_read + interval,
            };
            next = Some(due);
        }
        if let Some(idle) = self.config.idle_release {
            let active = self.last_read.max(self.last_write);
            let due = if now >= active + idle {
                // The read buffer needs no freeing: `fill` lets go of it before waiting.
                self.conn.release_memory();
                self.read_size = self.config.read_buffer_size;
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
        // The peer may already be gone; there is nobody left to tell.
        let _ = self.flush().await;
        if self.conn.role() == Role::Client && !self.conn.is_failed() {
            let mut sink = [0u8; 1024];
            let _ = tokio::time::timeout(self.config.close_timeout, async {
                while matches!(self.io.read(&mut sink).await, Ok(n) if n > 0) {}
            })
            .await;
        }
        let _ = tokio::time::timeout(self.config.close_timeout, self.io.shutdown()).await;
        // Set last, so a call cancelled half way is completed by the next one.
        self.finished = true;
    }

    /// Writes every queued frame.
    /// A peer that does not read for `write_timeout` is given up on.
    pub async fn flush(&mut self) -> Result<(), Error> {
        if !self.has_output() {
            return Ok(());
        }
        let mut write = std::pin::pin!(write_out(
            &mut self.io,
            &mut self.ahead,
            &mut self.ahead_len,
            self.conn.output()
        ));
        // Most flushes complete at once: the write timeout's timer is armed only for one
        // that has to wait for the peer.
        let first = std::future::poll_fn(|cx| Poll::Ready(write.as_mut().poll(cx))).await;
        let written = match first {
            Poll::Ready(result) => Ok(result),
            Poll::Pending => tokio::time::timeout(self.config.write_timeout, write).await,
        };
        match written {
            Ok(result) => result?,
            Err(_) => {
                self.finished = true;
                return Err(Error::Timeout("writing to a peer that does not read"));
            }
        }
        self.writes = self.writes.wrapping_add(1);
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
            Message::Text(text) if text.len() >= WRITE_IN_PLACE => {
                self.feed_in_place(OpCode::Text, text.clone().into_bytes())?;
            }
            Message::Binary(data) if data.len() >= WRITE_IN_PLACE => {
                self.feed_in_place(OpCode::Binary, data.clone())?;
            }
            Message::Text(text) => self.conn.send(OpCode::Text, text.as_bytes())?,
            Message::Binary(data) => self.conn.send(OpCode::Binary, data)?,
            Message::Ping(data) => self.conn.send(OpCode::Ping, data)?,
            Message::Pong(data) => self.conn.send(OpCode::Pong, data)?,
            Message::Close(frame) => self.conn.close(frame.clone()),
        }
        self.relieve().await
    }

    /// Queues one message of `opcode` from a byte slice (text must be UTF-8: JSON from a
    /// serializer, say), with no intermediate `Message`.
    pub async fn feed_frame(&mut self, opcode: OpCode, payload: &[u8]) -> Result<(), Error> {
        self.conn.send(opcode, payload)?;
        self.relieve().await
    }

    /// Queues a large message: its header behind what is queued, then the payload
    /// itself, shared rather than copied (unless it must be masked or compressed).
    fn feed_in_place(&mut self, opcode: OpCode, payload: Bytes) -> Result<(), Error> {
        if !self.conn.send_header_only(opcode, payload.len())? {
            return Ok(self.conn.send(opcode, &payload)?);
        }
        let head = self.conn.output().split().freeze();
        self.ahead_len += head.len() + payload.len();
        self.ahead.push_back(head);
        self.ahead.push_back(payload);
        Ok(())
    }

    fn has_output(&self) -> bool {
        self.conn.has_output() || !self.ahead.is_empty()
    }

    async fn relieve(&mut self) -> Result<(), Error> {
        if self.conn.output().len() + self.ahead_len > self.config.max_write_buffer {
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

    /// Runs the close handshake: sends Close, waits for the peer's Close, discarding data
    /// that arrives meanwhile, then closes the transport; all of it bounded by
    /// `close_timeout`. Returns the peer's Close frame.
    pub async fn close(&mut self, frame: Option<CloseFrame>) -> Result<Option<CloseFrame>, Error> {
        self.conn.close(frame);
        if self.finished {
            return Ok(self.peer_close.clone());
        }
        let waited = tokio::time::timeout(self.config.close_timeout, async {
            self.flush().await?;
            while self.recv().await?.is_some() {}
            Ok::<_, Error>(())
        })
        .await;
        match waited {
            Ok(result) => result.map(|()| self.peer_close.clone()),
            Err(_) => {
                self.finished = true;
                let _ = tokio::time::timeout(self.config.close_timeout, self.io.shutdown()).await;
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

/// Writes the chunks of `ahead`, then `out` (consuming them as bytes go out, in as few
/// vectored writes as the stream takes) and flushes the stream.
async fn write_out<S: AsyncWrite + Unpin>(
    io: &mut S,
    ahead: &mut VecDeque<Bytes>,
    ahead_len: &mut usize,
    out: &mut BytesMut,
) -> Result<(), Error> {
    while ahead.is_empty() && !out.is_empty() {
        io.write_buf(out).await?;
    }
    while !ahead.is_empty() {
        // The slices are made afresh at each poll, so they are no part of the future
        // (which every waiting connection's task holds).
        let written = std::future::poll_fn(|cx| {
            let mut slices = [IoSlice::new(&[]); 16];
            let mut count = 0;
            for chunk in ahead.iter().take(slices.len() - 1) {
                slices[count] = IoSlice::new(chunk);
                count += 1;
            }
            if count < slices.len() && !out.is_empty() {
                slices[count] = IoSlice::new(out);
                count += 1;
            }
            Pin::new(&mut *io).poll_write_vectored(cx, &slices[..count])
        })
        .await?;
        if written == 0 {
            return Err(std::io::Error::from(std::io::ErrorKind::WriteZero).into());
        }
        let mut left = written;
        while left > 0 {
            match ahead.front_mut() {
                Some(chunk) if chunk.len() <= left => {
                    left -= chunk.len();
                    *ahead_len -= chunk.len();
                    ahead.pop_front();
                }
                Some(chunk) => {
                    chunk.advance(left);
                    *ahead_len -= left;
                    left = 0;
                }
                None => {
                    out.advance(left);
                    left = 0;
                }
            }
        }
    }
    while !out.is_empty() {
        io.write_buf(out).await?;
    }
    io.flush().await?;
    Ok(())
}

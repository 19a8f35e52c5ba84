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
    timer: Option<Timer>,
    /// When the unanswered ping went out; cleared by any byte from the peer.
    ping_sent: Option<Instant>,
    /// A protocol failure not yet reported (kept across a cancelled `recv`).
    failure: Option<switchboard_wire::Error>,
    peer_close: Option<CloseFrame>,
    finished: bool,
    /// Outgoing bytes ahead of the protocol's own output: earlier output frozen, then a
    /// large payload's header and the payload written as it is (no copy), in order.
    ahead: VecDeque<Chunk>,
    ahead_len: usize,
    /// An error [`WebSocket::poll_message`] met, for the next [`WebSocket::recv`].
    deferred: Option<Box<Error>>,
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
/// the bytes read (a view of the chunk), how many, and the room the read had.
fn poll_read_shared<S: AsyncRead + Unpin>(
    io: &mut S,
    want: usize,
    cx: &mut std::task::Context<'_>,
) -> Poll<std::io::Result<(BytesMut, usize, usize)>> {
    SHARED_READ.with(|chunk| {
        let mut chunk = chunk.borrow_mut();
        if chunk.capacity() - chunk.len() < want.max(1) {
            *chunk = BytesMut::with_capacity(READ_CHUNK.max(want));
        }
        let spare = chunk.capacity() - chunk.len();
        match poll_read_buf(Pin::new(&mut *io), cx, &mut *chunk) {
            Poll::Ready(Ok(n)) => Poll::Ready(Ok((chunk.split(), n, spare))),
            Poll::Ready(Err(error)) => Poll::Ready(Err(error)),
            Poll::Pending => Poll::Pending,
        }
    })
}

/// A connection's timer. Polling a `Sleep` costs about as much as decoding a small
/// frame, and a connection waits on its socket and its timer after every message: the
/// timer is polled again only when it may have fired, or when the task's waker changed
/// (or nothing may have been registered: the task's budget was spent).
#[derive(Debug)]
struct Timer {
    sleep: Pin<Box<Sleep>>,
    /// The waker the sleep is known to hold.
    waker: Option<std::task::Waker>,
}

impl Timer {
    fn new(deadline: Instant) -> Self {
        Self {
            sleep: Box::pin(sleep_until(deadline)),
            waker: None,
        }
    }

    fn reset(&mut self, deadline: Instant) {
        self.sleep.as_mut().reset(deadline);
        // A fired sleep let go of its waker: the next wait registers one again.
        self.waker = None;
    }

    /// Whether the deadline passed; otherwise the task is woken when it does.
    fn poll_fired(&mut self, cx: &mut std::task::Context<'_>) -> bool {
        let known = self.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker()));
        if known && !self.sleep.is_elapsed() {
            return false;
        }
        // Out of budget, the poll below returns before it registers the waker.
        let registers = tokio::task::coop::has_budget_remaining();
        if self.sleep.as_mut().poll(cx).is_ready() {
            return true;
        }
        self.waker = registers.then(|| cx.waker().clone());
        false
    }
}

/// What [`WebSocket::settle`] came to.
#[derive(Debug)]
pub enum Settled {
    /// A message came meanwhile.
    Message(Message),
    /// Done; wait with [`WebSocket::poll_message`] again.
    Done,
    /// The connection closed cleanly (as [`WebSocket::recv`]'s `Ok(None)`).
    Closed,
}

/// What [`WebSocket::poll_recv`] came to.
enum Next {
    Message(Message),
    /// The connection is over: its failure, if any, is reported.
    Finished,
    /// The close handshake is done or failed: send what is left and hang up.
    Finish,
    /// Queued output that must wait for the socket.
    Flush,
    /// The timer fired.
    Timer,
    Failed(Error),
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
        let timer = first_wake(&config).map(|after| Timer::new(now + after));
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
            deferred: None,
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
        if let Some(error) = self.deferred.take() {
            return Err(*error);
        }
        loop {
            // The common steps (decode, write what is queued, read) in one poll; what
            // has to wait on something else is done by `work`.
            match std::future::poll_fn(|cx| self.poll_recv(cx)).await {
                Next::Message(message) => return Ok(Some(message)),
                next => match self.work(next).await? {
                    Settled::Message(message) => return Ok(Some(message)),
                    Settled::Closed => return Ok(None),
                    Settled::Done => {}
                },
            }
        }
    }

    /// The next message, as a poll, for a loop that waits on the socket beside other
    /// sources: at hand, or brought by the socket now; `Ready(None)` when the socket has
    /// work that waits on something else (a full socket, the timer, the end of the
    /// connection or an error): call [`WebSocket::settle`] then, which does it.
    pub fn poll_message(&mut self, cx: &mut std::task::Context<'_>) -> Poll<Option<Message>> {
        match self.poll_recv(cx) {
            Poll::Ready(Next::Message(message)) => Poll::Ready(Some(message)),
            Poll::Ready(Next::Failed(error)) => {
                self.deferred = Some(Box::new(error));
                Poll::Ready(None)
            }
            Poll::Ready(_) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    /// Does the work [`WebSocket::poll_message`] left, without waiting for a message.
    pub async fn settle(&mut self) -> Result<Settled, Error> {
        if let Some(error) = self.deferred.take() {
            return Err(*error);
        }
        match std::future::poll_fn(|cx| Poll::Ready(self.poll_recv(cx))).await {
            Poll::Ready(next) => self.work(next).await,
            Poll::Pending => Ok(Settled::Done),
        }
    }

    /// What [`WebSocket::poll_recv`] left to do. Boxed: rare paths that would otherwise
    /// make every connection's receive future (and task) larger.
    async fn work(&mut self, next: Next) -> Result<Settled, Error> {
        match next {
            Next::Message(message) => return Ok(Settled::Message(message)),
            Next::Finished => {
                return match self.failure.take() {
                    Some(failure) => Err(failure.into()),
                    None => Ok(Settled::Closed),
                };
            }
            // The peer's Close arrived (and was answered), or the peer broke the
            // protocol (and its close frame is queued): send what is left, hang up.
            // Re-entered if a cancelled call left it half done.
            Next::Finish => Box::pin(self.finish()).await,
            Next::Flush => Box::pin(self.flush()).await?,
            Next::Timer => Box::pin(self.on_timer()).await?,
            Next::Failed(error) => return Err(error),
        }
        Ok(Settled::Done)
    }

    /// Decodes what is buffered; once everything is, writes what was queued in one go
    /// and reads more (pinging quiet peers and dropping dead ones meanwhile).
    fn poll_recv(&mut self, cx: &mut std::task::Context<'_>) -> Poll<Next> {
        loop {
            if self.finished {
                return Poll::Ready(Next::Finished);
            }
            if self.conn.is_done() {
                return Poll::Ready(Next::Finish);
            }
            // (Nothing buffered decodes to nothing.)
            if !self.read_buf.is_empty() {
                match self.conn.read(&mut self.read_buf) {
                    Ok(Some(Message::Ping(_) | Message::Pong(_))) => continue,
                    Ok(Some(Message::Close(frame))) => {
                        self.peer_close = frame;
                        continue;
                    }
                    Ok(Some(message)) => return Poll::Ready(Next::Message(message)),
                    Ok(None) => {}
                    Err(failure) => {
                        self.failure = Some(failure);
                        continue;
                    }
                }
            }
            if self.has_output() {
                match self.poll_write_queued(cx) {
                    Poll::Ready(Ok(())) => self.writes = self.writes.wrapping_add(1),
                    Poll::Ready(Err(error)) => return Poll::Ready(Next::Failed(error)),
                    // A full socket: written under the write timeout.
                    Poll::Pending => return Poll::Ready(Next::Flush),
                }
            }
            let want = self.prepare_read();
            let read = if self.read_buf.is_empty() {
                poll_read_shared(&mut self.io, want, cx)
            } else {
                // The rest of a frame goes straight behind its start.
                self.read_buf.reserve(want);
                let spare = self.read_buf.capacity() - self.read_buf.len();
                poll_read_buf(Pin::new(&mut self.io), cx, &mut self.read_buf)
                    .map_ok(|n| (BytesMut::new(), n, spare))
            };
            match read {
                Poll::Ready(read) => {
                    if let Err(error) = self.after_read(read) {
                        return Poll::Ready(Next::Failed(error));
                    }
                }
                Poll::Pending => {
                    if self
                        .timer
                        .as_mut()
                        .is_some_and(|timer| timer.poll_fired(cx))
                    {
                        return Poll::Ready(Next::Timer);
                    }
                    return Poll::Pending;
                }
            }
        }
    }

    /// Before a read: how much to read. A connection that waits holds no read buffer of
    /// its own: nothing when every byte it read was decoded, else an exact copy of the
    /// partial frame (never a view that would pin a shared chunk while the peer takes
    /// its time).
    fn prepare_read(&mut self) -> usize {
        let want = self.conn.read_hint().min(1 << 20).max(self.read_size);
        if self.read_buf.is_empty() {
            self.read_buf = BytesMut::new();
        } else if self.read_view {
            let mut owned = BytesMut::with_capacity(self.read_buf.len() + want);
            owned.extend_from_slice(&self.read_buf);
            self.read_buf = owned;
        }
        self.read_view = false;
        want
    }

    /// Takes in what a read brought: a view of the shared chunk (when nothing was
    /// buffered), or `n` bytes read onto the buffer itself.
    fn after_read(&mut self, read: std::io::Result<(BytesMut, usize, usize)>) -> Result<(), Error> {
        let read = read.map(|(data, n, spare)| {
            if !data.is_empty() {
                self.read_buf = data;
                self.read_view = true;
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
                        timer.reset(Instant::now() + after);
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
            timer.reset(next);
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
        // The common case: written at once (plain writes for one contiguous buffer,
        // vectored ones past a large payload), with no future; only a socket that is
        // full goes on below, under the write timeout.
        let now = std::future::poll_fn(|cx| Poll::Ready(self.poll_write_queued(cx))).await;
        match now {
            Poll::Ready(result) => {
                result?;
                self.writes = self.writes.wrapping_add(1);
                return Ok(());
            }
            Poll::Pending => {}
        }
        let timeout = self.config.write_timeout;
        let write = std::future::poll_fn(|cx| self.poll_write_queued(cx));
        let written = tokio::time::timeout(timeout, write).await;
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
        if self.over_budget() {
            Box::pin(self.flush()).await?;
        }
        Ok(())
    }

    /// Queues one message of `opcode` from a byte slice (text must be UTF-8: JSON from a
    /// serializer, say), with no intermediate `Message`.
    pub async fn feed_frame(&mut self, opcode: OpCode, payload: &[u8]) -> Result<(), Error> {
        self.conn.send(opcode, payload)?;
        if self.over_budget() {
            Box::pin(self.flush()).await?;
        }
        Ok(())
    }

    /// Queues a whole frame made once for many connections
    /// ([`switchboard_wire::frame::server_frame`]): written from its own buffer when
    /// nothing else is queued (no copy), else copied behind what is. `false`, queuing
    /// nothing, where frames must be made for this connection (a client's, or with
    /// compression): send the payload then.
    pub async fn feed_encoded(&mut self, frame: &Bytes) -> Result<bool, Error> {
        if !self.conn.takes_frames()? {
            return Ok(false);
        }
        if self.has_output() {
            self.conn.output().extend_from_slice(frame);
        } else {
            self.ahead_len += frame.len();
            self.ahead.push_back(Chunk::Shared(frame.clone()));
        }
        if self.over_budget() {
            Box::pin(self.flush()).await?;
        }
        Ok(true)
    }

    /// Queues a large message: its header behind what is queued, then the payload
    /// itself, shared rather than copied (unless it must be masked or compressed).
    fn feed_in_place(&mut self, opcode: OpCode, payload: Bytes) -> Result<(), Error> {
        let Some((head, len)) = self.conn.header_only(opcode, payload.len())? else {
            return Ok(self.conn.send(opcode, &payload)?);
        };
        if self.conn.has_output() {
            let earlier = self.conn.output().split().freeze();
            self.ahead_len += earlier.len();
            self.ahead.push_back(Chunk::Shared(earlier));
        }
        self.ahead_len += len + payload.len();
        self.ahead.push_back(Chunk::Head {
            bytes: head,
            start: 0,
            end: len as u8,
        });
        self.ahead.push_back(Chunk::Shared(payload));
        Ok(())
    }

    fn has_output(&self) -> bool {
        self.conn.has_output() || !self.ahead.is_empty()
    }

    /// Writes what is queued and flushes the stream, as far as it goes without waiting.
    fn poll_write_queued(&mut self, cx: &mut std::task::Context<'_>) -> Poll<Result<(), Error>> {
        poll_write_out(
            &mut self.io,
            cx,
            &mut self.ahead,
            &mut self.ahead_len,
            self.conn.output(),
        )
    }

    /// Whether more is queued than may wait for the next write: then the feeding
    /// methods write it out first (boxed where they do: rare, and every connection's
    /// future would otherwise keep room for a waiting write).
    fn over_budget(&mut self) -> bool {
        self.conn.output().len() + self.ahead_len > self.config.max_write_buffer
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
        self.timer = first_wake(&self.config).map(|after| Timer::new(Instant::now() + after));
    }
}

/// When the timer first fires: the sooner of the ping interval and the idle release.
fn first_wake(config: &Config) -> Option<Duration> {
    match (config.ping_interval, config.idle_release) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Writes `out` and flushes the stream, as far as it goes without waiting (what was
/// written is consumed from `out`).
fn poll_write_all<S: AsyncWrite + Unpin>(
    io: &mut S,
    cx: &mut std::task::Context<'_>,
    out: &mut BytesMut,
) -> Poll<Result<(), Error>> {
    while !out.is_empty() {
        let n = std::task::ready!(wrote(Pin::new(&mut *io).poll_write(cx, out)))?;
        out.advance(n);
    }
    Pin::new(io).poll_flush(cx).map_err(Error::from)
}

/// A write's outcome: the bytes written, or the error (writing nothing is one).
fn wrote(result: Poll<std::io::Result<usize>>) -> Poll<Result<usize, Error>> {
    match result {
        Poll::Ready(Ok(0)) => Poll::Ready(Err(
            std::io::Error::from(std::io::ErrorKind::WriteZero).into()
        )),
        Poll::Ready(Ok(n)) => Poll::Ready(Ok(n)),
        Poll::Ready(Err(error)) => Poll::Ready(Err(error.into())),
        Poll::Pending => Poll::Pending,
    }
}

/// A piece of queued output ahead of the protocol's buffer.
#[derive(Debug)]
enum Chunk {
    Shared(Bytes),
    /// A frame header, kept inline (no allocation per large message).
    Head {
        bytes: [u8; switchboard_wire::frame::MAX_HEADER_LEN],
        start: u8,
        end: u8,
    },
}

impl Chunk {
    fn bytes(&self) -> &[u8] {
        match self {
            Chunk::Shared(bytes) => bytes,
            Chunk::Head { bytes, start, end } => &bytes[usize::from(*start)..usize::from(*end)],
        }
    }

    fn advance(&mut self, n: usize) {
        match self {
            Chunk::Shared(bytes) => bytes.advance(n),
            Chunk::Head { start, .. } => *start += n as u8,
        }
    }
}

/// Writes the chunks of `ahead`, then `out`, consuming them as bytes go out (in as few
/// vectored writes as the stream takes), and flushes the stream: as far as it goes
/// without waiting.
fn poll_write_out<S: AsyncWrite + Unpin>(
    io: &mut S,
    cx: &mut std::task::Context<'_>,
    ahead: &mut VecDeque<Chunk>,
    ahead_len: &mut usize,
    out: &mut BytesMut,
) -> Poll<Result<(), Error>> {
    if ahead.len() == 1 && out.is_empty() {
        // One buffer (a frame shared by many connections): plain writes from it.
        while let Some(chunk) = ahead.front_mut() {
            let written =
                std::task::ready!(wrote(Pin::new(&mut *io).poll_write(cx, chunk.bytes())))?;
            *ahead_len -= written;
            if written == chunk.bytes().len() {
                ahead.pop_front();
            } else {
                chunk.advance(written);
            }
        }
    }
    while !ahead.is_empty() {
        let mut slices = [IoSlice::new(&[]); 4];
        let mut count = 0;
        for chunk in ahead.iter().take(slices.len() - 1) {
            slices[count] = IoSlice::new(chunk.bytes());
            count += 1;
        }
        if count < slices.len() && !out.is_empty() {
            slices[count] = IoSlice::new(out);
            count += 1;
        }
        let written = std::task::ready!(wrote(
            Pin::new(&mut *io).poll_write_vectored(cx, &slices[..count])
        ))?;
        let mut left = written;
        while left > 0 {
            match ahead.front_mut() {
                Some(chunk) if chunk.bytes().len() <= left => {
                    let len = chunk.bytes().len();
                    left -= len;
                    *ahead_len -= len;
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
    poll_write_all(io, cx, out)
}

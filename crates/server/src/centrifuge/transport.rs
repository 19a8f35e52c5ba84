//! What a Centrifugo session talks over: a WebSocket, or an emulated connection whose
//! server-to-client half is an HTTP response (`http_stream`, `sse`) and whose
//! client-to-server half arrives as `POST /emulation` requests, on whichever node they
//! land ([`super::emulation`]).

use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use switchboard_net::wire::OpCode;
use switchboard_net::{CloseCode, CloseFrame, Message, Stream, WebSocket};
use switchboard_protocol::centrifuge::{self as proto, encode_reply, Encoding, Reply};
use tokio::sync::mpsc;

use super::emulation::Registered;

/// How replies are framed on an HTTP response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Framing {
    /// `http_stream` with JSON: one reply per line.
    Lines,
    /// `http_stream` with Protobuf: replies with their varint length before each.
    Delimited,
    /// `sse`: one reply per event's `data` (JSON).
    Events,
}

impl Framing {
    pub(super) fn name(self) -> &'static str {
        match self {
            Self::Lines | Self::Delimited => "http_stream",
            Self::Events => "sse",
        }
    }
}

/// An emulated connection.
pub(super) struct Emulated {
    pub(super) framing: Framing,
    /// The connect command (and whatever came with it) from the opening request.
    pub(super) first: Option<Bytes>,
    /// Frames of commands posted to `/emulation` for this session.
    pub(super) commands: mpsc::Receiver<Bytes>,
    /// Chunks for the response body.
    pub(super) body: mpsc::Sender<Bytes>,
    pub(super) out: BytesMut,
    /// How long a chunk may wait for a client that takes nothing.
    pub(super) patience: Duration,
    /// Its place among the sessions `/emulation` reaches.
    pub(super) registered: Registered,
}

// The WebSocket is the common case: it stays inline (one allocation less per
// connection); the rarer emulated connection is the one boxed.
#[allow(clippy::large_enum_variant)]
pub(super) enum Transport {
    WebSocket(WebSocket<Stream>),
    Emulated(Box<Emulated>),
}

fn gone() -> switchboard_net::Error {
    switchboard_net::Error::ConnectionLost
}

impl Transport {
    /// The session id `/emulation` requests name, for an emulated connection.
    pub(super) fn session(&self) -> Option<&str> {
        match self {
            Self::WebSocket(_) => None,
            Self::Emulated(emulated) => Some(emulated.registered.session()),
        }
    }

    /// The next frame of commands; `None` when the client left. Cancel-safe.
    pub(super) async fn recv(&mut self) -> Result<Option<Message>, switchboard_net::Error> {
        match self {
            Self::WebSocket(socket) => socket.recv().await,
            Self::Emulated(emulated) => {
                if let Some(first) = emulated.first.take() {
                    return Ok(Some(Message::Binary(first)));
                }
                tokio::select! {
                    command = emulated.commands.recv() => Ok(command.map(Message::Binary)),
                    () = emulated.body.closed() => Ok(None),
                }
            }
        }
    }

    /// Queues one reply (a frame of `opcode` on a WebSocket) until [`Transport::flush`].
    pub(super) async fn feed_frame(
        &mut self,
        opcode: OpCode,
        frame: &[u8],
    ) -> Result<(), switchboard_net::Error> {
        match self {
            Self::WebSocket(socket) => socket.feed_frame(opcode, frame).await,
            Self::Emulated(emulated) => {
                let out = &mut emulated.out;
                match emulated.framing {
                    Framing::Delimited => out.put_slice(frame),
                    Framing::Lines => {
                        put_one_line(out, frame);
                        out.put_u8(b'\n');
                    }
                    Framing::Events => {
                        out.put_slice(b"data: ");
                        put_one_line(out, frame);
                        out.put_slice(b"\n\n");
                    }
                }
                Ok(())
            }
        }
    }

    pub(super) async fn flush(&mut self) -> Result<(), switchboard_net::Error> {
        match self {
            Self::WebSocket(socket) => socket.flush().await,
            Self::Emulated(emulated) => {
                if emulated.out.is_empty() {
                    return Ok(());
                }
                let chunk = emulated.out.split().freeze();
                match tokio::time::timeout(emulated.patience, emulated.body.send(chunk)).await {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(_)) => Err(gone()),
                    Err(_) => Err(switchboard_net::Error::Timeout(
                        "the client took nothing of its stream",
                    )),
                }
            }
        }
    }

    /// Ends the connection with a disconnect: the WebSocket close code and reason, or
    /// on an HTTP stream a `disconnect` push before the response ends.
    pub(super) async fn close(
        &mut self,
        encoding: Encoding,
        (code, reason): (u16, &str),
    ) -> Result<(), switchboard_net::Error> {
        match self {
            Self::WebSocket(socket) => {
                let frame = CloseFrame::new(CloseCode(code), reason);
                Box::pin(socket.close(Some(frame))).await.map(drop)
            }
            Self::Emulated(_) => {
                let push = Reply {
                    push: Some(proto::Push {
                        disconnect: Some(proto::Disconnect {
                            code: u32::from(code),
                            reason: reason.to_owned(),
                            reconnect: false,
                        }),
                        ..proto::Push::default()
                    }),
                    ..Reply::default()
                };
                self.feed_frame(OpCode::Binary, &encode_reply(encoding, &push))
                    .await?;
                self.flush().await
                // The response ends when the transport is dropped.
            }
        }
    }
}

/// JSON on one line: a line break in JSON can only be whitespace, and on these
/// framings it would end the message.
fn put_one_line(out: &mut BytesMut, json: &[u8]) {
    let start = out.len();
    out.put_slice(json);
    for byte in &mut out[start..] {
        if matches!(*byte, b'\n' | b'\r') {
            *byte = b' ';
        }
    }
}

//! `switchboard-peers ENGINE [--listen ADDR] [--workers N]`: an echo server on another
//! WebSocket engine (or raw TCP), for `switchboard bench compare` to measure Switchboard
//! against. Each answers every text or binary message with the same message, the way
//! its own examples do; each logs `listening on ADDR` once it accepts connections.
//! `tungstenite-broadcast` is the fan-out peer: every text message any connection sends
//! goes to every connection, in the manner of tokio-tungstenite's chat example.

use std::net::SocketAddr;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const ENGINES: &str =
    "raw, tungstenite, fastwebsockets, tokio-websockets, sockudo-ws, tungstenite-broadcast";

fn main() {
    let mut args = std::env::args().skip(1);
    let engine = args.next().unwrap_or_else(|| usage());
    let mut listen: SocketAddr = "127.0.0.1:9100".parse().unwrap();
    let mut workers = 1;
    while let Some(flag) = args.next() {
        let value = args.next().unwrap_or_else(|| usage());
        match flag.as_str() {
            "--listen" => listen = value.parse().unwrap_or_else(|_| usage()),
            "--workers" => workers = value.parse().unwrap_or_else(|_| usage()),
            _ => usage(),
        }
    }
    // The same runtime as `switchboard serve --workers N`.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(serve(engine, listen));
}

fn usage() -> ! {
    eprintln!("usage: switchboard-peers ENGINE [--listen ADDR] [--workers N]\nengines: {ENGINES}");
    std::process::exit(2);
}

async fn serve(engine: String, listen: SocketAddr) {
    let handler: fn(TcpStream) -> _ = match engine.as_str() {
        "raw" => |s| Box::pin(raw(s)) as Conn,
        "tungstenite" => |s| Box::pin(tungstenite(s)) as Conn,
        "fastwebsockets" => |s| Box::pin(fastwebsockets(s)) as Conn,
        "tokio-websockets" => |s| Box::pin(tokio_websockets(s)) as Conn,
        "sockudo-ws" => |s| Box::pin(sockudo(s)) as Conn,
        "tungstenite-broadcast" => |s| Box::pin(broadcast::connection(s)) as Conn,
        _ => usage(),
    };
    let listener = TcpListener::bind(listen).await.expect("bind");
    eprintln!("listening on {}", listener.local_addr().unwrap());
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        stream.set_nodelay(true).ok();
        tokio::spawn(handler(stream));
    }
}

type Conn = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// No framing at all: the ceiling any engine can reach on this machine.
async fn raw(mut stream: TcpStream) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if stream.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}

async fn tungstenite(stream: TcpStream) {
    let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else { return };
    while let Some(Ok(message)) = ws.next().await {
        if (message.is_text() || message.is_binary()) && ws.send(message).await.is_err() {
            return;
        }
    }
}

async fn fastwebsockets(stream: TcpStream) {
    use http_body_util::Empty;
    use hyper::body::{Bytes, Incoming};
    use hyper::service::service_fn;
    use hyper::{Request, Response};

    async fn upgrade(
        mut request: Request<Incoming>,
    ) -> Result<Response<Empty<Bytes>>, fastwebsockets::WebSocketError> {
        let (response, socket) = fastwebsockets::upgrade::upgrade(&mut request)?;
        tokio::spawn(async move {
            let Ok(ws) = socket.await else { return };
            let mut ws = fastwebsockets::FragmentCollector::new(ws);
            loop {
                let Ok(frame) = ws.read_frame().await else { return };
                match frame.opcode {
                    fastwebsockets::OpCode::Close => return,
                    fastwebsockets::OpCode::Text | fastwebsockets::OpCode::Binary => {
                        if ws.write_frame(frame).await.is_err() {
                            return;
                        }
                    }
                    _ => {}
                }
            }
        });
        Ok(response)
    }

    let io = hyper_util::rt::TokioIo::new(stream);
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(io, service_fn(upgrade))
        .with_upgrades()
        .await;
}

async fn tokio_websockets(stream: TcpStream) {
    let Ok((_, mut ws)) = tokio_websockets::ServerBuilder::new().accept(stream).await else {
        return;
    };
    while let Some(Ok(message)) = ws.next().await {
        if (message.is_text() || message.is_binary()) && ws.send(message).await.is_err() {
            return;
        }
    }
}

async fn sockudo(stream: TcpStream) {
    use sockudo_ws::server::WebSocketServer;
    use sockudo_ws::transport::Http1;
    use sockudo_ws::{Config, Message};

    let server = WebSocketServer::<Http1>::new(Config::default());
    let Ok((mut ws, _)) = server.accept_raw(stream).await else { return };
    while let Some(Ok(message)) = ws.next().await {
        let echo = matches!(message, Message::Text(_) | Message::Binary(_));
        if echo && ws.send(message).await.is_err() {
            return;
        }
    }
}

/// A broadcast server on tokio-tungstenite: a map of connections to their unbounded
/// senders; a text message from any connection is cloned to all of them.
mod broadcast {
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Mutex, OnceLock};

    use futures_util::{SinkExt, StreamExt};
    use tokio::net::TcpStream;
    use tokio::sync::mpsc::{unbounded_channel, UnboundedSender};
    use tokio_tungstenite::tungstenite::Message;

    type Peers = Mutex<HashMap<u64, UnboundedSender<Message>>>;

    fn peers() -> &'static Peers {
        static PEERS: OnceLock<Peers> = OnceLock::new();
        PEERS.get_or_init(Default::default)
    }

    pub(crate) async fn connection(stream: TcpStream) {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let Ok(ws) = tokio_tungstenite::accept_async(stream).await else { return };
        let id = NEXT.fetch_add(1, Ordering::Relaxed);
        let (tx, mut rx) = unbounded_channel();
        peers().lock().unwrap().insert(id, tx);
        let (mut sink, mut stream) = ws.split();
        let forward = tokio::spawn(async move {
            while let Some(message) = rx.recv().await {
                if sink.send(message).await.is_err() {
                    return;
                }
            }
        });
        while let Some(Ok(message)) = stream.next().await {
            if message.is_text() {
                for peer in peers().lock().unwrap().values() {
                    let _ = peer.send(message.clone());
                }
            }
        }
        peers().lock().unwrap().remove(&id);
        forward.abort();
    }
}

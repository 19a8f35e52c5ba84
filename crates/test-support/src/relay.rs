//! A TCP relay between a test's client and a server: what a network does to a link,
//! on demand. It can add latency, go silent (stop forwarding in both directions
//! without closing anything, as a partitioned network does) and speak again, and cut
//! every link at once.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Conditions {
    delay: Duration,
    silent: bool,
}

/// A relay listening on a free loopback port, forwarding to `upstream`; stopped when
/// dropped.
#[derive(Debug)]
pub struct Relay {
    pub address: SocketAddr,
    conditions: watch::Sender<Conditions>,
    links: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

impl Relay {
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a relay port");
        let address = listener.local_addr().expect("the relay's address");
        let (conditions, watching) = watch::channel(Conditions {
            delay: Duration::ZERO,
            silent: false,
        });
        let links: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let accept = {
            let links = links.clone();
            tokio::spawn(async move {
                while let Ok((client, _)) = listener.accept().await {
                    let Ok(server) = TcpStream::connect(upstream).await else {
                        continue;
                    };
                    let _ = (client.set_nodelay(true), server.set_nodelay(true));
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    let mut links = links.lock().expect("links lock");
                    for (from, to) in [(client_read, server_write), (server_read, client_write)] {
                        links.extend(pump(from, to, watching.clone()));
                    }
                }
            })
        };
        Self {
            address,
            conditions,
            links,
            accept,
        }
    }

    /// `redis://` (or any scheme) at the relay.
    pub fn url(&self, scheme: &str) -> String {
        format!("{scheme}://{}", self.address)
    }

    /// Every byte from now on arrives `delay` later (in order, at full rate).
    pub fn set_delay(&self, delay: Duration) {
        self.conditions.send_modify(|c| c.delay = delay);
    }

    /// Stops forwarding in both directions, closing nothing: the peers see silence.
    pub fn silence(&self) {
        self.conditions.send_modify(|c| c.silent = true);
    }

    /// Forwards again, what was held back first.
    pub fn speak(&self) {
        self.conditions.send_modify(|c| c.silent = false);
    }

    /// Closes every link now open (new connections are still relayed).
    pub fn cut(&self) {
        for link in self.links.lock().expect("links lock").drain(..) {
            link.abort();
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

/// Copies `from` to `to` under the relay's conditions: a reader that timestamps each
/// chunk, a writer that sends it once its delay is past and the relay is not silent.
fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    conditions: watch::Receiver<Conditions>,
) -> [JoinHandle<()>; 2] {
    let (chunks, mut queued) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let mut reading = conditions.clone();
    let reader = tokio::spawn(async move {
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            // Silent: nothing is read either, so the sender's buffers fill up as they
            // would on a dead path.
            if reading.wait_for(|c| !c.silent).await.is_err() {
                return;
            }
            let read = match from.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(read) => read,
            };
            let due = Instant::now() + reading.borrow().delay;
            if chunks.send((due, buffer[..read].to_vec())).is_err() {
                return;
            }
        }
    });
    let mut writing = conditions;
    let writer = tokio::spawn(async move {
        while let Some((due, chunk)) = queued.recv().await {
            tokio::time::sleep_until(due).await;
            if writing.wait_for(|c| !c.silent).await.is_err() {
                return;
            }
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    });
    [reader, writer]
}

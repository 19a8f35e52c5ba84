//! A TCP relay between a test's client and a server: what a network does to a link,
//! on demand. It can add latency, go silent (stop forwarding in both directions
//! without closing anything, as a partitioned network does) for every link or only for
//! the links of one process, speak again, and cut every link at once.

use std::collections::HashSet;
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

/// One relayed connection: its client socket (to tell whose it is), its conditions and
/// the four tasks that pump it.
#[derive(Debug)]
struct Link {
    inode: Option<u64>,
    conditions: watch::Sender<Conditions>,
    tasks: Vec<JoinHandle<()>>,
}

#[derive(Debug)]
struct State {
    /// What every link, and every new one, is under.
    base: Conditions,
    /// Processes whose links are silent besides.
    silenced: Vec<u32>,
    links: Vec<Link>,
}

impl State {
    fn conditions_of(&self, inode: Option<u64>) -> Conditions {
        let silenced = inode.is_some_and(|inode| {
            self.silenced
                .iter()
                .any(|&pid| sockets_of(pid).contains(&inode))
        });
        Conditions {
            silent: self.base.silent || silenced,
            ..self.base
        }
    }
}

/// A relay listening on a free loopback port, forwarding to `upstream`; stopped when
/// dropped.
#[derive(Debug)]
pub struct Relay {
    pub address: SocketAddr,
    state: Arc<Mutex<State>>,
    accept: JoinHandle<()>,
}

impl Relay {
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a relay port");
        let address = listener.local_addr().expect("the relay's address");
        let state = Arc::new(Mutex::new(State {
            base: Conditions {
                delay: Duration::ZERO,
                silent: false,
            },
            silenced: Vec::new(),
            links: Vec::new(),
        }));
        let accept = {
            let state = state.clone();
            tokio::spawn(async move {
                while let Ok((client, peer)) = listener.accept().await {
                    let inode = socket_inode(peer, address);
                    let Ok(server) = TcpStream::connect(upstream).await else {
                        continue;
                    };
                    let _ = (client.set_nodelay(true), server.set_nodelay(true));
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    let mut state = state.lock().expect("relay lock");
                    let (conditions, watching) = watch::channel(state.conditions_of(inode));
                    let mut tasks = Vec::new();
                    for (from, to) in [(client_read, server_write), (server_read, client_write)] {
                        tasks.extend(pump(from, to, watching.clone()));
                    }
                    state.links.push(Link {
                        inode,
                        conditions,
                        tasks,
                    });
                }
            })
        };
        Self {
            address,
            state,
            accept,
        }
    }

    /// `redis://` (or any scheme) at the relay.
    pub fn url(&self, scheme: &str) -> String {
        format!("{scheme}://{}", self.address)
    }

    /// Changes what every link is under, now and from now on.
    fn change(&self, change: impl Fn(&mut State)) {
        let mut state = self.state.lock().expect("relay lock");
        change(&mut state);
        let state = &*state;
        for link in &state.links {
            let now = state.conditions_of(link.inode);
            link.conditions
                .send_if_modified(|c| std::mem::replace(c, now) != now);
        }
    }

    /// Every byte from now on arrives `delay` later (in order, at full rate).
    pub fn set_delay(&self, delay: Duration) {
        self.change(|s| s.base.delay = delay);
    }

    /// Stops forwarding in both directions, closing nothing: the peers see silence.
    pub fn silence(&self) {
        self.change(|s| s.base.silent = true);
    }

    /// Stops forwarding on the links that process `pid` opened, and those it opens
    /// from now on, closing nothing; the other clients' links go on.
    pub fn silence_process(&self, pid: u32) {
        self.change(|s| s.silenced.push(pid));
    }

    /// Forwards again on every link, what was held back first.
    pub fn speak(&self) {
        self.change(|s| {
            s.base.silent = false;
            s.silenced.clear();
        });
    }

    /// Closes every link now open (new connections are still relayed).
    pub fn cut(&self) {
        for link in self.state.lock().expect("relay lock").links.drain(..) {
            for task in link.tasks {
                task.abort();
            }
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

/// The inode of the client's end of a loopback connection from `client` to `server`,
/// from `/proc/net/tcp` (Linux), so the process holding it can be told.
fn socket_inode(client: SocketAddr, server: SocketAddr) -> Option<u64> {
    let hex = |address: SocketAddr| match address {
        // The kernel prints an IPv4 address as one native-endian word.
        SocketAddr::V4(v4) => Some(format!(
            "{:08X}:{:04X}",
            u32::from_ne_bytes(v4.ip().octets()),
            v4.port()
        )),
        SocketAddr::V6(_) => None,
    };
    let (local, remote) = (hex(client)?, hex(server)?);
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        (fields.get(1) == Some(&local.as_str()) && fields.get(2) == Some(&remote.as_str()))
            .then(|| fields.get(9)?.parse().ok())
            .flatten()
    })
}

/// The inodes of the sockets process `pid` holds open.
fn sockets_of(pid: u32) -> HashSet<u64> {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return HashSet::new();
    };
    fds.filter_map(|fd| {
        let target = std::fs::read_link(fd.ok()?.path()).ok()?;
        let target = target.to_str()?;
        target
            .strip_prefix("socket:[")?
            .strip_suffix(']')?
            .parse()
            .ok()
    })
    .collect()
}

/// Copies `from` to `to` under the link's conditions: a reader that timestamps each
/// chunk, a writer that sends it once its delay is past and the link is not silent.
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

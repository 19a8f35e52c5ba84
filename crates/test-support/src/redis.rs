//! A `redis-server` of a test's own on a free port, stopped when dropped.
//!
//! Needs Debian's `redis-server`. Without it [`RedisServer::start`] says so and gives
//! `None` (the test then passes locally); with `CI=true` it fails instead, since CI must
//! run what needs Redis.

use std::process::Stdio;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::time::Instant;

use crate::relay::Relay;

/// What Redis keeps across a restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Persistence {
    /// Nothing: a restart loses every key.
    None,
    /// An append-only file written on every command (`appendfsync always`).
    AppendOnly,
}

#[derive(Debug)]
pub struct RedisServer {
    port: u16,
    dir: tempfile::TempDir,
    persistence: Persistence,
    child: Option<Child>,
}

impl RedisServer {
    /// A running server; `None` (after saying why) when `redis-server` is not installed
    /// and this is not CI.
    pub async fn start(persistence: Persistence) -> Option<Self> {
        let found = std::process::Command::new("redis-server")
            .arg("--version")
            .output()
            .is_ok();
        if !found {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "redis-server is not installed; CI needs it (apt-get install -y redis-server)"
            );
            eprintln!("SKIPPED: redis-server is not installed (apt-get install -y redis-server)");
            return None;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .ok()?
            .local_addr()
            .ok()?
            .port();
        let mut redis = Self {
            port,
            dir: tempfile::tempdir().expect("a directory for Redis"),
            persistence,
            child: None,
        };
        redis.run().await;
        Some(redis)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Where it listens (for a relay in front of it).
    pub fn address(&self) -> std::net::SocketAddr {
        ([127, 0, 0, 1], self.port).into()
    }

    /// Starts it (again, on the same port and directory) and waits until it accepts.
    pub async fn run(&mut self) {
        let mut command = Command::new("redis-server");
        command
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .arg("--dir")
            .arg(self.dir.path());
        match self.persistence {
            Persistence::None => command.args(["--appendonly", "no"]),
            Persistence::AppendOnly => {
                command.args(["--appendonly", "yes", "--appendfsync", "always"])
            }
        };
        let child = command
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("starting redis-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", self.port)).await.is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops it the way an operator restarts it (SIGTERM: it writes its data out, when
    /// it keeps any) and waits until it has exited.
    pub async fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = child.id().expect("a running redis-server").to_string();
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill");
        assert!(status.success());
        tokio::time::timeout(Duration::from_secs(10), child.wait())
            .await
            .expect("redis-server stops")
            .expect("redis-server's status");
    }

    /// Runs `redis-cli ARGS…` against it; its output.
    pub fn cli(&self, args: &[&str]) -> String {
        let output = std::process::Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("running redis-cli");
        assert!(output.status.success(), "redis-cli {args:?} failed");
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    }

    /// Stops and starts it.
    pub async fn restart(&mut self) {
        self.stop().await;
        self.run().await;
    }
}

/// A Redis Cluster of the test's own: `masters` masters with one replica each, every
/// node a `redis-server --cluster-enabled yes` on a free port whose bus port (port +
/// 10000) is free too, joined by `redis-cli --cluster create`. Stopped when dropped.
#[derive(Debug)]
pub struct RedisCluster {
    dir: tempfile::TempDir,
    nodes: Vec<ClusterNode>,
    node_timeout_ms: u64,
}

#[derive(Debug)]
struct ClusterNode {
    port: u16,
    child: Option<Child>,
    /// The relay its clients reach it through, when the cluster is relayed: the node
    /// announces the relay's port, so a client that follows the cluster's own map goes
    /// through the relay too.
    relay: Option<Relay>,
}

/// A port that is free with its cluster bus port (port + 10000).
fn cluster_port(taken: &[u16]) -> u16 {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::from_os_rng();
    loop {
        let port: u16 = rng.random_range(20_000..45_000);
        if taken
            .iter()
            .any(|t| t.abs_diff(port) <= 1 || t.abs_diff(port) == 10_000)
        {
            continue;
        }
        let free = |p: u16| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok();
        if free(port) && free(port + 10_000) {
            return port;
        }
    }
}

impl RedisCluster {
    /// A cluster whose state is `ok` on every node; `None` as [`RedisServer::start`].
    /// `node_timeout_ms` is its `cluster-node-timeout` (how soon a silent master is
    /// failed over).
    pub async fn start(masters: usize, node_timeout_ms: u64) -> Option<Self> {
        Self::start_with(masters, node_timeout_ms, false).await
    }

    /// A cluster as [`RedisCluster::start`] whose every node is reached through a
    /// [`Relay`] (its announced address), so a test can silence the links of one client
    /// process to the whole cluster ([`RedisCluster::silence_process`]) while the others,
    /// and the nodes among themselves, go on.
    pub async fn start_relayed(masters: usize, node_timeout_ms: u64) -> Option<Self> {
        Self::start_with(masters, node_timeout_ms, true).await
    }

    async fn start_with(masters: usize, node_timeout_ms: u64, relayed: bool) -> Option<Self> {
        RedisServer::start(Persistence::None).await?;
        let dir = tempfile::tempdir().expect("a directory for the cluster");
        let mut cluster = Self {
            dir,
            nodes: Vec::new(),
            node_timeout_ms,
        };
        let mut ports = Vec::new();
        for _ in 0..masters * 2 {
            ports.push(cluster_port(&ports));
        }
        for &port in &ports {
            let relay = if relayed {
                Some(Relay::start(([127, 0, 0, 1], port).into()).await)
            } else {
                None
            };
            cluster.nodes.push(ClusterNode {
                port,
                child: None,
                relay,
            });
        }
        for index in 0..cluster.nodes.len() {
            cluster.run(index, node_timeout_ms).await;
        }
        let mut create = std::process::Command::new("redis-cli");
        create.args(["--cluster", "create"]);
        for port in &ports {
            create.arg(format!("127.0.0.1:{port}"));
        }
        let output = create
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .output()
            .expect("running redis-cli --cluster create");
        assert!(
            output.status.success(),
            "redis-cli --cluster create failed: {}",
            String::from_utf8_lossy(&output.stdout)
        );
        cluster.wait_ok().await;
        Some(cluster)
    }

    async fn run(&mut self, index: usize, node_timeout_ms: u64) {
        let port = self.nodes[index].port;
        let dir = self.dir.path().join(port.to_string());
        std::fs::create_dir_all(&dir).expect("a node directory");
        let mut command = Command::new("redis-server");
        if let Some(relay) = &self.nodes[index].relay {
            let bus = (port + 10_000).to_string();
            command
                .args(["--cluster-announce-port", &relay.address.port().to_string()])
                .args(["--cluster-announce-bus-port", &bus]);
        }
        let child = command
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .args(["--cluster-enabled", "yes"])
            .args(["--cluster-node-timeout", &node_timeout_ms.to_string()])
            .args(["--cluster-config-file", "nodes.conf"])
            .arg("--logfile")
            .arg(dir.join("redis.log"))
            .arg("--dir")
            .arg(&dir)
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("starting redis-server");
        self.nodes[index].child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until every running node says `cluster_state:ok` and knows every slot, and
    /// every replica is in sync with its master.
    pub async fn wait_ok(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ok = self.running().all(|port| {
                let info = cli(port, &["CLUSTER", "INFO"]);
                let replication = cli(port, &["INFO", "replication"]);
                info.contains("cluster_state:ok")
                    && info.contains("cluster_slots_ok:16384")
                    // A replica that has not synchronised once cannot take over.
                    && (replication.contains("role:master")
                        || replication.contains("master_link_status:up"))
            });
            if ok {
                return;
            }
            assert!(Instant::now() < deadline, "the cluster never became ok");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The end of the log of the node on `port`.
    pub fn log(&self, port: u16) -> String {
        let path = self.dir.path().join(port.to_string()).join("redis.log");
        let log = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<&str> = log
            .lines()
            .filter(|l| !l.contains("MASTER") && !l.contains("SYNC"))
            .collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// The logs of the nodes that replicate `master` (for a failure's message).
    pub fn replicas_logs(&self, master: u16) -> String {
        let port = self.any_port();
        let nodes = cli(port, &["CLUSTER", "NODES"]);
        let id = nodes
            .lines()
            .find(|l| l.contains(&format!(":{}@", self.announced_port(master))))
            .and_then(|l| l.split(' ').next())
            .unwrap_or_default()
            .to_owned();
        nodes
            .lines()
            .filter(|l| !id.is_empty() && l.split(' ').nth(3) == Some(id.as_str()))
            .filter_map(|l| {
                l.split(' ')
                    .nth(1)?
                    .split('@')
                    .next()?
                    .rsplit(':')
                    .next()?
                    .parse()
                    .ok()
            })
            .map(|p: u16| self.own_port(p))
            .map(|p| format!("{p}:\n{}", self.log(p)))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// A node that runs.
    pub fn any_port(&self) -> u16 {
        self.running().next().expect("a running node")
    }

    fn running(&self) -> impl Iterator<Item = u16> + '_ {
        self.nodes
            .iter()
            .filter(|n| n.child.is_some())
            .map(|n| n.port)
    }

    /// Every node's URL, as the cluster announces it (any of them is a seed).
    pub fn urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| match &n.relay {
                Some(relay) => relay.url("redis"),
                None => format!("redis://127.0.0.1:{}", n.port),
            })
            .collect()
    }

    /// Silences every link process `pid` has, or opens, to any node of a relayed
    /// cluster ([`Relay::silence_process`]).
    pub fn silence_process(&self, pid: u32) {
        for relay in self.nodes.iter().filter_map(|n| n.relay.as_ref()) {
            relay.silence_process(pid);
        }
    }

    /// Every relay forwards again.
    pub fn speak(&self) {
        for relay in self.nodes.iter().filter_map(|n| n.relay.as_ref()) {
            relay.speak();
        }
    }

    /// The port the cluster announces for the node on `port` (its relay's, if any).
    fn announced_port(&self, port: u16) -> u16 {
        self.nodes
            .iter()
            .find(|n| n.port == port)
            .and_then(|n| n.relay.as_ref())
            .map_or(port, |r| r.address.port())
    }

    /// The node's own port for a port the cluster announces (a relay's).
    fn own_port(&self, announced: u16) -> u16 {
        self.nodes
            .iter()
            .find(|n| n.relay.as_ref().map(|r| r.address.port()) == Some(announced))
            .map_or(announced, |n| n.port)
    }

    /// The port of the master that now serves `key`'s slot (`None` while none does: a
    /// master failed and no replica took over yet).
    pub fn master_of(&self, key: &str) -> Option<u16> {
        let port = self.running().next().expect("a running node");
        let slot: u16 = cli(port, &["CLUSTER", "KEYSLOT", key])
            .parse()
            .expect("a slot");
        // Lines of `CLUSTER NODES`: id, address, flags, master, ..., slot ranges.
        for line in cli(port, &["CLUSTER", "NODES"]).lines() {
            let fields: Vec<&str> = line.split(' ').collect();
            if fields.len() < 9 || !fields[2].contains("master") || fields[2].contains("fail") {
                continue;
            }
            let serves = fields[8..].iter().any(|range| {
                let (from, to) = range.split_once('-').unwrap_or((range, range));
                match (from.parse::<u16>(), to.parse::<u16>()) {
                    (Ok(from), Ok(to)) => (from..=to).contains(&slot),
                    _ => false,
                }
            });
            if serves {
                let address = fields[1].split('@').next().expect("an address");
                let announced = address.rsplit(':').next().and_then(|p| p.parse().ok());
                return announced.map(|port| self.own_port(port));
            }
        }
        None
    }

    /// Kills the node on `port` with SIGKILL (no chance to hand anything over).
    pub async fn kill(&mut self, port: u16) {
        let node = self
            .nodes
            .iter_mut()
            .find(|n| n.port == port)
            .expect("a node of the cluster");
        let mut child = node.child.take().expect("a running node");
        child.start_kill().expect("SIGKILL");
        let _ = child.wait().await;
    }

    /// Starts the node on `port` again, from its cluster config: a master that was
    /// failed over comes back as a replica of the one that took its place.
    pub async fn restart(&mut self, port: u16) {
        let index = self
            .nodes
            .iter()
            .position(|n| n.port == port)
            .expect("a node of the cluster");
        assert!(self.nodes[index].child.is_none(), "the node still runs");
        self.run(index, self.node_timeout_ms).await;
    }

    /// Runs `redis-cli ARGS…` against the node on `port`.
    pub fn cli(&self, port: u16, args: &[&str]) -> String {
        cli(port, args)
    }
}

fn cli(port: u16, args: &[&str]) -> String {
    let output = std::process::Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .expect("running redis-cli");
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

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

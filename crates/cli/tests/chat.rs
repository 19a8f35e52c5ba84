//! `switchboard chat` driven in a real terminal: tmux runs it, `send-keys` types into
//! it and `capture-pane` reads its screen, while another user talks to it through the
//! client SDK, and the server is killed and started again underneath it.

use std::process::Command as Std;
use std::time::Duration;

use switchboard_client::{connect, Event, Events, Options};
use tokio::time::{timeout, Instant};

mod support;

use support::{serve_with, BIN};

/// A tmux server of its own (`-L`), holding one session, killed on drop.
struct Pane {
    socket: String,
    session: &'static str,
}

impl Pane {
    /// Runs `command` in a detached 110×30 terminal. `None` when tmux is missing
    /// outside CI; in CI (where `.ci/run` installs it) that fails the test instead.
    fn start(command: &str) -> Option<Self> {
        if Std::new("tmux").arg("-V").output().is_err() {
            assert!(
                std::env::var_os("CI").is_none(),
                "tmux is needed to drive the terminal chat (apt-get install tmux)"
            );
            eprintln!("skipped: tmux is not installed");
            return None;
        }
        let pane = Self {
            socket: format!("switchboard-test-{}", std::process::id()),
            session: "chat",
        };
        // The pane stays after the program ends, showing how it ended.
        let script = format!("{command} 2>&1; echo EXITED $?; sleep 60");
        pane.tmux(&[
            "new-session",
            "-d",
            "-s",
            pane.session,
            "-x",
            "110",
            "-y",
            "30",
            &script,
        ]);
        Some(pane)
    }

    fn tmux(&self, args: &[&str]) -> String {
        let output = Std::new("tmux")
            .args(["-L", &self.socket, "-f", "/dev/null"])
            .args(args)
            .output()
            .unwrap();
        assert!(output.status.success(), "tmux {args:?}: {output:?}");
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Types text as it is.
    fn type_text(&self, text: &str) {
        self.tmux(&["send-keys", "-t", self.session, "-l", text]);
    }

    /// Presses a named key (`Enter`, `Escape`).
    fn press(&self, key: &str) {
        self.tmux(&["send-keys", "-t", self.session, key]);
    }

    fn screen(&self) -> String {
        self.tmux(&["capture-pane", "-p", "-t", self.session])
    }

    /// Waits (up to 30 s) until the screen satisfies `ok`; fails showing the screen.
    async fn wait_for(&self, what: &str, ok: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let screen = self.screen();
            if ok(&screen) {
                return screen;
            }
            assert!(
                Instant::now() < deadline,
                "the chat never showed {what}; its screen:\n{screen}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Pane {
    fn drop(&mut self) {
        let _ = Std::new("tmux")
            .args(["-L", &self.socket, "kill-server"])
            .output();
    }
}

fn has_line(screen: &str, needle: &str) -> bool {
    screen.lines().any(|line| line.contains(needle))
}

/// Bob's events up to the first that `stop` accepts, all of them returned.
async fn bob_until(events: &mut Events, stop: impl Fn(&Event) -> bool) -> Vec<Event> {
    let mut seen = Vec::new();
    timeout(Duration::from_secs(30), async {
        while let Some(event) = events.recv().await {
            let done = stop(&event);
            seen.push(event);
            if done {
                return;
            }
        }
        panic!("bob's client closed");
    })
    .await
    .unwrap_or_else(|_| panic!("bob waited in vain; he saw {seen:?}"));
    seen
}

fn is_from(event: &Event, from: &str, text: &str) -> bool {
    matches!(event, Event::Message(m) if m.from.as_deref() == Some(from) && m.text.as_deref() == Some(text))
}

fn alice_typing(event: &Event) -> Option<bool> {
    match event {
        Event::Typing { user, is_typing } if user == "alice" => Some(*is_typing),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_terminal_chat_talks_with_another_user_and_survives_a_server_crash() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap().to_owned();
    let (mut server, address) = serve_with("127.0.0.1:0", &["--data-dir", &data]).await;
    let url = format!("ws://{address}/room/tmux-room");
    let Some(pane) = Pane::start(&format!("{BIN} chat {url} --name alice")) else {
        return;
    };
    pane.wait_for("that it joined", |s| {
        s.contains("● connected") && s.contains("joined #tmux-room as alice")
    })
    .await;

    // Another user's message shows with the sender's name.
    let bob_options = Options::default().with_name("bob");
    let (bob, mut bob_events) = connect(&url, bob_options).await.unwrap();
    pane.wait_for("bob in the member list", |s| has_line(s, "│bob"))
        .await;
    bob.send_message("hello from bob").unwrap();
    pane.wait_for("bob's message", |s| has_line(s, "bob: hello from bob"))
        .await;

    // Typing shows up for bob once (not once per key); Enter sends under alice's name.
    pane.type_text("hi from alice");
    pane.wait_for("the typed line", |s| has_line(s, "│hi from alice"))
        .await;
    let seen = bob_until(&mut bob_events, |e| alice_typing(e) == Some(true)).await;
    assert!(!seen.iter().any(|e| is_from(e, "alice", "hi from alice")));
    pane.press("Enter");
    let seen = bob_until(&mut bob_events, |e| is_from(e, "alice", "hi from alice")).await;
    let typing: Vec<bool> = seen.iter().filter_map(alice_typing).collect();
    assert_eq!(
        typing,
        [false],
        "one 'stopped' when the line was sent: {seen:?}"
    );
    pane.wait_for("alice's own message", |s| {
        has_line(s, "alice: hi from alice") && !s.contains("(sending…)")
    })
    .await;

    // Bob typing shows in alice's chat.
    bob.set_typing(true).unwrap();
    pane.wait_for("bob typing", |s| s.contains("bob is typing…"))
        .await;

    // The server dies; the chat says so, keeps what is typed meanwhile, and sends it
    // once the server is back.
    server.kill().await.unwrap();
    pane.wait_for("the lost connection", |s| s.contains("reconnecting"))
        .await;
    pane.type_text("typed while away");
    pane.press("Enter");
    pane.wait_for("the queued message", |s| {
        has_line(s, "alice: typed while away  (sending…)")
    })
    .await;
    let (_server, _) = serve_with(&address, &["--data-dir", &data]).await;
    let screen = pane
        .wait_for("the reconnection", |s| {
            s.contains("● connected") && s.contains("— reconnected") && !s.contains("(sending…)")
        })
        .await;
    let delivered = screen
        .lines()
        .filter(|l| l.contains("alice: typed while away"))
        .count();
    assert_eq!(delivered, 1, "{screen}");
    let seen = bob_until(&mut bob_events, |e| is_from(e, "alice", "typed while away")).await;
    let messages = seen
        .iter()
        .filter(|e| matches!(e, Event::Message(_)))
        .count();
    assert_eq!(messages, 1, "bob got it once: {seen:?}");

    pane.press("Escape");
    pane.wait_for("a clean exit", |s| s.contains("EXITED 0"))
        .await;
    bob.close().await;
}

//! `switchboard chat`: a terminal chat on a room, on the client SDK.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use clap::Args;
use ratatui::crossterm::event::{
    self, Event as Term, KeyCode, KeyEvent, KeyEventKind, KeyModifiers,
};
use ratatui::layout::{Alignment, Constraint, Layout, Position, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Paragraph, Wrap};
use ratatui::{DefaultTerminal, Frame};
use switchboard_client::{Event, Events, Options, RoomClient, State};
use tokio::sync::mpsc;
use unicode_width::UnicodeWidthChar;

#[derive(Debug, Args)]
#[command(
    after_help = "Keys: Enter sends, Esc or Ctrl-C quits, PageUp/PageDown scroll, \
Left/Right/Home/End move in the line. Lost connections are reopened by themselves; messages \
typed meanwhile are sent once the room is back, and missed ones are filled in."
)]
pub(crate) struct ChatArgs {
    #[command(flatten)]
    room: crate::target::RoomTarget,
    /// Lines kept on screen for scrolling back.
    #[arg(long, default_value_t = 2000)]
    scrollback: usize,
}

/// After this long without a key, "typing" is withdrawn.
const TYPING_IDLE: Duration = Duration::from_secs(3);
/// While typing goes on, the indicator is sent again this often (servers expire it).
const TYPING_REFRESH: Duration = Duration::from_secs(3);
/// Others' typing indicators that were never withdrawn fade after this long.
const TYPING_FADE: Duration = Duration::from_secs(8);

pub(crate) async fn run(args: ChatArgs) -> anyhow::Result<()> {
    // Joined before the screen is taken, so a refusal prints as a plain error.
    let (room, events) = args.room.join(Options::default()).await?;
    let mut app = App::new(room.clone(), args.scrollback);
    let mut terminal = ratatui::init();
    let result = app.run(&mut terminal, events).await;
    ratatui::restore();
    // Messages already sent get their acknowledgement, within bounds.
    if tokio::time::timeout(Duration::from_secs(5), room.close())
        .await
        .is_err()
    {
        tracing::warn!("the room did not acknowledge the last messages in time");
    }
    result
}

/// Terminal events, read on a thread of their own (reading blocks).
fn terminal_events() -> mpsc::Receiver<Term> {
    let (tx, rx) = mpsc::channel(64);
    std::thread::spawn(move || loop {
        match event::poll(Duration::from_millis(200)) {
            Ok(true) => {
                let Ok(read) = event::read() else { return };
                if tx.blocking_send(read).is_err() {
                    return;
                }
            }
            Ok(false) if tx.is_closed() => return,
            Ok(false) => {}
            Err(_) => return,
        }
    });
    rx
}

enum Entry {
    Chat {
        time: String,
        from: String,
        text: String,
    },
    Notice(String),
}

enum Status {
    Connecting,
    Connected,
    Reconnecting { attempt: u32, at: Instant },
    Closed,
}

struct App {
    room: RoomClient,
    room_name: String,
    me: String,
    entries: VecDeque<Entry>,
    scrollback: usize,
    /// Sent, not yet acknowledged: (nonce, text).
    unsent: Vec<(String, String)>,
    members: BTreeSet<String>,
    typing: BTreeMap<String, Instant>,
    status: Status,
    input: String,
    /// Cursor position in `input`, in characters.
    cursor: usize,
    /// Lines scrolled up from the bottom.
    scroll: usize,
    /// When "typing" was last sent; `None` while not typing.
    typing_sent: Option<Instant>,
    last_edit: Instant,
    quit: bool,
}

impl App {
    fn new(room: RoomClient, scrollback: usize) -> Self {
        Self {
            room,
            room_name: String::new(),
            me: String::new(),
            entries: VecDeque::new(),
            scrollback: scrollback.max(10),
            unsent: Vec::new(),
            members: BTreeSet::new(),
            typing: BTreeMap::new(),
            status: Status::Connecting,
            input: String::new(),
            cursor: 0,
            scroll: 0,
            typing_sent: None,
            last_edit: Instant::now(),
            quit: false,
        }
    }

    async fn run(
        &mut self,
        terminal: &mut DefaultTerminal,
        mut events: Events,
    ) -> anyhow::Result<()> {
        let mut keys = terminal_events();
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        let mut room_open = true;
        while !self.quit {
            terminal.draw(|frame| self.draw(frame))?;
            tokio::select! {
                event = events.recv(), if room_open => match event {
                    Some(event) => {
                        self.on_event(event);
                        // Take whatever else is ready before drawing again.
                        while let Some(more) = events.try_recv() {
                            self.on_event(more);
                        }
                    }
                    None => room_open = false,
                },
                key = keys.recv() => match key {
                    Some(Term::Key(key)) if key.kind == KeyEventKind::Press => self.on_key(key),
                    Some(_) => {}
                    None => break,
                },
                _ = tick.tick() => self.on_tick(),
            }
        }
        Ok(())
    }

    fn notice(&mut self, text: impl Into<String>) {
        self.push(Entry::Notice(text.into()));
    }

    fn push(&mut self, entry: Entry) {
        self.entries.push_back(entry);
        while self.entries.len() > self.scrollback {
            self.entries.pop_front();
        }
    }

    fn on_event(&mut self, event: Event) {
        match event {
            Event::Welcome { welcome, resumed } => {
                self.me.clone_from(&welcome.user);
                self.room_name.clone_from(&welcome.room);
                self.members = welcome.members.iter().cloned().collect();
                self.typing.clear();
                match resumed {
                    Some(resumed) if !resumed.complete => self.notice(
                        "reconnected; some messages from while away are no longer kept: the room's newest follow",
                    ),
                    Some(resumed) => match welcome.last_id.saturating_sub(resumed.after) {
                        0 => self.notice("reconnected"),
                        1 => self.notice("reconnected; 1 message from while away follows"),
                        n => {
                            self.notice(format!("reconnected; {n} messages from while away follow"))
                        }
                    },
                    None => self.notice(format!("joined #{} as {}", welcome.room, welcome.user)),
                }
            }
            Event::Message(message) => {
                if let Some(nonce) = &message.nonce {
                    self.unsent.retain(|(n, _)| n != nonce);
                }
                if let Some(from) = &message.from {
                    self.typing.remove(from);
                }
                self.push(Entry::Chat {
                    time: local_time(&message.timestamp),
                    text: shown(&message),
                    from: message.from.unwrap_or_else(|| "(server)".into()),
                });
            }
            Event::Typing { user, is_typing } => {
                if is_typing {
                    self.typing.insert(user, Instant::now());
                } else {
                    self.typing.remove(&user);
                }
            }
            Event::Join { user } => {
                self.notice(format!("{user} joined"));
                self.members.insert(user);
            }
            Event::Leave { user } => {
                self.notice(format!("{user} left"));
                self.typing.remove(&user);
                self.members.remove(&user);
            }
            Event::Error(error) => {
                if let Some(nonce) = &error.nonce {
                    self.unsent.retain(|(n, _)| n != nonce);
                    self.notice(format!("not sent: {} ({})", error.message, error.code));
                } else {
                    self.notice(format!("error: {} ({})", error.message, error.code));
                }
            }
            Event::State(state) => self.on_state(state),
            _ => {}
        }
    }

    fn on_state(&mut self, state: State) {
        match state {
            State::Connecting { attempt: 0 } => self.status = Status::Connecting,
            State::Connecting { attempt } => {
                self.status = Status::Reconnecting {
                    attempt,
                    at: Instant::now(),
                }
            }
            State::Connected => self.status = Status::Connected,
            State::Reconnecting {
                attempt,
                delay,
                reason,
            } => {
                if attempt == 1 {
                    self.notice(format!("connection lost ({reason}); reconnecting"));
                }
                self.status = Status::Reconnecting {
                    attempt,
                    at: Instant::now() + delay,
                };
            }
            State::Closed { reason, .. } => {
                self.notice(format!("closed: {reason} (Esc quits)"));
                self.status = Status::Closed;
            }
            _ => {}
        }
    }

    fn on_key(&mut self, key: KeyEvent) {
        let control = key.modifiers.contains(KeyModifiers::CONTROL);
        match key.code {
            KeyCode::Esc => self.quit = true,
            KeyCode::Char('c' | 'd') if control => self.quit = true,
            KeyCode::Char('u') if control => {
                self.input.clear();
                self.cursor = 0;
                self.edited();
            }
            KeyCode::Char(c) if !control => {
                let at = self.byte_at(self.cursor);
                self.input.insert(at, c);
                self.cursor += 1;
                self.edited();
            }
            KeyCode::Backspace if self.cursor > 0 => {
                self.cursor -= 1;
                let at = self.byte_at(self.cursor);
                self.input.remove(at);
                self.edited();
            }
            KeyCode::Delete if self.cursor < self.input.chars().count() => {
                let at = self.byte_at(self.cursor);
                self.input.remove(at);
                self.edited();
            }
            KeyCode::Left => self.cursor = self.cursor.saturating_sub(1),
            KeyCode::Right => self.cursor = (self.cursor + 1).min(self.input.chars().count()),
            KeyCode::Home => self.cursor = 0,
            KeyCode::End => self.cursor = self.input.chars().count(),
            KeyCode::PageUp => self.scroll += 10,
            KeyCode::PageDown => self.scroll = self.scroll.saturating_sub(10),
            KeyCode::Up => self.scroll += 1,
            KeyCode::Down => self.scroll = self.scroll.saturating_sub(1),
            KeyCode::Enter => self.submit(),
            _ => {}
        }
    }

    fn byte_at(&self, chars: usize) -> usize {
        self.input
            .char_indices()
            .nth(chars)
            .map_or(self.input.len(), |(i, _)| i)
    }

    /// Typing indicators follow the input: "started" once (refreshed while typing goes
    /// on), "stopped" when the line is sent or emptied, or after a pause.
    fn edited(&mut self) {
        let now = Instant::now();
        self.last_edit = now;
        if self.input.is_empty() {
            self.stop_typing();
        } else if self
            .typing_sent
            .map_or(true, |sent| now.duration_since(sent) >= TYPING_REFRESH)
        {
            // Dropped while disconnected: the indicator is only news of the moment.
            let _ = self.room.set_typing(true);
            self.typing_sent = Some(now);
        }
    }

    fn stop_typing(&mut self) {
        if self.typing_sent.take().is_some() {
            let _ = self.room.set_typing(false);
        }
    }

    fn submit(&mut self) {
        let text = self.input.trim().to_owned();
        self.input.clear();
        self.cursor = 0;
        self.stop_typing();
        match text.as_str() {
            "" => {}
            "/quit" | "/exit" => self.quit = true,
            _ => match self.room.send_message(text.clone()) {
                Ok(nonce) => {
                    self.unsent.push((nonce, text));
                    self.scroll = 0;
                }
                Err(error) => self.notice(format!("not sent: {error}")),
            },
        }
    }

    fn on_tick(&mut self) {
        let now = Instant::now();
        if self.typing_sent.is_some() && now.duration_since(self.last_edit) >= TYPING_IDLE {
            self.stop_typing();
        }
        self.typing
            .retain(|_, since| now.duration_since(*since) < TYPING_FADE);
    }

    fn draw(&mut self, frame: &mut Frame<'_>) {
        let [body, typing, input] = Layout::vertical([
            Constraint::Min(3),
            Constraint::Length(1),
            Constraint::Length(3),
        ])
        .areas(frame.area());
        let members_width = self
            .members
            .iter()
            .map(|m| m.chars().count() + 8)
            .max()
            .unwrap_or(0)
            .clamp(16, 30) as u16;
        let [messages, members] =
            Layout::horizontal([Constraint::Min(20), Constraint::Length(members_width)])
                .areas(body);
        self.draw_messages(frame, messages);
        self.draw_members(frame, members);
        frame.render_widget(
            Paragraph::new(self.typing_line()).style(dim().add_modifier(Modifier::ITALIC)),
            typing,
        );
        self.draw_input(frame, input);
    }

    fn status_line(&self) -> Line<'static> {
        let (text, color) = match &self.status {
            Status::Connecting => ("connecting…".to_owned(), Color::Yellow),
            Status::Connected => ("● connected".to_owned(), Color::Green),
            Status::Reconnecting { attempt, at } => {
                let wait = at.saturating_duration_since(Instant::now());
                let text = if wait.is_zero() {
                    format!("reconnecting… (attempt {attempt})")
                } else {
                    format!(
                        "reconnecting in {:.1} s (attempt {attempt})",
                        wait.as_secs_f64()
                    )
                };
                (text, Color::Yellow)
            }
            Status::Closed => ("closed".to_owned(), Color::Red),
        };
        Line::from(Span::styled(format!(" {text} "), Style::new().fg(color)))
            .alignment(Alignment::Right)
    }

    fn draw_messages(&mut self, frame: &mut Frame<'_>, area: Rect) {
        let mut lines: Vec<Line<'_>> = self
            .entries
            .iter()
            .map(|entry| match entry {
                Entry::Chat { time, from, text } => Line::from(vec![
                    Span::styled(format!("{time} "), dim()),
                    Span::styled(from.as_str(), name_style(from, from == &self.me)),
                    Span::raw(": "),
                    Span::raw(text.as_str()),
                ]),
                Entry::Notice(text) => Line::from(Span::styled(
                    format!("— {text}"),
                    dim().add_modifier(Modifier::ITALIC),
                )),
            })
            .collect();
        lines.extend(self.unsent.iter().map(|(_, text)| {
            Line::from(vec![
                Span::styled("      ", dim()),
                Span::styled(self.me.as_str(), dim().add_modifier(Modifier::BOLD)),
                Span::styled(format!(": {text}  (sending…)"), dim()),
            ])
        }));
        let title = if self.room_name.is_empty() {
            " switchboard ".to_owned()
        } else {
            format!(" #{} — {} ", self.room_name, self.me)
        };
        let block = Block::bordered()
            .title(Line::from(Span::styled(
                title,
                Style::new().add_modifier(Modifier::BOLD),
            )))
            .title(self.status_line());
        // Only the tail that can be shown is laid out (and scroll offsets stay small).
        let width = area.width.saturating_sub(2);
        let inner_height = usize::from(area.height.saturating_sub(2));
        let wanted = inner_height + self.scroll;
        let (mut start, mut height) = (lines.len(), 0);
        while start > 0 && height < wanted {
            start -= 1;
            height += Paragraph::new(lines[start].clone())
                .wrap(Wrap { trim: false })
                .line_count(width);
        }
        let paragraph = Paragraph::new(lines.split_off(start)).wrap(Wrap { trim: false });
        let total = paragraph.line_count(width);
        let bottom = total.saturating_sub(inner_height);
        self.scroll = self.scroll.min(bottom);
        let top = bottom - self.scroll;
        let paragraph = paragraph
            .block(block)
            .scroll((u16::try_from(top).unwrap_or(u16::MAX), 0));
        frame.render_widget(paragraph, area);
    }

    fn draw_members(&self, frame: &mut Frame<'_>, area: Rect) {
        let lines: Vec<Line<'_>> = self
            .members
            .iter()
            .map(|member| {
                let you = member == &self.me;
                let mut spans = vec![Span::styled(member.as_str(), name_style(member, you))];
                if you {
                    spans.push(Span::styled(" (you)", dim()));
                } else if self.typing.contains_key(member) {
                    spans.push(Span::styled(" …", dim()));
                }
                Line::from(spans)
            })
            .collect();
        let block = Block::bordered().title(format!(" members ({}) ", self.members.len()));
        frame.render_widget(Paragraph::new(lines).block(block), area);
    }

    fn typing_line(&self) -> String {
        let names: Vec<&str> = self
            .typing
            .keys()
            .filter(|user| **user != self.me)
            .map(String::as_str)
            .collect();
        match names.as_slice() {
            [] => String::new(),
            [one] => format!(" {one} is typing…"),
            [a, b] => format!(" {a} and {b} are typing…"),
            many => format!(" {} people are typing…", many.len()),
        }
    }

    fn draw_input(&self, frame: &mut Frame<'_>, area: Rect) {
        let width = usize::from(area.width.saturating_sub(2)).max(1);
        let columns = |c: char| c.width().unwrap_or(0);
        // Scrolled sideways so the cursor stays in view; widths in terminal columns.
        let before: Vec<char> = self.input.chars().take(self.cursor).collect();
        let mut at = before.iter().copied().map(columns).sum::<usize>();
        let mut skip = 0;
        while at + 1 > width && skip < before.len() {
            at -= columns(before[skip]);
            skip += 1;
        }
        let mut used = 0;
        let visible: String = self
            .input
            .chars()
            .skip(skip)
            .take_while(|&c| {
                used += columns(c);
                used <= width
            })
            .collect();
        let block = Block::bordered().title(" message · Enter sends · Esc quits ");
        frame.render_widget(Paragraph::new(visible).block(block), area);
        let x = area.x + 1 + u16::try_from(at).unwrap_or(0);
        frame.set_cursor_position(Position::new(x, area.y + 1));
    }
}

fn dim() -> Style {
    Style::new().fg(Color::DarkGray)
}

/// Each name keeps one color; one's own is bold.
fn name_style(name: &str, mine: bool) -> Style {
    const COLORS: [Color; 6] = [
        Color::Cyan,
        Color::Magenta,
        Color::Yellow,
        Color::Blue,
        Color::LightGreen,
        Color::LightRed,
    ];
    let hash = name
        .bytes()
        .fold(5381u32, |h, b| h.wrapping_mul(33) ^ u32::from(b));
    let style = Style::new().fg(COLORS[hash as usize % COLORS.len()]);
    if mine {
        style.add_modifier(Modifier::BOLD)
    } else {
        style
    }
}

/// `HH:MM` in local time from the server's RFC 3339 timestamp.
/// A message as one line: its event name, text and data (as JSON).
fn shown(message: &switchboard_client::ChatMessage) -> String {
    let parts: Vec<String> = [
        message.event.as_ref().map(|event| format!("[{event}]")),
        message.text.clone(),
        message.data_json().map(str::to_owned),
    ]
    .into_iter()
    .flatten()
    .collect();
    parts.join(" ")
}

fn local_time(timestamp: &str) -> String {
    chrono::DateTime::parse_from_rfc3339(timestamp).map_or_else(
        |_| timestamp.to_owned(),
        |t| t.with_timezone(&chrono::Local).format("%H:%M").to_string(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_shown_in_local_hours_and_minutes() {
        let shown = local_time("2026-11-23T10:07:00.123Z");
        let digits: Vec<bool> = shown.chars().map(|c| c.is_ascii_digit()).collect();
        assert_eq!(digits, [true, true, false, true, true], "{shown}");
        assert_eq!(&shown[2..3], ":");
        assert_eq!(local_time("not a time"), "not a time");
    }
}

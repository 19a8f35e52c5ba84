//! Progress on stderr while a benchmark runs: `compare`'s bar over all its steps (part ×
//! cell × engine) with a bar or spinner under it for the step running, and the bars of
//! the long single loads (`echo`'s samples, `fanout`'s rates, `idle`'s connections).
//!
//! Bars are drawn only when stderr is a terminal (indicatif hides them when it is not,
//! or when `TERM` is `dumb`), so a log or CI holds the same lines as it did without them.
//! Stderr belongs to the process, so do its bars: one [`MultiProgress`] draws them all,
//! and every line the tool writes to stderr goes through [`line`], above the bars, which
//! a bare `eprintln!` would tear. A load that `compare` runs has a pipe for stderr, so
//! its bars stay hidden and its lines reach `compare`, which shows the latest one under
//! the step's bar ([`output`]).

use std::borrow::Cow;
use std::process::{Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::Command;

/// Every bar of the process, drawn on stderr (hidden when it is not a terminal).
static BARS: LazyLock<MultiProgress> = LazyLock::new(MultiProgress::new);

/// How often a bar that follows a clock or a counter is brought up to date.
const TICK: Duration = Duration::from_millis(100);

/// Writes a line to stderr above the bars.
pub(crate) fn line(text: impl AsRef<str>) {
    BARS.suspend(|| eprintln!("{}", text.as_ref()));
}

/// Whether bars are drawn (stderr is a terminal).
fn shown() -> bool {
    !BARS.is_hidden()
}

fn style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template)
        .expect("a valid progress template")
        .progress_chars("=> ")
}

/// A bar of `len` units: `unit` is what it counts ("samples", "connections").
pub(crate) fn bar(len: u64, unit: &str) -> ProgressBar {
    let template = format!("  [{{bar:20}}] {{pos}}/{{len}} {unit}, {{elapsed}}  {{wide_msg}}");
    BARS.add(ProgressBar::new(len).with_style(style(&template)))
}

/// A spinner with the time since it started and a message.
pub(crate) fn spinner(message: impl Into<Cow<'static, str>>) -> ProgressBar {
    let spinner = BARS.add(
        ProgressBar::new_spinner()
            .with_style(style("  {spinner} {elapsed}  {wide_msg}"))
            .with_message(message),
    );
    if shown() {
        spinner.enable_steady_tick(TICK);
    }
    spinner
}

/// A bar that fills over `expected` (a load of known length: warm-up and samples) and
/// stops short of full until it is finished or dropped.
pub(crate) fn timed(expected: Duration) -> ProgressBar {
    let len = expected.as_millis().max(1) as u64;
    let bar = BARS.add(
        ProgressBar::new(len)
            .with_style(style("  [{bar:20}] {elapsed} {prefix}  {wide_msg}"))
            .with_prefix(format!("of ~{} s", expected.as_secs_f64().ceil())),
    );
    if shown() {
        let weak = bar.downgrade();
        let started = Instant::now();
        tokio::spawn(async move {
            while let Some(bar) = weak.upgrade() {
                if bar.is_finished() {
                    break;
                }
                bar.set_position((started.elapsed().as_millis() as u64).min(len - 1));
                drop(bar);
                tokio::time::sleep(TICK).await;
            }
        });
    }
    bar
}

/// Moves `bar` with `counter` until the bar is finished or dropped.
pub(crate) fn follow(bar: &ProgressBar, counter: Arc<AtomicU64>) {
    if !shown() {
        return;
    }
    let weak = bar.downgrade();
    tokio::spawn(async move {
        while let Some(bar) = weak.upgrade() {
            if bar.is_finished() {
                break;
            }
            bar.set_position(counter.load(Ordering::Relaxed));
            drop(bar);
            tokio::time::sleep(TICK).await;
        }
    });
}

/// The overall bar of a run made of steps (`compare`'s parts × cells × engines): the
/// step running as its message, each finished step's line printed above it.
#[derive(Debug)]
pub(crate) struct Steps {
    bar: ProgressBar,
}

impl Default for Steps {
    /// No bar: what `compare` holds before it knows its steps.
    fn default() -> Self {
        Self {
            bar: ProgressBar::hidden(),
        }
    }
}

impl Steps {
    pub(crate) fn new(total: u64) -> Self {
        let bar = BARS.add(ProgressBar::new(total).with_style(style(
            "[{bar:20}] {pos}/{len} steps, {elapsed} (~{eta} left)  {wide_msg}",
        )));
        if shown() {
            bar.enable_steady_tick(TICK);
        }
        Self { bar }
    }

    /// Names the step that starts (`echo · 100 × 20 B · switchboard`).
    pub(crate) fn start(&self, step: impl Into<Cow<'static, str>>) {
        self.bar.set_message(step);
    }

    /// Prints a finished step's line above the bars and counts the step.
    pub(crate) fn done(&self, text: impl AsRef<str>) {
        line(text);
        // A count planned too low grows rather than overflowing the bar.
        if self
            .bar
            .length()
            .is_some_and(|len| self.bar.position() >= len)
        {
            self.bar.inc_length(1);
        }
        self.bar.inc(1);
    }

    pub(crate) fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

/// Runs `command` to its end as [`Command::output`] does (no stdin; stdout and stderr
/// collected), showing each line it writes to stderr as `bar`'s message meanwhile.
pub(crate) async fn output(command: &mut Command, bar: &ProgressBar) -> std::io::Result<Output> {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut stdout = child.stdout.take().expect("stdout is piped");
    let stderr = child.stderr.take().expect("stderr is piped");
    let read_stdout = async {
        let mut all = Vec::new();
        stdout.read_to_end(&mut all).await?;
        std::io::Result::Ok(all)
    };
    let read_stderr = async {
        let mut all = Vec::new();
        let mut lines = BufReader::new(stderr).split(b'\n');
        while let Some(text) = lines.next_segment().await? {
            bar.set_message(String::from_utf8_lossy(&text).trim().to_owned());
            all.extend_from_slice(&text);
            all.push(b'\n');
        }
        std::io::Result::Ok(all)
    };
    let (stdout, stderr) = tokio::try_join!(read_stdout, read_stderr)?;
    let status = child.wait().await?;
    Ok(Output {
        status,
        stdout,
        stderr,
    })
}

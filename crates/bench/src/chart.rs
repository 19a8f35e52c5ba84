//! The charts of `switchboard bench compare`, drawn with plotters as SVG and PNG into the
//! output folder: `compare-echo` (each engine's messages/s relative to the best server in
//! the cell; below it the server's CPU per message at the fixed rate, when that pass
//! ran), `compare-fanout` (delivered messages/s at the highest publish rate held; below
//! it the server's CPU per delivery at a fixed rate, when the `fanout-cpu` part ran) and
//! `compare-memory` (KiB of server memory per idle connection). A part that did not run
//! has no chart. `compare.svg` is the echo chart under the name it had before these.
//!
//! The charts read a run as compare.json holds it: [`Run`] takes the fields it draws and
//! ignores the rest, so a saved run can be drawn again and a new part of the report
//! changes nothing here until it is charted. An engine has the same colour in every
//! chart: blues for Switchboard's doors, grey for the raw TCP ceiling.
//!
//! plotters draws each chart as SVG only (its SVG backend writes text as `<text>`
//! elements and sizes it by estimate, with no font library); the PNG is that SVG
//! rasterized by resvg, pure Rust, its text set in a system TrueType font that fontdb
//! finds by scanning the font folders (Debian's `fonts-dejavu-core` gives one). With no
//! font found the PNG is drawn all the same, without its text.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use anyhow::Context;
use plotters::coord::ranged1d::{KeyPointHint, NoDefaultFormatting, ValueFormatter};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use resvg::usvg::fontdb;
use resvg::{tiny_skia, usvg};
use serde::Deserialize;

use super::fanout::FanoutResult;
use super::{EchoResult, IdleResult};

const FONT: &str = "sans-serif";
/// Wide enough for five cells of eight engines, narrow enough for a page of text.
const WIDTH: u32 = 960;
const PANEL_HEIGHT: u32 = 330;
const LEGEND_ROW: u32 = 24;
const LEGEND_ENTRY: u32 = 200;
/// A bar's value is written above it only when the bar is at least this wide (pixels).
const LABELLED_BAR: f64 = 34.0;

/// What the charts draw of a `compare` run: the fields of its report (compare.json)
/// that they need.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct Run {
    cells: Vec<String>,
    engines: Vec<String>,
    /// engine → cell → closed-loop result.
    throughput: BTreeMap<String, BTreeMap<String, EchoResult>>,
    /// engine → cell → result at the fixed rate, with the server's CPU per message.
    cpu: BTreeMap<String, BTreeMap<String, EchoResult>>,
    /// engine → subscribers → the rising-rate steps.
    fanout: BTreeMap<String, BTreeMap<usize, FanoutResult>>,
    fanout_engines: Vec<String>,
    /// The fixed-rate fan-out, per subscriber count.
    fanout_cpu: Vec<FanoutCpuCell>,
    /// engine → connections → idle memory.
    idle: BTreeMap<String, BTreeMap<usize, IdleResult>>,
}

/// One subscriber count of the fixed-rate fan-out, as the report holds it.
#[derive(Debug, Deserialize)]
struct FanoutCpuCell {
    subscribers: usize,
    rate: f64,
    /// engine → its rounds.
    rounds: BTreeMap<String, Vec<FanoutCpuRound>>,
}

#[derive(Debug, Deserialize)]
struct FanoutCpuRound {
    user_us: f64,
    system_us: f64,
}

impl FanoutCpuCell {
    /// The engine's median round by total CPU per delivery (the lower middle one of an
    /// even count), the round the report's table shows.
    fn median(&self, engine: &str) -> Option<&FanoutCpuRound> {
        let mut rounds: Vec<&FanoutCpuRound> = self.rounds.get(engine)?.iter().collect();
        rounds.sort_by(|a, b| (a.user_us + a.system_us).total_cmp(&(b.user_us + b.system_us)));
        rounds.get(rounds.len().saturating_sub(1) / 2).copied()
    }
}

impl Run {
    /// The run as a report that serializes as compare.json does.
    pub(crate) fn of(report: &impl serde::Serialize) -> anyhow::Result<Self> {
        serde_json::from_value(serde_json::to_value(report)?).context("reading the report")
    }

    /// Every engine the charts name: the echo engines, then the fan-out ones.
    fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = Vec::new();
        for name in self.engines.iter().chain(&self.fanout_engines) {
            if !names.contains(&name.as_str()) {
                names.push(name);
            }
        }
        names
    }
}

/// Draws the charts of `run` into `dir` as SVG and PNG; returns the files written.
pub(crate) fn write(run: &Run, dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let colors = Colors::new(&run.names());
    let mut written = Vec::new();
    for (stem, figure) in [
        ("compare-echo", echo(run)),
        ("compare-fanout", fanout(run)),
        ("compare-memory", memory(run)),
    ] {
        let Some(figure) = figure else { continue };
        written.extend(render(&figure, &colors, dir, stem)?);
    }
    let echo = dir.join("compare-echo.svg");
    if written.contains(&echo) {
        let earlier = dir.join("compare.svg");
        std::fs::copy(&echo, &earlier).with_context(|| format!("writing {}", earlier.display()))?;
        written.push(earlier);
    }
    Ok(written)
}

/// What one bar shows.
#[derive(Debug, Clone, Copy)]
enum Value {
    /// Not measured: no bar.
    Missing,
    /// Measured, with no figure to draw (a fan-out with no rate held): a word instead.
    Note(&'static str),
    One(f64),
    /// Two parts stacked: the lower solid (the server's user time), the upper light
    /// (its system time).
    Split(f64, f64),
}

impl Value {
    fn top(self) -> Option<f64> {
        match self {
            Value::Missing | Value::Note(_) => None,
            Value::One(value) => Some(value),
            Value::Split(lower, upper) => Some(lower + upper),
        }
    }
}

/// Grouped bars: a group per cell (or subscriber or connection count), in it a bar per
/// series, each series in the same place in every group.
#[derive(Debug)]
struct Panel {
    caption: String,
    y_desc: &'static str,
    groups: Vec<String>,
    /// Each series' name and its value in each group.
    series: Vec<(String, Vec<Value>)>,
    /// The value axis' tick labels.
    ticks: fn(f64) -> String,
    /// Whether each bar has its value written above it (where bars are wide enough).
    labelled: bool,
    /// The top of the value axis when it is fixed (a share), else above the tallest bar.
    y_max: Option<f64>,
}

/// The bars of a panel: each series' value in each group given by `value` (series,
/// group index); a series measured in no group is left out, and so is a group where
/// none is. Returns the groups kept and the series.
fn bars(
    names: &[String],
    groups: &[String],
    value: impl Fn(&str, usize) -> Value,
) -> (Vec<String>, Vec<(String, Vec<Value>)>) {
    let measured = |v: &Value| !matches!(v, Value::Missing);
    let table: Vec<(String, Vec<Value>)> = names
        .iter()
        .map(|name| {
            let values = (0..groups.len()).map(|g| value(name, g)).collect();
            (name.clone(), values)
        })
        .collect();
    let kept: Vec<usize> = (0..groups.len())
        .filter(|&g| table.iter().any(|(_, values)| measured(&values[g])))
        .collect();
    let series = table
        .into_iter()
        .filter(|(_, values)| values.iter().any(measured))
        .map(|(name, values)| (name, kept.iter().map(|&g| values[g]).collect()))
        .collect();
    (kept.iter().map(|&g| groups[g].clone()).collect(), series)
}

impl Panel {
    fn is_empty(&self) -> bool {
        self.series.is_empty() || self.groups.is_empty()
    }
}

/// One picture: panels one above the other, one legend below them.
#[derive(Debug)]
struct Figure {
    panels: Vec<Panel>,
    /// A line under the legend (what the light part of a bar is).
    note: Option<&'static str>,
}

impl Figure {
    fn of(panels: Vec<Panel>, note: Option<&'static str>) -> Option<Self> {
        let panels: Vec<Panel> = panels.into_iter().filter(|p| !p.is_empty()).collect();
        let split = panels
            .iter()
            .flat_map(|p| &p.series)
            .flat_map(|(_, values)| values)
            .any(|v| matches!(v, Value::Split(..)));
        (!panels.is_empty()).then_some(Self {
            panels,
            note: note.filter(|_| split),
        })
    }

    /// The series named in the legend, in the order they first appear.
    fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = Vec::new();
        for (name, _) in self.panels.iter().flat_map(|p| &p.series) {
            if !names.contains(&name.as_str()) {
                names.push(name);
            }
        }
        names
    }

    fn legend_height(&self) -> u32 {
        let per_row = ((WIDTH - 80) / LEGEND_ENTRY).max(1) as usize;
        let rows = self.names().len().div_ceil(per_row) as u32;
        12 + rows * LEGEND_ROW + if self.note.is_some() { LEGEND_ROW } else { 0 }
    }

    fn size(&self) -> (u32, u32) {
        (
            WIDTH,
            PANEL_HEIGHT * self.panels.len() as u32 + self.legend_height(),
        )
    }
}

const SPLIT_NOTE: &str = "Solid: the server's user time; light: its system time.";

fn echo(run: &Run) -> Option<Figure> {
    let best: Vec<f64> = run
        .cells
        .iter()
        .map(|cell| {
            run.throughput
                .values()
                .filter_map(|cells| cells.get(cell))
                .map(|r| r.median)
                .fold(0.0, f64::max)
        })
        .collect();
    let (groups, series) = bars(&run.engines, &run.cells, |engine, g| {
        match run
            .throughput
            .get(engine)
            .and_then(|c| c.get(&run.cells[g]))
        {
            Some(r) if best[g] > 0.0 => Value::One(r.median / best[g]),
            _ => Value::Missing,
        }
    });
    let throughput = Panel {
        caption: "Echo: messages/s relative to the best server in each cell (closed loop)".into(),
        y_desc: "of the best",
        groups,
        series,
        ticks: percent,
        labelled: false,
        y_max: Some(1.05),
    };
    let (groups, series) = bars(&run.engines, &run.cells, |engine, g| {
        match run.cpu.get(engine).and_then(|c| c.get(&run.cells[g])) {
            Some(EchoResult {
                user_us: Some(user),
                system_us: Some(system),
                ..
            }) => Value::Split(*user, *system),
            _ => Value::Missing,
        }
    });
    let cpu = Panel {
        caption: "Echo: the server's CPU per message at a fixed rate (half the slowest server's)"
            .into(),
        y_desc: "µs per message",
        groups,
        series,
        ticks: plain,
        labelled: false,
        y_max: None,
    };
    Figure::of(vec![throughput, cpu], Some(SPLIT_NOTE))
}

fn fanout(run: &Run) -> Option<Figure> {
    let (counts, groups) = counts_of(&run.fanout, "subscribers");
    let (labels, series) = bars(&run.fanout_engines, &groups, |engine, g| {
        match run.fanout.get(engine).and_then(|c| c.get(&counts[g])) {
            Some(result) => result.best_held().map_or(Value::Note("none held"), |step| {
                Value::One(step.delivered_per_sec)
            }),
            None => Value::Missing,
        }
    });
    let bound = run
        .fanout
        .values()
        .flat_map(|c| c.values())
        .map(|r| r.p99_bound_ms)
        .next()
        .unwrap_or_default();
    let delivered = Panel {
        caption: format!(
            "Fan-out: delivered messages/s at the highest publish rate held (p99 ≤ {bound} ms)"
        ),
        y_desc: "messages/s",
        groups: labels,
        series,
        ticks: compact,
        labelled: true,
        y_max: None,
    };
    let cells: Vec<String> = run
        .fanout_cpu
        .iter()
        .map(|c| format!("{} × {} msg/s", thousands(c.subscribers as f64), c.rate))
        .collect();
    let (labels, series) = bars(&run.fanout_engines, &cells, |engine, g| {
        run.fanout_cpu[g]
            .median(engine)
            .map_or(Value::Missing, |r| Value::Split(r.user_us, r.system_us))
    });
    let cpu = Panel {
        caption:
            "Fan-out at a fixed rate: the server's CPU per delivery (subscribers × publish rate)"
                .into(),
        y_desc: "µs per delivery",
        groups: labels,
        series,
        ticks: plain,
        labelled: true,
        y_max: None,
    };
    Figure::of(vec![delivered, cpu], Some(SPLIT_NOTE))
}

/// The counts any engine was measured at (engine → count → result), in order, and
/// their group labels ("1,000 subscribers").
fn counts_of<V>(
    by_engine: &BTreeMap<String, BTreeMap<usize, V>>,
    unit: &str,
) -> (Vec<usize>, Vec<String>) {
    let counts: std::collections::BTreeSet<usize> = by_engine
        .values()
        .flat_map(|by_count| by_count.keys().copied())
        .collect();
    let counts: Vec<usize> = counts.into_iter().collect();
    let groups = counts
        .iter()
        .map(|&n| format!("{} {unit}", thousands(n as f64)))
        .collect();
    (counts, groups)
}

fn memory(run: &Run) -> Option<Figure> {
    let (counts, groups) = counts_of(&run.idle, "connections");
    let (labels, series) = bars(&run.engines, &groups, |engine, g| {
        run.idle
            .get(engine)
            .and_then(|c| c.get(&counts[g]))
            .map_or(Value::Missing, |r| Value::One(r.kib_per_connection))
    });
    let panel = Panel {
        caption: "Server memory per idle connection (RSS growth ÷ connections)".into(),
        y_desc: "KiB per connection",
        groups: labels,
        series,
        ticks: plain,
        labelled: true,
        y_max: None,
    };
    Figure::of(vec![panel], None)
}

/// Each engine's colour, the same in every chart of a run.
#[derive(Debug)]
struct Colors(BTreeMap<String, RGBColor>);

impl Colors {
    const OURS: [RGBColor; 3] = [
        RGBColor(0x33, 0x55, 0xff),
        RGBColor(0x84, 0x9b, 0xff),
        RGBColor(0x1a, 0x2b, 0x8f),
    ];
    const RAW: RGBColor = RGBColor(0x9a, 0xa3, 0xb5);
    const PEERS: [RGBColor; 10] = [
        RGBColor(0xe4, 0x57, 0x2e),
        RGBColor(0x17, 0xbe, 0xbb),
        RGBColor(0xe0, 0xa8, 0x00),
        RGBColor(0x76, 0xb0, 0x41),
        RGBColor(0xa0, 0x51, 0x95),
        RGBColor(0xf2, 0x8e, 0x2b),
        RGBColor(0x8c, 0x56, 0x4b),
        RGBColor(0xe3, 0x77, 0xc2),
        RGBColor(0x55, 0x55, 0x55),
        RGBColor(0xbc, 0xbd, 0x22),
    ];

    fn new(names: &[&str]) -> Self {
        let (mut ours, mut peers) = (0, 0);
        let mut map = BTreeMap::new();
        for name in names {
            let color = if *name == "raw" {
                Self::RAW
            } else if name.starts_with("switchboard") {
                ours += 1;
                Self::OURS[(ours - 1) % Self::OURS.len()]
            } else {
                peers += 1;
                Self::PEERS[(peers - 1) % Self::PEERS.len()]
            };
            map.insert((*name).to_owned(), color);
        }
        Self(map)
    }

    fn of(&self, name: &str) -> RGBColor {
        self.0.get(name).copied().unwrap_or(Self::RAW)
    }
}

/// `color` mixed with white: the light part of a split bar.
fn light(RGBColor(r, g, b): RGBColor) -> RGBColor {
    let mix = |c: u8| c + ((255 - c) as f64 * 0.6) as u8;
    RGBColor(mix(r), mix(g), mix(b))
}

/// Writes `figure` as `STEM.svg` and `STEM.png` in `dir`: the PNG is the SVG rasterized.
fn render(
    figure: &Figure,
    colors: &Colors,
    dir: &Path,
    stem: &str,
) -> anyhow::Result<Vec<PathBuf>> {
    let svg = dir.join(format!("{stem}.svg"));
    let mut text = String::new();
    {
        let root = SVGBackend::with_string(&mut text, figure.size()).into_drawing_area();
        draw(&root, figure, colors)
            .map_err(|error| anyhow::anyhow!("drawing {}: {error}", svg.display()))?;
    }
    std::fs::write(&svg, &text).with_context(|| format!("writing {}", svg.display()))?;
    let png = dir.join(format!("{stem}.png"));
    let bytes = rasterize(&text).with_context(|| format!("drawing {}", png.display()))?;
    std::fs::write(&png, bytes).with_context(|| format!("writing {}", png.display()))?;
    Ok(vec![svg, png])
}

/// The SVG `svg` as a PNG of its size, on white, its text in [`fonts`].
fn rasterize(svg: &str) -> anyhow::Result<Vec<u8>> {
    let fonts = fonts();
    let mut options = usvg::Options {
        fontdb: Arc::clone(fonts),
        ..usvg::Options::default()
    };
    if fonts.is_empty() {
        // Text is left out; without this usvg would warn of every element.
        options.font_resolver.select_font = Box::new(|_, _| None);
    }
    let tree = usvg::Tree::from_str(svg, &options).context("reading the SVG")?;
    let size = tree.size().to_int_size();
    let mut pixmap = tiny_skia::Pixmap::new(size.width(), size.height())
        .context("an image of the chart's size")?;
    pixmap.fill(tiny_skia::Color::WHITE);
    resvg::render(&tree, tiny_skia::Transform::default(), &mut pixmap.as_mut());
    pixmap.encode_png().context("encoding the PNG")
}

/// The fonts the PNGs' text is set in, loaded once: the system's, as fontdb's
/// `load_system_fonts` finds them by scanning the usual font folders (and those that
/// fontconfig's configuration files name, read as text: no library is loaded). The
/// charts ask for `sans-serif`; when the family the system configures for it (fontdb's
/// default: Arial) is not installed, the first of a few common ones that is, else any
/// family found. No font at all is not an error: the PNGs are drawn without their text,
/// and this says so once.
fn fonts() -> &'static Arc<fontdb::Database> {
    static FONTS: OnceLock<Arc<fontdb::Database>> = OnceLock::new();
    FONTS.get_or_init(|| {
        let mut db = fontdb::Database::new();
        db.load_system_fonts();
        let installed = |db: &fontdb::Database, family: &str| {
            db.faces()
                .any(|face| face.families.iter().any(|(name, _)| name == family))
        };
        let configured = db.family_name(&fontdb::Family::SansSerif).to_owned();
        if !installed(&db, &configured) {
            let other = [
                "DejaVu Sans",
                "Liberation Sans",
                "Noto Sans",
                "Arial",
                "Helvetica",
                "FreeSans",
            ]
            .into_iter()
            .find(|family| installed(&db, family))
            .map(str::to_owned)
            .or_else(|| {
                db.faces()
                    .find_map(|face| face.families.first())
                    .map(|(name, _)| name.clone())
            });
            match other {
                Some(family) => db.set_sans_serif_family(family),
                None => tracing::warn!(
                    "no system font found: the charts' PNGs have no text (the SVGs do); \
                     a TrueType font such as Debian's fonts-dejavu-core gives it"
                ),
            }
        }
        Arc::new(db)
    })
}

type DrawResult<DB> = Result<(), DrawingAreaErrorKind<<DB as DrawingBackend>::ErrorType>>;

fn draw<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    figure: &Figure,
    colors: &Colors,
) -> DrawResult<DB> {
    root.fill(&WHITE)?;
    let (plots, legend) = root.split_vertically(PANEL_HEIGHT * figure.panels.len() as u32);
    for (area, panel) in plots
        .split_evenly((figure.panels.len(), 1))
        .iter()
        .zip(&figure.panels)
    {
        draw_panel(area, panel, colors)?;
    }
    let per_row = ((WIDTH - 80) / LEGEND_ENTRY).max(1) as usize;
    let names = figure.names();
    for (i, name) in names.iter().enumerate() {
        let x = 80 + (i % per_row) as i32 * LEGEND_ENTRY as i32;
        let y = 6 + (i / per_row) as i32 * LEGEND_ROW as i32;
        legend.draw(&Rectangle::new(
            [(x, y + 1), (x + 14, y + 15)],
            colors.of(name).filled(),
        ))?;
        legend.draw(&Text::new(name.to_string(), (x + 20, y + 1), (FONT, 14)))?;
    }
    if let Some(note) = figure.note {
        let y = 6 + names.len().div_ceil(per_row) as i32 * LEGEND_ROW as i32;
        legend.draw(&Text::new(
            note,
            (80, y + 1),
            (FONT, 13).into_font().color(&BLACK.mix(0.7)),
        ))?;
    }
    root.present()
}

fn draw_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    panel: &Panel,
    colors: &Colors,
) -> DrawResult<DB> {
    let groups = panel.groups.len();
    let tallest = panel
        .series
        .iter()
        .flat_map(|(_, values)| values)
        .filter_map(|v| v.top())
        .fold(0.0, f64::max);
    let top = panel
        .y_max
        .unwrap_or(if tallest > 0.0 { tallest * 1.15 } else { 1.0 });
    let mut chart = ChartBuilder::on(area)
        .caption(&panel.caption, (FONT, 16))
        .margin(8)
        .margin_right(20)
        .x_label_area_size(28)
        .y_label_area_size(72)
        .build_cartesian_2d(Groups(&panel.groups), 0.0..top)?;
    let tick_label = |y: &f64| (panel.ticks)(*y);
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(groups)
        .y_labels(6)
        .y_label_formatter(&tick_label)
        .y_desc(panel.y_desc)
        .label_style((FONT, 13))
        .axis_desc_style((FONT, 13))
        .bold_line_style(RGBColor(0xdd, 0xdd, 0xdd))
        .light_line_style(TRANSPARENT)
        .draw()?;

    // A group's bars take 80 % of its width, centred; a group of few bars no more than
    // three would take each.
    let series = panel.series.len().max(1);
    let slot = 0.8 / series.max(3) as f64;
    let (plot_width, _) = chart.plotting_area().dim_in_pixel();
    let labelled = panel.labelled && plot_width as f64 / groups as f64 * slot >= LABELLED_BAR;
    let above = TextStyle::from((FONT, 12).into_font()).pos(Pos::new(HPos::Center, VPos::Bottom));
    // A bar's value, a few pixels above it.
    let label = |text: String, at: (f64, f64)| {
        EmptyElement::at(at) + Text::new(text, (0, -3), above.clone())
    };
    for (s, (name, values)) in panel.series.iter().enumerate() {
        let color = colors.of(name);
        for (g, value) in values.iter().enumerate() {
            let left = g as f64 + 0.5 - slot * series as f64 / 2.0 + slot * s as f64;
            let right = left + slot * 0.85;
            let middle = (left + right) / 2.0;
            match *value {
                Value::Missing => continue,
                Value::Note(word) => {
                    chart.draw_series([label(word.to_owned(), (middle, 0.0))])?;
                    continue;
                }
                Value::One(height) => {
                    chart.draw_series([Rectangle::new(
                        [(left, 0.0), (right, height)],
                        color.filled(),
                    )])?;
                }
                Value::Split(lower, upper) => {
                    // A part of no height is left out: an empty rectangle is no valid SVG.
                    let parts = [
                        (0.0, lower, color.filled()),
                        (lower, lower + upper, light(color).filled()),
                    ];
                    chart.draw_series(
                        parts
                            .into_iter()
                            .filter(|(bottom, top, _)| top > bottom)
                            .map(|(bottom, top, style)| {
                                Rectangle::new([(left, bottom), (right, top)], style)
                            }),
                    )?;
                }
            }
            if let (true, Some(height)) = (labelled, value.top()) {
                chart.draw_series([label(short(height), (middle, height))])?;
            }
        }
    }
    Ok(())
}

/// The group axis: group `g` spans `g..g + 1`, its name under the middle.
#[derive(Debug, Clone, Copy)]
struct Groups<'a>(&'a [String]);

impl Ranged for Groups<'_> {
    type FormatOption = NoDefaultFormatting;
    type ValueType = f64;

    fn map(&self, value: &f64, (low, high): (i32, i32)) -> i32 {
        let share = value / self.0.len().max(1) as f64;
        low + ((high - low) as f64 * share).round() as i32
    }

    fn key_points<Hint: KeyPointHint>(&self, _: Hint) -> Vec<f64> {
        (0..self.0.len()).map(|g| g as f64 + 0.5).collect()
    }

    fn range(&self) -> std::ops::Range<f64> {
        0.0..self.0.len().max(1) as f64
    }
}

impl ValueFormatter<f64> for Groups<'_> {
    fn format_ext(&self, value: &f64) -> String {
        let group = value.floor().max(0.0) as usize;
        self.0.get(group).cloned().unwrap_or_default()
    }
}

/// 0.25 as "25%".
fn percent(share: f64) -> String {
    format!("{:.0}%", share * 100.0)
}

/// A figure to two decimals at most, without trailing zeros: 2.5, 14, 0.25.
fn plain(value: f64) -> String {
    let text = format!("{value:.2}");
    text.trim_end_matches('0').trim_end_matches('.').to_owned()
}

/// An axis tick: 500k, 1.5M, 2.5k, 40.
fn compact(value: f64) -> String {
    match value.abs() {
        v if v >= 1e6 => format!("{}M", plain(value / 1e6)),
        v if v >= 1e3 => format!("{}k", plain(value / 1e3)),
        _ => plain(value),
    }
}

/// A figure in three significant digits or so: 1.91M, 98.6k, 135, 12.0, 3.96.
fn short(value: f64) -> String {
    match value.abs() {
        v if v >= 1e6 => format!("{:.2}M", value / 1e6),
        v if v >= 1e5 => format!("{:.0}k", value / 1e3),
        v if v >= 1e4 => format!("{:.1}k", value / 1e3),
        v if v >= 1e3 => format!("{:.2}k", value / 1e3),
        v if v >= 100.0 => format!("{value:.0}"),
        v if v >= 10.0 => format!("{value:.1}"),
        _ => format!("{value:.2}"),
    }
}

fn thousands(value: f64) -> String {
    super::compare::thousands(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small run: two echo cells with the CPU pass, fan-out to two counts (one with
    /// no rate held by one server), the fixed-rate fan-out, idle memory at one count.
    fn run() -> Run {
        let echo = |median: f64| {
            serde_json::json!({"connections": 100, "size": 20, "median": median,
                "min": median, "max": median, "user_us": 2.5, "system_us": 9.0})
        };
        let step = |rate: f64, held: bool| {
            serde_json::json!({"rate": rate, "published": 10, "expected": 10_000,
                "delivered": 10_000, "delivered_per_sec": rate * 1000.0, "p50_ms": 5.0,
                "p99_ms": 40.0, "max_ms": 60.0, "closed": 0, "held": held})
        };
        let fanout = |held: bool| {
            serde_json::json!({"subscribers": 1000, "p99_bound_ms": 250.0,
                "steps": [step(10.0, held), step(100.0, false)]})
        };
        let idle = |kib: f64| {
            serde_json::json!({"connections": 1000, "rss_before_kib": 1000,
                "rss_after_kib": 5000, "kib_per_connection": kib})
        };
        let report = serde_json::json!({
            "machine": "test", "settings": "test", "a_later_part": {"ignored": true},
            "cells": ["100 × 20 B", "200 × 16 KiB"],
            "engines": ["switchboard", "raw", "fastwebsockets"],
            "throughput": {
                "switchboard": {"100 × 20 B": echo(120_000.0), "200 × 16 KiB": echo(99_000.0)},
                "raw": {"100 × 20 B": echo(180_000.0), "200 × 16 KiB": echo(68_000.0)},
                "fastwebsockets": {"100 × 20 B": echo(136_000.0)}
            },
            "cpu": {"switchboard": {"100 × 20 B": echo(60_000.0)}, "raw": {"100 × 20 B": echo(60_000.0)}},
            "fanout_engines": ["switchboard", "sockudo"],
            "fanout": {
                "switchboard": {"1000": fanout(true), "5000": fanout(true)},
                "sockudo": {"1000": fanout(true), "5000": fanout(false)}
            },
            "fanout_cpu": [{"subscribers": 5000, "rate": 10.0, "step_secs": 3.0, "rounds": {
                "switchboard": [{"round": 0, "user_us": 3.4, "system_us": 9.1},
                    {"round": 1, "user_us": 3.0, "system_us": 9.0}],
                "sockudo": [{"round": 0, "user_us": 20.0, "system_us": 15.0}]
            }}],
            "idle": {"switchboard": {"1000": idle(3.9)}, "fastwebsockets": {"1000": idle(6.7)}}
        });
        serde_json::from_value(report).expect("a report")
    }

    /// The SVG is well-formed enough to be read as XML: one root `<svg>` element, every
    /// element closed in order.
    fn assert_xml_ish(svg: &str) {
        assert!(svg.trim_start().starts_with("<svg"), "{svg:.80}");
        let mut open: Vec<&str> = Vec::new();
        let mut rest = svg;
        while let Some(start) = rest.find('<') {
            let end = rest[start..].find('>').expect("a tag is closed") + start;
            let tag = &rest[start + 1..end];
            if let Some(name) = tag.strip_prefix('/') {
                assert_eq!(open.pop(), Some(name.trim()), "closing tag {name}");
            } else if !tag.ends_with('/') && !tag.starts_with('?') && !tag.starts_with('!') {
                open.push(tag.split_whitespace().next().expect("a tag name"));
            }
            rest = &rest[end + 1..];
        }
        assert!(open.is_empty(), "left open: {open:?}");
    }

    #[test]
    fn each_part_is_drawn_as_svg_and_png_naming_every_engine() {
        let dir =
            std::env::temp_dir().join(format!("switchboard-bench-charts-{}", std::process::id()));
        let written = write(&run(), &dir).expect("charts are drawn");
        for (stem, engines) in [
            (
                "compare-echo",
                ["switchboard", "raw", "fastwebsockets"].as_slice(),
            ),
            ("compare-fanout", ["switchboard", "sockudo"].as_slice()),
            (
                "compare-memory",
                ["switchboard", "fastwebsockets"].as_slice(),
            ),
        ] {
            let svg_path = dir.join(format!("{stem}.svg"));
            let png_path = dir.join(format!("{stem}.png"));
            assert!(
                written.contains(&svg_path) && written.contains(&png_path),
                "{written:?}"
            );
            let svg = std::fs::read_to_string(&svg_path).expect("the SVG");
            assert_xml_ish(&svg);
            for engine in engines {
                assert!(svg.contains(engine), "{stem}.svg names {engine}");
            }
            let png = std::fs::read(&png_path).expect("the PNG");
            assert!(png.len() > 8, "{stem}.png is empty");
            assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "{stem}.png is a PNG");
        }
        // The echo chart keeps its earlier name too.
        assert_eq!(
            std::fs::read(dir.join("compare.svg")).expect("compare.svg"),
            std::fs::read(dir.join("compare-echo.svg")).expect("compare-echo.svg")
        );
        std::fs::remove_dir_all(&dir).expect("removing the charts");
    }

    #[test]
    fn a_part_that_did_not_run_has_no_chart() {
        let mut run = run();
        run.fanout.clear();
        run.fanout_cpu.clear();
        run.idle.clear();
        let dir = std::env::temp_dir().join(format!(
            "switchboard-bench-echo-only-{}",
            std::process::id()
        ));
        let written = write(&run, &dir).expect("charts are drawn");
        let mut names: Vec<String> = written
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            ["compare-echo.png", "compare-echo.svg", "compare.svg"]
        );
        std::fs::remove_dir_all(&dir).expect("removing the charts");
    }

    #[test]
    fn the_median_round_is_the_lower_middle_by_total() {
        let run = run();
        let cell = &run.fanout_cpu[0];
        let median = cell.median("switchboard").expect("rounds");
        assert_eq!((median.user_us, median.system_us), (3.0, 9.0));
        assert!(cell.median("tungstenite-broadcast").is_none());
    }

    #[test]
    fn figures_are_written_short() {
        assert_eq!(short(1_911_530.0), "1.91M");
        assert_eq!(short(98_635.0), "98.6k");
        assert_eq!(short(134.87), "135");
        assert_eq!(short(3.96), "3.96");
        assert_eq!(plain(2.50), "2.5");
        assert_eq!(plain(14.0), "14");
        assert_eq!(percent(0.25), "25%");
        assert_eq!(compact(1_500_000.0), "1.5M");
        assert_eq!(compact(8_000.0), "8k");
    }
}

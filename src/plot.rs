//! `swarmrun plot RUN_DIR`: a run's `metrics.jsonl` as PNG charts —
//! `loss.png` (training and validation loss by window), `throughput.png`
//! (tokens/s above, bubble below) and, when the run compressed its
//! boundaries, `compression.png` (the wire ratio) — for a run in progress
//! or finished, with no viewer but an image one.
//!
//! Text is drawn with a vendored font (DejaVu Sans, `data/`), so plotting
//! needs no system font library and looks the same everywhere.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::prelude::*;
use serde::Deserialize;
use thiserror::Error;
use SeriesLabelPosition::{UpperLeft, UpperRight};

/// Every chart's size in pixels.
pub const SIZE: (u32, u32) = (1000, 600);

/// DejaVu Sans (Bitstream Vera license, `data/DejaVuSans.LICENSE`),
/// compressed.
const FONT_ZST: &[u8] = include_bytes!("../data/DejaVuSans.ttf.zst");

#[derive(Debug, Error)]
pub enum PlotError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}:{line}: {source}", path.display())]
    Line {
        path: PathBuf,
        line: usize,
        source: serde_json::Error,
    },
    #[error("{}: no window finished yet", .0.display())]
    Empty(PathBuf),
    #[error("the vendored font cannot be read: {0}")]
    Font(String),
    #[error("drawing {}: {message}", path.display())]
    Draw { path: PathBuf, message: String },
}

/// The fields of a `metrics.jsonl` line the charts use.
#[derive(Debug, Clone, Deserialize)]
struct Window {
    window: u64,
    loss: f64,
    val_loss: Option<f64>,
    tokens_per_s: f64,
    bubble: f64,
    compression: Option<f64>,
}

/// Draws the charts of `run_dir` into `out` (created if missing) and
/// returns the files written.
pub fn plot(run_dir: &Path, out: &Path) -> Result<Vec<PathBuf>, PlotError> {
    let metrics = run_dir.join("metrics.jsonl");
    let windows = read(&metrics)?;
    if windows.is_empty() {
        return Err(PlotError::Empty(metrics));
    }
    register_font()?;
    std::fs::create_dir_all(out).map_err(|source| PlotError::Io {
        path: out.to_path_buf(),
        source,
    })?;
    let name = run_dir.file_name().map_or_else(
        || run_dir.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    let at = |w: &Window, v: f64| (w.window as f64, v);
    let mut written = Vec::new();

    let path = out.join("loss.png");
    let train: Vec<(f64, f64)> = windows.iter().map(|w| at(w, w.loss)).collect();
    let val: Vec<(f64, f64)> = windows
        .iter()
        .filter_map(|w| Some(at(w, w.val_loss?)))
        .collect();
    let series = [
        ("training loss", &train, BLUE),
        ("validation loss", &val, RED),
    ];
    let axes = ("window", "loss");
    chart(&path, &format!("{name}: loss"), axes, &series, UpperRight).map_err(draw_error(&path))?;
    written.push(path);

    let path = out.join("throughput.png");
    let speed: Vec<(f64, f64)> = windows.iter().map(|w| at(w, w.tokens_per_s)).collect();
    let bubble: Vec<(f64, f64)> = windows.iter().map(|w| at(w, 100.0 * w.bubble)).collect();
    throughput(&path, &name, &speed, &bubble).map_err(draw_error(&path))?;
    written.push(path);

    let ratios: Vec<(f64, f64)> = windows
        .iter()
        .filter_map(|w| Some(at(w, w.compression?)))
        .collect();
    if ratios.iter().any(|&(_, r)| r > 1.0) {
        let path = out.join("compression.png");
        let series = [("dense bytes / wire bytes", &ratios, DARK_GREEN)];
        let title = format!("{name}: boundary compression");
        chart(&path, &title, ("window", "ratio (x)"), &series, UpperRight)
            .map_err(draw_error(&path))?;
        written.push(path);
    }
    Ok(written)
}

fn read(path: &Path) -> Result<Vec<Window>, PlotError> {
    let text = std::fs::read_to_string(path).map_err(|source| PlotError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|source| PlotError::Line {
                path: path.to_path_buf(),
                line: i + 1,
                source,
            })
        })
        .collect()
}

type Drawn = Result<(), Box<dyn std::error::Error>>;

/// A line's legend, points (window, value) and colour.
type Series<'a, C> = (&'a str, &'a Vec<(f64, f64)>, C);

/// A chart of named series (x, y) in the palette's colours, for charts of
/// other data than a run's metrics (`swarmrun bench report`).
pub fn series_chart(
    path: &Path,
    title: &str,
    (x_desc, y_desc): (&str, &str),
    series: &[(String, Vec<(f64, f64)>)],
) -> Result<(), PlotError> {
    register_font()?;
    let palette = [BLUE, RED, DARK_GREEN, MAGENTA, CYAN, BLACK];
    let series: Vec<Series<'_, RGBColor>> = series
        .iter()
        .zip(palette.iter().cycle())
        .map(|((label, points), &colour)| (label.as_str(), points, colour))
        .collect();
    // Rates rise with size: the upper left is where the lines are not.
    chart(path, title, (x_desc, y_desc), &series, UpperLeft).map_err(draw_error(path))
}

/// One chart of several series against x (a run's window, usually).
fn chart<C: Into<RGBAColor> + Copy>(
    path: &Path,
    title: &str,
    (x_desc, y_desc): (&str, &str),
    series: &[Series<'_, C>],
    legend: SeriesLabelPosition,
) -> Drawn {
    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let all = series.iter().flat_map(|(_, points, _)| points.iter());
    let (x, y) = ranges(all);
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 26))
        .margin(20)
        .x_label_area_size(44)
        .y_label_area_size(70)
        .build_cartesian_2d(x, y)?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .x_label_formatter(&whole)
        .label_style(("sans-serif", 16))
        .draw()?;
    for &(label, points, color) in series {
        let color: RGBAColor = color.into();
        let style = color.stroke_width(2);
        chart
            .draw_series(LineSeries::new(points.iter().copied(), style))?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], style));
    }
    chart
        .configure_series_labels()
        .label_font(("sans-serif", 16))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(legend)
        .draw()?;
    root.present()?;
    Ok(())
}

/// Tokens/s above, the bubble (percent of the window) below.
fn throughput(path: &Path, name: &str, speed: &[(f64, f64)], bubble: &[(f64, f64)]) -> Drawn {
    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(&format!("{name}: throughput"), ("sans-serif", 26))?;
    let (upper, lower) = root.split_vertically(SIZE.1 / 2);
    for (area, points, desc, color) in [
        (&upper, speed, "tokens/s", BLUE),
        (&lower, bubble, "bubble (%)", MAGENTA),
    ] {
        let (x, y) = ranges(points.iter());
        let mut chart = ChartBuilder::on(area)
            .margin(16)
            .x_label_area_size(40)
            .y_label_area_size(90)
            .build_cartesian_2d(x, y)?;
        chart
            .configure_mesh()
            .x_desc("window")
            .y_desc(desc)
            .x_label_formatter(&whole)
            .y_label_formatter(&whole)
            .label_style(("sans-serif", 16))
            .draw()?;
        let style = color.stroke_width(2);
        chart.draw_series(LineSeries::new(points.iter().copied(), style))?;
    }
    root.present()?;
    Ok(())
}

/// Windows and tokens/s are whole numbers.
fn whole(v: &f64) -> String {
    format!("{v:.0}")
}

/// A green that reads on white.
const DARK_GREEN: RGBColor = RGBColor(0, 140, 60);

/// The points' window range and value range, the latter padded by 5% (and
/// widened when every value is the same).
fn ranges<'a>(
    points: impl Iterator<Item = &'a (f64, f64)>,
) -> (std::ops::Range<f64>, std::ops::Range<f64>) {
    let (mut x1, mut y0, mut y1) = (0.0f64, f64::INFINITY, f64::NEG_INFINITY);
    for &(x, y) in points.filter(|(_, y)| y.is_finite()) {
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if !y0.is_finite() {
        (y0, y1) = (0.0, 1.0);
    }
    let pad = match (y1 - y0) * 0.05 {
        p if p > 0.0 => p,
        _ => y0.abs().max(1.0) * 0.05,
    };
    (0.0..x1.max(1.0), (y0 - pad)..(y1 + pad))
}

fn draw_error(path: &Path) -> impl Fn(Box<dyn std::error::Error>) -> PlotError + '_ {
    move |e| PlotError::Draw {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

/// Registers the vendored font as plotters' "sans-serif", once.
fn register_font() -> Result<(), PlotError> {
    static FONT: OnceLock<Result<(), String>> = OnceLock::new();
    FONT.get_or_init(|| {
        let bytes = zstd::decode_all(FONT_ZST).map_err(|e| e.to_string())?;
        // plotters keeps fonts for the process's life.
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
            .map_err(|_| "not a font plotters can read".to_string())
    })
    .clone()
    .map_err(PlotError::Font)
}

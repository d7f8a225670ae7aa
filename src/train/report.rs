//! Reports of a run: the loss-curve PNG (plotters) and atomic JSON writing.

use crate::error::{Error, Result};
use crate::io::atomic::{write_atomic, write_atomic_with};
use crate::train::trainer::{Metrics, StepMetric};
use plotters::prelude::*;
use std::path::Path;

/// DejaVu Sans Mono (Bitstream Vera licence, data/fonts/LICENSE-DejaVu.txt), embedded so the
/// chart renders the same on every machine without system fonts.
static FONT: &[u8] = include_bytes!("../../data/fonts/DejaVuSansMono.ttf");

/// Makes the embedded font plotters' "sans-serif" (idempotent).
pub(crate) fn register_font() {
    // Registering twice is harmless; plotters keeps the first registration.
    let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
}

fn plot_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::format(path, format!("cannot draw chart: {e}"))
}

/// Draws the per-step training loss (and the eval losses before/after as markers) to a PNG of
/// 900x540 pixels, written atomically. Errors: no steps, or drawing/writing failed.
pub fn write_loss_png(path: &Path, metrics: &Metrics, title: &str) -> Result<()> {
    if metrics.steps.is_empty() {
        return Err(Error::arg("metrics", "no step to plot"));
    }
    register_font();
    write_atomic_with(path, |tmp| {
        let root = BitMapBackend::new(tmp, (900, 540)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| plot_err(path, e))?;
        let losses: Vec<(f64, f64)> = metrics
            .steps
            .iter()
            .map(|s| (s.step as f64 + 1.0, s.loss))
            .collect();
        let mut lo = losses.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
        let mut hi = losses.iter().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
        for e in [metrics.eval_loss_before, metrics.eval_loss_after]
            .into_iter()
            .flatten()
        {
            lo = lo.min(e);
            hi = hi.max(e);
        }
        let pad = ((hi - lo) * 0.08).max(1e-3);
        let n = losses.len() as f64;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..n + 1.0, (lo - pad)..(hi + pad))
            .map_err(|e| plot_err(path, e))?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc("loss (nats / target token)")
            .draw()
            .map_err(|e| plot_err(path, e))?;
        chart
            .draw_series(LineSeries::new(losses, &BLUE))
            .map_err(|e| plot_err(path, e))?
            .label("train loss (batch)")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
        let evals: Vec<(f64, f64)> = [
            metrics.eval_loss_before.map(|v| (0.0, v)),
            metrics.eval_loss_after.map(|v| (n, v)),
        ]
        .into_iter()
        .flatten()
        .collect();
        if !evals.is_empty() {
            chart
                .draw_series(evals.into_iter().map(|p| Circle::new(p, 6, RED.filled())))
                .map_err(|e| plot_err(path, e))?
                .label("eval loss (before, after)")
                .legend(|(x, y)| Circle::new((x + 10, y), 5, RED.filled()));
        }
        chart
            .configure_series_labels()
            .border_style(BLACK)
            .background_style(WHITE.mix(0.8))
            .draw()
            .map_err(|e| plot_err(path, e))?;
        root.present().map_err(|e| plot_err(path, e))
    })
}

/// Draws each of `keys` of the steps' [`StepMetric::logs`] (DPO's rewards and log-probabilities,
/// a reward model's accuracy) against the step, one panel per key in a grid of two columns, to
/// a PNG 900 pixels wide, written atomically. A key no step logged draws an empty panel.
/// Errors: no steps or keys, or drawing/writing failed.
pub fn write_logs_png(path: &Path, steps: &[StepMetric], keys: &[&str], title: &str) -> Result<()> {
    if steps.is_empty() || keys.is_empty() {
        return Err(Error::arg("metrics", "no step or no value to plot"));
    }
    register_font();
    let rows = keys.len().div_ceil(2);
    let height = 60 + 260 * rows as u32;
    write_atomic_with(path, |tmp| {
        let root = BitMapBackend::new(tmp, (900, height)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| plot_err(path, e))?;
        let root = root
            .titled(title, ("sans-serif", 22))
            .map_err(|e| plot_err(path, e))?;
        let n = steps.len() as f64;
        for (panel, key) in root.split_evenly((rows, 2)).iter().zip(keys) {
            let pts: Vec<(f64, f64)> = steps
                .iter()
                .filter_map(|s| s.logs.get(*key).map(|&v| (s.step as f64 + 1.0, v)))
                .collect();
            let lo = pts.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
            let hi = pts.iter().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
            let (lo, hi) = if lo.is_finite() { (lo, hi) } else { (0.0, 1.0) };
            let pad = ((hi - lo) * 0.08).max(1e-3);
            let mut chart = ChartBuilder::on(panel)
                .caption(*key, ("sans-serif", 16))
                .margin(8)
                .x_label_area_size(28)
                .y_label_area_size(60)
                .build_cartesian_2d(0.0..n + 1.0, (lo - pad)..(hi + pad))
                .map_err(|e| plot_err(path, e))?;
            chart
                .configure_mesh()
                .x_desc("step")
                .draw()
                .map_err(|e| plot_err(path, e))?;
            chart
                .draw_series(LineSeries::new(pts, &BLUE))
                .map_err(|e| plot_err(path, e))?;
        }
        root.present().map_err(|e| plot_err(path, e))
    })
}

/// Writes `value` as pretty-printed JSON to `path`, atomically. Errors: serialization or I/O.
pub fn write_json<T: serde::Serialize>(path: &Path, value: &T) -> Result<()> {
    let s = serde_json::to_string_pretty(value).map_err(|e| Error::Json {
        context: path.display().to_string(),
        msg: e.to_string(),
    })?;
    write_atomic(path, s.as_bytes())
}

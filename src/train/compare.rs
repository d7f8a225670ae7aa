//! The method-comparison table of `lorafuse compare`: one row per fine-tuning method, with
//! the columns the PEFT literature reports (trainable parameters, memory, speed, quality).

use crate::error::{Error, Result};
use crate::train::trainer::Metrics;
use plotters::prelude::*;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// One method's results.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CompareRow {
    pub method: String,
    pub trainable_params: usize,
    /// Trainable parameters as a percentage of the base model's.
    pub trainable_percent: f64,
    /// Peak resident memory of the whole run (bytes).
    pub peak_rss_bytes: Option<u64>,
    pub seconds_per_step_median: f64,
    pub eval_loss_before: Option<f64>,
    pub eval_loss_after: Option<f64>,
}

impl CompareRow {
    /// A row from a run's metrics; `base_params` is the model's parameter count.
    pub fn from_metrics(method: &str, m: &Metrics, base_params: usize) -> Self {
        CompareRow {
            method: method.to_string(),
            trainable_params: m.trainable_params,
            trainable_percent: 100.0 * m.trainable_params as f64 / base_params.max(1) as f64,
            peak_rss_bytes: m.peak_rss_bytes,
            seconds_per_step_median: m.seconds_per_step_median,
            eval_loss_before: m.eval_loss_before,
            eval_loss_after: m.eval_loss_after,
        }
    }
}

/// The table as aligned text (Markdown).
pub fn table(rows: &[CompareRow]) -> String {
    let mut s = String::from(
        "| method | trainable params | % of model | peak RSS (MiB) | s/step (median) | eval loss before | eval loss after | change |\n|---|---|---|---|---|---|---|---|\n",
    );
    let f = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.4}"));
    for r in rows {
        let change = match (r.eval_loss_before, r.eval_loss_after) {
            (Some(b), Some(a)) => format!("{:+.1}%", 100.0 * (a - b) / b),
            _ => "-".into(),
        };
        s.push_str(&format!(
            "| {} | {} | {:.3} | {} | {:.3} | {} | {} | {} |\n",
            r.method,
            r.trainable_params,
            r.trainable_percent,
            r.peak_rss_bytes
                .map_or("-".into(), |b| (b >> 20).to_string()),
            r.seconds_per_step_median,
            f(r.eval_loss_before),
            f(r.eval_loss_after),
            change
        ));
    }
    s
}

/// Draws two panels (eval loss after training; seconds per step) with one bar per method,
/// to a 1000x480 PNG, atomically.
pub fn write_compare_png(path: &Path, rows: &[CompareRow]) -> Result<()> {
    if rows.is_empty() {
        return Err(Error::arg("rows", "no method to plot"));
    }
    crate::train::report::register_font();
    let err = |e: &dyn std::fmt::Display| Error::format(path, format!("cannot draw chart: {e}"));
    crate::io::atomic::write_atomic_with(path, |tmp| {
        let root = BitMapBackend::new(tmp, (1000, 480)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(&e))?;
        let panels = root.split_evenly((1, 2));
        let n = rows.len();
        let names: Vec<String> = rows.iter().map(|r| r.method.clone()).collect();
        let series: [(&str, Vec<f64>); 2] = [
            (
                "eval loss after training (nats/token)",
                rows.iter()
                    .map(|r| r.eval_loss_after.unwrap_or(0.0))
                    .collect(),
            ),
            (
                "seconds per step (median)",
                rows.iter().map(|r| r.seconds_per_step_median).collect(),
            ),
        ];
        for (panel, (title, vals)) in panels.iter().zip(series.iter()) {
            let hi = vals.iter().cloned().fold(0.0f64, f64::max) * 1.15 + 1e-9;
            let mut chart = ChartBuilder::on(panel)
                .caption(*title, ("sans-serif", 18))
                .margin(10)
                .x_label_area_size(30)
                .y_label_area_size(50)
                .build_cartesian_2d((0..n).into_segmented(), 0.0..hi)
                .map_err(|e| err(&e))?;
            let labels = names.clone();
            chart
                .configure_mesh()
                .disable_x_mesh()
                .x_label_formatter(&move |v| match v {
                    SegmentValue::CenterOf(i) => labels.get(*i).cloned().unwrap_or_default(),
                    _ => String::new(),
                })
                .draw()
                .map_err(|e| err(&e))?;
            chart
                .draw_series(vals.iter().enumerate().map(|(i, &v)| {
                    let mut bar = Rectangle::new(
                        [
                            (SegmentValue::Exact(i), 0.0),
                            (SegmentValue::Exact(i + 1), v),
                        ],
                        Palette99::pick(i).filled(),
                    );
                    bar.set_margin(0, 0, 8, 8);
                    bar
                }))
                .map_err(|e| err(&e))?;
        }
        root.present().map_err(|e| err(&e))
    })
}

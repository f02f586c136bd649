//! The demo's HTML report: the metric tables before and after training, and for sample
//! queries the reference image, the modification text and the top-5 results, with the target
//! marked. Images are linked by paths relative to the report.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};

/// The ranked results of one query under one model.
#[derive(Debug, Clone)]
pub struct RankedQuery {
    /// Image paths relative to the report.
    pub reference: String,
    pub caption: String,
    pub target: String,
    /// Top results (relative paths), best first.
    pub top: Vec<String>,
}

/// A report section: a named model's metrics and ranked sample queries.
#[derive(Debug, Clone)]
pub struct ReportRun {
    pub title: String,
    pub metrics: Vec<(String, f64)>,
    pub queries: Vec<RankedQuery>,
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Writes the report. `runs` share their queries' order (query i is the same in each run).
pub fn write_report(path: &Path, title: &str, notes: &[String], runs: &[ReportRun]) -> Result<()> {
    let mut h = String::new();
    let _ = write!(
        h,
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>{t}</title><style>\
         body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}}\
         td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}\
         .q{{display:flex;gap:6px;align-items:flex-start;margin:4px 0}}\
         .q img{{width:112px;height:112px;border:4px solid transparent}}\
         .q img.target{{border-color:#1a9b2f}} .q .ref{{border-color:#888}}\
         .cap{{width:220px;font-size:14px}} .lbl{{width:110px;font-size:12px;color:#555}}\
         </style></head><body><h1>{t}</h1>",
        t = esc(title)
    );
    for n in notes {
        let _ = write!(h, "<p>{}</p>", esc(n));
    }
    // Metrics: one column per run.
    h.push_str("<h2>Validation metrics</h2><table><tr><th>metric</th>");
    for r in runs {
        let _ = write!(h, "<th>{}</th>", esc(&r.title));
    }
    h.push_str("</tr>");
    if let Some(first) = runs.first() {
        for (i, (k, _)) in first.metrics.iter().enumerate() {
            let _ = write!(h, "<tr><td style=\"text-align:left\">{}</td>", esc(k));
            for r in runs {
                let v = r
                    .metrics
                    .get(i)
                    .map_or(String::new(), |(_, v)| format!("{v:.2}"));
                let _ = write!(h, "<td>{v}</td>");
            }
            h.push_str("</tr>");
        }
    }
    h.push_str("</table>");
    let n = runs.iter().map(|r| r.queries.len()).min().unwrap_or(0);
    if n > 0 {
        h.push_str(
            "<h2>Sample queries</h2><p>Reference (grey frame), modification text, then the \
             top-5 of each model; the target has a green frame.</p>",
        );
    }
    for qi in 0..n {
        let q0 = &runs[0].queries[qi];
        let _ = write!(
            h,
            "<div class=\"q\"><img class=\"ref\" src=\"{}\" alt=\"reference\"><div class=\"cap\">\
             <b>{}</b></div></div>",
            esc(&q0.reference),
            esc(&q0.caption)
        );
        for r in runs {
            let q = &r.queries[qi];
            let _ = write!(
                h,
                "<div class=\"q\"><div class=\"lbl\">{}</div>",
                esc(&r.title)
            );
            for img in q.top.iter().take(5) {
                let class = if *img == q.target {
                    " class=\"target\""
                } else {
                    ""
                };
                let _ = write!(h, "<img{class} src=\"{}\" alt=\"result\">", esc(img));
            }
            if !q.top.iter().take(5).any(|t| *t == q.target) {
                let _ = write!(
                    h,
                    "<div class=\"lbl\">target not in top 5:</div><img class=\"target\" src=\"{}\" alt=\"target\">",
                    esc(&q.target)
                );
            }
            h.push_str("</div>");
        }
        h.push_str("<hr>");
    }
    h.push_str("</body></html>\n");
    crate::train::checkpoint::write_atomic(path, h.as_bytes())
        .with_context(|| format!("writing report {}", path.display()))
}

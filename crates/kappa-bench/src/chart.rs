//! A hand-written SVG line chart (no plotting dependency): panels side by side sharing a
//! logarithmic x axis, each with a linear y axis from 0 or a logarithmic one, one polyline per
//! series. Pure: numbers
//! in, SVG text out; `kappa-bench growth` writes it beside its tables.

use std::fmt::Write as _;

/// One line of a panel.
#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    /// (x, y) points; those with a non-finite or non-positive x, or a non-finite y, are left
    /// out (a figure that was not measured).
    pub points: Vec<(f64, f64)>,
    /// CSS colour of the line.
    pub color: &'static str,
    pub dashed: bool,
}

/// One chart of the figure.
#[derive(Debug, Clone)]
pub struct Panel {
    pub title: String,
    pub y_label: String,
    pub series: Vec<Series>,
    /// A logarithmic y axis (points with y <= 0 are left out) instead of a linear one from 0.
    pub log_y: bool,
}

const PANEL_W: f64 = 440.0;
const PANEL_H: f64 = 300.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 50.0;
const BOTTOM: f64 = 50.0;
const LEGEND_ROW: f64 = 18.0;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The smallest "nice" number (1, 2 or 5 times a power of ten) at or above `v`.
fn nice_ceil(v: f64) -> f64 {
    if !(v.is_finite() && v > 0.0) {
        return 1.0;
    }
    let p = 10f64.powf(v.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * p)
        .find(|c| *c >= v * (1.0 - 1e-9))
        .unwrap_or(10.0 * p)
}

/// A tick label: 1000 -> "1k", 2.5e6 -> "2.5M", 0.5 -> "0.5".
fn short_num(v: f64) -> String {
    let (d, suffix) = if v.abs() >= 1e6 {
        (v / 1e6, "M")
    } else if v.abs() >= 1e3 {
        (v / 1e3, "k")
    } else {
        (v, "")
    };
    let s = format!("{d:.1}");
    let s = s.strip_suffix(".0").unwrap_or(&s).to_string();
    format!("{s}{suffix}")
}

fn usable(p: &(f64, f64)) -> bool {
    p.0.is_finite() && p.0 > 0.0 && p.1.is_finite()
}

/// The figure: `panels` side by side over the log-x axis `x_label`, a legend under each.
pub fn line_chart_svg(title: &str, x_label: &str, panels: &[Panel]) -> String {
    let xs: Vec<f64> = panels
        .iter()
        .flat_map(|p| p.series.iter())
        .flat_map(|s| s.points.iter().filter(|p| usable(p)).map(|p| p.0))
        .collect();
    let (lo, hi) = xs
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &x| {
            (a.min(x), b.max(x))
        });
    let (lx0, mut lx1) = if lo.is_finite() {
        (lo.log10().floor(), hi.log10().ceil())
    } else {
        (0.0, 1.0)
    };
    if lx1 <= lx0 {
        lx1 = lx0 + 1.0;
    }
    let rows = panels.iter().map(|p| p.series.len()).max().unwrap_or(0) as f64;
    let width = PANEL_W * panels.len().max(1) as f64;
    let height = PANEL_H + rows * LEGEND_ROW + 10.0;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" viewBox="0 0 {width:.0} {height:.0}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        s,
        r#"<rect x="0" y="0" width="{width:.0}" height="{height:.0}" fill="white"/>"#
    );
    let _ = writeln!(
        s,
        r#"<text x="{:.0}" y="20" text-anchor="middle" font-size="14" font-weight="bold">{}</text>"#,
        width / 2.0,
        esc(title)
    );
    let (pw, ph) = (PANEL_W - LEFT - RIGHT, PANEL_H - TOP - BOTTOM);
    for (i, panel) in panels.iter().enumerate() {
        let ox = i as f64 * PANEL_W + LEFT;
        let ok = |p: &(f64, f64)| usable(p) && (!panel.log_y || p.1 > 0.0);
        let ys: Vec<f64> = panel
            .series
            .iter()
            .flat_map(|s| s.points.iter().filter(|p| ok(p)).map(|p| p.1))
            .collect();
        // Linear: 0 .. a nice ceiling, 5 ticks. Log: whole decades around the values.
        let (y0, y1) = if panel.log_y {
            let lo = ys.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = ys.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            if lo.is_finite() {
                let (a, b) = (lo.log10().floor(), hi.log10().ceil());
                (a, if b > a { b } else { a + 1.0 })
            } else {
                (0.0, 1.0)
            }
        } else {
            (0.0, nice_ceil(ys.iter().copied().fold(0.0, f64::max)))
        };
        let px = |x: f64| ox + (x.log10() - lx0) / (lx1 - lx0) * pw;
        let py = |y: f64| {
            let f = if panel.log_y {
                (y.log10() - y0) / (y1 - y0)
            } else {
                y.max(0.0) / y1
            };
            TOP + ph - f * ph
        };
        let yticks: Vec<f64> = if panel.log_y {
            let mut t = Vec::new();
            let mut e = y0;
            while e <= y1 + 1e-9 {
                t.push(10f64.powf(e));
                e += 1.0;
            }
            t
        } else {
            (0..=4).map(|k| y1 * f64::from(k) / 4.0).collect()
        };
        let _ = writeln!(s, r#"<g class="panel">"#);
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-weight="bold">{}</text>"#,
            ox + pw / 2.0,
            TOP - 12.0,
            esc(&panel.title)
        );
        // Axes, grid and ticks.
        let _ = writeln!(
            s,
            r##"<rect x="{ox:.1}" y="{TOP:.1}" width="{pw:.1}" height="{ph:.1}" fill="none" stroke="#333"/>"##
        );
        for &y in &yticks {
            let _ = writeln!(
                s,
                r##"<line x1="{ox:.1}" y1="{0:.1}" x2="{1:.1}" y2="{0:.1}" stroke="#ddd"/><text x="{2:.1}" y="{3:.1}" text-anchor="end">{4}</text>"##,
                py(y),
                ox + pw,
                ox - 6.0,
                py(y) + 4.0,
                short_num(y)
            );
        }
        let mut e = lx0;
        while e <= lx1 + 1e-9 {
            let x = ox + (e - lx0) / (lx1 - lx0) * pw;
            let _ = writeln!(
                s,
                r##"<line x1="{x:.1}" y1="{TOP:.1}" x2="{x:.1}" y2="{0:.1}" stroke="#ddd"/><text x="{x:.1}" y="{1:.1}" text-anchor="middle">{2}</text>"##,
                TOP + ph,
                TOP + ph + 16.0,
                short_num(10f64.powf(e))
            );
            e += 1.0;
        }
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            ox + pw / 2.0,
            TOP + ph + 34.0,
            esc(x_label)
        );
        let _ = writeln!(
            s,
            r#"<text x="{0:.1}" y="{1:.1}" text-anchor="middle" transform="rotate(-90 {0:.1} {1:.1})">{2}</text>"#,
            ox - 52.0,
            TOP + ph / 2.0,
            esc(&panel.y_label)
        );
        // Lines and the legend.
        for (j, series) in panel.series.iter().enumerate() {
            let pts: Vec<String> = series
                .points
                .iter()
                .filter(|p| ok(p))
                .map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y)))
                .collect();
            let dash = if series.dashed {
                r#" stroke-dasharray="6 4""#
            } else {
                ""
            };
            let name = esc(&series.name);
            let _ = writeln!(
                s,
                r#"<polyline class="series" data-name="{name}" fill="none" stroke="{}" stroke-width="2"{dash} points="{}"/>"#,
                series.color,
                pts.join(" ")
            );
            for p in &pts {
                if let Some((x, y)) = p.split_once(',') {
                    let _ = writeln!(
                        s,
                        r#"<circle cx="{x}" cy="{y}" r="3" fill="{}"/>"#,
                        series.color
                    );
                }
            }
            let ly = PANEL_H + j as f64 * LEGEND_ROW;
            let _ = writeln!(
                s,
                r#"<line x1="{ox:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{}" stroke-width="2"{dash}/><text x="{:.1}" y="{:.1}">{name}</text>"#,
                ox + 24.0,
                series.color,
                ox + 30.0,
                ly + 4.0
            );
        }
        let _ = writeln!(s, "</g>");
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny well-formedness check: every element opened is closed, in order, and the root
    /// is `svg`. Returns the element names seen.
    fn elements(svg: &str) -> Result<Vec<String>, String> {
        let mut stack: Vec<String> = Vec::new();
        let mut seen = Vec::new();
        let mut rest = svg;
        while let Some(i) = rest.find('<') {
            let j = rest[i..].find('>').ok_or("unterminated tag")? + i;
            let tag = &rest[i + 1..j];
            if let Some(name) = tag.strip_prefix('/') {
                match stack.pop() {
                    Some(open) if open == name.trim() => {}
                    other => return Err(format!("</{name}> closes {other:?}")),
                }
            } else {
                let name = tag
                    .split_whitespace()
                    .next()
                    .ok_or("empty tag")?
                    .trim_end_matches('/')
                    .to_string();
                if seen.is_empty() && name != "svg" {
                    return Err(format!("root is {name}"));
                }
                if !tag.ends_with('/') {
                    stack.push(name.clone());
                }
                seen.push(name);
            }
            if !tag.matches('"').count().is_multiple_of(2) {
                return Err(format!("unbalanced quotes in <{tag}>"));
            }
            rest = &rest[j + 1..];
        }
        if !stack.is_empty() {
            return Err(format!("unclosed {stack:?}"));
        }
        if !rest.trim().is_empty() {
            return Err("text after the root".into());
        }
        Ok(seen)
    }

    fn series(name: &str, points: Vec<(f64, f64)>) -> Series {
        Series {
            name: name.into(),
            points,
            color: "#1f77b4",
            dashed: false,
        }
    }

    #[test]
    fn chart_holds_every_series_and_is_well_formed() {
        let panels = vec![
            Panel {
                title: "throughput".into(),
                y_label: "readings/s".into(),
                series: vec![
                    series(
                        "`local`",
                        vec![(1e3, 80_000.0), (1e4, 70_000.0), (1e6, 30_000.0)],
                    ),
                    series("remote & <co>", vec![(1e3, 60_000.0), (1e6, 20_000.0)]),
                ],
                log_y: false,
            },
            Panel {
                title: "memory per sensor".into(),
                y_label: "bytes".into(),
                series: vec![Series {
                    dashed: true,
                    ..series(
                        "redis",
                        vec![(1e3, 30_000.0), (1e4, -5.0), (1e5, f64::NAN), (1e6, 250.0)],
                    )
                }],
                log_y: true,
            },
        ];
        let svg = line_chart_svg("Growth", "sensors (log)", &panels);
        let names = elements(&svg).expect("well-formed");
        assert_eq!(names.iter().filter(|n| *n == "polyline").count(), 3);
        assert!(svg.contains(r#"data-name="`local`""#));
        assert!(svg.contains("remote &amp; &lt;co&gt;"));
        assert!(svg.contains("stroke-dasharray"));
        // The not-measured point (and, on the log axis, the negative one) is left out, never
        // written as NaN.
        assert!(!svg.contains("NaN"));
        assert_eq!(svg.matches("<circle").count(), 3 + 2 + 2);
        // Log x from 10^3 to 10^6: the four decade ticks.
        for t in [">1k<", ">10k<", ">100k<", ">1M<"] {
            assert!(svg.contains(t), "tick {t}");
        }
        // Log y from 10^2 to 10^5 on the memory panel.
        for t in [">100<", ">100k<"] {
            assert!(svg.contains(t), "tick {t}");
        }
    }

    #[test]
    fn empty_chart_is_still_well_formed() {
        let svg = line_chart_svg("none", "x", &[]);
        assert!(elements(&svg).is_ok());
        let svg = line_chart_svg(
            "one",
            "x",
            &[Panel {
                title: "p".into(),
                y_label: "y".into(),
                series: vec![series("a", vec![])],
                log_y: true,
            }],
        );
        assert!(elements(&svg).is_ok());
    }

    #[test]
    fn ticks_are_nice() {
        assert_eq!(nice_ceil(73_000.0), 100_000.0);
        assert_eq!(nice_ceil(180.0), 200.0);
        assert_eq!(nice_ceil(4.1), 5.0);
        assert_eq!(short_num(2_500_000.0), "2.5M");
        assert_eq!(short_num(20_000.0), "20k");
        assert_eq!(short_num(0.5), "0.5");
    }
}

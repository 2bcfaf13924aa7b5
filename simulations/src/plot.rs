//! Nodes completed against time, one line per mode, T_min marked (SVG).

use std::path::Path;

use plotters::prelude::*;

/// Draws the completion curves to an SVG file.
pub fn completion_svg(
    path: &Path,
    title: &str,
    t_min: f64,
    nodes: usize,
    series: &[(String, Vec<f64>)],
) -> anyhow::Result<()> {
    let t_max = series
        .iter()
        .flat_map(|(_, v)| v.iter().copied())
        .fold(t_min, f64::max)
        * 1.05;
    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..t_max, 0f64..nodes as f64 + 0.5)?;
    chart
        .configure_mesh()
        .x_desc("seconds since the storm started")
        .y_desc("nodes with verified artifacts")
        .draw()?;
    let colors = [BLUE, RED, GREEN, MAGENTA, CYAN];
    for (i, (name, times)) in series.iter().enumerate() {
        let mut sorted = times.clone();
        sorted.sort_by(f64::total_cmp);
        let mut pts = vec![(0.0, 0.0)];
        for (k, t) in sorted.iter().enumerate() {
            pts.push((*t, k as f64));
            pts.push((*t, (k + 1) as f64));
        }
        let c = colors[i % colors.len()];
        chart
            .draw_series(LineSeries::new(pts, c.stroke_width(2)))?
            .label(name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
    }
    chart
        .draw_series(LineSeries::new(
            vec![(t_min, 0.0), (t_min, nodes as f64)],
            BLACK.stroke_width(1),
        ))?
        .label(format!("T_min = {t_min:.1} s"))
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK));
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()?;
    root.present()?;
    Ok(())
}

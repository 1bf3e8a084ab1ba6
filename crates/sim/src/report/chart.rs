//! PNG charts, drawn with `plotters` into an RGB buffer and encoded with
//! `png`.
//!
//! Text uses DejaVu Sans embedded in the binary (`assets/DejaVuSans.ttf`,
//! Bitstream Vera license, `assets/DejaVuSans-LICENSE.txt`) through
//! plotters' `ab_glyph` feature: its `ttf` feature would look fonts up with
//! fontconfig and freetype, which a fresh machine or a container may lack,
//! and a chart without text is no chart.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::backend::RGBPixel;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::group::{Group, TimeUnit, groups, pct1};
use super::{ReportError, RunResult};

static FONT: &[u8] = include_bytes!("../../assets/DejaVuSans.ttf");

/// The family every text style below names; plotters' `ab_glyph` font
/// table resolves it to [`FONT`].
const FAMILY: &str = "sans-serif";

/// Registers [`FONT`] once per process (plotters keeps a global table).
fn ensure_font() -> Result<(), ReportError> {
    static LOADED: OnceLock<bool> = OnceLock::new();
    let ok = *LOADED
        .get_or_init(|| plotters::style::register_font(FAMILY, FontStyle::Normal, FONT).is_ok());
    if ok { Ok(()) } else { Err(ReportError::Font) }
}

/// One color per policy, by its position in the group, the same in both
/// charts (the common ten-color categorical palette, chosen to keep
/// neighbouring bars apart).
const COLORS: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

fn color(i: usize) -> RGBColor {
    COLORS[i % COLORS.len()]
}

type Area<'a> = DrawingArea<BitMapBackend<'a, RGBPixel>, Shift>;
type DrawError =
    DrawingAreaErrorKind<<BitMapBackend<'static, RGBPixel> as DrawingBackend>::ErrorType>;

/// Per group, `<stem>-<workload>-<mode>-<pods>pods-hit-ttft.png` (hit rate
/// and TTFT p90 by policy, two panels) and `...-per-pod.png` (requests per
/// pod, one bar per policy in each pod's group). Creates `dir` if needed.
/// Stem, workload and mode are reduced to `[A-Za-z0-9._-]` in file names
/// (they come from the command line). Returns the paths written, in order.
pub fn write_charts(
    results: &[RunResult],
    dir: &Path,
    stem: &str,
) -> Result<Vec<PathBuf>, ReportError> {
    let gs = groups(results);
    if gs.is_empty() {
        return Ok(Vec::new());
    }
    ensure_font()?;
    fs::create_dir_all(dir).map_err(|source| ReportError::CreateDir {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut written = Vec::with_capacity(gs.len() * 2);
    for g in &gs {
        let base = format!(
            "{}-{}-{}-{}pods",
            safe(stem),
            safe(g.workload),
            safe(g.mode),
            g.pods
        );
        let hit_ttft = dir.join(format!("{base}-hit-ttft.png"));
        render(&hit_ttft, (1200, 540), |root| draw_hit_ttft(root, g))?;
        written.push(hit_ttft);

        let per_pod = dir.join(format!("{base}-per-pod.png"));
        let bars = g.pods.max(1) * g.results.len();
        let width = (160 + bars * 28).clamp(900, 2400) as u32;
        render(&per_pod, (width, 540), |root| draw_per_pod(root, g))?;
        written.push(per_pod);
    }
    Ok(written)
}

/// Keeps file names portable: anything but ASCII letters, digits, `.`, `_`
/// and `-` becomes `_`.
pub(crate) fn safe(s: &str) -> String {
    let out: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if out.is_empty() { "_".to_string() } else { out }
}

/// Draws into a white RGB buffer of `size`, then encodes it to `path`.
fn render(
    path: &Path,
    size: (u32, u32),
    draw: impl FnOnce(&Area<'_>) -> Result<(), DrawError>,
) -> Result<(), ReportError> {
    let draw_err = |e: DrawError| ReportError::Draw {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    let (w, h) = size;
    let mut buf = vec![255u8; w as usize * h as usize * 3];
    {
        let backend =
            BitMapBackend::<RGBPixel>::with_buffer_and_format(&mut buf, size).map_err(|e| {
                ReportError::Draw {
                    path: path.to_path_buf(),
                    message: e.to_string(),
                }
            })?;
        let root = backend.into_drawing_area();
        root.fill(&WHITE).map_err(draw_err)?;
        draw(&root).map_err(draw_err)?;
        root.present().map_err(draw_err)?;
    }
    let png_err = |source| ReportError::Png {
        path: path.to_path_buf(),
        source,
    };
    let mut bytes = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut bytes, w, h);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut writer = enc.write_header().map_err(png_err)?;
        writer.write_image_data(&buf).map_err(png_err)?;
        writer.finish().map_err(png_err)?;
    }
    fs::write(path, bytes).map_err(|source| ReportError::Write {
        path: path.to_path_buf(),
        source,
    })
}

/// Two panels: hit rate (%) and TTFT p90 by policy, values on the bars.
fn draw_hit_ttft(root: &Area<'_>, g: &Group<'_>) -> Result<(), DrawError> {
    let area = root.titled(&g.title(), (FAMILY, 26))?;
    let panels = area.split_evenly((1, 2));
    let names: Vec<&str> = g.results.iter().map(|r| r.policy.as_str()).collect();

    let hits: Vec<f64> = g.results.iter().map(|r| r.hit_rate() * 100.0).collect();
    let best_hit: Vec<bool> = g.results.iter().map(|r| g.is_best_hit(r)).collect();
    bar_panel(
        &panels[0],
        "Prefix-cache hit rate (tokens)",
        "hit rate (%)",
        &names,
        &hits,
        &best_hit,
        100.0,
        &|i| format!("{}%", pct1(g.results[i].hit_rate())),
    )?;

    let unit = TimeUnit::for_values(g.results.iter().map(|r| r.ttft.p90));
    let p90: Vec<f64> = g.results.iter().map(|r| unit.scale(r.ttft.p90)).collect();
    let best_p90: Vec<bool> = g.results.iter().map(|r| g.is_best_ttft_p90(r)).collect();
    let top = p90.iter().copied().fold(0.0, f64::max) * 1.18;
    bar_panel(
        &panels[1],
        "TTFT p90 (lower is better)",
        &format!("TTFT p90 ({})", unit.label()),
        &names,
        &p90,
        &best_p90,
        top,
        &|i| unit.format(g.results[i].ttft.p90),
    )?;
    Ok(())
}

/// Share of the per-pod plot's height left below the legend in the upper
/// right corner (about 20 px an entry and 34 px of frame and counts, of a
/// plot about 410 px high), so the tallest bar stays under it.
fn legend_free_share(entries: usize) -> f64 {
    let legend = (20.0 * entries as f64 + 34.0) / 410.0;
    1.0 - legend.min(0.6)
}

/// Tick labels without float noise: "100" not "100.0", "0.25" not
/// "0.250".
fn axis_number(v: &f64) -> String {
    let s = format!("{v:.3}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s == "-0" {
        "0".to_string()
    } else {
        s.to_string()
    }
}

/// Category labels under the x axis, centred on their bar or bar group.
fn name_style() -> TextStyle<'static> {
    TextStyle::from((FAMILY, 15).into_font())
        .color(&BLACK)
        .pos(Pos::new(HPos::Center, VPos::Top))
}

/// Vertical offset of the i-th category label: every other label drops a
/// line when any label is wider than its slot, so neighbours never overlap.
fn stagger(
    area: &Area<'_>,
    slot_px: i32,
    labels: impl Iterator<Item = String>,
) -> Result<impl Fn(usize) -> i32, DrawError> {
    let style = name_style();
    let mut widest = 0;
    for l in labels {
        widest = widest.max(area.estimate_text_size(&l, &style)?.0);
    }
    let crowded = i64::from(widest) + 6 > i64::from(slot_px);
    Ok(move |i: usize| if crowded && i % 2 == 1 { 18 } else { 0 })
}

/// One bar per policy with its value above it; the group's best bar is
/// outlined in black.
#[allow(clippy::too_many_arguments)] // one call site per panel; a struct would only rename them
fn bar_panel(
    area: &Area<'_>,
    caption: &str,
    y_desc: &str,
    names: &[&str],
    values: &[f64],
    best: &[bool],
    y_top: f64,
    label: &dyn Fn(usize) -> String,
) -> Result<(), DrawError> {
    let n = names.len();
    // A range of zero height cannot be mapped; all-zero values still draw.
    let y_top = if y_top > 0.0 { y_top } else { 1.0 };
    let mut chart = ChartBuilder::on(area)
        .caption(caption, (FAMILY, 20))
        .margin(14)
        .x_label_area_size(58)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..n as f64, 0f64..y_top)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .max_light_lines(1)
        .y_label_formatter(&axis_number)
        .y_desc(y_desc)
        .label_style((FAMILY, 15))
        .axis_desc_style((FAMILY, 16))
        .draw()?;
    // Category names under each bar: plotters' own tick labels sit at
    // round numbers of the axis, not at bar centres.
    let (bx, by) = area.get_base_pixel();
    let slot = chart.backend_coord(&(1.0, 0.0)).0 - chart.backend_coord(&(0.0, 0.0)).0;
    let drop = stagger(area, slot, names.iter().map(|n| n.to_string()))?;
    for (i, name) in names.iter().enumerate() {
        let (px, py) = chart.backend_coord(&(i as f64 + 0.5, 0.0));
        area.draw(&Text::new(
            name.to_string(),
            (px - bx, py - by + 8 + drop(i)),
            name_style(),
        ))?;
    }
    chart.draw_series(values.iter().enumerate().map(|(i, &v)| {
        let x = i as f64;
        Rectangle::new([(x + 0.18, 0.0), (x + 0.82, v)], color(i).filled())
    }))?;
    chart.draw_series(
        values
            .iter()
            .enumerate()
            .filter(|(i, _)| best.get(*i).copied().unwrap_or(false))
            .map(|(i, &v)| {
                let x = i as f64;
                Rectangle::new([(x + 0.18, 0.0), (x + 0.82, v)], BLACK.stroke_width(3))
            }),
    )?;
    let value_style = TextStyle::from((FAMILY, 15).into_font())
        .color(&BLACK)
        .pos(Pos::new(HPos::Center, VPos::Bottom));
    chart.draw_series(values.iter().enumerate().map(|(i, &v)| {
        let text = if best.get(i).copied().unwrap_or(false) {
            format!("{} (best)", label(i))
        } else {
            label(i)
        };
        Text::new(
            text,
            (i as f64 + 0.5, v + y_top * 0.01),
            value_style.clone(),
        )
    }))?;
    Ok(())
}

/// Requests per pod: for each pod, one bar per policy, with a legend. A
/// flat profile is an even spread; one tall bar is a hot spot.
fn draw_per_pod(root: &Area<'_>, g: &Group<'_>) -> Result<(), DrawError> {
    let pods = g
        .results
        .iter()
        .map(|r| r.per_pod_requests.len())
        .max()
        .unwrap_or(0);
    let pods = pods.max(g.pods).max(1);
    let m = g.results.len().max(1);
    let top = g
        .results
        .iter()
        .flat_map(|r| r.per_pod_requests.iter().copied())
        .max()
        .unwrap_or(0) as f64
        / legend_free_share(m);
    let top = if top > 0.0 { top } else { 1.0 };
    let mut chart = ChartBuilder::on(root)
        .caption(format!("Requests per pod: {}", g.title()), (FAMILY, 24))
        .margin(16)
        .x_label_area_size(58)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..pods as f64, 0f64..top)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .max_light_lines(1)
        .y_label_formatter(&axis_number)
        .y_desc("requests routed")
        .label_style((FAMILY, 15))
        .axis_desc_style((FAMILY, 16))
        .draw()?;
    let (bx, by) = root.get_base_pixel();
    let slot = chart.backend_coord(&(1.0, 0.0)).0 - chart.backend_coord(&(0.0, 0.0)).0;
    let drop = stagger(root, slot, (0..pods).map(|pod| format!("pod {pod}")))?;
    for pod in 0..pods {
        let (px, py) = chart.backend_coord(&(pod as f64 + 0.5, 0.0));
        root.draw(&Text::new(
            format!("pod {pod}"),
            (px - bx, py - by + 8 + drop(pod)),
            name_style(),
        ))?;
    }
    let slot = 0.8 / m as f64;
    // Counts above the bars while they stay legible (roughly 3 digits a bar).
    let with_counts = pods * m <= 40;
    let count_style = TextStyle::from((FAMILY, 13).into_font())
        .color(&BLACK)
        .pos(Pos::new(HPos::Center, VPos::Bottom));
    for (k, r) in g.results.iter().enumerate() {
        let c = color(k);
        let x0 = |pod: usize| pod as f64 + 0.1 + k as f64 * slot;
        chart
            .draw_series(r.per_pod_requests.iter().enumerate().map(|(pod, &n)| {
                Rectangle::new(
                    [(x0(pod), 0.0), (x0(pod) + slot * 0.92, n as f64)],
                    c.filled(),
                )
            }))?
            .label(r.policy.as_str())
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 14, y + 6)], c.filled()));
        if with_counts {
            chart.draw_series(r.per_pod_requests.iter().enumerate().map(|(pod, &n)| {
                Text::new(
                    n.to_string(),
                    (x0(pod) + slot * 0.46, n as f64 + top * 0.01),
                    count_style.clone(),
                )
            }))?;
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font((FAMILY, 15))
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::Quantiles;

    fn three_policies_four_pods() -> Vec<RunResult> {
        let run = |policy: &str, hits: u64, p90: f64, pods: Vec<u64>| RunResult {
            workload: "tenants".into(),
            mode: "sim".into(),
            pods: 4,
            policy: policy.into(),
            requests: pods.iter().sum(),
            query_tokens: 10_000,
            hit_tokens: hits,
            ttft: Quantiles {
                p50: p90 / 2.0,
                p90,
                p99: p90 * 1.5,
                mean: p90 / 2.0,
            },
            per_pod_requests: pods,
            ..RunResult::default()
        };
        vec![
            run("round-robin", 1_200, 2.0, vec![100, 100, 100, 100]),
            run("least-loaded", 1_500, 1.6, vec![90, 110, 95, 105]),
            run("kvroute", 8_740, 0.3, vec![130, 80, 100, 90]),
        ]
    }

    fn temp_dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "kvroute-sim-report-chart-{}-{name}",
            std::process::id()
        ));
        let _ = fs::remove_dir_all(&d);
        d
    }

    /// Decodes a PNG file: (width, height, RGB bytes).
    fn decode(path: &Path) -> (u32, u32, Vec<u8>) {
        let bytes = fs::read(path).expect("read png");
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "PNG signature");
        let mut reader = png::Decoder::new(std::io::Cursor::new(bytes))
            .read_info()
            .expect("png header");
        let mut buf = vec![0; reader.output_buffer_size().expect("buffer size")];
        let info = reader.next_frame(&mut buf).expect("png frame");
        assert_eq!(info.color_type, png::ColorType::Rgb);
        buf.truncate(info.buffer_size());
        (info.width, info.height, buf)
    }

    #[test]
    fn charts_are_valid_pngs_with_content() {
        let dir = temp_dir("ok").join("nested");
        let paths = write_charts(&three_policies_four_pods(), &dir, "run 1").expect("charts");
        let names: Vec<String> = paths
            .iter()
            .map(|p| p.file_name().expect("name").to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            vec![
                "run_1-tenants-sim-4pods-hit-ttft.png",
                "run_1-tenants-sim-4pods-per-pod.png"
            ]
        );
        let (w, h, rgb) = decode(&paths[0]);
        assert_eq!((w, h), (1200, 540));
        // kvroute's color (the third) fills its bar; round-robin's the first.
        let has = |rgb: &[u8], c: RGBColor| rgb.chunks(3).any(|p| p == [c.0, c.1, c.2]);
        for i in 0..3 {
            assert!(has(&rgb, color(i)), "bar of policy {i} drawn");
        }
        let (w, h, rgb) = decode(&paths[1]);
        // 4 pods x 3 policies = 12 bars: 160 + 12 * 28 = 496, clamped to 900.
        assert_eq!((w, h), (900, 540));
        for i in 0..3 {
            assert!(has(&rgb, color(i)), "series of policy {i} drawn");
        }
        // Text was rendered: anti-aliased glyph edges give grey pixels that
        // no flat fill uses.
        let grey = rgb
            .chunks(3)
            .filter(|p| p[0] == p[1] && p[1] == p[2] && p[0] > 40 && p[0] < 215)
            .count();
        assert!(grey > 500, "anti-aliased text pixels: {grey}");
        let _ = fs::remove_dir_all(dir.parent().expect("parent"));
    }

    #[test]
    fn crowded_labels_alternate_lines() {
        ensure_font().expect("font");
        let mut buf = vec![0u8; 200 * 100 * 3];
        let area = BitMapBackend::<RGBPixel>::with_buffer_and_format(&mut buf, (200, 100))
            .expect("buffer")
            .into_drawing_area();
        let labels = || ["round-robin".to_string(), "kvroute".to_string()].into_iter();
        // "round-robin" at 15 px is some 80 px wide: fits 120, not 40.
        let roomy = stagger(&area, 120, labels()).expect("roomy");
        assert_eq!((roomy(0), roomy(1)), (0, 0));
        let crowded = stagger(&area, 40, labels()).expect("crowded");
        assert_eq!((crowded(0), crowded(1), crowded(2)), (0, 18, 0));
    }

    #[test]
    fn unwritable_dir_is_an_error_naming_it() {
        let base = temp_dir("blocked");
        fs::create_dir_all(&base).expect("temp dir");
        let blocker = base.join("file");
        fs::write(&blocker, b"x").expect("blocker");
        let dir = blocker.join("charts");
        let err = write_charts(&three_policies_four_pods(), &dir, "s").expect_err("must fail");
        assert!(matches!(&err, ReportError::CreateDir { path, .. } if *path == dir));
        assert!(err.to_string().contains(&dir.display().to_string()));
        let _ = fs::remove_dir_all(&base);
    }

    #[test]
    fn zero_values_and_empty_input_draw_or_skip() {
        let dir = temp_dir("zeros");
        let mut rs = three_policies_four_pods();
        for r in &mut rs {
            r.hit_tokens = 0;
            r.ttft = Quantiles::default();
            r.per_pod_requests = vec![0; 4];
        }
        let paths = write_charts(&rs, &dir, "z").expect("all-zero charts draw");
        assert_eq!(paths.len(), 2);
        assert_eq!(decode(&paths[0]).0, 1200);
        assert!(write_charts(&[], &dir, "z").expect("empty").is_empty());
        assert_eq!(safe("a/b c"), "a_b_c");
        assert_eq!(safe(""), "_");
        assert_eq!(axis_number(&100.0), "100");
        assert_eq!(axis_number(&0.25), "0.25");
        assert_eq!(axis_number(&0.0), "0");
        let _ = fs::remove_dir_all(&dir);
    }
}

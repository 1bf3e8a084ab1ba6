//! Everything at once: CSV, Markdown and the charts of a run set, under one
//! directory and one file-name stem, so a demo or CI job has a single call
//! and a single list of artefacts to keep.

use std::fs;
use std::path::{Path, PathBuf};

use super::chart::safe;
use super::{ReportError, RunResult, markdown, write_charts, write_csv};

/// The files [`write_all`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    /// `<dir>/<stem>.csv`
    pub csv: PathBuf,
    /// `<dir>/<stem>.md`
    pub markdown: PathBuf,
    /// Two PNGs per (workload, mode, pods) group (see [`write_charts`]).
    pub charts: Vec<PathBuf>,
}

/// Writes `<stem>.csv`, `<stem>.md` and the charts into `dir`, creating it.
/// The stem is reduced to `[A-Za-z0-9._-]` as in the chart names, so every
/// file lands in `dir` whatever the stem holds.
pub fn write_all(results: &[RunResult], dir: &Path, stem: &str) -> Result<Written, ReportError> {
    fs::create_dir_all(dir).map_err(|source| ReportError::CreateDir {
        path: dir.to_path_buf(),
        source,
    })?;
    let stem = safe(stem);
    let csv = dir.join(format!("{stem}.csv"));
    write_csv(results, &csv)?;
    let md = dir.join(format!("{stem}.md"));
    fs::write(&md, markdown(results)).map_err(|source| ReportError::Write {
        path: md.clone(),
        source,
    })?;
    let charts = write_charts(results, dir, &stem)?;
    Ok(Written {
        csv,
        markdown: md,
        charts,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::csv_string;

    fn results() -> Vec<RunResult> {
        ["round-robin", "kvroute"]
            .iter()
            .enumerate()
            .map(|(i, p)| RunResult {
                workload: "mooncake".into(),
                mode: "sim".into(),
                pods: 2,
                policy: (*p).into(),
                requests: 10,
                query_tokens: 100,
                hit_tokens: 10 + 60 * i as u64,
                per_pod_requests: vec![5 + i as u64, 5 - i as u64],
                ..RunResult::default()
            })
            .collect()
    }

    #[test]
    fn writes_every_artefact() {
        let dir =
            std::env::temp_dir().join(format!("kvroute-sim-report-all-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let rs = results();
        let w = write_all(&rs, &dir, "bench").expect("write all");
        let odd = write_all(&rs, &dir, "a/b").expect("odd stem");
        assert_eq!(odd.csv, dir.join("a_b.csv"));
        assert_eq!(w.csv, dir.join("bench.csv"));
        assert_eq!(w.markdown, dir.join("bench.md"));
        assert_eq!(
            w.charts,
            vec![
                dir.join("bench-mooncake-sim-2pods-hit-ttft.png"),
                dir.join("bench-mooncake-sim-2pods-per-pod.png"),
            ]
        );
        assert_eq!(fs::read_to_string(&w.csv).expect("csv"), csv_string(&rs));
        assert_eq!(fs::read_to_string(&w.markdown).expect("md"), markdown(&rs));
        for c in &w.charts {
            let bytes = fs::read(c).expect("chart");
            assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        }
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn unwritable_dir_names_the_path() {
        let base = std::env::temp_dir().join(format!(
            "kvroute-sim-report-all-blocked-{}",
            std::process::id()
        ));
        let _ = fs::remove_dir_all(&base);
        fs::create_dir_all(&base).expect("base");
        let file = base.join("plain-file");
        fs::write(&file, b"x").expect("file");
        let dir = file.join("out");
        let err = write_all(&results(), &dir, "s").expect_err("must fail");
        assert!(
            err.to_string().contains(&dir.display().to_string()),
            "{err}"
        );
        let _ = fs::remove_dir_all(&base);
    }
}

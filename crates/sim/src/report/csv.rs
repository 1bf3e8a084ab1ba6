//! CSV: one row per run with every field of [`RunResult`], in base units
//! (seconds, shares in 0..1) and full precision, for spreadsheets and
//! scripts. Derived values (hit rate, throughput, max/mean) are included so
//! a reader need not recompute them, but the raw counters are there too.
//!
//! RFC 4180: comma-separated, CRLF-free (`\n`) lines, fields quoted only
//! when they hold a comma, a quote or a line break. Floats use Rust's
//! shortest round-trip form, so parsing a cell gives back the exact `f64`.

use std::fs;
use std::path::Path;

use super::{Quantiles, ReportError, RunResult};

/// The header row, in column order.
pub const CSV_COLUMNS: [&str; 33] = [
    "workload",
    "mode",
    "pods",
    "policy",
    "requests",
    "query_tokens",
    "hit_tokens",
    "hit_rate",
    "ttft_p50_s",
    "ttft_p90_s",
    "ttft_p99_s",
    "ttft_mean_s",
    "e2e_p50_s",
    "e2e_p90_s",
    "e2e_p99_s",
    "e2e_mean_s",
    "makespan_s",
    "output_tokens",
    "throughput_tok_s",
    "per_pod_requests",
    "max_mean_share",
    "preemptions",
    "decision_p50_s",
    "decision_p90_s",
    "decision_p99_s",
    "decision_mean_s",
    "fidelity_lookups",
    "stale_lookup_share",
    "missed_block_share",
    "ingest_lag_p50_s",
    "ingest_lag_p90_s",
    "ingest_lag_p99_s",
    "ingest_lag_mean_s",
];

/// The CSV text of `results`: the header row, then one row per run in input
/// order. Per-pod counts are one `;`-joined cell (`12;30;7`); the fidelity
/// cells are empty when the run has none (sim mode).
pub fn csv_string(results: &[RunResult]) -> String {
    let mut out = CSV_COLUMNS.join(",");
    out.push('\n');
    for r in results {
        let row = row(r);
        debug_assert_eq!(row.len(), CSV_COLUMNS.len());
        let cells: Vec<String> = row.iter().map(|c| quote(c)).collect();
        out.push_str(&cells.join(","));
        out.push('\n');
    }
    out
}

/// Writes [`csv_string`] to `path` (the parent directory must exist).
pub fn write_csv(results: &[RunResult], path: &Path) -> Result<(), ReportError> {
    fs::write(path, csv_string(results)).map_err(|source| ReportError::Write {
        path: path.to_path_buf(),
        source,
    })
}

fn quantiles(q: &Quantiles) -> [String; 4] {
    [q.p50, q.p90, q.p99, q.mean].map(|v| v.to_string())
}

fn row(r: &RunResult) -> Vec<String> {
    let mut cells = vec![
        r.workload.clone(),
        r.mode.clone(),
        r.pods.to_string(),
        r.policy.clone(),
        r.requests.to_string(),
        r.query_tokens.to_string(),
        r.hit_tokens.to_string(),
        r.hit_rate().to_string(),
    ];
    cells.extend(quantiles(&r.ttft));
    cells.extend(quantiles(&r.e2e));
    cells.extend([
        r.makespan_s.to_string(),
        r.output_tokens.to_string(),
        r.throughput_tok_s().to_string(),
        r.per_pod_requests
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(";"),
        r.max_mean_share().to_string(),
        r.preemptions.to_string(),
    ]);
    cells.extend(quantiles(&r.decision));
    match &r.fidelity {
        Some(f) => {
            cells.extend([
                f.lookups.to_string(),
                f.stale_lookup_share.to_string(),
                f.missed_block_share.to_string(),
            ]);
            cells.extend(quantiles(&f.ingest_lag));
        }
        None => cells.extend((0..7).map(|_| String::new())),
    }
    cells
}

/// RFC 4180 quoting, only where needed.
fn quote(cell: &str) -> String {
    if cell.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", cell.replace('"', "\"\""))
    } else {
        cell.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::Fidelity;
    use std::collections::HashMap;

    /// A minimal RFC 4180 reader (quoted fields, doubled quotes), written
    /// independently of the writer to read its output back.
    fn parse(text: &str) -> Vec<Vec<String>> {
        let mut rows = Vec::new();
        let mut row = Vec::new();
        let mut field = String::new();
        let mut quoted = false;
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            match (quoted, c) {
                (true, '"') if chars.peek() == Some(&'"') => {
                    chars.next();
                    field.push('"');
                }
                (true, '"') => quoted = false,
                (true, c) => field.push(c),
                (false, '"') => quoted = true,
                (false, ',') => row.push(std::mem::take(&mut field)),
                (false, '\n') => {
                    row.push(std::mem::take(&mut field));
                    rows.push(std::mem::take(&mut row));
                }
                (false, c) => field.push(c),
            }
        }
        assert!(field.is_empty() && row.is_empty(), "no trailing newline");
        rows
    }

    fn sample() -> Vec<RunResult> {
        let q = |p50, p90, p99, mean| Quantiles {
            p50,
            p90,
            p99,
            mean,
        };
        vec![
            RunResult {
                workload: "mooncake".into(),
                mode: "live".into(),
                pods: 3,
                policy: "kvroute, \"exact\"".into(),
                requests: 30,
                query_tokens: 4000,
                hit_tokens: 1000,
                ttft: q(0.1, 0.2, 0.3, 0.15),
                e2e: q(1.5, 2.5, 3.5, 1.75),
                makespan_s: 8.0,
                output_tokens: 1000,
                per_pod_requests: vec![12, 10, 8],
                preemptions: 2,
                decision: q(1e-5, 2e-5, 3e-5, 1.2e-5),
                fidelity: Some(Fidelity {
                    lookups: 500,
                    stale_lookup_share: 0.01,
                    missed_block_share: 0.002,
                    ingest_lag: q(0.004, 0.005, 0.009, 0.0045),
                }),
            },
            RunResult {
                workload: "mooncake".into(),
                mode: "sim".into(),
                pods: 3,
                policy: "round-robin".into(),
                requests: 30,
                per_pod_requests: vec![10, 10, 10],
                ..RunResult::default()
            },
        ]
    }

    fn temp_dir(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!(
            "kvroute-sim-report-csv-{}-{name}",
            std::process::id()
        ));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).expect("create temp dir");
        d
    }

    #[test]
    fn written_csv_parses_back_to_the_values() {
        let dir = temp_dir("roundtrip");
        let path = dir.join("out.csv");
        write_csv(&sample(), &path).expect("write csv");
        let rows = parse(&fs::read_to_string(&path).expect("read back"));
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[0], CSV_COLUMNS.map(String::from).to_vec());
        let at = |row: usize| -> HashMap<&str, &str> {
            CSV_COLUMNS
                .iter()
                .copied()
                .zip(rows[row].iter().map(String::as_str))
                .collect()
        };
        let live = at(1);
        assert_eq!(live["policy"], "kvroute, \"exact\"");
        assert_eq!(live["pods"], "3");
        assert_eq!(live["hit_rate"].parse::<f64>().ok(), Some(0.25));
        assert_eq!(live["ttft_p90_s"].parse::<f64>().ok(), Some(0.2));
        assert_eq!(live["e2e_mean_s"].parse::<f64>().ok(), Some(1.75));
        assert_eq!(live["throughput_tok_s"].parse::<f64>().ok(), Some(125.0));
        assert_eq!(live["per_pod_requests"], "12;10;8");
        // 12 * 3 / 30
        assert_eq!(live["max_mean_share"].parse::<f64>().ok(), Some(1.2));
        assert_eq!(live["decision_mean_s"].parse::<f64>().ok(), Some(1.2e-5));
        assert_eq!(live["fidelity_lookups"], "500");
        assert_eq!(live["stale_lookup_share"].parse::<f64>().ok(), Some(0.01));
        assert_eq!(live["ingest_lag_p99_s"].parse::<f64>().ok(), Some(0.009));

        let sim = at(2);
        assert_eq!(sim["mode"], "sim");
        assert_eq!(sim["hit_rate"], "0");
        assert_eq!(sim["per_pod_requests"], "10;10;10");
        for col in &CSV_COLUMNS[26..] {
            assert_eq!(sim[col], "", "{col} is empty without fidelity");
        }
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn unwritable_path_is_an_error_naming_it() {
        let dir = temp_dir("unwritable");
        // A regular file where a directory should be: fails even as root.
        let blocker = dir.join("not-a-dir");
        fs::write(&blocker, b"x").expect("write blocker");
        let path = blocker.join("out.csv");
        let err = write_csv(&sample(), &path).expect_err("must fail");
        assert!(matches!(&err, ReportError::Write { path: p, .. } if *p == path));
        assert!(err.to_string().contains(&path.display().to_string()));
        let _ = fs::remove_dir_all(&dir);
    }
}

//! The comparison table, rendered for the terminal (aligned columns) and
//! as GitHub Markdown. Both come from one cell model so the two never
//! disagree on a number or on which run is marked best.

use super::RunResult;
use super::group::{Group, TimeUnit, groups, micros, millis, pct1, pct2, ratio};

/// One cell: its text and whether it is the group's best value in a
/// column that is marked (hit rate, TTFT p90).
struct Cell {
    text: String,
    best: bool,
}

impl Cell {
    fn plain(text: String) -> Cell {
        Cell { text, best: false }
    }
}

/// One group's table.
struct Table {
    headers: Vec<&'static str>,
    rows: Vec<Vec<Cell>>,
}

/// Columns of every group; the fidelity columns follow only when a run of
/// the group has fidelity (live mode).
const HEADERS: [&str; 12] = [
    "policy",
    "requests",
    "hit %",
    "TTFT p50",
    "TTFT p90",
    "TTFT p99",
    "e2e p50",
    "tok/s",
    "max/mean",
    "preempt",
    "dec p50 µs",
    "dec p99 µs",
];
const FIDELITY_HEADERS: [&str; 4] = ["stale %", "missed %", "lag p50 ms", "lag p99 ms"];

fn table(g: &Group<'_>) -> Table {
    let unit = |f: fn(&RunResult) -> f64| TimeUnit::for_values(g.results.iter().map(|r| f(r)));
    let ttft50 = unit(|r| r.ttft.p50);
    let ttft90 = unit(|r| r.ttft.p90);
    let ttft99 = unit(|r| r.ttft.p99);
    let e2e50 = unit(|r| r.e2e.p50);
    let fidelity = g.has_fidelity();

    let mut headers = HEADERS.to_vec();
    if fidelity {
        headers.extend(FIDELITY_HEADERS);
    }
    let rows = g
        .results
        .iter()
        .map(|r| {
            let mut row = vec![
                Cell::plain(r.policy.clone()),
                Cell::plain(r.requests.to_string()),
                Cell {
                    text: pct1(r.hit_rate()),
                    best: g.is_best_hit(r),
                },
                Cell::plain(ttft50.format(r.ttft.p50)),
                Cell {
                    text: ttft90.format(r.ttft.p90),
                    best: g.is_best_ttft_p90(r),
                },
                Cell::plain(ttft99.format(r.ttft.p99)),
                Cell::plain(e2e50.format(r.e2e.p50)),
                Cell::plain(format!("{:.1}", r.throughput_tok_s())),
                Cell::plain(ratio(r.max_mean_share())),
                Cell::plain(r.preemptions.to_string()),
                Cell::plain(micros(r.decision.p50)),
                Cell::plain(micros(r.decision.p99)),
            ];
            if fidelity {
                match &r.fidelity {
                    Some(f) => row.extend([
                        Cell::plain(pct2(f.stale_lookup_share)),
                        Cell::plain(pct2(f.missed_block_share)),
                        Cell::plain(millis(f.ingest_lag.p50)),
                        Cell::plain(millis(f.ingest_lag.p99)),
                    ]),
                    None => {
                        row.extend((0..FIDELITY_HEADERS.len()).map(|_| Cell::plain("-".into())))
                    }
                }
            }
            row
        })
        .collect();
    Table { headers, rows }
}

/// The terminal rendering: one block per group (a title line, a header, a
/// rule, one line per policy), the policy column left-aligned and numbers
/// right-aligned. Best values carry a `*`; every other cell of a marked
/// column carries a space in its place so the digits stay aligned.
pub fn terminal_table(results: &[RunResult]) -> String {
    let gs = groups(results);
    if gs.is_empty() {
        return "no results\n".to_string();
    }
    let mut out = String::new();
    for (i, g) in gs.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        out.push_str(&g.title());
        out.push('\n');
        let t = table(g);
        let marked = [2usize, 4];
        let texts: Vec<Vec<String>> = t
            .rows
            .iter()
            .map(|row| {
                row.iter()
                    .enumerate()
                    .map(|(c, cell)| {
                        if marked.contains(&c) {
                            format!("{}{}", cell.text, if cell.best { '*' } else { ' ' })
                        } else {
                            cell.text.clone()
                        }
                    })
                    .collect()
            })
            .collect();
        let widths: Vec<usize> = t
            .headers
            .iter()
            .enumerate()
            .map(|(c, h)| {
                texts
                    .iter()
                    .map(|row| row[c].chars().count())
                    .chain([h.chars().count()])
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let line = |cells: &mut dyn Iterator<Item = String>| -> String {
            let parts: Vec<String> = cells
                .zip(&widths)
                .enumerate()
                .map(|(c, (s, &w))| {
                    if c == 0 {
                        format!("{s:<w$}")
                    } else {
                        format!("{s:>w$}")
                    }
                })
                .collect();
            let mut l = parts.join("  ");
            l.truncate(l.trim_end().len());
            l.push('\n');
            l
        };
        out.push_str(&line(&mut t.headers.iter().map(|h| h.to_string())));
        out.push_str(&line(&mut widths.iter().map(|&w| "-".repeat(w))));
        for row in texts {
            out.push_str(&line(&mut row.into_iter()));
        }
    }
    out.push_str("\n* best hit rate / best TTFT p90 of the group\n");
    out
}

/// GitHub Markdown: a `###` heading per group, then its table (numbers
/// right-aligned), best values in bold. Bold, not `*`: two trailing `*` on
/// one row would turn the text between them italic.
pub fn markdown(results: &[RunResult]) -> String {
    let gs = groups(results);
    if gs.is_empty() {
        return "_No results._\n".to_string();
    }
    let mut out = String::new();
    for g in &gs {
        let t = table(g);
        out.push_str(&format!("### {}\n\n", escape_md(&g.title())));
        out.push_str(&format!("| {} |\n", t.headers.join(" | ")));
        let rule: Vec<&str> = (0..t.headers.len())
            .map(|c| if c == 0 { ":---" } else { "---:" })
            .collect();
        out.push_str(&format!("| {} |\n", rule.join(" | ")));
        for row in &t.rows {
            let cells: Vec<String> = row
                .iter()
                .map(|cell| {
                    let text = escape_md(&cell.text);
                    if cell.best {
                        format!("**{text}**")
                    } else {
                        text
                    }
                })
                .collect();
            out.push_str(&format!("| {} |\n", cells.join(" | ")));
        }
        out.push('\n');
    }
    out.push_str("Bold: the best hit rate and the best TTFT p90 of each group.\n");
    out
}

/// Escapes what would break a table row or start markup inside a cell
/// (policy and workload names come from the command line).
fn escape_md(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for ch in s.chars() {
        if matches!(ch, '|' | '*' | '_' | '`' | '\\' | '[' | ']' | '<' | '>') {
            out.push('\\');
        }
        out.push(ch);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::{Fidelity, Quantiles};

    fn q(p50: f64, p90: f64, p99: f64) -> Quantiles {
        Quantiles {
            p50,
            p90,
            p99,
            mean: p50,
        }
    }

    /// Two policies on one group: round-robin loses on both marked columns.
    fn two() -> Vec<RunResult> {
        vec![
            RunResult {
                workload: "tenants".into(),
                mode: "sim".into(),
                pods: 2,
                policy: "round-robin".into(),
                requests: 100,
                query_tokens: 10_000,
                hit_tokens: 1_200,
                ttft: q(0.8, 2.0, 3.5),
                e2e: q(4.0, 6.0, 8.0),
                makespan_s: 50.0,
                output_tokens: 20_000,
                per_pod_requests: vec![50, 50],
                preemptions: 3,
                decision: q(0.000_001, 0.000_002, 0.000_004),
                fidelity: None,
            },
            RunResult {
                workload: "tenants".into(),
                mode: "sim".into(),
                pods: 2,
                policy: "kvroute".into(),
                requests: 100,
                query_tokens: 10_000,
                hit_tokens: 8_740,
                ttft: q(0.12, 0.3, 0.9),
                e2e: q(3.0, 5.0, 7.0),
                makespan_s: 40.0,
                output_tokens: 20_000,
                per_pod_requests: vec![55, 45],
                preemptions: 0,
                decision: q(0.000_012_5, 0.000_030, 0.000_050),
                fidelity: None,
            },
        ]
    }

    #[test]
    fn markdown_is_exact() {
        let md = markdown(&two());
        let expected = "\
### tenants, sim mode, 2 pods

| policy | requests | hit % | TTFT p50 | TTFT p90 | TTFT p99 | e2e p50 | tok/s | max/mean | preempt | dec p50 µs | dec p99 µs |
| :--- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |
| round-robin | 100 | 12.0 | 800.0 ms | 2.00 s | 3.50 s | 4.00 s | 400.0 | 1.00x | 3 | 1.0 | 4.0 |
| kvroute | 100 | **87.4** | 120.0 ms | **0.30 s** | 0.90 s | 3.00 s | 500.0 | 1.10x | 0 | 12.5 | 50.0 |

Bold: the best hit rate and the best TTFT p90 of each group.
";
        assert_eq!(md, expected);
    }

    #[test]
    fn markdown_shows_fidelity_and_escapes_names() {
        let mut rs = two();
        for r in &mut rs {
            r.mode = "live".into();
        }
        rs[0].policy = "a|b".into();
        rs[1].fidelity = Some(Fidelity {
            lookups: 1000,
            stale_lookup_share: 0.0125,
            missed_block_share: 0.003,
            ingest_lag: q(0.004, 0.006, 0.0215),
        });
        let md = markdown(&rs);
        let lines: Vec<&str> = md.lines().collect();
        assert_eq!(lines[0], "### tenants, live mode, 2 pods");
        assert!(lines[2].ends_with("| stale % | missed % | lag p50 ms | lag p99 ms |"));
        assert!(lines[4].starts_with("| a\\|b | 100 |"), "{}", lines[4]);
        assert!(lines[4].ends_with("| - | - | - | - |"), "{}", lines[4]);
        assert!(
            lines[5].ends_with("| 1.25 | 0.30 | 4.0 | 21.5 |"),
            "{}",
            lines[5]
        );
    }

    #[test]
    fn terminal_table_aligns_and_marks_best() {
        let out = terminal_table(&two());
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], "tenants, sim mode, 2 pods");
        assert!(
            lines[1].starts_with("policy       requests  hit %"),
            "{}",
            lines[1]
        );
        assert!(
            lines[2].starts_with("-----------  --------  -----"),
            "{}",
            lines[2]
        );
        // Same width for every line of the block (right-aligned last column).
        let width = lines[1].chars().count();
        for l in &lines[2..5] {
            assert_eq!(l.chars().count(), width, "{l:?}");
        }
        let rr = lines[3];
        let kv = lines[4];
        assert!(rr.starts_with("round-robin       100  12.0 "), "{rr}");
        assert!(kv.starts_with("kvroute           100  87.4*"), "{kv}");
        assert!(rr.contains(" 2.00 s "), "{rr}");
        assert!(kv.contains(" 0.30 s*"), "{kv}");
        assert!(kv.contains(" 120.0 ms "), "{kv}");
        assert!(kv.contains(" 500.0 "), "{kv}");
        assert!(kv.contains(" 1.10x "), "{kv}");
        assert!(kv.ends_with(" 12.5        50.0"), "{kv}");
        assert_eq!(out.matches('*').count(), 3, "two marks and the legend");
        assert!(out.ends_with("\n* best hit rate / best TTFT p90 of the group\n"));
    }

    #[test]
    fn terminal_table_separates_groups() {
        let mut rs = two();
        rs[1].pods = 4;
        let out = terminal_table(&rs);
        assert!(out.starts_with("tenants, sim mode, 2 pods\n"));
        assert!(out.contains("\n\ntenants, sim mode, 4 pods\n"));
        // Alone in its group, each run is its group's best.
        assert!(out.contains("12.0*"));
        assert!(out.contains("87.4*"));
        assert_eq!(terminal_table(&[]), "no results\n");
    }
}

//! Grouping of results by (workload, mode, pods) and the number formats the
//! renderings share, so the terminal, Markdown and charts agree digit for
//! digit.

use super::RunResult;

/// Results of one (workload, mode, pods) combination, in input order: only
/// runs of the same workload on the same fleet are comparable, so every
/// rendering compares within a group and never across.
#[derive(Debug)]
pub(crate) struct Group<'a> {
    pub workload: &'a str,
    pub mode: &'a str,
    pub pods: usize,
    pub results: Vec<&'a RunResult>,
}

impl Group<'_> {
    /// The heading every rendering uses for the group.
    pub fn title(&self) -> String {
        format!("{}, {} mode, {} pods", self.workload, self.mode, self.pods)
    }

    /// Whether `r` has the group's best (highest) hit rate; ties all win.
    pub fn is_best_hit(&self, r: &RunResult) -> bool {
        let best = self
            .results
            .iter()
            .map(|r| r.hit_rate())
            .fold(f64::NEG_INFINITY, f64::max);
        r.hit_rate() == best
    }

    /// Whether `r` has the group's best (lowest) TTFT p90. Runs that
    /// completed no request have no TTFT at all (their zero is not fast),
    /// so they neither win nor count.
    pub fn is_best_ttft_p90(&self, r: &RunResult) -> bool {
        if r.requests == 0 {
            return false;
        }
        let best = self
            .results
            .iter()
            .filter(|r| r.requests > 0)
            .map(|r| r.ttft.p90)
            .fold(f64::INFINITY, f64::min);
        r.ttft.p90 == best
    }

    /// Whether any run of the group carries live-mode fidelity numbers (the
    /// fidelity columns are shown for the whole group then).
    pub fn has_fidelity(&self) -> bool {
        self.results.iter().any(|r| r.fidelity.is_some())
    }
}

/// Groups `results` by (workload, mode, pods), groups in order of first
/// appearance and results in input order within each.
pub(crate) fn groups(results: &[RunResult]) -> Vec<Group<'_>> {
    let mut out: Vec<Group<'_>> = Vec::new();
    for r in results {
        let existing = out
            .iter_mut()
            .find(|g| g.workload == r.workload && g.mode == r.mode && g.pods == r.pods);
        match existing {
            Some(g) => g.results.push(r),
            None => out.push(Group {
                workload: &r.workload,
                mode: &r.mode,
                pods: r.pods,
                results: vec![r],
            }),
        }
    }
    out
}

/// Unit of a latency column: one unit per column and group so values read
/// against each other without converting (812.0 ms next to 1.20 s is easy
/// to misread).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TimeUnit {
    Ms,
    S,
}

impl TimeUnit {
    /// Seconds once any value reaches a second, milliseconds below.
    pub fn for_values(seconds: impl IntoIterator<Item = f64>) -> TimeUnit {
        if seconds.into_iter().any(|s| s >= 1.0) {
            TimeUnit::S
        } else {
            TimeUnit::Ms
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            TimeUnit::Ms => "ms",
            TimeUnit::S => "s",
        }
    }

    /// `seconds` in this unit, as a plain number (charts' axes).
    pub fn scale(self, seconds: f64) -> f64 {
        match self {
            TimeUnit::Ms => seconds * 1e3,
            TimeUnit::S => seconds,
        }
    }

    /// `seconds` with this unit: "812.0 ms" or "1.20 s".
    pub fn format(self, seconds: f64) -> String {
        match self {
            TimeUnit::Ms => format!("{:.1} ms", seconds * 1e3),
            TimeUnit::S => format!("{seconds:.2} s"),
        }
    }
}

/// A share (0..1) as a percentage with one decimal.
pub(crate) fn pct1(share: f64) -> String {
    format!("{:.1}", share * 100.0)
}

/// A share (0..1) as a percentage with two decimals (fidelity shares are
/// small, a tenth of a percent hides them).
pub(crate) fn pct2(share: f64) -> String {
    format!("{:.2}", share * 100.0)
}

/// Seconds as microseconds (routing decisions take µs, not ms).
pub(crate) fn micros(seconds: f64) -> String {
    format!("{:.1}", seconds * 1e6)
}

/// Seconds as milliseconds (ingest lag).
pub(crate) fn millis(seconds: f64) -> String {
    format!("{:.1}", seconds * 1e3)
}

/// Max-over-mean share of the per-pod request counts.
pub(crate) fn ratio(x: f64) -> String {
    format!("{x:.2}x")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::Quantiles;

    fn run(workload: &str, mode: &str, pods: usize, policy: &str) -> RunResult {
        RunResult {
            workload: workload.into(),
            mode: mode.into(),
            pods,
            policy: policy.into(),
            ..RunResult::default()
        }
    }

    #[test]
    fn groups_keep_first_appearance_and_input_order() {
        let rs = vec![
            run("a", "sim", 4, "p1"),
            run("b", "sim", 4, "p1"),
            run("a", "sim", 8, "p1"),
            run("a", "sim", 4, "p2"),
            run("a", "live", 4, "p1"),
        ];
        let gs = groups(&rs);
        let shape: Vec<(&str, &str, usize, Vec<&str>)> = gs
            .iter()
            .map(|g| {
                let policies = g.results.iter().map(|r| r.policy.as_str()).collect();
                (g.workload, g.mode, g.pods, policies)
            })
            .collect();
        assert_eq!(
            shape,
            vec![
                ("a", "sim", 4, vec!["p1", "p2"]),
                ("b", "sim", 4, vec!["p1"]),
                ("a", "sim", 8, vec!["p1"]),
                ("a", "live", 4, vec!["p1"]),
            ]
        );
        assert_eq!(gs[0].title(), "a, sim mode, 4 pods");
    }

    #[test]
    fn best_marks_ties_and_skips_empty_runs() {
        let mut a = run("w", "sim", 2, "a");
        a.requests = 10;
        a.query_tokens = 100;
        a.hit_tokens = 50;
        a.ttft = Quantiles {
            p90: 0.3,
            ..Quantiles::default()
        };
        let mut b = a.clone();
        b.policy = "b".into();
        b.ttft.p90 = 0.2;
        // No requests: zero TTFT must not win.
        let c = run("w", "sim", 2, "c");
        let rs = vec![a, b, c];
        let gs = groups(&rs);
        let g = &gs[0];
        let hit: Vec<bool> = rs.iter().map(|r| g.is_best_hit(r)).collect();
        let p90: Vec<bool> = rs.iter().map(|r| g.is_best_ttft_p90(r)).collect();
        assert_eq!(hit, vec![true, true, false]);
        assert_eq!(p90, vec![false, true, false]);
    }

    #[test]
    fn time_units_switch_at_one_second() {
        assert_eq!(TimeUnit::for_values([0.2, 0.999]), TimeUnit::Ms);
        assert_eq!(TimeUnit::for_values([0.2, 1.0]), TimeUnit::S);
        assert_eq!(TimeUnit::Ms.format(0.8125), "812.5 ms");
        assert_eq!(TimeUnit::S.format(1.2), "1.20 s");
        assert_eq!(TimeUnit::Ms.scale(0.25), 250.0);
    }
}

//! The one-line comparison the demo prints: a policy against a baseline in
//! the terms the claim is made in (hit rate, TTFT, balance).

use super::RunResult;
use super::group::{TimeUnit, pct1, ratio};

/// "kvroute: cache hit rate 87.4% (round-robin 12.0%), TTFT p50 120.0 ms vs
/// 800.0 ms (improvement 85%), p90 0.30 s vs 2.00 s (improvement 85%),
/// busiest pod 1.10x mean (round-robin 1.00x)".
///
/// The improvement is `1 - kvroute / baseline` in whole percent; a negative
/// one reads "worse by N%" so the line never claims a win it did not have.
/// Each TTFT pair shares one unit (seconds once either reaches a second).
pub fn headline(kvroute: &RunResult, baseline: &RunResult) -> String {
    let ttft = |label: &str, k: f64, b: f64| {
        let unit = TimeUnit::for_values([k, b]);
        format!(
            "{label} {} vs {} ({})",
            unit.format(k),
            unit.format(b),
            improvement(k, b)
        )
    };
    format!(
        "{}: cache hit rate {}% ({} {}%), {}, {}, busiest pod {} mean ({} {})",
        kvroute.policy,
        pct1(kvroute.hit_rate()),
        baseline.policy,
        pct1(baseline.hit_rate()),
        ttft("TTFT p50", kvroute.ttft.p50, baseline.ttft.p50),
        ttft("p90", kvroute.ttft.p90, baseline.ttft.p90),
        ratio(kvroute.max_mean_share()),
        baseline.policy,
        ratio(baseline.max_mean_share()),
    )
}

/// `1 - ours / theirs` as a whole percentage; the sign is taken after
/// rounding so a change that rounds to 0% is not called worse.
fn improvement(ours: f64, theirs: f64) -> String {
    if theirs <= 0.0 {
        return "no baseline value".to_string();
    }
    // Whole percent as an integer: a float -0.0 would print as "-0".
    let pct = ((1.0 - ours / theirs) * 100.0).round() as i64;
    if pct < 0 {
        format!("worse by {}%", -pct)
    } else {
        format!("improvement {pct}%")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::Quantiles;

    fn run(policy: &str, hits: u64, p50: f64, p90: f64, pods: Vec<u64>) -> RunResult {
        RunResult {
            policy: policy.into(),
            requests: pods.iter().sum(),
            query_tokens: 1000,
            hit_tokens: hits,
            ttft: Quantiles {
                p50,
                p90,
                p99: p90,
                mean: p50,
            },
            per_pod_requests: pods,
            ..RunResult::default()
        }
    }

    #[test]
    fn better_on_both() {
        let k = run("kvroute", 874, 0.12, 0.3, vec![55, 45]);
        let b = run("round-robin", 120, 0.8, 2.0, vec![50, 50]);
        assert_eq!(
            headline(&k, &b),
            "kvroute: cache hit rate 87.4% (round-robin 12.0%), \
             TTFT p50 120.0 ms vs 800.0 ms (improvement 85%), \
             p90 0.30 s vs 2.00 s (improvement 85%), \
             busiest pod 1.10x mean (round-robin 1.00x)"
        );
    }

    #[test]
    fn worse_is_said() {
        // p50: 1 - 0.5/0.4 = -25%; p90: 1 - 1.5/2.0 = +25%.
        let k = run("kvroute", 300, 0.5, 1.5, vec![30, 10]);
        let b = run("least-loaded", 400, 0.4, 2.0, vec![20, 20]);
        assert_eq!(
            headline(&k, &b),
            "kvroute: cache hit rate 30.0% (least-loaded 40.0%), \
             TTFT p50 500.0 ms vs 400.0 ms (worse by 25%), \
             p90 1.50 s vs 2.00 s (improvement 25%), \
             busiest pod 1.50x mean (least-loaded 1.00x)"
        );
    }

    #[test]
    fn rounding_and_empty_baseline() {
        assert_eq!(improvement(1.003, 1.0), "improvement 0%");
        assert_eq!(improvement(1.006, 1.0), "worse by 1%");
        assert_eq!(improvement(0.5, 0.0), "no baseline value");
    }
}

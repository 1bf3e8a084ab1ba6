//! The simulator's and the live load test's command lines, end to end:
//! `kvroute-loadtest sim` over every policy, and `kvroute-loadtest live`
//! over the real stack (Redis, simulated pods, `kvroute-ingester`, two
//! `kvroute-scorer` replicas, Envoy), each read back from the CSV it writes.
//!
//! `live` finds the ingester and scorer binaries beside its own (the
//! workspace build puts them there) and Envoy in the test venv
//! (`./scripts/test.sh` installs it); a missing one fails the test.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

fn loadtest() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kvroute-loadtest"));
    c.env("RUST_BACKTRACE", "0");
    c
}

/// The CSV's rows as column -> value maps.
fn rows(path: &Path) -> Vec<HashMap<String, String>> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut lines = text.lines();
    let header: Vec<String> = lines
        .next()
        .expect("a header row")
        .split(',')
        .map(String::from)
        .collect();
    lines
        .map(|l| {
            // No field of these runs holds a comma or a quote.
            header
                .iter()
                .cloned()
                .zip(l.split(',').map(String::from))
                .collect()
        })
        .collect()
}

fn num(row: &HashMap<String, String>, col: &str) -> f64 {
    row[col]
        .parse()
        .unwrap_or_else(|e| panic!("{col}={:?}: {e}", row[col]))
}

fn run(cmd: &mut Command) {
    let out = cmd.output().expect("kvroute-loadtest runs");
    assert!(
        out.status.success(),
        "{:?} failed: {}\n{}",
        cmd,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn sim_runs_every_policy_on_a_workload() {
    let dir = tempfile_dir("sim");
    run(loadtest()
        .args([
            "sim",
            "--workload",
            "tenants",
            "--requests",
            "160",
            "--pods",
            "4",
            "--out-dir",
        ])
        .arg(&dir));
    let rows = rows(&dir.join("sim.csv"));
    assert_eq!(rows.len(), 12, "every policy once");
    let by: HashMap<&str, &HashMap<String, String>> =
        rows.iter().map(|r| (r["policy"].as_str(), r)).collect();
    for r in &rows {
        assert_eq!(r["requests"], "160", "{}", r["policy"]);
        assert_eq!(r["mode"], "sim");
    }
    // Tenants share 2,000-token system prompts: prefix-aware routing keeps
    // them where they are cached, random scatters them.
    let hit = |p: &str| num(by[p], "hit_rate");
    assert!(
        hit("kvroute") > hit("random") + 0.05,
        "{} vs {}",
        hit("kvroute"),
        hit("random")
    );
    assert!(hit("kvroute") >= hit("oracle") - 0.05);
    for f in [
        "sim.md",
        "sim-tenants-sim-4pods-hit-ttft.png",
        "sim-tenants-sim-4pods-per-pod.png",
    ] {
        assert!(dir.join(f).is_file(), "{f} written");
    }
}

#[test]
fn live_routes_through_the_real_stack() {
    let dir = tempfile_dir("live");
    run(loadtest()
        .args([
            "live",
            "--workload",
            "tenants",
            "--requests",
            "48",
            "--rate",
            "24",
            "--pods",
            "2",
            "--scorers",
            "2",
            "--fidelity-every",
            "1",
            "--policies",
            "kvroute,round-robin",
            "--out-dir",
        ])
        .arg(&dir));
    let rows = rows(&dir.join("live.csv"));
    assert_eq!(rows.len(), 2);
    let (kv, rr) = (&rows[0], &rows[1]);
    assert_eq!(
        (kv["policy"].as_str(), rr["policy"].as_str()),
        ("kvroute", "round-robin")
    );
    for r in &rows {
        assert_eq!(r["requests"], "48", "every request answered through Envoy");
        assert!(num(r, "query_tokens") > 0.0);
        assert!(num(r, "ttft_p50_s") > 0.0);
    }
    // The scorers answered (their decision histogram), the index was read
    // back for every request, and it did not name blocks the pods lacked.
    assert!(num(kv, "decision_p50_s") > 0.0);
    assert_eq!(num(kv, "fidelity_lookups"), 48.0);
    assert!(
        num(kv, "stale_lookup_share") < 0.05,
        "{}",
        kv["stale_lookup_share"]
    );
    assert!(
        num(kv, "hit_rate") >= num(rr, "hit_rate"),
        "{} vs {}",
        kv["hit_rate"],
        rr["hit_rate"]
    );
}

fn tempfile_dir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("kvroute-fleet-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

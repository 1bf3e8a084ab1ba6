//! What every benchmark prints about where it ran, how it finds the binaries
//! it starts, and the `redis-benchmark` baseline: shared so the reports read
//! alike.

use anyhow::{Context, bail};
use std::path::{Path, PathBuf};

/// CPU model and core count, for the record.
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|r| r.trim_start_matches([' ', '\t', ':']).to_owned())
            })
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{cpu}, {cores} cores")
}

/// The 1-minute load average: other processes on the machine skew the numbers.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "unknown".into())
}

/// `1234567.8` -> `1,234,568`.
pub fn fmt_int(v: f64) -> String {
    let s = format!("{:.0}", v.max(0.0));
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// `explicit` when given (`flag` names it in the error), else the binary
/// `name` next to this one (same cargo profile).
pub fn sibling_binary(name: &str, explicit: Option<&Path>, flag: &str) -> anyhow::Result<PathBuf> {
    if let Some(p) = explicit {
        return Ok(p.to_path_buf());
    }
    let exe = std::env::current_exe()?;
    let path = exe
        .parent()
        .context("no directory for the current binary")?
        .join(name);
    if !path.is_file() {
        bail!(
            "{} not found: build it with the same profile (cargo build --release -p {name}) or pass {flag}",
            path.display()
        );
    }
    Ok(path)
}

/// Runs `redis-benchmark -P 64` with `test` (a `-t` selection or a
/// command) against the same server; requests/s of the line `label`.
pub fn redis_benchmark(
    port: u16,
    requests: usize,
    test: &[&str],
    label: &str,
) -> anyhow::Result<f64> {
    let out = std::process::Command::new("redis-benchmark")
        .args([
            "-p",
            &port.to_string(),
            "-P",
            "64",
            "-n",
            &requests.to_string(),
        ])
        .args(["-r", "1000000", "-q"])
        .args(test)
        .output()
        .context("running redis-benchmark (installed with redis-server)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    // `-q` prints progress lines separated by '\r', then
    // "<label...>: <n> requests per second, ...".
    let rps = text
        .split(['\r', '\n'])
        .filter(|l| l.trim_start().starts_with(label))
        .filter_map(|l| {
            l.rsplit_once(": ")?
                .1
                .split_whitespace()
                .next()?
                .parse::<f64>()
                .ok()
        })
        .next_back();
    match rps {
        Some(rps) if out.status.success() => Ok(rps),
        _ => bail!(
            "cannot parse redis-benchmark output ({}): {text}",
            out.status
        ),
    }
}

/// utime + stime of `pid` (a pid, or `self`), from `/proc/<pid>/stat`.
pub fn cpu_seconds(pid: impl std::fmt::Display) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which is in parentheses and may hold
    // spaces): state is field 3, utime 14, stime 15.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("unexpected /proc/<pid>/stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> anyhow::Result<f64> {
        Ok(fields
            .get(i)
            .context("short /proc/<pid>/stat")?
            .parse::<f64>()?)
    };
    // `rest` starts at field 3, so field k is at index k - 3.
    Ok((ticks(11)? + ticks(12)?) / clock_ticks())
}

/// `getconf CLK_TCK` (100 on Linux unless configured otherwise).
fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_separators() {
        assert_eq!(fmt_int(1_234_567.8), "1,234,568");
        assert_eq!(fmt_int(999.0), "999");
        assert_eq!(fmt_int(-3.0), "0");
    }
}

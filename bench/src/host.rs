//! What machine a run was made on, so numbers are never read without their context.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Host {
    pub hostname: String,
    /// `uname -r`.
    pub kernel: String,
    /// `uname -v`.
    pub kernel_build: String,
    pub arch: String,
    /// PRETTY_NAME from /etc/os-release.
    pub os: String,
    pub cpu_model: String,
    /// CPUs this process may run on.
    pub cpus: usize,
    pub memory_bytes: u64,
    /// /proc/loadavg when the run started: how busy the (shared) machine was.
    pub loadavg: [f64; 3],
    /// First line of each tool's version output.
    pub tools: BTreeMap<String, String>,
    pub quicklane_version: String,
    pub started_unix: u64,
    /// UTC, ISO 8601.
    pub started_utc: String,
}

impl Host {
    /// Collects what can be read; anything unreadable is recorded as "unknown" rather than
    /// failing the run.
    pub fn collect(tools: &[(&str, &str)]) -> Self {
        let started_unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let read = |path: &str| {
            std::fs::read_to_string(path).map_or_else(|_| "unknown".into(), |s| s.trim().to_owned())
        };
        Self {
            hostname: read("/proc/sys/kernel/hostname"),
            kernel: read("/proc/sys/kernel/osrelease"),
            kernel_build: read("/proc/sys/kernel/version"),
            arch: std::env::consts::ARCH.to_owned(),
            os: os_release(&read("/etc/os-release")),
            cpu_model: cpu_model(&read("/proc/cpuinfo")),
            cpus: std::thread::available_parallelism().map_or(0, usize::from),
            memory_bytes: mem_total(&read("/proc/meminfo")),
            loadavg: loadavg(&read("/proc/loadavg")),
            tools: tools
                .iter()
                .map(|&(tool, flag)| (tool.to_owned(), version(tool, flag)))
                .collect(),
            quicklane_version: env!("CARGO_PKG_VERSION").to_owned(),
            started_unix,
            started_utc: utc(started_unix),
        }
    }
}

fn os_release(text: &str) -> String {
    text.lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map_or_else(|| "unknown".into(), |v| v.trim_matches('"').to_owned())
}

fn cpu_model(cpuinfo: &str) -> String {
    cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or_else(|| "unknown".into(), |(_, v)| v.trim().to_owned())
}

fn mem_total(meminfo: &str) -> u64 {
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}

fn loadavg(text: &str) -> [f64; 3] {
    let mut it = text
        .split_whitespace()
        .map(|v| v.parse::<f64>().unwrap_or(0.0));
    [(); 3].map(|()| it.next().unwrap_or(0.0))
}

/// The first non-empty line a tool prints for its version flag (some print to stderr).
fn version(tool: &str, flag: &str) -> String {
    match Command::new(tool).arg(flag).output() {
        Ok(out) => {
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            crate::tools::strip_ansi(&text)
                .lines()
                .map(|l| l.trim().trim_start_matches("sockperf:").trim())
                .find(|l| !l.is_empty())
                .unwrap_or("unknown")
                .to_owned()
        }
        Err(e) => format!("not runnable: {e}"),
    }
}

/// Seconds since the epoch as `YYYY-MM-DDTHH:MM:SSZ` (proleptic Gregorian, UTC).
fn utc(unix: u64) -> String {
    let (days, rem) = (unix / 86_400, unix % 86_400);
    // Howard Hinnant's civil-from-days.
    let z = days.cast_signed() + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_dates() {
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(utc(1_795_302_822), "2026-11-21T23:13:42Z");
    }

    #[test]
    fn proc_files() {
        assert_eq!(
            cpu_model("processor\t: 0\nmodel name\t: AMD EPYC 7B13\n"),
            "AMD EPYC 7B13"
        );
        assert_eq!(
            mem_total("MemTotal:        8000 kB\nMemFree: 1 kB\n"),
            8_192_000
        );
        let load = loadavg("0.50 1.25 2.00 1/100 42\n");
        assert!(
            load.iter()
                .zip([0.5, 1.25, 2.0])
                .all(|(a, b)| (a - b).abs() < 1e-12),
            "{load:?}"
        );
        assert_eq!(
            os_release("ID=debian\nPRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\n"),
            "Debian GNU/Linux 12 (bookworm)"
        );
    }

    #[test]
    fn this_machine() {
        let host = Host::collect(&[("sh", "-c")]);
        assert!(host.cpus > 0);
        assert!(!host.kernel.is_empty() && host.kernel != "unknown");
    }
}

//! CPU time spent by the processes of a set of cgroups, from cgroup v2 `cpu.stat`.
//!
//! The cgroups rather than /proc/stat: this machine is shared and noisy, and the cgroups of
//! the simulated node hold exactly the benchmark's client and server processes. Without
//! IRQ-time accounting (the common kernel configuration) the softirq work a sender does on
//! the receive path is charged to the task it runs in, i.e. to these cgroups too.

use std::path::{Path, PathBuf};

use crate::error::Error;

/// Reads the summed `usage_usec` of some cgroups.
#[derive(Debug, Clone)]
pub struct CpuMeter {
    cgroups: Vec<PathBuf>,
}

impl CpuMeter {
    pub fn new(cgroups: impl IntoIterator<Item = impl AsRef<Path>>) -> Self {
        Self {
            cgroups: cgroups.into_iter().map(|p| p.as_ref().to_owned()).collect(),
        }
    }

    /// Total CPU time of the cgroups' processes so far (including exited ones), in seconds.
    pub fn seconds(&self) -> Result<f64, Error> {
        let mut usec = 0;
        for dir in &self.cgroups {
            let path = dir.join("cpu.stat");
            let text = std::fs::read_to_string(&path)
                .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
            usec += usage_usec(&text).ok_or_else(|| Error::Cgroup {
                path: path.clone(),
                problem: "no usage_usec line".into(),
            })?;
        }
        Ok(usec as f64 / 1e6)
    }
}

fn usage_usec(cpu_stat: &str) -> Option<u64> {
    cpu_stat
        .lines()
        .find_map(|l| l.strip_prefix("usage_usec "))
        .and_then(|v| v.trim().parse().ok())
}

/// CPU-seconds per Gbit moved: `cpu_s` over `bytes` transferred.
pub fn per_gbit(cpu_s: f64, bytes: f64) -> Option<f64> {
    let gbit = bytes * 8.0 / 1e9;
    (gbit > 0.0 && cpu_s > 0.0).then(|| cpu_s / gbit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_usage_from_cpu_stat() {
        let text = "usage_usec 1234567\nuser_usec 1000\nsystem_usec 234567\nnr_periods 0\n";
        assert_eq!(usage_usec(text), Some(1_234_567));
        assert_eq!(usage_usec("user_usec 5\n"), None);
    }

    #[test]
    fn per_gbit_needs_both_sides() {
        assert_eq!(per_gbit(2.0, 125e6), Some(2.0));
        assert_eq!(per_gbit(0.0, 125e6), None);
        assert_eq!(per_gbit(1.0, 0.0), None);
    }

    #[test]
    fn the_callers_own_cgroup_is_readable() {
        // cpu.stat exists in every cgroup v2 directory, the root included.
        let Ok(root) = simnode::cgroup2_mount() else {
            return;
        };
        let cpu = CpuMeter::new([root]).seconds().unwrap();
        assert!(cpu > 0.0);
    }
}

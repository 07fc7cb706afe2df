//! Finding mounts by filesystem type in /proc/self/mountinfo, which (unlike /proc/mounts)
//! separates the filesystem type from options unambiguously.

use std::path::PathBuf;

use crate::Error;

/// Mount points of every mount whose filesystem type is `fstype`, in mount order.
pub(crate) fn mount_points(fstype: &str) -> Result<Vec<PathBuf>, Error> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| Error::io("reading /proc/self/mountinfo", e))?;
    Ok(parse(&text, fstype))
}

fn parse(text: &str, fstype: &str) -> Vec<PathBuf> {
    text.lines()
        .filter_map(|line| {
            // "ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTS [OPTIONAL...] - FSTYPE SOURCE SUPEROPTS"
            let (pre, post) = line.split_once(" - ")?;
            let mount_point = pre.split(' ').nth(4)?;
            (post.split(' ').next()? == fstype).then(|| PathBuf::from(unescape(mount_point)))
        })
        .collect()
}

/// The kernel writes space, tab, newline and backslash in paths as 3-digit octal escapes.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        if let Some(digits) = octal {
            out.push(
                digits
                    .iter()
                    .fold(0u8, |acc, d| acc.wrapping_mul(8) + (d - b'0')),
            );
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
25 30 0:23 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime shared:10 - cgroup2 cgroup2 rw
42 31 0:39 / /sys/fs/cgroup/cpu rw,relatime shared:11 - cgroup cgroup rw,cpu
50 25 0:40 / /sys/fs/bpf rw,relatime - bpf bpf rw,mode=700
51 25 0:41 / /mnt/with\\040space rw - cgroup2 none rw
";

    #[test]
    fn finds_mounts_by_fstype() {
        assert_eq!(
            parse(SAMPLE, "cgroup2"),
            vec![
                PathBuf::from("/sys/fs/cgroup/unified"),
                PathBuf::from("/mnt/with space")
            ]
        );
        assert_eq!(parse(SAMPLE, "bpf"), vec![PathBuf::from("/sys/fs/bpf")]);
        assert!(parse(SAMPLE, "tmpfs").is_empty());
    }

    #[test]
    fn live_mountinfo_parses() {
        assert!(mount_points("proc")
            .unwrap()
            .contains(&PathBuf::from("/proc")));
    }
}

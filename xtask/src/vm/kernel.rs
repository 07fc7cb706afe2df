//! Debian kernels to boot, fetched once: the image package is downloaded (never installed,
//! which would pull in initramfs-tools), unpacked with `dpkg -x`, indexed with `depmod`, and
//! its compressed image turned into an ELF vmlinux, which boots about 5 s faster under TCG.
use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{bail, ensure, Context as _, Result};
use serde_json::json;

use super::apt::{PrivateApt, CACHE_ROOT};
use crate::run_cmd;

/// A kernel series the matrix covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Series {
    /// Debian 12's own kernel.
    V6_1,
    /// bookworm-backports.
    V6_12,
}

impl Series {
    pub const ALL: [Self; 2] = [Self::V6_1, Self::V6_12];

    pub fn name(self) -> &'static str {
        match self {
            Self::V6_1 => "6.1",
            Self::V6_12 => "6.12",
        }
    }
}

/// An unpacked kernel ready to boot.
#[derive(Debug, Clone)]
pub struct Kernel {
    pub series: Series,
    /// `linux-image-...` package and its Debian version, for the report.
    pub package: String,
    pub version: String,
    /// `uname -r` in the guest.
    pub release: String,
    dir: PathBuf,
}

impl Kernel {
    pub fn vmlinux(&self) -> PathBuf {
        self.dir.join("vmlinux")
    }

    /// The kernel's module tree, which the guest links to /lib/modules/RELEASE so the kernel
    /// can load modules (veth, sch_fq, ...) on demand.
    pub fn modules(&self) -> PathBuf {
        self.dir.join("tree/lib/modules").join(&self.release)
    }
}

/// The kernel of `series`, from the cache, or fetched and unpacked into it. A series is fetched
/// once and kept: `rm -r /var/cache/quicklane-vm/kernels` picks up a newer one.
pub fn ensure(series: Series, apt: &mut Option<PrivateApt>) -> Result<Kernel> {
    let dir = Path::new(CACHE_ROOT).join("kernels").join(series.name());
    let manifest = dir.join("manifest.json");
    if let Ok(text) = std::fs::read_to_string(&manifest) {
        let m: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", manifest.display()))?;
        let field = |k: &str| m[k].as_str().map(str::to_owned);
        if let (Some(package), Some(version), Some(release)) =
            (field("package"), field("version"), field("release"))
        {
            return Ok(Kernel {
                series,
                package,
                version,
                release,
                dir,
            });
        }
    }
    if apt.is_none() {
        *apt = Some(PrivateApt::new()?);
    }
    let apt = apt.as_mut().expect("set above");
    fetch(series, apt, &dir).with_context(|| format!("fetching the {} kernel", series.name()))
}

fn fetch(series: Series, apt: &mut PrivateApt, dir: &Path) -> Result<Kernel> {
    let (package, version) = resolve(series, apt)?;
    let release = package
        .strip_prefix("linux-image-")
        .with_context(|| format!("unexpected kernel package name {package}"))?
        .to_owned();
    eprintln!("vm: fetching {package} {version}");
    // A half-finished earlier attempt has no manifest; start it over.
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir)?;
    apt.download(&package, &version, dir)?;
    let deb = std::fs::read_dir(dir)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .context("apt-get download produced no .deb")?;
    let tree = dir.join("tree");
    run_cmd(Command::new("dpkg").arg("-x").arg(&deb).arg(&tree))?;
    std::fs::remove_file(&deb)?;
    run_cmd(Command::new("depmod").arg("-b").arg(&tree).arg(&release))?;
    let kernel = Kernel {
        series,
        package,
        version,
        release,
        dir: dir.to_owned(),
    };
    let image = std::fs::read(
        tree.join("boot")
            .join(format!("vmlinuz-{}", kernel.release)),
    )?;
    std::fs::write(kernel.vmlinux(), vmlinux_from_bzimage(&image)?)?;
    // Written last: its presence means everything above is complete.
    let manifest = json!({
        "package": kernel.package,
        "version": kernel.version,
        "release": kernel.release,
    });
    std::fs::write(dir.join("manifest.json"), manifest.to_string())?;
    Ok(kernel)
}

/// The image package that the `linux-image-amd64` metapackage of `series` points at, newest
/// first. The generic flavour: `-cloud-amd64` has no 9p, which the guest's root needs.
fn resolve(series: Series, apt: &mut PrivateApt) -> Result<(String, String)> {
    let show = apt.show("linux-image-amd64")?;
    let prefix = format!("{}.", series.name());
    let mut best: Option<(String, String, String)> = None;
    for stanza in show.split("\n\n") {
        let field = |name: &str| {
            stanza
                .lines()
                .find_map(|l| l.strip_prefix(name).map(str::trim).map(str::to_owned))
        };
        let (Some(meta_version), Some(depends)) = (field("Version:"), field("Depends:")) else {
            continue;
        };
        if !meta_version.starts_with(&prefix) {
            continue;
        }
        // "linux-image-6.1.0-56-amd64 (= 6.1.192-2)"
        let Some((package, rest)) = depends.split_once(" (= ") else {
            continue;
        };
        let version = rest.trim_end_matches(')').to_owned();
        if best
            .as_ref()
            .is_none_or(|(v, _, _)| newer(&meta_version, v))
        {
            best = Some((meta_version, package.to_owned(), version));
        }
    }
    let (_, package, version) = best.with_context(|| {
        format!(
            "no linux-image-amd64 {} in the package lists",
            series.name()
        )
    })?;
    Ok((package, version))
}

fn newer(a: &str, b: &str) -> bool {
    Command::new("dpkg")
        .args(["--compare-versions", a, "gt", b])
        .status()
        .is_ok_and(|s| s.success())
}

/// The ELF kernel inside a bzImage: the x86 boot header says where the compressed payload is;
/// the payload ends with its uncompressed size (4 bytes), which the decompressors do not want.
fn vmlinux_from_bzimage(image: &[u8]) -> Result<Vec<u8>> {
    let u32_at = |off: usize| -> Result<u32> {
        let bytes = image
            .get(off..off + 4)
            .context("bzImage shorter than its boot header")?;
        Ok(u32::from_le_bytes(bytes.try_into().expect("4 bytes")))
    };
    ensure!(
        image.get(0x202..0x206) == Some(b"HdrS"),
        "not a bzImage (no HdrS boot header)"
    );
    let setup_sects = match image[0x1f1] {
        0 => 4,
        n => usize::from(n),
    };
    let start = (setup_sects + 1) * 512 + u32_at(0x248)? as usize;
    let len = u32_at(0x24c)? as usize;
    let payload = image
        .get(start..start + len.saturating_sub(4))
        .context("bzImage payload out of bounds")?;
    let tool = if payload.starts_with(b"\xfd7zXZ\x00") {
        "xz"
    } else if payload.starts_with(b"\x28\xb5\x2f\xfd") {
        "zstd"
    } else if payload.starts_with(b"\x1f\x8b") {
        "gzip"
    } else {
        bail!(
            "unknown kernel compression (payload starts {:02x?})",
            &payload[..payload.len().min(6)]
        );
    };
    let elf = decompress(tool, payload)?;
    ensure!(
        elf.starts_with(b"\x7fELF"),
        "the decompressed kernel is not an ELF file"
    );
    Ok(elf)
}

/// Pipes `data` through `TOOL -dc`.
pub fn decompress(tool: &str, data: &[u8]) -> Result<Vec<u8>> {
    let mut child = Command::new(tool)
        .arg("-dc")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {tool}"))?;
    let mut stdin = child.stdin.take().expect("piped");
    let out = std::thread::scope(|s| {
        s.spawn(move || std::io::Write::write_all(&mut stdin, data));
        child.wait_with_output()
    })?;
    ensure!(out.status.success(), "{tool} -dc failed: {}", out.status);
    Ok(out.stdout)
}

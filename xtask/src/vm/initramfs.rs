//! The guest's initramfs, written as a newc cpio archive (no cpio tool needed): a static
//! busybox, the two init stages, the job, and the few modules the kernel needs before the host
//! root is mounted (virtio PCI, 9p, overlayfs), uncompressed and in dependency order.
use std::{collections::BTreeMap, path::Path};

use anyhow::{bail, Context as _, Result};

use super::kernel::{decompress, Kernel};

const BUSYBOX: &str = "/bin/busybox";
const STAGE1: &str = include_str!("guest/init.sh");
const STAGE2: &str = include_str!("guest/stage2.sh");

/// Modules that mount the shared root; whichever are built into a kernel are skipped.
const BOOT_MODULES: &[&str] = &["virtio_pci", "9pnet_virtio", "9p", "overlay"];

pub fn build(kernel: &Kernel, job: &str) -> Result<Vec<u8>> {
    let mut cpio = Cpio::default();
    for dir in ["bin", "dev", "modules"] {
        cpio.dir(dir);
    }
    // The kernel opens /dev/console for init's stdio before anything is mounted.
    cpio.char_device("dev/console", 5, 1);
    let busybox = std::fs::read(BUSYBOX)
        .with_context(|| format!("reading {BUSYBOX} (busybox-static; run `cargo xtask setup`)"))?;
    cpio.file("bin/busybox", 0o755, &busybox);
    cpio.file("init", 0o755, STAGE1.as_bytes());
    cpio.file("stage2", 0o755, STAGE2.as_bytes());
    cpio.file("job.sh", 0o644, job.as_bytes());
    let mut order = String::new();
    for (name, bytes) in boot_modules(&kernel.modules())? {
        cpio.file(&format!("modules/{name}"), 0o644, &bytes);
        order.push_str(&name);
        order.push('\n');
    }
    cpio.file("modules/order", 0o644, order.as_bytes());
    Ok(cpio.finish())
}

/// The boot modules and everything they depend on, dependencies first, as `(file name,
/// uncompressed bytes)`.
fn boot_modules(modules: &Path) -> Result<Vec<(String, Vec<u8>)>> {
    let dep_file = modules.join("modules.dep");
    let deps: BTreeMap<String, Vec<String>> = std::fs::read_to_string(&dep_file)
        .with_context(|| format!("reading {}", dep_file.display()))?
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(m, d)| {
            (
                m.to_owned(),
                d.split_whitespace().map(str::to_owned).collect(),
            )
        })
        .collect();
    let builtin = std::fs::read_to_string(modules.join("modules.builtin")).unwrap_or_default();
    let mut order: Vec<String> = Vec::new();
    for name in BOOT_MODULES {
        let found = deps.keys().find(|path| module_name(path) == *name);
        match found {
            Some(path) => visit(path, &deps, &mut order, 0)?,
            None if builtin.lines().any(|l| module_name(l) == *name) => {}
            None => bail!("module {name} is neither in modules.dep nor built in"),
        }
    }
    order
        .iter()
        .map(|path| {
            let file = modules.join(path);
            let raw =
                std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            // Debian compresses 6.12's modules with xz; the initramfs loads them with a plain
            // insmod, which wants them uncompressed.
            let compression = Path::new(path).extension().and_then(|e| e.to_str());
            let bytes = match compression {
                Some("xz") => decompress("xz", &raw)?,
                Some("zst") => decompress("zstd", &raw)?,
                _ => raw,
            };
            Ok((format!("{}.ko", module_name(path)), bytes))
        })
        .collect()
}

/// Depth-first, dependencies before dependents; modules.dep has no cycles, the depth bound
/// guards against a corrupt file.
fn visit(
    path: &str,
    deps: &BTreeMap<String, Vec<String>>,
    order: &mut Vec<String>,
    depth: usize,
) -> Result<()> {
    if order.iter().any(|p| p == path) {
        return Ok(());
    }
    if depth > 32 {
        bail!("modules.dep: dependency chain through {path} is too deep");
    }
    // modules.dep lists the direct dependency last; loading in reverse order satisfies each.
    for dep in deps.get(path).into_iter().flatten().rev() {
        visit(dep, deps, order, depth + 1)?;
    }
    order.push(path.to_owned());
    Ok(())
}

/// `kernel/fs/9p/9p.ko.xz` -> `9p`.
fn module_name(path: &str) -> &str {
    let file = path.rsplit('/').next().unwrap_or(path);
    file.split(".ko").next().unwrap_or(file)
}

/// A newc ("070701") cpio archive in memory.
#[derive(Default)]
struct Cpio {
    out: Vec<u8>,
    next_ino: u32,
}

impl Cpio {
    fn dir(&mut self, path: &str) {
        self.entry(path, 0o040_755, 0, &[]);
    }

    fn char_device(&mut self, path: &str, major: u32, minor: u32) {
        self.entry(path, 0o020_600, (major << 8) | minor, &[]);
    }

    fn file(&mut self, path: &str, perm: u32, data: &[u8]) {
        self.entry(path, 0o100_000 | perm, 0, data);
    }

    fn entry(&mut self, path: &str, mode: u32, rdev: u32, data: &[u8]) {
        self.next_ino += 1;
        let fields = [
            self.next_ino,
            mode,
            0, // uid
            0, // gid
            1, // nlink
            0, // mtime
            data.len() as u32,
            0, // dev major
            0, // dev minor
            rdev >> 8,
            rdev & 0xff,
            path.len() as u32 + 1,
            0, // check
        ];
        self.out.extend_from_slice(b"070701");
        for f in fields {
            self.out.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.out.extend_from_slice(path.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, 0, &[]);
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_names_drop_directories_and_compression() {
        assert_eq!(module_name("kernel/fs/9p/9p.ko.xz"), "9p");
        assert_eq!(module_name("kernel/net/9p/9pnet_virtio.ko"), "9pnet_virtio");
        assert_eq!(module_name("kernel/fs/overlayfs/overlay.ko.zst"), "overlay");
    }

    #[test]
    fn dependencies_come_first_and_once() {
        let deps: BTreeMap<String, Vec<String>> = [
            ("a.ko", vec!["c.ko", "b.ko"]),
            ("b.ko", vec!["c.ko"]),
            ("c.ko", vec![]),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.into_iter().map(str::to_owned).collect()))
        .collect();
        let mut order = Vec::new();
        visit("a.ko", &deps, &mut order, 0).unwrap();
        assert_eq!(order, ["c.ko", "b.ko", "a.ko"]);
    }

    #[test]
    fn cpio_entries_are_aligned_and_end_with_the_trailer() {
        let mut cpio = Cpio::default();
        cpio.dir("bin");
        cpio.file("bin/x", 0o755, b"hello");
        let out = cpio.finish();
        assert_eq!(out.len() % 4, 0);
        assert!(out.starts_with(b"070701"));
        let trailer = out
            .windows(10)
            .position(|w| w == b"TRAILER!!!")
            .expect("trailer present");
        // "bin/x" header: 110 bytes + name "bin/x\0" padded to 4, then "hello" padded.
        let second = out.windows(5).position(|w| w == b"bin/x").unwrap() - 110;
        assert_eq!(second % 4, 0);
        assert!(trailer > second);
    }
}

//! One guest boot: QEMU with the kernel, the initramfs, the host's root shared read-only over
//! 9p and a writable results directory; the console is streamed and logged, and the job's exit
//! code is read from its exit line. A guest that reports nothing is an `Outcome::NoExitCode`.
use std::{
    io::{BufRead as _, BufReader, Write as _},
    path::Path,
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};

/// How long QEMU may take to exit after the exit line before it is killed.
const EXIT_GRACE: Duration = Duration::from_secs(10);

#[derive(Debug)]
pub enum Outcome {
    /// The job ran and exited with this code.
    Exited(i32),
    /// The guest crashed, hung or failed to boot before reporting.
    NoExitCode(String),
}

pub struct Boot<'a> {
    pub vmlinux: &'a Path,
    pub initrd: &'a Path,
    /// Mounted read-write at /run/ql-out in the guest.
    pub out_dir: &'a Path,
    pub nonce: &'a str,
    pub timeout: Duration,
    /// Console lines are printed with this prefix.
    pub label: &'a str,
    pub log: &'a Path,
}

impl Boot<'_> {
    pub fn run(&self) -> Result<Outcome> {
        let mut log = std::fs::File::create(self.log)
            .with_context(|| format!("creating {}", self.log.display()))?;
        let mut cmd = self.command();
        // QEMU's own complaints go to the same log as the console.
        cmd.stderr(log.try_clone()?);
        let mut child = cmd.spawn().context("starting qemu-system-x86_64")?;
        let stdout = child.stdout.take().expect("piped");
        let (tx, rx) = mpsc::channel::<String>();
        // The reader ends at EOF, which QEMU's exit (or kill) guarantees.
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut line = Vec::new();
            while reader.read_until(b'\n', &mut line).is_ok_and(|n| n > 0) {
                let text = String::from_utf8_lossy(&line).trim_end().to_owned();
                if tx.send(text).is_err() {
                    break;
                }
                line.clear();
            }
        });
        let marker = format!("QUICKLANE-VM-EXIT {} ", self.nonce);
        let started = Instant::now();
        let mut deadline = started + self.timeout;
        let mut code = None;
        loop {
            let wait = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(wait) {
                Ok(line) => {
                    writeln!(log, "{line}")?;
                    eprintln!("[{}] {line}", self.label);
                    if let Some(rest) = line.split_once(&marker).map(|(_, r)| r) {
                        code = rest.trim().parse::<i32>().ok();
                        deadline = Instant::now() + EXIT_GRACE;
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    kill(&mut child);
                    if let Some(code) = code {
                        return Ok(Outcome::Exited(code));
                    }
                    return Ok(Outcome::NoExitCode(format!(
                        "no exit line within {}s (guest hung)",
                        self.timeout.as_secs()
                    )));
                }
            }
        }
        let status = child.wait()?;
        Ok(match code {
            Some(code) => Outcome::Exited(code),
            None => Outcome::NoExitCode(format!(
                "the guest stopped after {}s without an exit line (qemu {status}); console in {}",
                started.elapsed().as_secs(),
                self.log.display()
            )),
        })
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new("qemu-system-x86_64");
        // TCG: this machine's /dev/kvm is paravirtual and stock kernels crash or crawl under
        // it. A runner with real KVM can set QUICKLANE_VM_ACCEL=kvm.
        let accel = std::env::var("QUICKLANE_VM_ACCEL").unwrap_or_else(|_| "tcg".to_owned());
        cmd.args(["-nodefaults", "-no-user-config", "-display", "none"])
            .args(["-machine", &format!("pc,accel={accel}"), "-cpu", "max"])
            .args(["-smp", "2", "-m", "2G"])
            // qboot boots a kernel directly, seconds faster than SeaBIOS under TCG.
            .args(["-bios", "/usr/share/qemu/qboot.rom"])
            .args(["-serial", "stdio", "-no-reboot"])
            .arg("-kernel")
            .arg(self.vmlinux)
            .arg("-initrd")
            .arg(self.initrd)
            .args(["-append", "console=ttyS0 panic=-1 loglevel=4 rdinit=/init"])
            .arg("-virtfs")
            .arg("local,path=/,mount_tag=ql-root,security_model=none,readonly=on")
            .arg("-virtfs")
            .arg(format!(
                "local,path={},mount_tag=ql-out,security_model=none",
                self.out_dir.display()
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::piped());
        cmd
    }
}

fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

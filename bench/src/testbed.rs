//! Running things on the simulated node: the agent, long-lived servers and measured tool
//! runs, with every command line and output recorded in the results directory.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use simnode::{Node, Pod, Proc};

use crate::error::Error;
use crate::interrupt;
use crate::results::{CommandRecord, Mode};

/// How long the agent and servers get to come up, and the agent to stop.
const START_TIMEOUT: Duration = Duration::from_secs(20);
const POLL: Duration = Duration::from_millis(10);

/// Where a process runs.
#[derive(Debug, Clone, Copy)]
pub enum Place<'a> {
    /// In a pod: its namespace and cgroup, so the bypass considers its sockets.
    Pod(&'a Pod),
    /// In the node's host namespace, in a cgroup outside the node's: a peer the bypass must
    /// leave alone, as a process on another node would be.
    Outside(&'a Node, &'a OutsideCgroup),
}

impl Place<'_> {
    pub fn name(&self) -> String {
        match self {
            Self::Pod(pod) => pod.name().to_owned(),
            Self::Outside(..) => "node".to_owned(),
        }
    }

    fn spawn(&self, program: &OsStr, args: &[String], out: File, err: File) -> Result<Proc, Error> {
        let mut cmd = match self {
            Self::Pod(pod) => pod.command(program),
            Self::Outside(node, cgroup) => {
                let mut cmd = node.command(program);
                cgroup.join_on_exec(&mut cmd)?;
                cmd
            }
        };
        cmd.args(args).stdin(Stdio::null()).stdout(out).stderr(err);
        Ok(match self {
            Self::Pod(pod) => pod.spawn(&mut cmd)?,
            Self::Outside(node, _) => node.spawn(&mut cmd)?,
        })
    }

    /// Whether something in this place's namespace listens there.
    fn listening(&self, at: Listen<'_>) -> Result<bool, Error> {
        let read = || {
            // thread-self: /proc/net follows the thread group leader, not this thread.
            let table =
                |file: &str| std::fs::read_to_string(format!("/proc/thread-self/net/{file}"));
            match at {
                Listen::Port(port) => ["tcp", "tcp6"]
                    .iter()
                    .any(|file| table(file).is_ok_and(|text| listens(&text, port))),
                Listen::Unix(path) => table("unix").is_ok_and(|text| listens_unix(&text, path)),
            }
        };
        Ok(match self {
            Self::Pod(pod) => pod.in_netns(read)?,
            Self::Outside(node, _) => node.in_netns(read)?,
        })
    }
}

/// Where a started server is waited for.
#[derive(Debug, Clone, Copy)]
pub enum Listen<'a> {
    /// A TCP listener on this port.
    Port(u16),
    /// An AF_UNIX stream listener bound to this path.
    Unix(&'a Path),
}

impl std::fmt::Display for Listen<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Port(port) => write!(f, "port {port}"),
            Self::Unix(path) => write!(f, "{}", path.display()),
        }
    }
}

/// Whether a /proc/net/unix table has a listening socket (flag __SO_ACCEPTCON) bound to `path`.
fn listens_unix(table: &str, path: &Path) -> bool {
    const ACCEPTCON: &str = "00010000";
    table.lines().skip(1).any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.len() > 7 && fields[3] == ACCEPTCON && Path::new(fields[7]) == path
    })
}

/// Whether a /proc/net/tcp{,6} table has a socket in LISTEN (state 0A) on `port`.
fn listens(table: &str, port: u16) -> bool {
    let port = format!(":{port:04X}");
    table.lines().skip(1).any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.len() > 3 && fields[1].ends_with(&port) && fields[3] == "0A"
    })
}

/// A cgroup of the bench's own beside the node's, for the non-eligible peer; named like the
/// node's resources so the leak check finds it if it ever survives. Removed on drop.
#[derive(Debug)]
pub struct OutsideCgroup {
    dir: PathBuf,
}

impl OutsideCgroup {
    pub fn create(node: &Node) -> Result<Self, Error> {
        let dir = simnode::cgroup2_mount()?.join(format!("qlsim-{}-outside", node.id()));
        std::fs::create_dir(&dir)
            .map_err(|e| Error::io(format!("creating cgroup {}", dir.display()), e))?;
        Ok(Self { dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn join_on_exec(&self, cmd: &mut Command) -> Result<(), Error> {
        let path = self.dir.join("cgroup.procs");
        // Opened before fork: opening files between fork and exec is not async-signal-safe.
        let procs = OpenOptions::new()
            .write(true)
            .open(&path)
            .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
        // SAFETY: the hook only issues write(2) on an already open descriptor, which neither
        // allocates nor takes locks, so it is safe between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                // "0" moves the writing process itself.
                nix::unistd::write(&procs, b"0")
                    .map(drop)
                    .map_err(std::io::Error::from)
            });
        }
        Ok(())
    }
}

impl Drop for OutsideCgroup {
    fn drop(&mut self) {
        // Its processes are Proc guards that are normally gone by now; kill stragglers, since
        // a populated cgroup cannot be removed.
        let _ = std::fs::write(self.dir.join("cgroup.kill"), "1");
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            let events =
                std::fs::read_to_string(self.dir.join("cgroup.events")).unwrap_or_default();
            if events.lines().any(|l| l == "populated 0") {
                break;
            }
            std::thread::sleep(POLL);
        }
        if let Err(e) = std::fs::remove_dir(&self.dir) {
            tracing::warn!(dir = %self.dir.display(), error = %e, "cannot remove the bench cgroup");
        }
    }
}

/// The results directory's raw outputs and the log of every command run.
#[derive(Debug)]
pub struct Recorder {
    out_dir: PathBuf,
    seq: usize,
    pub commands: Vec<CommandRecord>,
}

impl Recorder {
    pub fn new(out_dir: &Path) -> Result<Self, Error> {
        let raw = out_dir.join("raw");
        std::fs::create_dir_all(&raw)
            .map_err(|e| Error::io(format!("creating {}", raw.display()), e))?;
        Ok(Self {
            out_dir: out_dir.to_owned(),
            seq: 0,
            commands: Vec::new(),
        })
    }

    /// A fresh `raw/NNNN-label` path (relative) and its absolute form.
    fn next(&mut self, label: &str, ext: &str) -> (String, PathBuf) {
        self.seq += 1;
        let rel = format!("raw/{:04}-{label}.{ext}", self.seq);
        let abs = self.out_dir.join(&rel);
        (rel, abs)
    }

    fn create(path: &Path) -> Result<File, Error> {
        File::create(path).map_err(|e| Error::io(format!("creating {}", path.display()), e))
    }

    /// Runs `program args` in `place` to completion and returns its stdout. Fails if it
    /// exits non-zero, takes longer than `timeout`, or Ctrl-C is pressed meanwhile.
    pub fn run(
        &mut self,
        place: Place<'_>,
        program: &OsStr,
        args: &[String],
        timeout: Duration,
        rep_mode: (Option<usize>, Mode),
    ) -> Result<String, Error> {
        self.start(place, program, args, rep_mode)?.wait(timeout)
    }

    /// Starts `program args` in `place` in the background, recorded like [`Recorder::run`];
    /// [`Running::wait`] collects it. Dropping the result kills the process.
    pub fn start(
        &mut self,
        place: Place<'_>,
        program: &OsStr,
        args: &[String],
        (rep, mode): (Option<usize>, Mode),
    ) -> Result<Running, Error> {
        let tool = Path::new(program)
            .file_name()
            .unwrap_or(program)
            .to_string_lossy()
            .into_owned();
        let (rel, out_path) = self.next(&format!("{tool}-{}", place.name()), "txt");
        let err_path = out_path.with_extension("err");
        let mut command_words = vec![tool];
        command_words.extend_from_slice(args);
        let command = command_words.join(" ");
        self.commands.push(CommandRecord {
            rep,
            mode,
            place: place.name(),
            argv: command_words,
            raw: rel.clone(),
        });
        let proc = place.spawn(
            program,
            args,
            Self::create(&out_path)?,
            Self::create(&err_path)?,
        )?;
        Ok(Running {
            proc,
            command,
            place: place.name(),
            rel,
            out_path,
            err_path,
            started: Instant::now(),
        })
    }

    /// Starts a server whose output is a measurement (it exits by itself and reports), waits
    /// until it listens `at`, and records it like [`Recorder::run`]; collect it with
    /// [`Running::wait`].
    pub fn measured_server(
        &mut self,
        place: Place<'_>,
        program: &OsStr,
        args: &[String],
        at: Listen<'_>,
        rep_mode: (Option<usize>, Mode),
    ) -> Result<Running, Error> {
        let mut running = self.start(place, program, args, rep_mode)?;
        while !place.listening(at)? {
            interrupt::check()?;
            let exited = running
                .proc
                .child_mut()
                .try_wait()
                .map_err(|e| Error::io(format!("waiting for `{}`", running.command), e))?;
            if exited.is_some() || running.started.elapsed() > START_TIMEOUT {
                return Err(Error::NotListening {
                    what: format!("`{}` in {}", running.command, running.place),
                    at: at.to_string(),
                    after: running.started.elapsed(),
                    log: running.rel.clone(),
                });
            }
            std::thread::sleep(POLL);
        }
        Ok(running)
    }

    /// Starts a long-lived server in `place` and waits until it listens `at`. Its output
    /// goes to `raw/NNNN-label.log`.
    pub fn server(
        &mut self,
        place: Place<'_>,
        program: &OsStr,
        args: &[String],
        at: Listen<'_>,
        label: &str,
    ) -> Result<Proc, Error> {
        let (rel, log) = self.next(label, "log");
        let out = Self::create(&log)?;
        let err = out
            .try_clone()
            .map_err(|e| Error::io(format!("duplicating {}", log.display()), e))?;
        let mut proc = place.spawn(program, args, out, err)?;
        let started = Instant::now();
        while !place.listening(at)? {
            interrupt::check()?;
            let exited = proc
                .child_mut()
                .try_wait()
                .map_err(|e| Error::io(format!("waiting for {label}"), e))?;
            if exited.is_some() || started.elapsed() > START_TIMEOUT {
                return Err(Error::NotListening {
                    what: format!("{label} in {}", place.name()),
                    at: at.to_string(),
                    after: started.elapsed(),
                    log: rel,
                });
            }
            std::thread::sleep(POLL);
        }
        Ok(proc)
    }

    /// Keeps `text` (e.g. a config the run used) as `raw/NNNN-label.ext`; returns that name.
    pub fn save(&mut self, label: &str, ext: &str, text: &str) -> Result<String, Error> {
        let (rel, path) = self.next(label, ext);
        std::fs::write(&path, text)
            .map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
        Ok(rel)
    }

    /// The log file for the agent's next start, and its relative name.
    fn agent_log(&mut self) -> Result<(File, String), Error> {
        let (rel, path) = self.next("agent", "log");
        Ok((Self::create(&path)?, rel))
    }
}

/// A command started by [`Recorder::start`]; killed on drop (the [`Proc`] guard).
#[derive(Debug)]
pub struct Running {
    proc: Proc,
    command: String,
    place: String,
    rel: String,
    out_path: PathBuf,
    err_path: PathBuf,
    started: Instant,
}

impl Running {
    /// Waits for a started command to finish and returns its stdout. Fails if it exits
    /// non-zero, has run longer than `timeout` in all, or Ctrl-C is pressed meanwhile.
    pub fn wait(self, timeout: Duration) -> Result<String, Error> {
        let Running {
            mut proc,
            command,
            place,
            rel,
            out_path,
            err_path,
            started,
        } = self;
        let status = loop {
            interrupt::check()?;
            if let Some(status) = proc
                .child_mut()
                .try_wait()
                .map_err(|e| Error::io(format!("waiting for `{command}`"), e))?
            {
                break status;
            }
            if started.elapsed() > timeout {
                return Err(Error::ToolTimeout {
                    command,
                    place,
                    after: timeout,
                    raw: rel,
                });
            }
            std::thread::sleep(POLL);
        };
        let stdout = std::fs::read_to_string(&out_path)
            .map_err(|e| Error::io(format!("reading {}", out_path.display()), e))?;
        let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
        if stderr.trim().is_empty() {
            // Keep the raw directory to the outputs that say something.
            let _ = std::fs::remove_file(&err_path);
        }
        if !status.success() {
            // A tool killed by the Ctrl-C that reached its process group is not a tool failure.
            interrupt::check()?;
            let said = if stderr.trim().is_empty() {
                &stdout
            } else {
                &stderr
            };
            return Err(Error::ToolFailed {
                command,
                place,
                status: status.to_string(),
                stderr: tail(said),
                raw: rel,
            });
        }
        Ok(stdout)
    }
}

/// The last lines of a tool's complaint, for an error message.
fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let start = lines.len().saturating_sub(3);
    lines[start..].join(" | ")
}

/// `quicklane run` on the node, started and stopped around each accelerated block.
#[derive(Debug)]
pub struct Agent {
    proc: Option<Proc>,
    log: String,
    state: PathBuf,
}

impl Agent {
    /// Starts the agent and waits until it has attached everything (its state file names it).
    pub fn start(
        node: &Node,
        exe: &Path,
        config: &Path,
        recorder: &mut Recorder,
    ) -> Result<Self, Error> {
        let (log_file, log) = recorder.agent_log()?;
        let mut cmd = node.command(exe);
        cmd.args([
            OsStr::new("run"),
            OsStr::new("--config"),
            config.as_os_str(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file);
        let proc = node.spawn(&mut cmd)?;
        let mut agent = Self {
            proc: Some(proc),
            log,
            state: node.run_dir().join("state.json"),
        };
        let started = Instant::now();
        loop {
            interrupt::check()?;
            if agent.state_pid() == Some(agent.pid()) {
                return Ok(agent);
            }
            let proc = agent.proc.as_mut().expect("set above");
            if let Some(status) = proc.child_mut().try_wait().ok().flatten() {
                return Err(agent.fail(format!("exited during start ({status})")));
            }
            if started.elapsed() > START_TIMEOUT {
                return Err(
                    agent.fail(format!("was not ready after {} s", START_TIMEOUT.as_secs()))
                );
            }
            std::thread::sleep(POLL);
        }
    }

    fn pid(&self) -> u32 {
        self.proc.as_ref().map_or(0, Proc::id)
    }

    fn state_pid(&self) -> Option<u32> {
        let state: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&self.state).ok()?).ok()?;
        state["pid"].as_u64().and_then(|p| u32::try_from(p).ok())
    }

    fn fail(&self, problem: String) -> Error {
        Error::Agent {
            problem,
            log: self.log.clone(),
        }
    }

    /// The live counters from `quicklane status --json`, as `object.name`, and with QoS on
    /// also each shaped pod's as `qos.POD.DIRECTION.NAME`.
    pub fn counters(&self, node: &Node, exe: &Path) -> Result<BTreeMap<String, u64>, Error> {
        Ok(counters_of(&self.status(node, exe)?))
    }

    /// `quicklane status --json`.
    pub fn status(&self, node: &Node, exe: &Path) -> Result<serde_json::Value, Error> {
        let out = Command::new(exe)
            .args(["status", "--json", "--pin-dir"])
            .arg(node.pin_dir())
            .arg("--run-dir")
            .arg(node.run_dir())
            .output()
            .map_err(|e| Error::io("running `quicklane status`", e))?;
        if !out.status.success() {
            return Err(self.fail(format!(
                "status failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        serde_json::from_slice(&out.stdout)
            .map_err(|e| self.fail(format!("status printed no JSON: {e}")))
    }

    /// SIGTERM, and a check that it detached cleanly.
    pub fn stop(mut self) -> Result<(), Error> {
        let mut proc = self.proc.take().expect("only taken here and in drop");
        terminate(&proc);
        let status = proc
            .wait_timeout(START_TIMEOUT)
            .map_err(|e| self.fail(format!("did not stop after SIGTERM: {e}")))?;
        if !status.success() {
            return Err(self.fail(format!("exited with {status} on SIGTERM")));
        }
        Ok(())
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // An error or Ctrl-C: let it detach and unpin before the guard's SIGKILL.
        if let Some(mut proc) = self.proc.take() {
            terminate(&proc);
            let _ = proc.wait_timeout(START_TIMEOUT);
        }
    }
}

/// The counters of a `quicklane status --json`, flattened as [`Agent::counters`] returns them.
pub fn counters_of(status: &serde_json::Value) -> BTreeMap<String, u64> {
    let mut counters = BTreeMap::new();
    let mut put = |prefix: String, values: &serde_json::Value| {
        for (name, value) in values.as_object().into_iter().flatten() {
            if let Some(v) = value.as_u64() {
                counters.insert(format!("{prefix}.{name}"), v);
            }
        }
    };
    for (object, values) in status["counters"].as_object().into_iter().flatten() {
        put(object.clone(), values);
    }
    for pod in status["qos"]["pods"].as_array().into_iter().flatten() {
        let name = pod["name"].as_str().unwrap_or("?");
        for dir in ["egress", "ingress"] {
            put(format!("qos.{name}.{dir}"), &pod[dir]);
        }
    }
    counters
}

fn terminate(proc: &Proc) {
    let pid = nix::unistd::Pid::from_raw(proc.id().cast_signed());
    // Already gone is fine: the wait that follows sees it.
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
}

/// The config the agent runs with on `node`: bypass only, scoped to the node's cgroup, pins
/// and state private to the node.
pub fn write_agent_config(node: &Node) -> Result<PathBuf, Error> {
    std::fs::create_dir_all(node.run_dir())
        .map_err(|e| Error::io(format!("creating {}", node.run_dir().display()), e))?;
    let path = node.run_dir().join("quicklane.toml");
    let text = format!(
        "[agent]\npin_dir = {:?}\nrun_dir = {:?}\n\n[bypass]\nenabled = true\ncgroup = {:?}\n\n\
         [tc]\nenabled = false\n\n[xdp]\nenabled = false\n",
        node.pin_dir().display().to_string(),
        node.run_dir().display().to_string(),
        node.cgroup_dir().display().to_string(),
    );
    std::fs::write(&path, text).map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
    Ok(path)
}

/// The first two CPUs this process may run on, for a measurement that keeps its client on
/// one and its server on the other (`loadgen --cpu`); `None` with fewer than two.
pub fn two_cpus() -> Option<[usize; 2]> {
    let allowed = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)).ok()?;
    let mut cpus = (0..nix::sched::CpuSet::count()).filter(|&c| allowed.is_set(c).unwrap_or(false));
    Some([cpus.next()?, cpus.next()?])
}

/// Fails early, before anything is built, if a tool is not on PATH.
pub fn require_tools(tools: &[&str]) -> Result<(), Error> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for tool in tools {
        if !std::env::split_paths(&path).any(|dir| dir.join(tool).is_file()) {
            return Err(Error::ToolMissing {
                tool: (*tool).to_owned(),
                source: std::io::ErrorKind::NotFound.into(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_table() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue\n   \
                     0: 00000000:2B67 00000000:0000 0A 00000000:00000000\n   \
                     1: 0100007F:1389 0100007F:9C40 01 00000000:00000000\n";
        assert!(listens(table, 0x2B67));
        assert!(!listens(table, 0x1389), "established, not listening");
        assert!(!listens(table, 80));
    }

    #[test]
    fn unix_listen_table() {
        let table = "Num       RefCount Protocol Flags    Type St Inode Path\n\
                     0000000043bc6529: 00000002 00000000 00010000 0001 01 117 /run/q/rr.sock\n\
                     0000000007c706db: 00000003 00000000 00000000 0001 03 118 /run/q/st.sock\n\
                     0000000007c706dc: 00000003 00000000 00000000 0001 03 119\n";
        assert!(listens_unix(table, Path::new("/run/q/rr.sock")));
        assert!(
            !listens_unix(table, Path::new("/run/q/st.sock")),
            "connected, not listening"
        );
        assert!(!listens_unix(table, Path::new("/run/q")));
    }

    #[test]
    fn counters_include_the_qos_pods() {
        let status = serde_json::json!({
            "counters": {"tc": {"qos_dropped": 3, "egress_packets": 10}},
            "qos": {"pods": [
                {"name": "pod0", "egress": {"packets": 5, "dropped": 1},
                 "ingress": {"packets": 0, "dropped": 0}}
            ]}
        });
        let c = counters_of(&status);
        assert_eq!(c["tc.qos_dropped"], 3);
        assert_eq!(c["qos.pod0.egress.dropped"], 1);
        assert_eq!(c["qos.pod0.ingress.packets"], 0);
        assert_eq!(counters_of(&serde_json::json!({"qos": null})).len(), 0);
    }

    #[test]
    fn tails_keep_the_last_lines() {
        assert_eq!(tail("a\n\nb\nc\nd\n"), "b | c | d");
    }

    #[test]
    fn missing_tools_are_named() {
        let err = require_tools(&["sh", "no-such-tool-quicklane"]).unwrap_err();
        assert!(err.to_string().contains("no-such-tool-quicklane"), "{err}");
        assert!(err.to_string().contains("cargo xtask setup"), "{err}");
    }
}

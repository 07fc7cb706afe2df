//! A child process that cannot outlive the test that started it.

use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use crate::Error;

/// How long `Drop` waits for a killed child to be reaped before giving up on it.
const REAP_TIMEOUT: Duration = Duration::from_secs(5);

/// A spawned child that is killed (`SIGKILL`) and reaped when dropped, so a failing test leaves no
/// stray servers behind.
#[derive(Debug)]
pub struct Proc {
    child: Child,
    what: String,
}

impl Proc {
    pub(crate) fn spawn(cmd: &mut Command, place: &str) -> Result<Self, Error> {
        let what = format!("{} in {place}", cmd.get_program().display());
        let child = cmd
            .spawn()
            .map_err(|e| Error::io(format!("spawning {what}"), e))?;
        tracing::debug!(pid = child.id(), %what, "spawned");
        Ok(Proc { child, what })
    }

    /// The child's process id.
    #[must_use]
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    #[must_use]
    pub fn child(&self) -> &Child {
        &self.child
    }

    /// The child itself, e.g. to take its stdin/stdout/stderr pipes.
    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    /// Waits at most `timeout` for the child to exit.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<ExitStatus, Error> {
        let start = Instant::now();
        let mut pause = Duration::from_millis(1);
        loop {
            if let Some(status) = self
                .child
                .try_wait()
                .map_err(|e| Error::io(format!("waiting for {}", self.what), e))?
            {
                return Ok(status);
            }
            let elapsed = start.elapsed();
            if elapsed >= timeout {
                return Err(Error::Timeout {
                    what: format!("{} (pid {}) to exit", self.what, self.id()),
                    after: timeout,
                });
            }
            std::thread::sleep(pause.min(timeout.saturating_sub(elapsed)));
            pause = (pause * 2).min(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        if let Err(e) = self.child.kill() {
            tracing::warn!(pid = self.id(), what = %self.what, error = %e, "cannot kill child");
        }
        if let Err(e) = self.wait_timeout(REAP_TIMEOUT) {
            tracing::warn!(error = %e, "child not reaped; it is left as a zombie");
        }
    }
}

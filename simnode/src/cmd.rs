//! Running `ip` from iproute2, which keeps topology setup readable and matches what a person
//! would type to reproduce a failure by hand.

use std::process::{Command, Stdio};

use crate::Error;

/// Runs `ip ARGS...` and turns a non-zero exit into an error carrying the command line and its
/// stderr, so a failed step names itself.
pub(crate) fn ip(args: &[&str]) -> Result<(), Error> {
    let cmd = format!("ip {}", args.join(" "));
    tracing::debug!(%cmd, "running");
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| Error::io(format!("spawning `{cmd}` (is iproute2 installed?)"), e))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(Error::Command {
            cmd,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

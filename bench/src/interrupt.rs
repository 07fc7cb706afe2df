//! Ctrl-C: a flag set by the SIGINT handler and checked between (and while waiting on) steps,
//! so a stopped run still tears the simulated node down through the normal drop path.

use std::sync::atomic::{AtomicBool, Ordering};

use nix::sys::signal::{self, SigHandler, Signal};

use crate::error::Error;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: std::ffi::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Routes SIGINT to the flag instead of killing the process.
pub fn install() -> Result<(), Error> {
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe { signal::signal(Signal::SIGINT, SigHandler::Handler(on_sigint)) }
        .map(drop)
        .map_err(|e| Error::io("installing the SIGINT handler", e.into()))
}

/// `Err(Interrupted)` once Ctrl-C was pressed.
pub fn check() -> Result<(), Error> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        Err(Error::Interrupted)
    } else {
        Ok(())
    }
}

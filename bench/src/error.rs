//! Everything that stops a benchmark run, each saying what to do about it.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use crate::tools::ParseError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },

    #[error("simulated node: {0}")]
    Node(#[from] simnode::Error),

    #[error(transparent)]
    Parse(#[from] ParseError),

    #[error("`{command}` ({place}) failed with {status}: {stderr}; its output is in {raw}")]
    ToolFailed {
        command: String,
        place: String,
        status: String,
        stderr: String,
        raw: String,
    },

    #[error("`{command}` ({place}) did not finish within {:.0} s; its output is in {raw}", .after.as_secs_f64())]
    ToolTimeout {
        command: String,
        place: String,
        after: Duration,
        raw: String,
    },

    #[error("{tool} is not installed (spawning it failed: {source}); run `cargo xtask setup`")]
    ToolMissing {
        tool: String,
        #[source]
        source: io::Error,
    },

    #[error("{what} was not listening on {at} after {:.0} s; see {log}", .after.as_secs_f64())]
    NotListening {
        what: String,
        at: String,
        after: Duration,
        log: String,
    },

    #[error("baseline qdisc on {ifname}: {message}")]
    Qdisc { ifname: String, message: String },

    #[error("the agent {problem}; its log is {log}")]
    Agent { problem: String, log: String },

    #[error("cgroup {}: {problem}", .path.display())]
    Cgroup { path: PathBuf, problem: String },

    #[error("{what} gave a result that cannot be used: {problem}")]
    BadSample { what: String, problem: String },

    #[error("interrupted: the simulated node was torn down and no report was written")]
    Interrupted,

    #[error("{} is not a results file of this harness: {problem}", .path.display())]
    BadResults { path: PathBuf, problem: String },

    #[error("{count} ratio(s) regressed beyond their measured noise:\n{details}")]
    Regression { count: usize, details: String },

    #[error("invalid arguments: {0}")]
    Usage(String),
}

impl Error {
    pub(crate) fn io(what: impl Into<String>, source: io::Error) -> Self {
        Self::Io {
            what: what.into(),
            source,
        }
    }
}

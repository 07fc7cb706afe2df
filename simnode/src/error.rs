use std::time::Duration;

/// Everything that can go wrong while building, using or tearing down a simulated node.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "simnode needs root (euid is {euid}): network namespaces, veths and cgroups need \
         CAP_SYS_ADMIN and CAP_NET_ADMIN; run the tests as root"
    )]
    NotRoot { euid: u32 },

    #[error("`{cmd}` failed ({status}): {stderr}")]
    Command {
        cmd: String,
        status: String,
        stderr: String,
    },

    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },

    #[error(
        "no cgroup2 filesystem in /proc/self/mountinfo; mount one (e.g. \
         `mount -t cgroup2 none /sys/fs/cgroup`) or boot with cgroup v2 enabled"
    )]
    NoCgroup2,

    #[error("{requested} pods requested but a node holds at most {max} (one /24 per pod in 10.77.0.0/16)")]
    TooManyPods { requested: usize, max: usize },

    #[error("timed out after {after:?} waiting for {what}")]
    Timeout { what: String, after: Duration },

    #[error("teardown of simulated node {id} was incomplete: {}", .failures.join("; "))]
    Teardown { id: String, failures: Vec<String> },
}

impl Error {
    pub(crate) fn io(what: impl Into<String>, source: impl Into<std::io::Error>) -> Self {
        Error::Io {
            what: what.into(),
            source: source.into(),
        }
    }
}

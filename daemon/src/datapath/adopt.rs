//! Pacing for TCP sockets that were established before their pod was shaped. sock_ops turns
//! a socket's pacing callbacks on at establishment only; for the rest, the `ql_adopt`
//! iterator (`iter/tcp`) turns them on, one pass per network namespace on the node, since a
//! TCP iterator sees the namespace it is opened in. From its next ACK such a socket is paced
//! like any other (see `quicklane_common::adopt`).
use std::{
    collections::BTreeSet,
    fs::File,
    io::Read,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::OnceLock,
};

use aya::{
    programs::{Iter, ProgramError},
    Ebpf,
};
use quicklane_common::adopt::{AdoptConfig, AdoptRecord, ADOPTED, ALREADY};
use serde::{Deserialize, Serialize};

use super::btf;

pub const PROGRAM: &str = "ql_adopt";

#[derive(Debug, thiserror::Error)]
pub enum AdoptError {
    #[error("loading {PROGRAM}: {0}")]
    Program(#[from] ProgramError),
    #[error("network namespace {path}: {message}")]
    Netns { path: PathBuf, message: String },
}

/// What the passes so far did, for `quicklane status`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct AdoptionSummary {
    /// Passes over the node's namespaces (one per change of the shaped pods).
    pub passes: u64,
    /// Namespaces the last pass looked into.
    pub namespaces: u64,
    /// Sockets whose pacing callbacks a pass turned on.
    pub adopted: u64,
    /// Shaped sockets that were paced already.
    pub already: u64,
    /// Shaped sockets the kernel refused to adopt, and why (the last refusal).
    pub refused: u64,
    pub refusal: Option<String>,
    /// Why the last pass could not run, if it could not.
    pub error: Option<String>,
}

/// The iterator's load-time layout global, from the kernel's BTF; `None` without BTF (no
/// iterator can load there either).
pub fn config() -> Option<AdoptConfig> {
    static CONFIG: OnceLock<Option<AdoptConfig>> = OnceLock::new();
    *CONFIG.get_or_init(|| {
        let bytes = std::fs::read(btf::VMLINUX).ok()?;
        let offsets =
            btf::member_offsets(&bytes, "sock_common", &["skc_v6_daddr", "skc_v6_rcv_saddr"]);
        // A kernel without IPv6 has neither member, and no IPv6 sockets to adopt.
        let [v6_daddr, v6_rcv_saddr] = match offsets {
            Ok(o) => [o[0], o[1]],
            Err(btf::BtfError::NoMember { .. }) => [0, 0],
            Err(e) => {
                tracing::warn!(
                    "{}: {e}; IPv6 sockets will not be adopted into pacing",
                    btf::VMLINUX
                );
                [0, 0]
            }
        };
        Some(AdoptConfig {
            v6_daddr,
            v6_rcv_saddr,
        })
    })
}

/// Runs one pass over every network namespace on the node and adds its outcome to `summary`.
pub fn run(ebpf: &mut Ebpf, summary: &mut AdoptionSummary) {
    summary.passes += 1;
    summary.error = match pass(ebpf, summary) {
        Ok(()) => None,
        Err(e) => Some(e.to_string()),
    };
    if let Some(e) = &summary.error {
        tracing::warn!("existing sockets of shaped pods not adopted into pacing: {e}");
    }
}

fn pass(ebpf: &mut Ebpf, summary: &mut AdoptionSummary) -> Result<(), AdoptError> {
    let program = ebpf.program_mut(PROGRAM).ok_or(ProgramError::NotLoaded)?;
    if program.fd().is_err() {
        super::load_program(program)?;
    }
    let prog: &mut Iter = program.try_into()?;
    let mut namespaces = 0;
    for path in namespace_paths() {
        let Some(records) = in_namespace(&path, prog)? else {
            continue;
        };
        namespaces += 1;
        for record in records {
            match record.result {
                ADOPTED => summary.adopted += 1,
                ALREADY => summary.already += 1,
                errno => {
                    summary.refused += 1;
                    summary.refusal = Some(refusal(errno));
                }
            }
        }
    }
    summary.namespaces = namespaces;
    tracing::info!(
        namespaces,
        adopted = summary.adopted,
        already = summary.already,
        refused = summary.refused,
        "existing sockets of shaped pods adopted into pacing"
    );
    if let Some(r) = &summary.refusal {
        tracing::warn!("{} existing sockets not adopted: {r}", summary.refused);
    }
    Ok(())
}

fn refusal(errno: i32) -> String {
    let e = std::io::Error::from_raw_os_error(-errno);
    if errno == -libc::EINVAL {
        format!("{e}: this kernel cannot set sock_ops callbacks from outside sock_ops (TCP_BPF_SOCK_OPS_CB_FLAGS, Linux 6.12); they are paced from their next connection, and held by the tc shaper until then")
    } else {
        e.to_string()
    }
}

/// One path per distinct network namespace: every process's, and the named ones of
/// `ip netns`, which may have no process.
fn namespace_paths() -> Vec<PathBuf> {
    let procs = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .map(|e| e.path().join("ns/net"));
    let named = std::fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path());
    let mut seen = BTreeSet::new();
    procs
        .chain(named)
        .filter(|p| {
            // A process that exits meanwhile is skipped: its namespace is gone or seen
            // through another.
            std::fs::metadata(p).is_ok_and(|m| seen.insert((m.dev(), m.ino())))
        })
        .collect()
}

/// The iterator's records in the namespace at `path`; `None` if it vanished meanwhile.
fn in_namespace(path: &Path, prog: &mut Iter) -> Result<Option<Vec<AdoptRecord>>, AdoptError> {
    let Ok(ns) = File::open(path) else {
        return Ok(None);
    };
    let netns_err = |message: String| AdoptError::Netns {
        path: path.to_owned(),
        message,
    };
    // A thread of its own: setns changes the calling thread's namespace for good.
    let bytes = std::thread::scope(|s| {
        s.spawn(|| -> Result<Vec<u8>, AdoptError> {
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| netns_err(format!("entering it: {e}")))?;
            // The iterator's namespace is the opener's: the link may be made anywhere, the
            // iterator file only here.
            let link = prog.attach()?;
            let mut file = prog
                .take_link(link)?
                .into_file()
                .map_err(|e| netns_err(format!("opening the iterator: {e}")))?;
            let mut bytes = Vec::new();
            file.read_to_end(&mut bytes)
                .map_err(|e| netns_err(format!("reading the iterator: {e}")))?;
            Ok(bytes)
        })
        .join()
        .unwrap_or_else(|_| Err(netns_err("the pass panicked".to_owned())))
    })?;
    Ok(Some(
        bytes
            .chunks_exact(size_of::<AdoptRecord>())
            .map(|c| AdoptRecord {
                result: i32::from_ne_bytes([c[0], c[1], c[2], c[3]]),
            })
            .collect(),
    ))
}

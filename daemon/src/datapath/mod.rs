//! Loading quicklane's BPF objects, attaching what the config asks for, pinning it all under
//! the pin directory, and re-adopting pins a previous agent left behind.
mod objects;
mod plan;
pub mod rules;

use std::{
    collections::BTreeMap,
    fs::File,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
};

use aya::{
    maps::{Map, MapData},
    programs::{
        links::{FdLink, PinnedLink},
        xdp::XdpMode as AyaXdpMode,
        CgroupAttachMode, SchedClassifier, SkMsg, SockOps, TcAttachType, Xdp,
    },
    Ebpf, EbpfLoader,
};
pub use objects::Object;
use plan::{Attachment, Target};
use quicklane_common::{SockopsConfig, ABI_VERSION, SOCKOPS_F_BYPASS};
use serde::Serialize;

use crate::{config::Config, config::XdpMode, paths::PinDir, sys};

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("cgroup {path}: {source}; set bypass.cgroup to an existing cgroup v2 directory")]
    Cgroup {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no cgroup v2 hierarchy is mounted; mount one (`mount -t cgroup2 none /sys/fs/cgroup`) or set bypass.cgroup")]
    NoCgroup2,
    #[error(
        "{key}: interface {ifname:?} does not exist in the agent's network namespace ({source})"
    )]
    NoInterface {
        key: &'static str,
        ifname: String,
        source: nix::Error,
    },
    #[error("loading BPF object {object}: {source}")]
    Load {
        object: &'static str,
        source: aya::EbpfError,
    },
    #[error("BPF object {object} has no program {program}")]
    MissingProgram {
        object: &'static str,
        program: &'static str,
    },
    #[error("program {program} failed to load (verifier or kernel refused it): {source:?}")]
    ProgramLoad {
        program: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("attaching {program} to {target}: {message}")]
    Attach {
        program: &'static str,
        target: String,
        message: String,
    },
    #[error("pin {path}: {message}")]
    Pin { path: PathBuf, message: String },
    #[error("{key}: {value}: {message}")]
    Rule {
        key: &'static str,
        value: String,
        message: String,
    },
}

/// One attachment as the agent and `quicklane status` report it.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct AttachmentReport {
    pub pin: String,
    pub program: String,
    pub target: String,
    /// true when the link was found pinned by a previous agent and kept as it was.
    pub adopted: bool,
}

/// The rule maps live in the sockops object; rules must be in place before its programs
/// are attached, so the first sockets are judged by them.
const RULES_STATE_MAP: &str = "QL_RULES_STATE";

/// The running datapath: links held (and pinned) until shutdown.
#[derive(Debug)]
pub struct Datapath {
    pins: PinDir,
    links: BTreeMap<String, PinnedLink>,
    report: Vec<AttachmentReport>,
    rules: Option<rules::RulesSummary>,
}

impl Datapath {
    /// Attaches everything `config` enables, re-adopting matching pinned links and detaching
    /// pinned links the config no longer wants.
    pub fn start(config: &Config) -> Result<Self, DatapathError> {
        let pins = PinDir::new(&config.agent.pin_dir);
        let wanted = plan::plan(config, || {
            crate::cgroup::cgroup2_mount().ok_or(DatapathError::NoCgroup2)
        })?;
        for dir in [pins.maps(), pins.links()] {
            std::fs::create_dir_all(&dir).map_err(|e| pin_err(&dir, e))?;
        }
        let mut this = Self {
            pins,
            links: BTreeMap::new(),
            report: Vec::new(),
            rules: None,
        };
        this.detach_unwanted(&wanted)?;
        let mut loaded = Loaded::default();
        if let Err(e) = this.apply_rules(config, &mut loaded) {
            this.undo_partial_start();
            return Err(e);
        }
        if let Err(e) = this.attach_all(&wanted, config, &mut loaded) {
            this.undo_partial_start();
            return Err(e);
        }
        Ok(this)
    }

    fn apply_rules(&mut self, config: &Config, loaded: &mut Loaded) -> Result<(), DatapathError> {
        if !config.bypass.enabled {
            return Ok(());
        }
        if !self.pins.map(RULES_STATE_MAP).exists() {
            // Loading the object creates (and pins) its maps.
            loaded.get(Object::Sockops, config, &self.pins)?;
        }
        self.reload_rules(config)
    }

    /// Rewrites the eligibility rules from `config` (SIGHUP); live connections follow on
    /// their next message.
    pub fn reload_rules(&mut self, config: &Config) -> Result<(), DatapathError> {
        let summary = rules::apply(&self.pins, &config.bypass)?;
        tracing::info!(
            generation = summary.generation,
            cgroups = summary.cgroups,
            cidrs = summary.cidrs,
            ports = summary.ports,
            "bypass rules applied"
        );
        self.rules = Some(summary);
        Ok(())
    }

    pub fn rules(&self) -> Option<&rules::RulesSummary> {
        self.rules.as_ref()
    }

    fn attach_all(
        &mut self,
        wanted: &[Attachment],
        config: &Config,
        loaded: &mut Loaded,
    ) -> Result<(), DatapathError> {
        let this = self;
        for att in wanted {
            let path = this.pins.link(&att.pin_name);
            let adopted = path.exists();
            let link = if adopted {
                PinnedLink::from_pin(&path).map_err(|e| pin_err(&path, e))?
            } else {
                let obj = loaded.get(att.object, config, &this.pins)?;
                attach(obj, att, &path)?
            };
            tracing::info!(pin = %att.pin_name, program = att.program, target = %att.target.describe(), adopted, "attached");
            this.report.push(AttachmentReport {
                pin: att.pin_name.clone(),
                program: att.program.to_owned(),
                target: att.target.describe(),
                adopted,
            });
            this.links.insert(att.pin_name.clone(), link);
        }
        Ok(())
    }

    /// A start that failed half-way must not leave its own attachments behind; links adopted
    /// from a previous agent stay as they were.
    fn undo_partial_start(&mut self) {
        let adopted_any = self.report.iter().any(|r| r.adopted);
        for r in self.report.iter().filter(|r| !r.adopted) {
            if let Some(link) = self.links.remove(&r.pin) {
                if let Err(e) = link.unpin() {
                    tracing::warn!(pin = %r.pin, "undoing a failed start: {e}");
                }
            }
        }
        if !adopted_any {
            if let Err(e) = remove_pins(&self.pins) {
                tracing::warn!("undoing a failed start: {e}");
            }
        }
    }

    pub fn report(&self) -> &[AttachmentReport] {
        &self.report
    }

    fn detach_unwanted(&self, wanted: &[Attachment]) -> Result<(), DatapathError> {
        for name in pinned_names(&self.pins.links()) {
            if wanted.iter().any(|a| a.pin_name == name) {
                continue;
            }
            let path = self.pins.link(&name);
            let link = PinnedLink::from_pin(&path).map_err(|e| pin_err(&path, e))?;
            link.unpin().map_err(|e| pin_err(&path, e))?;
            tracing::info!(pin = %name, "detached a pinned link the configuration no longer wants");
        }
        Ok(())
    }

    /// Detaches everything and removes every pin, or with `keep` leaves the datapath running
    /// for the next agent to adopt.
    pub fn shutdown(self, keep: bool) -> Result<(), DatapathError> {
        if keep {
            tracing::info!(pin_dir = %self.pins.root().display(), "leaving the datapath attached for the next agent");
            return Ok(());
        }
        for (name, link) in self.links {
            let path = self.pins.link(&name);
            link.unpin().map_err(|e| pin_err(&path, e))?;
        }
        remove_pins(&self.pins)?;
        tracing::info!("detached all programs and removed the pins");
        Ok(())
    }
}

/// Removes every pin below the pin directory and the directory itself; used on shutdown and
/// by tests that check nothing is left.
pub fn remove_pins(pins: &PinDir) -> Result<(), DatapathError> {
    for dir in [pins.links(), pins.maps()] {
        for name in pinned_names(&dir) {
            let path = dir.join(name);
            std::fs::remove_file(&path).map_err(|e| pin_err(&path, e))?;
        }
        remove_dir_if_present(&dir)?;
    }
    remove_dir_if_present(pins.root())
}

/// Removes the pin directories only where they are empty: after a refused start nothing of
/// ours is left, and whatever a previous agent kept is not touched.
pub fn remove_empty_dirs(pins: &PinDir) {
    for dir in [pins.links(), pins.maps(), pins.root().to_owned()] {
        let _ = std::fs::remove_dir(dir);
    }
}

fn remove_dir_if_present(dir: &Path) -> Result<(), DatapathError> {
    match std::fs::remove_dir(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(pin_err(dir, e)),
        _ => Ok(()),
    }
}

pub fn pinned_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    names
}

fn pin_err(path: &Path, e: impl std::fmt::Display) -> DatapathError {
    DatapathError::Pin {
        path: path.to_owned(),
        message: e.to_string(),
    }
}

/// Objects loaded on demand: a restart that adopts every link loads nothing.
#[derive(Default)]
struct Loaded(BTreeMap<Object, Ebpf>);

impl Loaded {
    fn get(
        &mut self,
        object: Object,
        config: &Config,
        pins: &PinDir,
    ) -> Result<&mut Ebpf, DatapathError> {
        match self.0.entry(object) {
            std::collections::btree_map::Entry::Occupied(e) => Ok(e.into_mut()),
            std::collections::btree_map::Entry::Vacant(e) => {
                Ok(e.insert(load(object, config, pins)?))
            }
        }
    }
}

pub fn load(object: Object, config: &Config, pins: &PinDir) -> Result<Ebpf, DatapathError> {
    let sockops_config = SockopsConfig {
        abi_version: ABI_VERSION,
        flags: if config.bypass.enabled {
            SOCKOPS_F_BYPASS
        } else {
            0
        },
        small_msg_bytes: config.bypass.small_msg_bytes,
        small_msg_streak: config.bypass.small_msg_streak,
    };
    let mut loader = EbpfLoader::new();
    let maps_dir = pins.maps();
    loader.default_map_pin_directory(&maps_dir);
    if object == Object::Sockops {
        loader
            .map_max_entries("QL_SOCKS", config.bypass.max_sockets)
            .map_max_entries("QL_META", config.bypass.max_sockets)
            .override_global("QL_SOCKOPS_CONFIG", &sockops_config, true);
    }
    loader
        .load(object.bytes())
        .map_err(|source| DatapathError::Load {
            object: object.name(),
            source,
        })
}

/// One program may serve several attachments (tc on many interfaces); load it only once.
macro_rules! load_once {
    ($prog:expr, $err:expr) => {
        if $prog.fd().is_err() {
            $prog.load().map_err($err)?;
        }
    };
}

fn attach(ebpf: &mut Ebpf, att: &Attachment, pin: &Path) -> Result<PinnedLink, DatapathError> {
    let program = att.program;
    let fail = |message: String| DatapathError::Attach {
        program,
        target: att.target.describe(),
        message,
    };
    let loaded = |source| DatapathError::ProgramLoad { program, source };
    let link: FdLink = match &att.target {
        Target::Cgroup(path) => {
            let cgroup = File::open(path).map_err(|source| DatapathError::Cgroup {
                path: path.clone(),
                source,
            })?;
            let prog: &mut SockOps = program_mut(ebpf, att)?;
            load_once!(prog, loaded);
            // A cgroup bpf_link always coexists with other programs; the kernel refuses
            // BPF_F_ALLOW_MULTI on link_create, so Single is the right mode here.
            let id = prog
                .attach(&cgroup, CgroupAttachMode::Single)
                .map_err(|e| fail(chain(&e)))?;
            fd_link(prog.take_link(id)).map_err(fail)?
        }
        Target::Sockhash => {
            let map_fd = {
                let map = ebpf.map("QL_SOCKS").ok_or(DatapathError::MissingProgram {
                    object: att.object.name(),
                    program: "QL_SOCKS",
                })?;
                let Map::SockHash(data) = map else {
                    return Err(fail("QL_SOCKS is not a sockhash".to_owned()));
                };
                data.fd()
                    .as_fd()
                    .try_clone_to_owned()
                    .map_err(|e| fail(chain(&e)))?
            };
            let prog: &mut SkMsg = program_mut(ebpf, att)?;
            load_once!(prog, loaded);
            let prog_fd = prog.fd().map_err(|e| fail(chain(&e)))?;
            let link = sys::sk_msg_link_create(prog_fd.as_fd(), map_fd.as_fd())
                .map_err(|e| fail(format!("{e}; sk_msg links need kernel >= 6.10")))?;
            sys::obj_pin(link.as_fd(), pin).map_err(|e| pin_err(pin, e))?;
            return PinnedLink::from_pin(pin).map_err(|e| pin_err(pin, e));
        }
        Target::TcEgress { ifname, .. } | Target::TcIngress { ifname, .. } => {
            let kind = if matches!(att.target, Target::TcEgress { .. }) {
                TcAttachType::Egress
            } else {
                TcAttachType::Ingress
            };
            let prog: &mut SchedClassifier = program_mut(ebpf, att)?;
            load_once!(prog, loaded);
            let id = prog.attach(ifname, kind).map_err(|e| fail(chain(&e)))?;
            fd_link(prog.take_link(id))
                .map_err(|e| fail(format!("{e}; pinnable tc links need TCX (kernel >= 6.6)")))?
        }
        Target::Xdp { ifname, mode, .. } => {
            let flags = match mode {
                XdpMode::Auto => AyaXdpMode::Default,
                XdpMode::Skb => AyaXdpMode::Skb,
                XdpMode::Native => AyaXdpMode::Driver,
            };
            let prog: &mut Xdp = program_mut(ebpf, att)?;
            load_once!(prog, loaded);
            let id = prog.attach(ifname, flags).map_err(|e| {
                let hint = if *mode == XdpMode::Native {
                    "; the driver may have no native XDP: set xdp.mode = \"skb\""
                } else {
                    ""
                };
                fail(format!("{e}{hint}"))
            })?;
            fd_link(prog.take_link(id)).map_err(fail)?
        }
    };
    link.pin(pin).map_err(|e| pin_err(pin, e))
}

/// An error with its sources: aya's `SyscallError` keeps the errno in its source.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        next = cause.source();
    }
    s
}

/// A freshly attached link as a pinnable fd link; legacy (non-link) attachments are refused.
fn fd_link<L>(taken: Result<L, aya::programs::ProgramError>) -> Result<FdLink, String>
where
    FdLink: TryFrom<L, Error = aya::programs::links::LinkError>,
{
    let link = taken.map_err(|e| chain(&e))?;
    FdLink::try_from(link)
        .map_err(|e| format!("{e}: the kernel gave a legacy attachment, not a bpf_link"))
}

fn program_mut<'a, T>(ebpf: &'a mut Ebpf, att: &Attachment) -> Result<&'a mut T, DatapathError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program>,
{
    let missing = DatapathError::MissingProgram {
        object: att.object.name(),
        program: att.program,
    };
    let prog = ebpf.program_mut(att.program).ok_or(missing)?;
    prog.try_into().map_err(|_| DatapathError::MissingProgram {
        object: att.object.name(),
        program: att.program,
    })
}

/// One program that passed the verifier, for `quicklane verify`.
#[derive(Debug, Clone, Serialize)]
pub struct VerifiedProgram {
    pub object: &'static str,
    pub program: &'static str,
    pub instructions: Option<u32>,
}

/// Loads every program of every object into the kernel without attaching anything, so the
/// verifier judges all of them. Maps are pinned in a scratch directory removed afterwards.
pub fn verify_all(
    config: &Config,
    scratch: &PinDir,
) -> Result<Vec<VerifiedProgram>, DatapathError> {
    std::fs::create_dir_all(scratch.maps()).map_err(|e| pin_err(&scratch.maps(), e))?;
    let result = verify_objects(config, scratch);
    let cleaned = remove_pins(scratch);
    let verified = result?;
    cleaned?;
    Ok(verified)
}

fn verify_objects(
    config: &Config,
    scratch: &PinDir,
) -> Result<Vec<VerifiedProgram>, DatapathError> {
    let mut out = Vec::new();
    for object in Object::ALL {
        let mut ebpf = load(object, config, scratch)?;
        for &program in object.programs() {
            let prog = ebpf
                .program_mut(program)
                .ok_or(DatapathError::MissingProgram {
                    object: object.name(),
                    program,
                })?;
            let loaded = |source| DatapathError::ProgramLoad { program, source };
            match prog {
                aya::programs::Program::SockOps(p) => p.load().map_err(loaded)?,
                aya::programs::Program::SkMsg(p) => p.load().map_err(loaded)?,
                aya::programs::Program::SchedClassifier(p) => p.load().map_err(loaded)?,
                aya::programs::Program::Xdp(p) => p.load().map_err(loaded)?,
                _ => {
                    return Err(DatapathError::MissingProgram {
                        object: object.name(),
                        program,
                    })
                }
            }
            let instructions = prog
                .info()
                .ok()
                .and_then(|i| i.verified_instruction_count());
            out.push(VerifiedProgram {
                object: object.name(),
                program,
                instructions,
            });
        }
    }
    Ok(out)
}

/// Opens a pinned map read-only for status and tests.
pub fn open_pinned_map(pins: &PinDir, name: &str) -> Result<MapData, DatapathError> {
    let path = pins.map(name);
    MapData::from_pin(&path).map_err(|e| pin_err(&path, e))
}

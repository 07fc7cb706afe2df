//! Loading quicklane's BPF objects, attaching what the config asks for, pinning it all under
//! the pin directory, and re-adopting pins a previous agent left behind.
pub mod adopt;
mod attach;
pub(crate) mod btf;
mod fq;
pub mod legacy;
mod objects;
mod plan;
pub mod qos;
pub mod rules;

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use aya::{maps::MapData, programs::links::PinnedLink, Ebpf, EbpfLoader};
pub use objects::Object;
use plan::Attachment;
use quicklane_common::{
    SockopsConfig, ABI_VERSION, SOCKOPS_F_BYPASS, SOCKOPS_F_CGROUP_ORIGIN,
    SOCKOPS_F_LOOPBACK_STREAMS_TCP, SOCKOPS_F_PACING,
};
use serde::Serialize;

use crate::{config::Config, paths::PinDir};

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
    #[error("qdisc on {ifname}: {message}")]
    Qdisc { ifname: String, message: String },
    #[error("qos: {0}")]
    Qos(String),
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
    links: BTreeMap<String, Held>,
    report: Vec<AttachmentReport>,
    rules: Option<rules::RulesSummary>,
    qos: Option<qos::QosState>,
    /// What the datapath was started with: pods arriving later need its objects.
    config: Config,
    loaded: Loaded,
    /// Shaped pod addresses whose existing sockets a pass has adopted into pacing.
    adopted_for: BTreeSet<std::net::IpAddr>,
    adoption: adopt::AdoptionSummary,
}

/// What keeps one attachment in place: a pinned bpf_link, or (kernels without that link kind)
/// a legacy attachment marked by its pinned program.
#[derive(Debug)]
pub(super) enum Held {
    Link(PinnedLink),
    Legacy(legacy::Legacy),
}

impl Held {
    fn adopt(pins: &PinDir, name: &str) -> Result<Option<Self>, DatapathError> {
        let link = pins.link(name);
        if link.exists() {
            return PinnedLink::from_pin(&link)
                .map(|l| Some(Self::Link(l)))
                .map_err(|e| pin_err(&link, e));
        }
        if pins.link(&legacy::pin_name(name)).exists() {
            return legacy::Legacy::from_pin(name, pins).map(|l| Some(Self::Legacy(l)));
        }
        Ok(None)
    }

    /// Detaches and removes the pin.
    fn release(self, pins: &PinDir, name: &str) -> Result<(), DatapathError> {
        match self {
            Self::Link(link) => {
                let path = pins.link(name);
                link.unpin().map(drop).map_err(|e| pin_err(&path, e))
            }
            Self::Legacy(l) => l.detach(pins),
        }
    }
}

impl Datapath {
    /// Attaches everything `config` enables and shapes the `source` pods (from the pod
    /// source, on top of the config file's), re-adopting matching pinned links and
    /// detaching pinned links nothing wants any more.
    pub fn start(
        config: &Config,
        source: (Vec<qos::SourcePod>, Vec<qos::RefusedPod>),
    ) -> Result<Self, DatapathError> {
        let pins = PinDir::new(&config.agent.pin_dir);
        let source_interfaces: Vec<String> =
            source.0.iter().map(|(p, _)| p.interface.clone()).collect();
        let wanted = plan::plan(config, &source_interfaces, || {
            crate::cgroup::cgroup2_mount().ok_or(DatapathError::NoCgroup2)
        })?;
        for dir in [pins.maps(), pins.links()] {
            std::fs::create_dir_all(&dir).map_err(|e| pin_err(&dir, e))?;
        }
        let enforcement = if config.qos.enabled {
            Some(qos::enforcement(config.qos.mode)?)
        } else {
            None
        };
        let mut this = Self {
            pins,
            links: BTreeMap::new(),
            report: Vec::new(),
            rules: None,
            qos: None,
            config: config.clone(),
            loaded: Loaded::new(qos::bpf_config(&config.qos, enforcement)),
            adopted_for: BTreeSet::new(),
            adoption: adopt::AdoptionSummary::default(),
        };
        this.detach_unwanted(&wanted)?;
        if let Err(e) = this.apply_rules() {
            this.undo_partial_start();
            return Err(e);
        }
        // QoS before anything is attached: the first sockets and packets already meet the
        // policy (a socket judged for the bypass without it would never be judged again).
        if let Some(enforcement) = enforcement {
            let started = this
                .ensure_maps(&[
                    qos::PODS_MAP,
                    qos::IFINDEX_MAP,
                    qos::ADDRS_MAP,
                    qos::SENDERS_MAP,
                ])
                .and_then(|()| qos::QosState::start(&this.pins, config, enforcement, source));
            match started {
                Ok(state) => this.qos = Some(state),
                Err(e) => {
                    this.undo_partial_start();
                    return Err(e);
                }
            }
        }
        if let Err(e) = this.attach_all(&wanted) {
            if let Some(q) = this.qos.take() {
                if let Err(e) = q.shutdown() {
                    tracing::warn!("undoing a failed start: {e}");
                }
            }
            this.undo_partial_start();
            return Err(e);
        }
        this.adopt_existing_sockets();
        Ok(this)
    }

    /// Once sock_ops is attached and a policy is written for addresses not shaped before:
    /// their pods' established sockets start pacing too (see `adopt`).
    fn adopt_existing_sockets(&mut self) {
        let Some(qos) = &self.qos else {
            return;
        };
        let shaped = qos.shaped_addresses();
        let new = !shaped.is_subset(&self.adopted_for);
        self.adopted_for = shaped;
        if !new {
            return;
        }
        match self.loaded.get(Object::Sockops, &self.config, &self.pins) {
            Ok(ebpf) => adopt::run(ebpf, &mut self.adoption),
            Err(e) => {
                tracing::warn!("existing sockets of shaped pods not adopted into pacing: {e}");
                self.adoption.passes += 1;
                self.adoption.error = Some(e.to_string());
            }
        }
    }

    /// What adopting existing sockets into pacing did (None: QoS disabled).
    pub fn adoption(&self) -> Option<&adopt::AdoptionSummary> {
        self.qos.as_ref().map(|_| &self.adoption)
    }

    /// Loads (and so pins) the objects holding `maps` if a previous agent did not leave them.
    fn ensure_maps(&mut self, maps: &[&str]) -> Result<(), DatapathError> {
        for &name in maps {
            if !self.pins.map(name).exists() {
                let object = if name == qos::ADDRS_MAP || name == qos::SENDERS_MAP {
                    Object::Sockops
                } else {
                    Object::Tc
                };
                self.loaded.get(object, &self.config, &self.pins)?;
            }
        }
        Ok(())
    }

    /// SIGHUP: re-run the allocator on the new policy and rewrite the rate tables; pods
    /// added to or removed from the file get (or lose) the tc shaper.
    pub fn reload_qos(&mut self, config: &Config) -> Result<(), DatapathError> {
        match &mut self.qos {
            Some(state) => state.reload(&self.pins, config)?,
            None => return Ok(()),
        }
        self.sync_pod_interfaces()?;
        self.adopt_existing_sockets();
        Ok(())
    }

    /// The pod source's current view (see `qos::QosState::set_source_pods`). Bypassed
    /// connections of a pod that just became shaped leave the bypass through the rules
    /// generation, bumped once the pod's policy is in place.
    pub fn set_source_pods(
        &mut self,
        pods: Vec<qos::SourcePod>,
        refused: Vec<qos::RefusedPod>,
    ) -> Result<(), DatapathError> {
        match &mut self.qos {
            Some(state) => state.set_source_pods(&self.pins, pods, refused)?,
            None => return Ok(()),
        }
        self.sync_pod_interfaces()?;
        if self.config.bypass.enabled {
            let config = self.config.clone();
            self.reload_rules(&config)?;
        }
        self.adopt_existing_sockets();
        Ok(())
    }

    /// Puts the tc programs on every interface a pod is shaped on (or `[tc]` names), and
    /// takes them off interfaces whose pod is gone.
    fn sync_pod_interfaces(&mut self) -> Result<(), DatapathError> {
        let Some(qos) = &self.qos else {
            return Ok(());
        };
        let mut ifnames: BTreeSet<String> = self.config.tc_interfaces().into_iter().collect();
        ifnames.extend(qos.interfaces());
        let mut wanted = Vec::new();
        for ifname in &ifnames {
            wanted.extend(plan::tc_attachments(ifname, "qos.pods.interface")?);
        }
        let stale: Vec<String> = self
            .links
            .keys()
            .filter(|pin| plan::is_tc_pin(pin) && !wanted.iter().any(|a| &a.pin_name == *pin))
            .cloned()
            .collect();
        for pin in stale {
            if let Some(held) = self.links.remove(&pin) {
                held.release(&self.pins, &pin)?;
            }
            self.report.retain(|r| r.pin != pin);
            tracing::info!(pin = %pin, "detached: no pod is shaped there any more");
        }
        wanted.retain(|a| !self.links.contains_key(&a.pin_name));
        self.attach_all(&wanted)
    }

    /// Periodic QoS upkeep (see `qos::QosState::tick`); true if the policy was rewritten.
    pub fn tick_qos(&mut self) -> Result<bool, DatapathError> {
        match &mut self.qos {
            Some(state) => {
                let before = state.summary().generation;
                state.tick(&self.pins)?;
                Ok(state.summary().generation != before)
            }
            None => Ok(false),
        }
    }

    pub fn qos(&self) -> Option<&qos::QosSummary> {
        self.qos.as_ref().map(qos::QosState::summary)
    }

    fn apply_rules(&mut self) -> Result<(), DatapathError> {
        let config = &self.config;
        if !config.bypass.enabled {
            return Ok(());
        }
        let cgroup_rules =
            !config.bypass.include_cgroups.is_empty() || !config.bypass.exclude_cgroups.is_empty();
        if cgroup_rules && !cgroup_origin_supported() {
            return Err(DatapathError::Rule {
                key: "bypass.include_cgroups/exclude_cgroups",
                value: "set".to_owned(),
                message: "this kernel does not offer the current-cgroup helpers to sock_ops \
                          (see `quicklane features`), so sockets cannot be told apart by pod; \
                          use include_cidrs/exclude_cidrs instead"
                    .to_owned(),
            });
        }
        if !self.pins.map(RULES_STATE_MAP).exists() {
            // Loading the object creates (and pins) its maps.
            self.loaded.get(Object::Sockops, config, &self.pins)?;
        }
        let config = self.config.clone();
        self.reload_rules(&config)
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
        // The rules are the live part of `[bypass]`: kept so a later generation bump (a pod
        // becoming shaped) re-applies these, not the ones the agent started with.
        self.config.bypass.rules_from(&config.bypass);
        Ok(())
    }

    pub fn rules(&self) -> Option<&rules::RulesSummary> {
        self.rules.as_ref()
    }

    fn attach_all(&mut self, wanted: &[Attachment]) -> Result<(), DatapathError> {
        let this = self;
        for att in wanted {
            let found = Held::adopt(&this.pins, &att.pin_name)?;
            let adopted = found.is_some();
            let link = if let Some(held) = found {
                held
            } else {
                let obj = this.loaded.get(att.object, &this.config, &this.pins)?;
                attach::attach(obj, att, &this.pins)?
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
            if let Some(held) = self.links.remove(&r.pin) {
                if let Err(e) = held.release(&self.pins, &r.pin) {
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
        for file in pinned_names(&self.pins.links()) {
            let name = legacy::base_name(&file).unwrap_or(&file);
            if wanted.iter().any(|a| a.pin_name == name) {
                continue;
            }
            if let Some(held) = Held::adopt(&self.pins, name)? {
                held.release(&self.pins, name)?;
            }
            tracing::info!(pin = %name, "detached an attachment the configuration no longer wants");
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
        if let Some(q) = self.qos {
            q.shutdown()?;
        }
        for (name, held) in self.links {
            held.release(&self.pins, &name)?;
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

pub(crate) fn pin_err(path: &Path, e: impl std::fmt::Display) -> DatapathError {
    DatapathError::Pin {
        path: path.to_owned(),
        message: e.to_string(),
    }
}

/// Objects loaded on demand: a restart that adopts every link loads nothing.
#[derive(Debug)]
struct Loaded {
    objects: BTreeMap<Object, Ebpf>,
    tc: quicklane_common::qos::QosConfig,
}

impl Loaded {
    fn new(tc: quicklane_common::qos::QosConfig) -> Self {
        Self {
            objects: BTreeMap::new(),
            tc,
        }
    }

    fn get(
        &mut self,
        object: Object,
        config: &Config,
        pins: &PinDir,
    ) -> Result<&mut Ebpf, DatapathError> {
        match self.objects.entry(object) {
            std::collections::btree_map::Entry::Occupied(e) => Ok(e.into_mut()),
            std::collections::btree_map::Entry::Vacant(e) => {
                Ok(e.insert(load(object, config, &self.tc, pins)?))
            }
        }
    }
}

/// Whether sock_ops may ask for the current cgroup; probed by loading, as kernels differ.
fn cgroup_origin_supported() -> bool {
    use aya::{
        programs::ProgramType,
        sys::{is_helper_supported, BpfHelper},
    };
    [
        BpfHelper::BPF_FUNC_get_current_cgroup_id,
        BpfHelper::BPF_FUNC_get_current_ancestor_cgroup_id,
    ]
    .into_iter()
    .all(|h| is_helper_supported(ProgramType::SockOps, h).unwrap_or(false))
}

pub fn load(
    object: Object,
    config: &Config,
    tc: &quicklane_common::qos::QosConfig,
    pins: &PinDir,
) -> Result<Ebpf, DatapathError> {
    let sockops_config = SockopsConfig {
        abi_version: ABI_VERSION,
        flags: if config.bypass.enabled {
            SOCKOPS_F_BYPASS
        } else {
            0
        } | if cgroup_origin_supported() {
            SOCKOPS_F_CGROUP_ORIGIN
        } else {
            0
        } | if tc.flags & quicklane_common::qos::QOS_F_ENABLED != 0 {
            SOCKOPS_F_PACING
        } else {
            0
        } | if config.bypass.loopback_streams_tcp {
            SOCKOPS_F_LOOPBACK_STREAMS_TCP
        } else {
            0
        },
        small_msg_bytes: config.bypass.small_msg_bytes,
        stream_streak: config.bypass.stream_streak,
        large_msg_bytes: config.bypass.large_msg_bytes,
        large_msg_bytes_nodelay: config.bypass.large_msg_bytes_nodelay,
        tcp_nonagle_bit: btf::tcp_nonagle_bit(),
        psock: btf::psock_layout(),
        // How far a shaped pod's bypassed bytes may run ahead of its rate. Whatever is ahead
        // when a connection leaves the bypass, its paced TCP inherits as lateness at the
        // shaper: at the full CE threshold every packet got marked and cubic fell to 0.92x of
        // a 200M limit with 2 % retransmits; a quarter leaves TCP's bursts room (0.99x, none).
        qos_burst_ns: (tc.ce_threshold_ns / 4).min(u64::from(u32::MAX)) as u32,
        qos_credit_ns: tc.credit_ns.min(u64::from(u32::MAX)) as u32,
    };
    let mut loader = EbpfLoader::new();
    let maps_dir = pins.maps();
    loader.default_map_pin_directory(&maps_dir);
    let adopt_config = adopt::config().unwrap_or_default();
    if object == Object::Sockops {
        loader
            .map_max_entries("QL_SOCKS", config.bypass.max_sockets)
            .map_max_entries("QL_META", config.bypass.max_sockets)
            .map_max_entries("QL_PACED", config.qos.max_paced_sockets)
            .override_global("QL_SOCKOPS_CONFIG", &sockops_config, true)
            .override_global("QL_ADOPT_CONFIG", &adopt_config, true);
    }
    if object == Object::Tc {
        loader.override_global("QL_QOS_CONFIG", tc, true);
    }
    loader
        .load(object.bytes())
        .map_err(|source| DatapathError::Load {
            object: object.name(),
            source,
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
    // Every feature on, so the verifier sees every path (flags are constants to it).
    let tc = qos::bpf_config(&config.qos, Some(qos::Enforcement::Fq));
    for object in Object::ALL {
        let mut ebpf = load(object, config, &tc, scratch)?;
        for &program in object.programs() {
            let prog = ebpf
                .program_mut(program)
                .ok_or(DatapathError::MissingProgram {
                    object: object.name(),
                    program,
                })?;
            load_program(prog).map_err(|source| DatapathError::ProgramLoad { program, source })?;
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

/// Loads one of our programs into the kernel, as the attach step would.
pub fn load_program(
    program: &mut aya::programs::Program,
) -> Result<(), aya::programs::ProgramError> {
    use aya::programs::{Program, ProgramError};
    match program {
        Program::SockOps(p) => p.load(),
        Program::SkMsg(p) => p.load(),
        Program::SchedClassifier(p) => p.load(),
        Program::Xdp(p) => p.load(),
        // Our one iterator walks TCP sockets.
        Program::Iter(p) => p.load("tcp", &aya::Btf::from_sys_fs()?),
        _ => Err(ProgramError::UnexpectedProgramType),
    }
}

/// Opens a pinned map read-only for status and tests.
pub fn open_pinned_map(pins: &PinDir, name: &str) -> Result<MapData, DatapathError> {
    let path = pins.map(name);
    MapData::from_pin(&path).map_err(|e| pin_err(&path, e))
}

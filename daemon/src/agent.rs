//! `quicklane run`: bring the datapath up, serve until SIGTERM/SIGINT, bring it down.
use std::path::Path;

use tokio::signal::unix::{signal, SignalKind};

use crate::{
    bpffs::{self, BpffsError},
    config::{Config, ConfigError},
    datapath::{
        self,
        qos::{RefusedPod, SourcePod},
        Datapath, DatapathError,
    },
    kubernetes::{KubeError, PodSource},
    lock::{AgentLock, LockError},
    paths::{PinDir, RunDir},
    state::AgentState,
};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Bpffs(#[from] BpffsError),
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error(transparent)]
    Kubernetes(#[from] KubeError),
    #[error("state file {path}: {source}")]
    State {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("installing signal handlers: {0}")]
    Signal(std::io::Error),
}

pub fn run(config_path: &Path, keep_datapath: bool) -> Result<(), AgentError> {
    let config = Config::load(config_path)?;
    // Handlers go in before anything is attached: a SIGTERM that arrives during start-up must
    // still lead to a clean detach, not the default action.
    let mut signals = Signals::install()?;
    let run_dir = RunDir::new(&config.agent.run_dir);
    let _lock = AgentLock::acquire(&run_dir.lock())?;
    bpffs::ensure_pin_dir(&config.agent.pin_dir)?;
    let mut source = if config.kubernetes.enabled {
        Some(PodSource::start(&config.kubernetes, &signals.rt)?)
    } else {
        None
    };
    let mut applied = match &mut source {
        Some(s) => initial_pods(s, &signals.rt, &config),
        None => (Vec::new(), Vec::new()),
    };
    let mut datapath = Datapath::start(&config, applied.clone()).inspect_err(|_| {
        datapath::remove_empty_dirs(&PinDir::new(&config.agent.pin_dir));
    })?;

    let mut state = AgentState {
        pid: std::process::id(),
        config: config_path.to_owned(),
        pin_dir: config.agent.pin_dir.clone(),
        keep_datapath,
        attachments: datapath.report().to_vec(),
        rules: datapath.rules().cloned(),
        qos: datapath.qos().cloned(),
        adoption: datapath.adoption().cloned(),
        kubernetes: source.as_ref().map(PodSource::status),
    };
    let state_path = run_dir.state();
    let write_state = |state: &AgentState| {
        state
            .write(&state_path)
            .map_err(|source| AgentError::State {
                path: state_path.clone(),
                source,
            })
    };
    let mut live = config.clone();
    let served = write_state(&state).and_then(|()| {
        tracing::info!(
            attachments = state.attachments.len(),
            "quicklane agent ready"
        );
        let tick = config.qos.enabled.then_some(QOS_TICK);
        loop {
            let signal = signals.next(tick, source.as_mut());
            match signal {
                Signal::Stop => break,
                Signal::Reload => match reload(config_path, &live, &mut datapath) {
                    Ok(new) => live = new,
                    // A bad edit must not take the running datapath down: keep the old rules.
                    Err(e) => tracing::error!("SIGHUP: configuration not applied: {e}"),
                },
                Signal::Tick => {
                    if let Err(e) = datapath.tick_qos() {
                        tracing::warn!("qos: reading pod activity: {e}");
                    }
                }
                Signal::Pods => {}
            }
            // The pod source is looked at on every wake-up: news from the watch, and a
            // retry each tick for pods whose interface was not there yet.
            if let Some(source) = &mut source {
                let now = source.pods(&signals.rt, &live.qos.pods);
                if now != applied {
                    match datapath.set_source_pods(now.0.clone(), now.1.clone()) {
                        Ok(()) => applied = now,
                        Err(e) => tracing::error!("kubernetes: pods not applied: {e}"),
                    }
                }
            }
            let next = AgentState {
                attachments: datapath.report().to_vec(),
                rules: datapath.rules().cloned(),
                qos: datapath.qos().cloned(),
                adoption: datapath.adoption().cloned(),
                kubernetes: source.as_ref().map(PodSource::status),
                ..state.clone()
            };
            if next != state {
                state = next;
                write_state(&state)?;
            }
        }
        Ok(())
    });
    let _ = std::fs::remove_file(&state_path);
    let stopped = datapath.shutdown(keep_datapath);
    served?;
    Ok(stopped?)
}

/// How long start-up waits for the API server's first list of the node's pods.
const INITIAL_LIST: std::time::Duration = std::time::Duration::from_secs(10);

/// The source's pods at start: waiting briefly for the list means a restarted agent keeps
/// shaping (and re-adopts the links of) pods it shaped before, rather than dropping them
/// until the list arrives.
fn initial_pods(
    source: &mut PodSource,
    rt: &tokio::runtime::Runtime,
    config: &Config,
) -> (Vec<SourcePod>, Vec<RefusedPod>) {
    if !source.wait_synced(rt, INITIAL_LIST) {
        let why = source.status().error.unwrap_or_else(|| "no answer".into());
        tracing::error!(
            "kubernetes: no pod list within {INITIAL_LIST:?} ({why}); starting without the API's pods, they are shaped once the list arrives"
        );
    }
    source.pods(rt, &config.qos.pods)
}

/// SIGHUP: re-read the file and apply what can change live (the bypass rules, the QoS node
/// split and pod annotations). Anything else needs a restart, and saying so beats silently
/// ignoring it.
fn reload(path: &Path, running: &Config, datapath: &mut Datapath) -> Result<Config, AgentError> {
    let new = Config::load(path)?;
    if new.without_live_rules() != running.without_live_rules() {
        tracing::warn!("SIGHUP: only the bypass include/exclude rules and the QoS policy (capacity, percents, pods and their annotations) change live; restart the agent for the other changes");
    }
    // QoS first: the bypass rules' generation bump makes sk_msg re-judge every bypassed
    // connection, and a pod that just became shaped must already be shaped when it does.
    if running.qos.enabled && new.qos.enabled {
        datapath.reload_qos(&new)?;
    }
    if running.bypass.enabled {
        datapath.reload_rules(&new)?;
    }
    Ok(new)
}

/// How often QoS looks at which pods send (see `datapath::qos::activity`).
const QOS_TICK: std::time::Duration = std::time::Duration::from_secs(1);

#[derive(Debug, PartialEq, Eq)]
enum Signal {
    Stop,
    Reload,
    /// `tick` passed without a signal.
    Tick,
    /// The pod source has news.
    Pods,
}

struct Signals {
    rt: tokio::runtime::Runtime,
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> Result<Self, AgentError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(AgentError::Signal)?;
        let (term, int, hup) = rt
            .block_on(async {
                Ok::<_, std::io::Error>((
                    signal(SignalKind::terminate())?,
                    signal(SignalKind::interrupt())?,
                    signal(SignalKind::hangup())?,
                ))
            })
            .map_err(AgentError::Signal)?;
        Ok(Self { rt, term, int, hup })
    }

    fn next(&mut self, tick: Option<std::time::Duration>, pods: Option<&mut PodSource>) -> Signal {
        self.rt.block_on(async {
            let tick = async {
                match tick {
                    Some(t) => tokio::time::sleep(t).await,
                    None => std::future::pending().await,
                }
            };
            let pods = async {
                match pods {
                    Some(p) => p.changed().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = tick => Signal::Tick,
                () = pods => Signal::Pods,
                _ = self.term.recv() => { tracing::info!("SIGTERM: stopping"); Signal::Stop }
                _ = self.int.recv() => { tracing::info!("SIGINT: stopping"); Signal::Stop }
                _ = self.hup.recv() => { tracing::info!("SIGHUP: reloading the bypass rules and the QoS policy"); Signal::Reload }
            }
        })
    }
}

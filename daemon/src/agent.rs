//! `quicklane run`: bring the datapath up, serve until SIGTERM/SIGINT, bring it down.
use std::path::Path;

use tokio::signal::unix::{signal, SignalKind};

use crate::{
    bpffs::{self, BpffsError},
    config::{Config, ConfigError},
    datapath::{self, Datapath, DatapathError},
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
    let stop = StopSignals::install()?;
    let run_dir = RunDir::new(&config.agent.run_dir);
    let _lock = AgentLock::acquire(&run_dir.lock())?;
    bpffs::ensure_pin_dir(&config.agent.pin_dir)?;
    let datapath = Datapath::start(&config).inspect_err(|_| {
        datapath::remove_empty_dirs(&PinDir::new(&config.agent.pin_dir));
    })?;

    let state = AgentState {
        pid: std::process::id(),
        config: config_path.to_owned(),
        pin_dir: config.agent.pin_dir.clone(),
        keep_datapath,
        attachments: datapath.report().to_vec(),
    };
    let state_path = run_dir.state();
    let served = state
        .write(&state_path)
        .map_err(|source| AgentError::State {
            path: state_path.clone(),
            source,
        })
        .map(|()| {
            tracing::info!(
                attachments = state.attachments.len(),
                "quicklane agent ready"
            );
            stop.wait();
        });
    let _ = std::fs::remove_file(&state_path);
    let stopped = datapath.shutdown(keep_datapath);
    served?;
    Ok(stopped?)
}

struct StopSignals {
    rt: tokio::runtime::Runtime,
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl StopSignals {
    fn install() -> Result<Self, AgentError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(AgentError::Signal)?;
        let (term, int) = rt
            .block_on(async {
                Ok::<_, std::io::Error>((
                    signal(SignalKind::terminate())?,
                    signal(SignalKind::interrupt())?,
                ))
            })
            .map_err(AgentError::Signal)?;
        Ok(Self { rt, term, int })
    }

    fn wait(mut self) {
        self.rt.block_on(async {
            tokio::select! {
                _ = self.term.recv() => tracing::info!("SIGTERM: stopping"),
                _ = self.int.recv() => tracing::info!("SIGINT: stopping"),
            }
        });
    }
}

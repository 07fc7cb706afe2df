//! The state file the agent writes for `quicklane status`: who runs, with what, attached how.
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{
    datapath::{adopt::AdoptionSummary, qos::QosSummary, rules::RulesSummary, AttachmentReport},
    kubernetes::SourceStatus,
};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AgentState {
    pub pid: u32,
    pub config: PathBuf,
    pub pin_dir: PathBuf,
    pub keep_datapath: bool,
    pub attachments: Vec<AttachmentReport>,
    /// Bypass rules in force (None: bypass disabled).
    pub rules: Option<RulesSummary>,
    /// QoS policy in force (None: QoS disabled).
    #[serde(default)]
    pub qos: Option<QosSummary>,
    /// Established sockets adopted into pacing when their pod became shaped (None: QoS
    /// disabled).
    #[serde(default)]
    pub adoption: Option<AdoptionSummary>,
    /// The Kubernetes pod source (None: not enabled).
    #[serde(default)]
    pub kubernetes: Option<SourceStatus>,
}

impl AgentState {
    /// Written to a temporary name and renamed, so a reader never sees half a file.
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        let tmp = path.with_extension("json.tmp");
        std::fs::write(
            &tmp,
            serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?,
        )?;
        std::fs::rename(tmp, path)
    }

    pub fn read(path: &Path) -> Option<Self> {
        let bytes = std::fs::read(path).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// The file outlives a killed agent; only a live pid makes it current.
    pub fn is_live(&self) -> bool {
        Path::new(&format!("/proc/{}", self.pid)).exists()
    }
}

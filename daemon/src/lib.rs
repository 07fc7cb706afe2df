//! quicklane's agent: configuration, BPF datapath lifecycle, status.
//!
//! The binary (`main.rs`) is a thin CLI over these modules; integration tests drive the binary.
pub mod agent;
pub mod bpffs;
pub mod cgroup;
pub mod config;
pub mod datapath;
pub mod features;
pub mod kubernetes;
pub mod lock;
pub mod paths;
pub mod state;
pub mod status;
mod sys;

//! quicklane's load generators and benchmark harness.
//!
//! `load` is the TCP load generator (`quicklane loadgen`). The rest is the harness behind
//! `quicklane bench`: [`scenario`]s build a simulated node, drive the real tools ([`tools`])
//! and the load generator with and without the agent (or, for qos, against the htb and tbf
//! baselines that [`qdisc`] sets up over netlink), and [`report`] writes the results
//! directory; [`compare`] is the regression check against a stored run.

pub mod cli;
pub mod compare;
pub mod cpu;
pub mod error;
pub mod host;
mod interrupt;
pub mod load;
pub mod progress;
pub mod qdisc;
pub mod report;
pub mod results;
pub mod scenario;
pub mod stats;
mod testbed;
pub mod tools;

pub use error::Error;
/// The agent config the bench runs with, and the CPUs its connect step keeps its two ends
/// on, for tools that measure the same node setup.
pub use testbed::{two_cpus, write_agent_config};

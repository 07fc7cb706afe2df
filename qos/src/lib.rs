//! Bandwidth QoS policy for quicklane, following the Kmesh-bwm / Volcano model: pods are
//! online (with a priority) or offline, may carry a limit and a guarantee per direction, and
//! share a node capacity of which offline pods get a band that shrinks as online demand grows.
//!
//! - [`rate`]: [`Rate`] and the parser for the Kubernetes quantities in annotations.
//! - [`policy`]: the per-pod and per-node policy types and their validation.
//! - [`annotations`]: a pod's annotations to a [`PodPolicy`], all or nothing.
//! - [`allocator`]: per-pod rates for every combination of active classes, for the kernel to
//!   look up without userspace in the loop.
//!
//! Everything here is pure computation: no I/O, no BPF, no async.
//!
//! ```
//! use std::collections::BTreeMap;
//! use quicklane_qos::{parse_bandwidth, pod_policy_from_annotations, rate_table};
//! use quicklane_qos::{Direction, NodePolicy, PodDemand};
//!
//! let ann = BTreeMap::from([
//!     ("kubernetes.io/egress-bandwidth".to_owned(), "600M".to_owned()),
//!     ("quicklane.io/priority".to_owned(), "high".to_owned()),
//! ]);
//! let policy = pod_policy_from_annotations(&ann)?;
//! let node = NodePolicy::with_capacity(parse_bandwidth("1G")?);
//! node.validate()?;
//! let table = rate_table(&node, &[PodDemand { policy, active: true }], Direction::Egress);
//! assert_eq!(table[0][0].to_string(), "600Mbit/s");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod allocator;
pub mod annotations;
pub mod policy;
pub mod rate;

pub use allocator::{allocate, rate_table, PodDemand};
pub use annotations::{pod_policy_from_annotations, AnnotationError, AnnotationProblem};
pub use policy::{Direction, DirectionPolicy, NodePolicy, PodPolicy, PolicyError, Priority};
pub use rate::{parse_bandwidth, Rate, RateError};

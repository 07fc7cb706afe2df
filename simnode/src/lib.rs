//! A simulated Kubernetes node built from network namespaces, for integration tests,
//! benchmarks and demos of quicklane.
//!
//! A [`Node`] owns a namespace that plays the host's root namespace (forwarding on), and pods:
//! each pod is a namespace with `eth0`, veth-paired to `qlh{i}` on the node, with
//! `10.77.{i}.2/24` and `fd77:0:0:{i}::2/64` and default routes via the node side (`.1`/`::1`),
//! so pods reach each other routed through the node. Every pod also has a cgroup v2 directory
//! under the node's. Everything is removed when the node is dropped, also during a panic.
//!
//! Names carry the process id and a per-process counter, so nodes from parallel tests and
//! test binaries never collide; addresses repeat across nodes, which are isolated.
//!
//! Everything here needs root.
//!
//! ```no_run
//! use std::net::{TcpListener, TcpStream};
//!
//! let node = simnode::Node::new(2)?;
//! let (a, b) = (node.pod(0), node.pod(1));
//! let listener = b.in_netns(|| TcpListener::bind((b.ipv4(), 8080)))??;
//! a.in_netns(|| TcpStream::connect((b.ipv4(), 8080)))??;
//! listener.accept()?;
//! let status = a.command("ping").args(["-c1", &b.ipv6().to_string()]).status()?;
//! assert!(status.success());
//! node.teardown()?;
//! simnode::assert_no_leaks();
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod bpf_progs;
mod bpffs;
mod cgroup;
mod cmd;
mod error;
mod leak;
mod mountinfo;
mod netns;
mod node;
mod pod;
mod proc;

pub use cgroup::cgroup2_mount;
pub use error::Error;
pub use leak::{assert_no_leaks, leaks, leaks_matching, Leak};
pub use node::{Node, MAX_PODS};
pub use pod::{Pod, POD_IFNAME};
pub use proc::Proc;

/// Fails unless running with effective uid 0, which namespaces, veths, cgroups and bpffs need.
pub fn require_root() -> Result<(), Error> {
    let euid = nix::unistd::geteuid();
    if euid.is_root() {
        Ok(())
    } else {
        Err(Error::NotRoot {
            euid: euid.as_raw(),
        })
    }
}

/// Gate for privileged tests: true when they can run. Without root they skip with a message,
/// except under `CI=true`, where a skip would hide that nothing was tested, so it panics.
pub fn privileged_or_skip(what: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{what} needs root, and CI=true forbids skipping it"
    );
    eprintln!("skipping {what}: needs root");
    false
}

//! One pod: a network namespace wired to the node by a veth pair, plus a cgroup.

use std::ffi::OsStr;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::node::Created;
use crate::{cgroup, cmd, netns, Error, Proc};

/// The pod side of the veth, named as a CNI plugin would name it.
pub const POD_IFNAME: &str = "eth0";

/// Without DAD a fresh address and the link-local one are usable at once; otherwise the
/// first neighbour solicitations wait a second or two for a non-tentative source address.
pub(crate) const NO_DAD_SYSCTLS: &[(&str, &str)] = &[
    ("net/ipv6/conf/all/accept_dad", "0"),
    ("net/ipv6/conf/default/accept_dad", "0"),
];

/// A pod of a [`Node`](crate::Node). Pod `i` owns `10.77.{i}.0/24` and `fd77:0:0:{i}::/64`: it
/// holds `.2`/`::2` on `eth0`, and the node holds `.1`/`::1` on `qlh{i}`, its default gateway.
#[derive(Debug)]
pub struct Pod {
    index: u8,
    name: String,
    netns_name: String,
    netns_path: PathBuf,
    cgroup_dir: PathBuf,
    host_ifname: String,
}

impl Pod {
    pub(crate) fn new(node_id: &str, index: u8, node_cgroup: &Path) -> Self {
        let name = format!("pod{index}");
        let netns_name = format!("qlsim-{node_id}-p{index}");
        Pod {
            index,
            netns_path: netns::path_of(&netns_name),
            cgroup_dir: node_cgroup.join(&name),
            host_ifname: format!("qlh{index}"),
            name,
            netns_name,
        }
    }

    /// Creates the pod in the node whose namespace is `node_netns`, recording what it creates
    /// in `created` as it goes, so the node's teardown also covers a half-built pod.
    pub(crate) fn build(&self, node_netns: &str, created: &mut Vec<Created>) -> Result<(), Error> {
        netns::create(&self.netns_name)?;
        created.push(Created::Netns(self.netns_name.clone()));
        // Before the veth exists, so that its devices inherit the "default" settings.
        netns::set_sysctls(&self.netns_path, NO_DAD_SYSCTLS)?;
        let (node, pod) = (node_netns, self.netns_name.as_str());
        let (host, eth) = (self.host_ifname.as_str(), POD_IFNAME);
        let (gw4, gw6) = (self.gateway_v4().to_string(), self.gateway_v6().to_string());
        let (host4, host6) = (format!("{gw4}/24"), format!("{gw6}/64"));
        let (pod4, pod6) = (format!("{}/24", self.ipv4()), format!("{}/64", self.ipv6()));
        // nodad: addresses are usable at once instead of after a second of DAD.
        let steps: [&[&str]; 10] = [
            &["-n", pod, "link", "set", "lo", "up"],
            &[
                "-n", node, "link", "add", host, "type", "veth", "peer", "name", eth, "netns", pod,
            ],
            &["-n", node, "addr", "add", &host4, "dev", host],
            &["-n", node, "addr", "add", &host6, "dev", host, "nodad"],
            &["-n", node, "link", "set", host, "up"],
            &["-n", pod, "addr", "add", &pod4, "dev", eth],
            &["-n", pod, "addr", "add", &pod6, "dev", eth, "nodad"],
            &["-n", pod, "link", "set", eth, "up"],
            &[
                "-n", pod, "route", "add", "default", "via", &gw4, "dev", eth,
            ],
            &[
                "-n", pod, "-6", "route", "add", "default", "via", &gw6, "dev", eth,
            ],
        ];
        steps.iter().try_for_each(|args| cmd::ip(args))?;
        cgroup::create(&self.cgroup_dir)?;
        created.push(Created::Cgroup(self.cgroup_dir.clone()));
        Ok(())
    }

    /// Position in [`Node::pods`](crate::Node::pods).
    #[must_use]
    pub fn index(&self) -> usize {
        usize::from(self.index)
    }

    /// `pod{i}`, also the name of its cgroup under the node's.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    #[must_use]
    pub fn netns_name(&self) -> &str {
        &self.netns_name
    }

    /// The namespace's bind mount under /var/run/netns, to open and `setns` into.
    #[must_use]
    pub fn netns_path(&self) -> &Path {
        &self.netns_path
    }

    /// The pod's cgroup, where [`command`](Self::command) places its children.
    #[must_use]
    pub fn cgroup_dir(&self) -> &Path {
        &self.cgroup_dir
    }

    /// The node-side veth (`qlh{i}`), inside the node's namespace.
    #[must_use]
    pub fn host_ifname(&self) -> &str {
        &self.host_ifname
    }

    /// The pod's address on `eth0`: `10.77.{i}.2`.
    #[must_use]
    pub fn ipv4(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 77, self.index, 2)
    }

    /// The pod's address on `eth0`: `fd77:0:0:{i}::2`.
    #[must_use]
    pub fn ipv6(&self) -> Ipv6Addr {
        Ipv6Addr::new(0xfd77, 0, 0, self.index.into(), 0, 0, 0, 2)
    }

    /// The node side's address on `qlh{i}` and the pod's IPv4 default gateway: `10.77.{i}.1`.
    #[must_use]
    pub fn gateway_v4(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 77, self.index, 1)
    }

    /// The node side's address on `qlh{i}` and the pod's IPv6 default gateway:
    /// `fd77:0:0:{i}::1`.
    #[must_use]
    pub fn gateway_v6(&self) -> Ipv6Addr {
        Ipv6Addr::new(0xfd77, 0, 0, self.index.into(), 0, 0, 0, 1)
    }

    /// A command whose child runs in this pod's network namespace and cgroup, as a
    /// container's process would; use it whenever cgroup identity matters (e.g. for
    /// cgroup-attached BPF programs), since [`in_netns`](Self::in_netns) cannot provide that.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new(program);
        self.enter_on_exec(&mut cmd);
        cmd
    }

    /// Spawns `cmd` in this pod (whether or not it came from [`command`](Self::command);
    /// entering twice is harmless) and returns a guard that kills it on drop.
    pub fn spawn(&self, cmd: &mut Command) -> Result<Proc, Error> {
        self.enter_on_exec(cmd);
        Proc::spawn(cmd, &self.netns_name)
    }

    /// Runs `f` on a thread inside this pod's network namespace, e.g. to open sockets as the
    /// pod would without a child process. The thread stays in the test process's cgroup, so
    /// its sockets do not carry the pod's cgroup identity: use [`command`](Self::command)
    /// for that.
    pub fn in_netns<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T, Error> {
        netns::run_in(&self.netns_path, f)
    }

    fn enter_on_exec(&self, cmd: &mut Command) {
        cgroup::join_on_exec(cmd, &self.cgroup_dir);
        netns::enter_on_exec(cmd, &self.netns_path);
    }
}

//! simnode against the real kernel: namespaces, veths, routing, cgroups and teardown.
//!
//! These need root. Without it they skip with a message, except under CI=true, where a
//! skipped privileged test would hide that nothing was tested.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::sys::socket::{
    self, sockopt, AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType, SockaddrIn,
    SockaddrIn6,
};
use nix::sys::time::TimeVal;
use simnode::{Leak, Node, Pod};

/// Upper bound for any single wait in these tests.
const TIMEOUT: Duration = Duration::from_secs(10);

fn privileged() -> bool {
    simnode::privileged_or_skip("simnode topology tests")
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}

fn inode(path: impl AsRef<Path>) -> u64 {
    let path = path.as_ref();
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()))
        .ino()
}

/// The unified-hierarchy (`0::`) cgroup of a process.
fn cgroup_of(pid: &str) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .unwrap_or_else(|| panic!("no 0:: line in /proc/{pid}/cgroup: {text}"))
        .to_owned()
}

/// A cgroup directory as /proc/PID/cgroup names it: relative to the cgroup2 mount.
fn cgroup_name(dir: &Path) -> String {
    let root = simnode::cgroup2_mount().unwrap();
    format!("/{}", dir.strip_prefix(root).unwrap().display())
}

fn wait_child(child: &mut Child) -> ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            start.elapsed() < TIMEOUT,
            "child {} still running",
            child.id()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn assert_killed(child: &mut Child) {
    let status = wait_child(child);
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status}");
}

fn assert_gone(paths: &[PathBuf]) {
    for path in paths {
        assert!(!path.exists(), "{} still exists", path.display());
    }
}

/// Every path a node owns, to check after it is gone.
fn node_paths(node: &Node) -> Vec<PathBuf> {
    let mut paths = vec![
        node.netns_path().to_owned(),
        node.cgroup_dir().to_owned(),
        node.pin_dir().to_owned(),
        node.run_dir().to_owned(),
    ];
    for pod in node.pods() {
        paths.push(pod.netns_path().to_owned());
        paths.push(pod.cgroup_dir().to_owned());
    }
    paths
}

/// Runs the system `ping` once from `pod`, as a user of the topology would.
fn ping(pod: &Pod, dst: IpAddr) {
    let mut proc = pod
        .spawn(
            pod.command("ping")
                .args(["-c1", "-W2", &dst.to_string()])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped()),
        )
        .unwrap();
    let status = proc.wait_timeout(TIMEOUT).unwrap();
    let mut out = String::new();
    let child = proc.child_mut();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    assert!(
        status.success(),
        "ping {dst} from {}: {status}\n{out}",
        pod.name()
    );
}

/// One ICMP echo from inside `pod` over a raw socket, with no retry: the topology must route
/// the very first packet, for IPv6 too.
fn icmp_echo(pod: &Pod, dst: IpAddr) {
    let reply = pod.in_netns(|| -> nix::Result<bool> {
        let (family, protocol, request, reply) = match dst {
            IpAddr::V4(_) => (AddressFamily::Inet, SockProtocol::Icmp, 8, 0),
            IpAddr::V6(_) => (AddressFamily::Inet6, SockProtocol::IcmpV6, 128, 129),
        };
        let fd = socket::socket(family, SockType::Raw, SockFlag::SOCK_CLOEXEC, protocol)?;
        socket::setsockopt(&fd, sockopt::ReceiveTimeout, &TimeVal::new(0, 100_000))?;
        let ident = (std::process::id() as u16).to_be_bytes();
        let mut packet = [
            request, 0, 0, 0, ident[0], ident[1], 0, 1, b's', b'i', b'm', b'!',
        ];
        if dst.is_ipv4() {
            // The kernel fills in ICMPv6 checksums on raw sockets, not ICMP ones.
            let sum = internet_checksum(&packet);
            packet[2..4].copy_from_slice(&sum.to_be_bytes());
        }
        match dst {
            IpAddr::V4(ip) => {
                let addr = SockaddrIn::from(std::net::SocketAddrV4::new(ip, 0));
                socket::sendto(fd.as_raw_fd(), &packet, &addr, MsgFlags::empty())?;
            }
            IpAddr::V6(ip) => {
                let addr = SockaddrIn6::from(std::net::SocketAddrV6::new(ip, 0, 0, 0));
                socket::sendto(fd.as_raw_fd(), &packet, &addr, MsgFlags::empty())?;
            }
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut buf = [0u8; 1500];
        while Instant::now() < deadline {
            let len = match socket::recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty()) {
                Ok(len) => len,
                Err(nix::errno::Errno::EAGAIN) => continue,
                Err(e) => return Err(e),
            };
            // IPv4 raw sockets deliver the IP header too; IPv6 ones do not.
            let icmp = if dst.is_ipv4() {
                &buf[usize::from(buf[0] & 0x0f) * 4..len]
            } else {
                &buf[..len]
            };
            if icmp.len() >= 8 && icmp[0] == reply && icmp[4..6] == ident {
                return Ok(true);
            }
        }
        Ok(false)
    });
    assert!(
        reply.unwrap().unwrap(),
        "no ICMP echo reply from {dst} to {} within 2s",
        pod.name()
    );
}

fn internet_checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Echoes 64 KiB over TCP from `client` to a listener in `server` on `ip`, and checks the
/// server saw the client's own pod address (routed, not translated).
fn tcp_roundtrip(client: &Pod, server: &Pod, server_ip: IpAddr, client_ip: IpAddr) {
    let listener = server
        .in_netns(|| TcpListener::bind((server_ip, 0)))
        .unwrap()
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let payload: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8).collect();
    std::thread::scope(|s| {
        let echo = s.spawn(|| {
            let (mut stream, peer) = accept_within(&listener, TIMEOUT);
            stream.set_read_timeout(Some(TIMEOUT)).unwrap();
            stream.set_write_timeout(Some(TIMEOUT)).unwrap();
            let mut buf = vec![0; payload.len()];
            stream.read_exact(&mut buf).unwrap();
            stream.write_all(&buf).unwrap();
            peer
        });
        let mut stream = client
            .in_netns(|| TcpStream::connect_timeout(&addr, TIMEOUT))
            .unwrap()
            .unwrap();
        stream.set_read_timeout(Some(TIMEOUT)).unwrap();
        stream.set_write_timeout(Some(TIMEOUT)).unwrap();
        stream.write_all(&payload).unwrap();
        let mut back = vec![0; payload.len()];
        stream.read_exact(&mut back).unwrap();
        assert!(back == payload, "echoed bytes differ");
        assert_eq!(echo.join().unwrap().ip(), client_ip);
    });
}

fn accept_within(listener: &TcpListener, timeout: Duration) -> (TcpStream, SocketAddr) {
    listener.set_nonblocking(true).unwrap();
    let start = Instant::now();
    loop {
        match listener.accept() {
            Ok((stream, peer)) => {
                stream.set_nonblocking(false).unwrap();
                return (stream, peer);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(
                    start.elapsed() < timeout,
                    "no connection within {timeout:?}"
                );
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
}

/// Creates an array map and pins it at `path`, as an agent would pin its maps.
fn pin_array_map(path: &Path) {
    #[repr(C)]
    struct MapCreate {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
    }
    #[repr(C)]
    struct ObjPin {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    const BPF_MAP_CREATE: libc::c_long = 0;
    const BPF_OBJ_PIN: libc::c_long = 6;
    const BPF_MAP_TYPE_ARRAY: u32 = 2;
    let mut create = MapCreate {
        map_type: BPF_MAP_TYPE_ARRAY,
        key_size: 4,
        value_size: 4,
        max_entries: 1,
    };
    // SAFETY: the attr is a live repr(C) prefix of `union bpf_attr` of exactly the size passed.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_CREATE,
            std::ptr::from_mut(&mut create),
            size_of::<MapCreate>(),
        )
    };
    assert!(
        fd >= 0,
        "BPF_MAP_CREATE: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: BPF_MAP_CREATE returned a new fd that nothing else owns.
    let map = unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) };
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    let mut pin = ObjPin {
        pathname: c_path.as_ptr() as u64,
        bpf_fd: map.as_raw_fd() as u32,
        file_flags: 0,
    };
    // SAFETY: as above; `c_path` outlives the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_PIN,
            std::ptr::from_mut(&mut pin),
            size_of::<ObjPin>(),
        )
    };
    assert!(
        ret == 0,
        "BPF_OBJ_PIN {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
}

#[test]
fn pods_reach_each_other_over_ipv4_and_ipv6() {
    if !privileged() {
        return;
    }
    let node = Node::new(2).unwrap();
    let (a, b) = (node.pod(0), node.pod(1));
    assert_eq!(a.ipv4(), Ipv4Addr::new(10, 77, 0, 2));
    assert_eq!(b.ipv6().to_string(), "fd77:0:0:1::2");
    assert_eq!(
        (b.host_ifname(), b.gateway_v4().to_string().as_str()),
        ("qlh1", "10.77.1.1")
    );

    // DAD would hold back neighbour discovery for a second or more after creation.
    for mut cmd in [node.command("ip"), a.command("ip"), b.command("ip")] {
        let out = cmd
            .args(["-6", "addr", "show", "tentative"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "",
            "tentative addresses"
        );
    }
    // Straight after creation and with one attempt each.
    icmp_echo(a, b.ipv6().into());
    icmp_echo(a, b.ipv4().into());
    icmp_echo(b, a.ipv6().into());
    icmp_echo(a, a.gateway_v6().into());
    // `cargo xtask setup` installs iputils-ping; a missing one is a setup bug, not a skip.
    assert!(
        on_path("ping"),
        "`ping` not installed: run `cargo xtask setup`"
    );
    ping(a, b.ipv4().into());
    ping(a, b.ipv6().into());

    tcp_roundtrip(a, b, b.ipv4().into(), a.ipv4().into());
    tcp_roundtrip(a, b, b.ipv6().into(), a.ipv6().into());
    node.teardown().unwrap();
}

#[test]
fn pod_commands_run_in_the_pod_netns_and_cgroup() {
    if !privileged() {
        return;
    }
    let node = Node::new(2).unwrap();
    let pod = node.pod(1);

    let out = pod
        .command("sh")
        .args([
            "-c",
            "cat /proc/self/cgroup; readlink /proc/self/ns/net; ip -o addr show dev eth0",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let out = String::from_utf8(out.stdout).unwrap();
    assert!(
        out.lines()
            .any(|l| l == format!("0::{}", cgroup_name(pod.cgroup_dir()))),
        "{out}"
    );
    assert!(
        out.contains(&format!("net:[{}]", inode(pod.netns_path()))),
        "{out}"
    );
    assert!(out.contains(&format!("inet {}/24", pod.ipv4())), "{out}");
    assert!(out.contains(&format!("inet6 {}/64", pod.ipv6())), "{out}");

    // A plain Command spawned through the pod lands there too.
    let sleeper = pod.spawn(Command::new("sleep").arg("30")).unwrap();
    let pid = sleeper.id().to_string();
    assert_eq!(cgroup_of(&pid), cgroup_name(pod.cgroup_dir()));
    assert_eq!(
        inode(format!("/proc/{pid}/ns/net")),
        inode(pod.netns_path())
    );
    assert_ne!(inode(pod.netns_path()), inode(node.netns_path()));

    // Node commands enter the node's namespace but keep the caller's cgroup.
    let node_proc = node.spawn(Command::new("sleep").arg("30")).unwrap();
    let node_pid = node_proc.id().to_string();
    assert_eq!(cgroup_of(&node_pid), cgroup_of("self"));
    assert_eq!(
        inode(format!("/proc/{node_pid}/ns/net")),
        inode(node.netns_path())
    );

    // in_netns moves only the thread's network namespace, never the caller's.
    let own_netns = inode("/proc/thread-self/ns/net");
    let seen = pod.in_netns(|| inode("/proc/thread-self/ns/net")).unwrap();
    assert_eq!(seen, inode(pod.netns_path()));
    assert_eq!(inode("/proc/thread-self/ns/net"), own_netns);

    let forwarding = node
        .in_netns(|| std::fs::read_to_string("/proc/sys/net/ipv6/conf/all/forwarding"))
        .unwrap()
        .unwrap();
    assert_eq!(forwarding.trim(), "1");
}

#[test]
fn teardown_removes_everything_and_kills_leftovers() {
    if !privileged() {
        return;
    }
    let node = Node::new(2).unwrap();
    let id = node.id().to_owned();
    let paths = node_paths(&node);
    // Left running on purpose, outside any guard.
    let mut leftovers: Vec<Child> = node
        .pods()
        .iter()
        .map(|pod| pod.command("sleep").arg("300").spawn().unwrap())
        .collect();
    // What an agent under test would leave: nested pins and runtime files.
    std::fs::create_dir_all(node.pin_dir().join("maps")).unwrap();
    pin_array_map(&node.pin_dir().join("maps/counters"));
    std::fs::create_dir_all(node.run_dir()).unwrap();
    std::fs::write(node.run_dir().join("agent.sock"), b"").unwrap();
    assert!(!simnode::leaks_matching(&id).is_empty());

    node.teardown().unwrap();

    for child in &mut leftovers {
        assert_killed(child);
    }
    assert_gone(&paths);
    assert_eq!(simnode::leaks_matching(&id), Vec::<Leak>::new());
}

#[test]
fn dropping_during_a_panic_cleans_up() {
    if !privileged() {
        return;
    }
    let seen: Mutex<Option<(String, Vec<PathBuf>, Child)>> = Mutex::new(None);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let node = Node::new(1).unwrap();
        let child = node.pod(0).command("sleep").arg("300").spawn().unwrap();
        *seen.lock().unwrap() = Some((node.id().to_owned(), node_paths(&node), child));
        panic!("deliberate panic while a simulated node is alive");
    }));
    assert!(result.is_err());
    let (id, paths, mut child) = seen.into_inner().unwrap().expect("node was built");
    assert_killed(&mut child);
    assert_gone(&paths);
    assert_eq!(simnode::leaks_matching(&id), Vec::<Leak>::new());
}

#[test]
fn concurrent_nodes_do_not_collide() {
    if !privileged() {
        return;
    }
    let nodes: Vec<Node> = std::thread::scope(|s| {
        let builders: Vec<_> = (0..3).map(|_| s.spawn(|| Node::new(2).unwrap())).collect();
        builders.into_iter().map(|b| b.join().unwrap()).collect()
    });
    let mut names: Vec<&str> = nodes
        .iter()
        .flat_map(|n| std::iter::once(n.netns_name()).chain(n.pods().iter().map(Pod::netns_name)))
        .collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), 9, "{names:?}");

    // Same addresses everywhere, yet every node routes on its own.
    for node in &nodes {
        icmp_echo(node.pod(0), node.pod(1).ipv4().into());
        icmp_echo(node.pod(1), node.pod(0).ipv6().into());
    }
    // A listener in one node is unreachable from another, where the same address is that
    // node's own pod, which refuses.
    let (a, b) = (&nodes[0], &nodes[1]);
    let listener = a
        .pod(1)
        .in_netns(|| TcpListener::bind((a.pod(1).ipv4(), 0)))
        .unwrap()
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let err = b
        .pod(0)
        .in_netns(|| TcpStream::connect_timeout(&addr, TIMEOUT))
        .unwrap()
        .unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);

    let ids: Vec<String> = nodes.iter().map(|n| n.id().to_owned()).collect();
    drop(nodes);
    for id in ids {
        assert_eq!(simnode::leaks_matching(&id), Vec::<Leak>::new());
    }
}

#[test]
fn leak_check_sees_live_nodes_and_nothing_after_drop() {
    if !privileged() {
        return;
    }
    let node = Node::new(2).unwrap();
    let id = node.id().to_owned();
    std::fs::create_dir_all(node.run_dir()).unwrap();
    let mut live = simnode::leaks_matching(&id);
    live.sort_by_key(ToString::to_string);
    let mut expected = vec![
        Leak::Netns {
            name: node.netns_name().to_owned(),
        },
        Leak::Netns {
            name: node.pod(0).netns_name().to_owned(),
        },
        Leak::Netns {
            name: node.pod(1).netns_name().to_owned(),
        },
        Leak::Cgroup {
            path: node.cgroup_dir().to_owned(),
        },
        Leak::RunDir {
            path: node.run_dir().to_owned(),
        },
    ];
    expected.sort_by_key(ToString::to_string);
    assert_eq!(live, expected);

    // The global check runs everywhere it looks (bpf syscall included) and sees this node.
    let global = simnode::leaks();
    assert!(
        !global.iter().any(|l| matches!(l, Leak::Unchecked { .. })),
        "{global:?}"
    );
    assert!(global.contains(&expected[0]), "{global:?}");

    drop(node);
    assert_eq!(simnode::leaks_matching(&id), Vec::<Leak>::new());
}

#[test]
fn too_many_pods_is_refused_before_anything_is_built() {
    if !privileged() {
        return;
    }
    let err = Node::new(simnode::MAX_PODS + 1).unwrap_err();
    assert!(
        matches!(err, simnode::Error::TooManyPods { requested, .. } if requested == simnode::MAX_PODS + 1),
        "{err}"
    );
}

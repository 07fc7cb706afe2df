//! The socket's own `SockKey`, read from a context struct that has the usual address fields
//! (`bpf_sock_ops` and `sk_msg_md` share the names).

/// Volatile reads: a plain read lets LLVM fold the field offset into the context pointer,
/// which the verifier rejects ("dereference of modified ctx ptr").
/// The IPv6 key is built here field by field rather than through `SockKey::from_v6`: that
/// way the verifier walks far fewer instructions in sock_ops and sk_msg (`quicklane verify`).
macro_rules! key_from_ctx {
    ($ctx:expr) => {{
        use core::ptr::{addr_of, read_volatile};
        use quicklane_common::sock::{normalise_v6, remote_port_host, SockKey, AF_INET, AF_INET6};
        let ctx = $ctx;
        // SAFETY: `ctx` is the context pointer the kernel handed to this program.
        unsafe {
            let family = read_volatile(addr_of!((*ctx).family));
            let local_port = read_volatile(addr_of!((*ctx).local_port));
            let remote_port = remote_port_host(read_volatile(addr_of!((*ctx).remote_port)));
            if family == AF_INET {
                Some(SockKey {
                    family: AF_INET,
                    local_ip: [read_volatile(addr_of!((*ctx).local_ip4)), 0, 0, 0],
                    remote_ip: [read_volatile(addr_of!((*ctx).remote_ip4)), 0, 0, 0],
                    local_port,
                    remote_port,
                })
            } else if family == AF_INET6 {
                let l = addr_of!((*ctx).local_ip6) as *const u32;
                let r = addr_of!((*ctx).remote_ip6) as *const u32;
                let (lf, local_ip) = normalise_v6([
                    read_volatile(l),
                    read_volatile(l.add(1)),
                    read_volatile(l.add(2)),
                    read_volatile(l.add(3)),
                ]);
                let (_, remote_ip) = normalise_v6([
                    read_volatile(r),
                    read_volatile(r.add(1)),
                    read_volatile(r.add(2)),
                    read_volatile(r.add(3)),
                ]);
                Some(SockKey {
                    family: lf,
                    local_ip,
                    remote_ip,
                    local_port,
                    remote_port,
                })
            } else {
                None
            }
        }
    }};
}

pub(crate) use key_from_ctx;

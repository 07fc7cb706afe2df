//! Socket identity used as the SOCKHASH key.

/// `AF_INET` as the kernel reports it in `bpf_sock_ops::family`.
pub const AF_INET: u32 = 2;
/// `AF_INET6`.
pub const AF_INET6: u32 = 10;

/// One TCP endpoint pair, seen from the socket that owns it.
///
/// IPv4 and IPv4-mapped IPv6 (`::ffff:a.b.c.d`, what a server on `[::]` sees) are both stored
/// as `family = AF_INET` with the address in word 0, so the two ends of one connection find
/// each other whichever family each side's socket has. Addresses stay in network byte order;
/// ports are host order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockKey {
    pub family: u32,
    pub local_ip: [u32; 4],
    pub remote_ip: [u32; 4],
    pub local_port: u32,
    pub remote_port: u32,
}

impl SockKey {
    /// The key under which the other end of this connection is stored.
    #[must_use]
    pub const fn peer(&self) -> Self {
        Self {
            family: self.family,
            local_ip: self.remote_ip,
            remote_ip: self.local_ip,
            local_port: self.remote_port,
            remote_port: self.local_port,
        }
    }

    /// Whether the connection runs over the loopback device: both ends on one address (a pod
    /// talking to itself, e.g. to its sidecar), or a 127/8 or `::1` peer.
    #[must_use]
    pub const fn is_loopback(&self) -> bool {
        let r = self.remote_ip;
        let l = self.local_ip;
        let same = r[0] == l[0] && r[1] == l[1] && r[2] == l[2] && r[3] == l[3];
        same || if self.family == AF_INET {
            u32::from_be(r[0]) >> 24 == 127
        } else {
            r[0] == 0 && r[1] == 0 && r[2] == 0 && r[3] == u32::to_be(1)
        }
    }
}

/// Normalises an IPv6 address as carried in `bpf_sock_ops` (four network-order words) into the
/// key's family and address: v4-mapped addresses become IPv4.
#[must_use]
pub const fn normalise_v6(words: [u32; 4]) -> (u32, [u32; 4]) {
    // ::ffff:0:0/96 — word 2 is 0x0000ffff in network order, which reads as 0xffff0000 on a
    // little-endian host.
    if words[0] == 0 && words[1] == 0 && words[2] == u32::from_be(0x0000_ffff) {
        (AF_INET, [words[3], 0, 0, 0])
    } else {
        (AF_INET6, words)
    }
}

impl SockKey {
    /// The key of an `AF_INET6` socket from its addresses as the kernel keeps them (four
    /// network-order words each): v4-mapped addresses make an IPv4 key.
    #[must_use]
    pub const fn from_v6(
        local: [u32; 4],
        remote: [u32; 4],
        local_port: u32,
        remote_port: u32,
    ) -> Self {
        let (family, local_ip) = normalise_v6(local);
        let (_, remote_ip) = normalise_v6(remote);
        Self {
            family,
            local_ip,
            remote_ip,
            local_port,
            remote_port,
        }
    }
}

/// Converts `remote_port` as read from `bpf_sock_ops`/`sk_msg_md` to host order.
///
/// The kernel loads the big-endian `skc_dport` and, on little-endian hosts, shifts it into the
/// upper 16 bits of the u32, so the bytes in memory are `[0, 0, hi, lo]`.
#[must_use]
pub const fn remote_port_host(raw: u32) -> u32 {
    u32::from_be(raw) & 0xffff
}

#[cfg(feature = "user")]
// SAFETY: repr(C), Copy, no padding (asserted below).
unsafe impl aya::Pod for SockKey {}

const _: () = {
    assert!(core::mem::size_of::<SockKey>() == 44);
    assert!(core::mem::offset_of!(SockKey, remote_ip) == 20);
    assert!(core::mem::offset_of!(SockKey, local_port) == 36);
};

#[cfg(test)]
mod tests {
    use super::*;

    fn key(family: u32, local: [u32; 4], remote: [u32; 4]) -> SockKey {
        SockKey {
            family,
            local_ip: local,
            remote_ip: remote,
            local_port: 40000,
            remote_port: 80,
        }
    }

    fn v4(a: [u8; 4]) -> [u32; 4] {
        [u32::from_ne_bytes(a), 0, 0, 0]
    }

    fn v6(a: core::net::Ipv6Addr) -> [u32; 4] {
        let o = a.octets();
        core::array::from_fn(|i| {
            u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]])
        })
    }

    #[test]
    fn loopback_is_lo_addresses_or_one_address_at_both_ends() {
        let lo6: core::net::Ipv6Addr = "::1".parse().unwrap();
        let pod6: core::net::Ipv6Addr = "fd77::1:2".parse().unwrap();
        let other6: core::net::Ipv6Addr = "fd77::1:3".parse().unwrap();
        assert!(key(AF_INET, v4([127, 0, 0, 1]), v4([127, 0, 0, 1])).is_loopback());
        assert!(key(AF_INET, v4([127, 0, 0, 1]), v4([127, 3, 0, 9])).is_loopback());
        assert!(key(AF_INET, v4([10, 77, 1, 2]), v4([10, 77, 1, 2])).is_loopback());
        assert!(key(AF_INET6, v6(lo6), v6(lo6)).is_loopback());
        assert!(key(AF_INET6, v6(pod6), v6(pod6)).is_loopback());
        assert!(!key(AF_INET, v4([10, 77, 1, 2]), v4([10, 77, 1, 3])).is_loopback());
        // 128.0.0.0 and 1.0.0.127 differ from 127/8 only in byte order.
        assert!(!key(AF_INET, v4([10, 77, 1, 2]), v4([1, 0, 0, 127])).is_loopback());
        assert!(!key(AF_INET, v4([10, 77, 1, 2]), v4([128, 0, 0, 0])).is_loopback());
        assert!(!key(AF_INET6, v6(pod6), v6(other6)).is_loopback());
        // ::1 as IPv4 words would be 0.0.0.0 / 0.0.0.1: not loopback by the v6 rule.
        assert!(!key(AF_INET, v4([10, 0, 0, 1]), [0, 0, 0, u32::to_be(1)]).is_loopback());
    }

    #[test]
    fn v4_mapped_becomes_ipv4() {
        let mapped = [0, 0, u32::from_be(0xffff), u32::from_be(0x0a00_0001)];
        assert_eq!(
            normalise_v6(mapped),
            (AF_INET, [u32::from_be(0x0a00_0001), 0, 0, 0])
        );
    }

    #[test]
    fn remote_port_as_the_kernel_lays_it_out() {
        // Port 8080 = 0x1f90: big-endian u16 shifted into the upper half on little-endian.
        let raw = u32::from_ne_bytes([0, 0, 0x1f, 0x90]);
        assert_eq!(remote_port_host(raw), 8080);
    }

    #[test]
    fn native_v6_is_kept() {
        let addr = [u32::from_be(0xfd00_0000), 0, 0, u32::from_be(1)];
        assert_eq!(normalise_v6(addr), (AF_INET6, addr));
    }

    #[test]
    fn peer_swaps_ends_and_is_an_involution() {
        let k = SockKey {
            family: AF_INET,
            local_ip: [1, 0, 0, 0],
            remote_ip: [2, 0, 0, 0],
            local_port: 10,
            remote_port: 20,
        };
        assert_eq!(k.peer().local_ip, [2, 0, 0, 0]);
        assert_eq!(k.peer().local_port, 20);
        assert_eq!(k.peer().peer(), k);
    }
}

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

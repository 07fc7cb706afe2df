//! Adopting TCP sockets that were established before their pod was shaped: a `iter/tcp`
//! program, run by the agent in each network namespace, turns on the sock_ops callbacks
//! that pace them from then on (the kernel gives sock_ops no callback to start from).

/// Load-time global of the adoption iterator (`QL_ADOPT_CONFIG`): where `struct sock_common`
/// keeps its IPv6 addresses on the running kernel, from its BTF. Kernel configuration moves
/// them; the IPv4 fields at its start have not moved in the kernel's history.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AdoptConfig {
    /// Byte offset of `skc_v6_daddr`; 0 where unknown, and IPv6 sockets are then skipped.
    pub v6_daddr: u32,
    /// Byte offset of `skc_v6_rcv_saddr`.
    pub v6_rcv_saddr: u32,
}

/// What the iterator wrote for one socket with a shaped end: `ADOPTED`, `ALREADY`, `NO_V6`,
/// or the negative errno the kernel gave for the option (`-EINVAL` where it predates
/// `TCP_BPF_SOCK_OPS_CB_FLAGS`, Linux 6.12).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AdoptRecord {
    pub result: i32,
}

/// The socket's RTT and state callbacks are on now: it is paced from its next ACK.
pub const ADOPTED: i32 = 0;
/// It already had them (paced since establishment, or adopted before).
pub const ALREADY: i32 = 1;
/// An IPv6 socket on a kernel whose `sock_common` layout the agent could not read.
pub const NO_V6: i32 = 2;

/// `struct sock_common`'s first 20 bytes, which are the same on every kernel: addresses,
/// ports, family, state.
pub mod sock_common {
    pub const DADDR: usize = 0;
    pub const RCV_SADDR: usize = 4;
    /// Network byte order.
    pub const DPORT: usize = 12;
    /// Host byte order.
    pub const NUM: usize = 14;
    pub const FAMILY: usize = 16;
    pub const STATE: usize = 18;
    pub const HEAD: usize = 20;
    /// `TCP_ESTABLISHED`.
    pub const ESTABLISHED: u8 = 1;
}

#[cfg(feature = "user")]
// SAFETY: repr(C), Copy, no padding (asserted below).
unsafe impl aya::Pod for AdoptConfig {}
#[cfg(feature = "user")]
// SAFETY: as above.
unsafe impl aya::Pod for AdoptRecord {}

const _: () = {
    assert!(core::mem::size_of::<AdoptConfig>() == 8);
    assert!(core::mem::size_of::<AdoptRecord>() == 4);
};

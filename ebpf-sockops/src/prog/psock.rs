//! What BPF can see of a socket's psock, the kernel's sockmap state of it, through this
//! kernel's BTF offsets (`PsockLayout`): whether anything else is using it, and whether its
//! redirect queue is empty. Reads go through the fault-safe helper; an unknown layout or a
//! failed read answers "no", which keeps the socket where it is.
use aya_ebpf::{
    bindings::bpf_sock,
    helpers::{bpf_probe_read_kernel, bpf_skc_to_tcp_sock},
};
use quicklane_common::PsockLayout;

use super::maps::psock_layout;

/// The low bits of `sk_user_data` are flags (`SK_USER_DATA_NOCOPY`, `_BPF`, `_PSOCK`).
const USER_DATA_FLAGS: u64 = 7;

/// Map links plus sends in progress when only the locking send uses the socket: a socket in
/// one map has one reference for its link, and each send, receive or redirect into it holds
/// one more while it runs.
const LINK_AND_ONE_SEND: i32 = 2;

/// The psock address of `sk` and the layout it was found with.
#[inline(always)]
fn psock_of(sk: *mut bpf_sock) -> Option<(u64, PsockLayout)> {
    let layout = psock_layout();
    if !layout.known() {
        return None;
    }
    // SAFETY: a socket pointer from the live context; the helper checks it is a TCP socket.
    let tp = unsafe { bpf_skc_to_tcp_sock(sk.cast()) };
    if tp.is_null() {
        return None;
    }
    // `struct sock` is the first member of `struct tcp_sock`.
    let at = tp as u64 + u64::from(layout.sk_user_data);
    // SAFETY: a pointer-sized field inside the socket, read through the fault-safe helper.
    let data = unsafe { bpf_probe_read_kernel(at as *const u64) }.ok()? & !USER_DATA_FLAGS;
    (data != 0).then_some((data, layout))
}

/// Whether the send running sk_msg is the only user of its socket's psock: no other send (of
/// another thread) is between its verdict and its redirect, which the kernel completes after
/// releasing the socket lock.
#[inline(always)]
pub fn sole_sender(sk: *mut bpf_sock) -> bool {
    let Some((psock, layout)) = psock_of(sk) else {
        return false;
    };
    let at = psock + u64::from(layout.refcnt);
    // SAFETY: the refcount_t inside the live psock, read through the fault-safe helper.
    unsafe { bpf_probe_read_kernel(at as *const i32) }.is_ok_and(|n| n == LINK_AND_ONE_SEND)
}

/// Whether `sk`'s redirect queue (`ingress_msg`) is empty. A message stays on the list until
/// its last byte was copied to the application.
#[inline(always)]
pub fn redirect_queue_empty(sk: *mut bpf_sock) -> bool {
    let Some((psock, layout)) = psock_of(sk) else {
        return false;
    };
    let head = psock + u64::from(layout.ingress_msg);
    // SAFETY: `list_head.next`, the first word of the list head inside the live psock.
    unsafe { bpf_probe_read_kernel(head as *const u64) }.is_ok_and(|next| next == head)
}

//! Same-node TCP bypass: sock_ops records established sockets in `QL_SOCKS`; sk_msg hands each
//! message straight to the peer socket when both ends are on this node.
//!
//! Fallback verdicts are chosen so the bypass can only ever remove work, never traffic:
//! sock_ops always returns 1 (the socket proceeds normally whatever happened to the maps), and
//! sk_msg returns `SK_PASS` on every miss or error so the message takes the normal TCP path.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
#![cfg_attr(target_arch = "bpf", feature(asm_experimental_arch))]

#[cfg(target_arch = "bpf")]
mod prog;

#[cfg(not(target_arch = "bpf"))]
fn main() {}

use core::ptr::{addr_of, read_volatile};

use aya_ebpf::{
    bindings::{
        sk_action::SK_PASS, BPF_F_INGRESS, BPF_NOEXIST, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
    },
    macros::{map, sk_msg, sock_ops},
    maps::{PerCpuArray, SockHash},
    programs::{SkMsgContext, SockOpsContext},
};
use quicklane_common::{
    counters::sockops as c,
    sock::{normalise_v6, remote_port_host, SockKey, AF_INET, AF_INET6},
    SockopsConfig, SOCKOPS_F_BYPASS,
};

/// Default map size; the agent overrides it at load time from its configuration.
const SOCKS_DEFAULT_MAX: u32 = 262_144;

#[map(name = "QL_SOCKS")]
static QL_SOCKS: SockHash<SockKey> = SockHash::pinned(SOCKS_DEFAULT_MAX, 0);

#[map(name = "QL_SOCKOPS_STATS")]
static QL_SOCKOPS_STATS: PerCpuArray<u64> = PerCpuArray::pinned(c::LEN, 0);

#[no_mangle]
static QL_SOCKOPS_CONFIG: SockopsConfig = SockopsConfig {
    abi_version: 0,
    flags: 0,
};

#[inline(always)]
fn count(slot: u32, by: u64) {
    if let Some(p) = QL_SOCKOPS_STATS.get_ptr_mut(slot) {
        // SAFETY: per-CPU slot, only this CPU writes it while this program runs.
        unsafe { *p += by };
    }
}

#[inline(always)]
fn config_flags() -> u32 {
    // SAFETY: read-only global patched by the loader; volatile so LLVM cannot fold the
    // compile-time default into the program.
    unsafe { read_volatile(addr_of!(QL_SOCKOPS_CONFIG.flags)) }
}

/// Builds the socket's own key from a context struct that has the usual address fields
/// (`bpf_sock_ops` and `sk_msg_md` share the names). Volatile reads: a plain read lets LLVM
/// fold the field offset into the context pointer, which the verifier rejects.
macro_rules! key_from_ctx {
    ($ctx:expr) => {{
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

#[sock_ops]
pub fn ql_sockops(ctx: SockOpsContext) -> u32 {
    count(c::CALLS, 1);
    let op = ctx.op();
    if op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB && op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB {
        return 1;
    }
    count(
        if op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
            c::ACTIVE_ESTABLISHED
        } else {
            c::PASSIVE_ESTABLISHED
        },
        1,
    );
    if config_flags() & SOCKOPS_F_BYPASS == 0 {
        return 1;
    }
    let Some(mut key) = key_from_ctx!(ctx.ops) else {
        count(c::SOCK_SKIPPED_FAMILY, 1);
        return 1;
    };
    // SAFETY: `ctx.ops` is the live bpf_sock_ops of this callback.
    match QL_SOCKS.update(&mut key, unsafe { &mut *ctx.ops }, u64::from(BPF_NOEXIST)) {
        Ok(()) => count(c::SOCK_INSERTED, 1),
        // Map full or key taken: the socket simply stays on the normal path.
        Err(_) => count(c::SOCK_INSERT_FAILED, 1),
    }
    1
}

#[sk_msg]
pub fn ql_sk_msg(ctx: SkMsgContext) -> u32 {
    count(c::MSG_CALLS, 1);
    let Some(key) = key_from_ctx!(ctx.msg) else {
        return SK_PASS;
    };
    let mut peer = key.peer();
    let size = u64::from(ctx.size());
    if QL_SOCKS.redirect_msg(&ctx, &mut peer, u64::from(BPF_F_INGRESS)) == i64::from(SK_PASS) {
        count(c::MSG_REDIRECTED, 1);
        count(c::MSG_REDIRECTED_BYTES, size);
    } else {
        count(c::MSG_PEER_MISS, 1);
    }
    // On a miss the helper's own verdict would be SK_DROP; the normal path must carry it.
    SK_PASS
}

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

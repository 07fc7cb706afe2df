//! Probes that need a device: run on a thread that has unshared its network namespace, so the
//! qdisc, the netkit pair and the device links exist only there and vanish with the thread.
use futures::StreamExt as _;
use rtnetlink::{
    packet_core::{
        NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST,
    },
    packet_route::{
        link::NetkitMode,
        tc::{TcAttribute, TcHandle, TcMessage},
        RouteNetlinkMessage,
    },
    Handle, LinkNetkit,
};

use super::{classify, links, Support};

/// The loopback device of a fresh network namespace always has index 1.
const LO_IFINDEX: u32 = 1;

pub struct InNetns {
    pub tcx: Support,
    pub xdp: Support,
    pub fq: Support,
    pub netkit: Support,
}

pub fn probe_in_throwaway_netns() -> InNetns {
    let outcome = std::thread::scope(|s| {
        s.spawn(|| {
            // unshare(CLONE_NEWNET) moves only this thread; the process keeps its namespace.
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| format!("unsharing a network namespace: {e}"))?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| format!("starting a netlink runtime: {e}"))?;
            Ok::<_, String>(InNetns {
                tcx: links::tcx(LO_IFINDEX),
                xdp: links::xdp(LO_IFINDEX),
                fq: rt.block_on(with_handle(fq)),
                netkit: rt.block_on(with_handle(netkit)),
            })
        })
        .join()
        .unwrap_or_else(|_| Err("the probe thread panicked".to_owned()))
    });
    outcome.unwrap_or_else(|error| {
        let failed = || Support::ProbeFailed {
            error: error.clone(),
        };
        InNetns {
            tcx: failed(),
            xdp: failed(),
            fq: failed(),
            netkit: failed(),
        }
    })
}

async fn with_handle<F, Fut>(probe: F) -> Support
where
    F: FnOnce(Handle) -> Fut,
    Fut: std::future::Future<Output = Support>,
{
    match rtnetlink::new_connection() {
        Ok((connection, handle, _)) => {
            tokio::spawn(connection);
            probe(handle).await
        }
        Err(e) => Support::ProbeFailed {
            error: format!("opening a netlink socket: {e}"),
        },
    }
}

/// An fq root qdisc on loopback. The kernel loads sch_fq on demand where it is a module.
async fn fq(mut handle: Handle) -> Support {
    let mut message = TcMessage::with_index(LO_IFINDEX.cast_signed());
    message.header.parent = TcHandle::ROOT;
    message.attributes.push(TcAttribute::Kind("fq".to_owned()));
    let mut request = NetlinkMessage::from(RouteNetlinkMessage::NewQueueDiscipline(message));
    request.header.flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL;
    let mut responses = match handle.request(request) {
        Ok(r) => r,
        Err(e) => {
            return Support::ProbeFailed {
                error: e.to_string(),
            }
        }
    };
    while let Some(response) = responses.next().await {
        if let NetlinkPayload::Error(e) = response.payload {
            if e.code.is_some() {
                // ENOENT: "Specified qdisc kind is unknown".
                return classify(&e.to_io(), &[libc::ENOENT], "no sch_fq in this kernel");
            }
        }
    }
    Support::Available
}

/// A netkit pair (kernel >= 6.7 with CONFIG_NETKIT).
async fn netkit(handle: Handle) -> Support {
    let pair = LinkNetkit::new("qlprobe0", "qlprobe1", NetkitMode::L3).build();
    match handle.link().add(pair).execute().await {
        Ok(()) => Support::Available,
        // EOPNOTSUPP: "Unknown device type".
        Err(rtnetlink::Error::NetlinkError(e)) => {
            classify(&e.to_io(), &[libc::EOPNOTSUPP], "no netkit in this kernel")
        }
        Err(e) => Support::ProbeFailed {
            error: e.to_string(),
        },
    }
}

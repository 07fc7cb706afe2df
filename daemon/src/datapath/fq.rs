//! sch_fq on shaped interfaces, so departure times written by the tc shaper are honoured.
//!
//! Our root qdisc carries a fixed handle major, which is how a restarted agent recognises it
//! (and how shutdown knows what to remove). We only replace the kernel's default root qdiscs:
//! overwriting an operator's htb tree would be a silent loss no restart could undo. Removing
//! ours hands the device back to the kernel's default, which is what it had before.
use futures::StreamExt as _;
use rtnetlink::{
    packet_core::{
        NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_REPLACE, NLM_F_REQUEST,
    },
    packet_route::{
        tc::{TcAttribute, TcHandle, TcMessage},
        RouteNetlinkMessage,
    },
    Handle,
};

use super::DatapathError;

/// "ql" in ASCII: the handle major of every qdisc quicklane installs.
pub const HANDLE_MAJOR: u16 = 0x716c;
/// Root qdiscs the kernel sets up by itself, safe to replace and to restore by deletion
/// ("noop": a device that is down; "none": nothing listed for it yet).
const DEFAULT_KINDS: &[&str] = &[
    "noqueue",
    "noop",
    "none",
    "pfifo_fast",
    "mq",
    "fq_codel",
    "pfifo",
];

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Installed {
    /// We put fq (or mq with fq leaves) on the device.
    New { replaced: String },
    /// A previous agent's fq was still there.
    Adopted,
}

/// Installs fq on `ifindex` (mq with one fq per queue on multi-queue devices).
pub fn install(ifname: &str, ifindex: u32) -> Result<Installed, DatapathError> {
    run(ifname, async move |handle| {
        let queues = tx_queues(&handle, ifindex).await?;
        let root = root_qdisc(&handle, ifindex).await?;
        if let Some((h, _)) = &root {
            if h.major == HANDLE_MAJOR {
                return Ok(Installed::Adopted);
            }
        }
        let replaced = root.map_or_else(|| "none".to_owned(), |(_, kind)| kind);
        if !DEFAULT_KINDS.contains(&replaced.as_str()) {
            return Err(format!(
                "has root qdisc {replaced:?}, which quicklane will not replace; remove it \
                 or set qos.mode = \"policer\""
            ));
        }
        if queues > 1 {
            add(
                &handle,
                ifindex,
                TcHandle::ROOT,
                HANDLE_MAJOR,
                0,
                "mq",
                true,
            )
            .await?;
            for q in 1..=queues {
                let parent = TcHandle {
                    major: HANDLE_MAJOR,
                    minor: q,
                };
                add(&handle, ifindex, parent, HANDLE_MAJOR + q, 0, "fq", false).await?;
            }
        } else {
            add(
                &handle,
                ifindex,
                TcHandle::ROOT,
                HANDLE_MAJOR,
                0,
                "fq",
                true,
            )
            .await?;
        }
        Ok(Installed::New { replaced })
    })
}

/// Removes our root qdisc if it is still there; the kernel puts its default back.
pub fn remove(ifname: &str, ifindex: u32) -> Result<(), DatapathError> {
    run(ifname, async move |mut handle| {
        match root_qdisc(&handle, ifindex).await? {
            Some((h, _)) if h.major == HANDLE_MAJOR => {}
            _ => return Ok(()),
        }
        let mut message = TcMessage::with_index(ifindex.cast_signed());
        message.header.parent = TcHandle::ROOT;
        let mut request = NetlinkMessage::from(RouteNetlinkMessage::DelQueueDiscipline(message));
        request.header.flags = NLM_F_REQUEST | NLM_F_ACK;
        ack(&mut handle, request).await
    })
}

async fn root_qdisc(handle: &Handle, ifindex: u32) -> Result<Option<(TcHandle, String)>, String> {
    let mut dump = handle.qdisc().get().index(ifindex.cast_signed()).execute();
    let mut found = None;
    while let Some(msg) = dump.next().await {
        let msg = msg.map_err(|e| format!("listing qdiscs: {e}"))?;
        if msg.header.index != ifindex.cast_signed() || msg.header.parent != TcHandle::ROOT {
            continue;
        }
        let kind = msg.attributes.iter().find_map(|a| match a {
            TcAttribute::Kind(k) => Some(k.clone()),
            _ => None,
        });
        found = Some((msg.header.handle, kind.unwrap_or_default()));
    }
    Ok(found)
}

async fn add(
    handle: &Handle,
    ifindex: u32,
    parent: TcHandle,
    major: u16,
    minor: u16,
    kind: &str,
    replace: bool,
) -> Result<(), String> {
    let mut message = TcMessage::with_index(ifindex.cast_signed());
    message.header.parent = parent;
    message.header.handle = TcHandle { major, minor };
    message.attributes.push(TcAttribute::Kind(kind.to_owned()));
    let mut request = NetlinkMessage::from(RouteNetlinkMessage::NewQueueDiscipline(message));
    request.header.flags =
        NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | if replace { NLM_F_REPLACE } else { 0 };
    ack(&mut handle.clone(), request)
        .await
        .map_err(|e| format!("adding {kind} qdisc: {e}"))
}

async fn ack(
    handle: &mut Handle,
    request: NetlinkMessage<RouteNetlinkMessage>,
) -> Result<(), String> {
    let mut responses = handle.request(request).map_err(|e| e.to_string())?;
    while let Some(response) = responses.next().await {
        if let NetlinkPayload::Error(e) = response.payload {
            if e.code.is_some() {
                return Err(e.to_io().to_string());
            }
        }
    }
    Ok(())
}

/// The device's transmit queues, as the kernel reports them in the agent's namespace.
async fn tx_queues(handle: &Handle, ifindex: u32) -> Result<u16, String> {
    use rtnetlink::packet_route::link::LinkAttribute;
    let mut links = handle.link().get().match_index(ifindex).execute();
    while let Some(link) = links.next().await {
        let link = link.map_err(|e| format!("reading the device: {e}"))?;
        for attr in link.attributes {
            if let LinkAttribute::NumTxQueues(n) = attr {
                return Ok(n.clamp(1, 0x7fff) as u16);
            }
        }
    }
    Ok(1)
}

fn run<T, F, Fut>(ifname: &str, f: F) -> Result<T, DatapathError>
where
    F: FnOnce(Handle) -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let fail = |message: String| DatapathError::Qdisc {
        ifname: ifname.to_owned(),
        message,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| fail(format!("starting a netlink runtime: {e}")))?;
    rt.block_on(async {
        let (connection, handle, _) = rtnetlink::new_connection()
            .map_err(|e| fail(format!("opening a netlink socket: {e}")))?;
        tokio::spawn(connection);
        f(handle).await.map_err(fail)
    })
}

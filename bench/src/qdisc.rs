//! The qos scenario's baselines: htb and tbf root qdiscs, htb classes and u32 filters, set
//! through rtnetlink as the agent sets its own qdiscs (never by running `tc`).
//!
//! netlink-packet-route 0.34 has no typed htb or tbf options, so their `TCA_OPTIONS` are
//! encoded here from the kernel's uapi structs (`struct tc_tbf_qopt`, `tc_htb_glob`,
//! `tc_htb_opt`, `tc_fifo_qopt`, all native-endian). Rate tables are not needed: a rate spec
//! whose link layer is Ethernet tells the kernel (since 3.11) to compute transmission times
//! itself, which is what iproute2 relies on too. Burst times go in psched ticks of 64 ns.

use std::fmt::Write as _;
use std::net::Ipv4Addr;

use futures::StreamExt as _;
use rtnetlink::packet_core::{
    DefaultNla, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST,
};
use rtnetlink::packet_route::tc::{
    TcAttribute, TcFilterU32Option, TcHandle, TcMessage, TcOption, TcU32Key, TcU32Selector,
    TcU32SelectorFlags,
};
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::Handle;
use simnode::Node;

use crate::error::Error;

/// Handle major of every qdisc this module installs (`1:` in tc's notation).
const MAJOR: u16 = 1;
/// `TC_LINKLAYER_ETHERNET`: the kernel computes packet times without a rate table.
const LINKLAYER_ETHERNET: u8 = 1;
/// `PSCHED_SHIFT`: a psched tick is 2^6 ns.
const PSCHED_SHIFT: u32 = 6;
/// `TCA_OPTIONS` (a fifo's options are the bare struct, not nested attributes).
const TCA_OPTIONS: u16 = 2;
const TCA_TBF_PARMS: u16 = 1;
const TCA_TBF_RATE64: u16 = 4;
const TCA_TBF_BURST: u16 = 6;
const TCA_HTB_PARMS: u16 = 1;
const TCA_HTB_INIT: u16 = 2;
const TCA_HTB_RATE64: u16 = 6;
const TCA_HTB_CEIL64: u16 = 7;
/// `HTB_VER >> 16`, which htb_init insists on.
const HTB_VERSION: u32 = 3;
/// htb's default rate-to-quantum divisor (`r2q`).
const HTB_R2Q: u32 = 10;
/// `ETH_P_IP`, filters match IPv4 only (the scenario's traffic is IPv4).
const ETH_P_IP: u16 = 0x0800;
/// Offset of the IPv4 source address in the network header, for the u32 match.
const IPV4_SRC_OFFSET: i32 = 12;

/// Token bucket on the root: `rate`, bucket `burst`, queue `limit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tbf {
    pub rate_bps: u64,
    pub burst_bytes: u32,
    pub limit_bytes: u32,
}

/// One htb class `1:minor`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HtbClass {
    pub minor: u16,
    /// The parent class's minor; `None` for a class directly under the qdisc.
    pub parent: Option<u16>,
    pub rate_bps: u64,
    pub ceil_bps: u64,
    pub burst_bytes: u32,
    pub cburst_bytes: u32,
    /// 0 (served first) to 7.
    pub prio: u32,
    /// A leaf gets a bfifo of this many bytes instead of htb's default pfifo.
    pub leaf_limit_bytes: Option<u32>,
}

/// Sends IPv4 packets from `src` to class `1:class`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceFilter {
    pub src: Ipv4Addr,
    pub class: u16,
}

/// An htb tree on the root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Htb {
    /// Class of unclassified traffic; 0 sends it unshaped through htb's direct queue.
    pub default_class: u16,
    pub classes: Vec<HtbClass>,
    pub filters: Vec<SourceFilter>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Shaper {
    Tbf(Tbf),
    Htb(Htb),
}

impl Shaper {
    /// The configuration in tc's words, for the report (what an operator would type).
    pub fn describe(&self, ifname: &str) -> String {
        let mut s = String::new();
        match self {
            Self::Tbf(t) => {
                let _ = write!(
                    s,
                    "qdisc add dev {ifname} root handle 1: tbf rate {} burst {}b limit {}b",
                    bits(t.rate_bps),
                    t.burst_bytes,
                    t.limit_bytes
                );
            }
            Self::Htb(h) => {
                let _ = write!(
                    s,
                    "qdisc add dev {ifname} root handle 1: htb default {:x}",
                    h.default_class
                );
                for c in &h.classes {
                    let parent = c
                        .parent
                        .map_or_else(|| "1:".to_owned(), |p| format!("1:{p:x}"));
                    let _ = write!(
                        s,
                        "; class add dev {ifname} parent {parent} classid 1:{:x} htb rate {} ceil {} \
                         burst {}b cburst {}b prio {}",
                        c.minor,
                        bits(c.rate_bps),
                        bits(c.ceil_bps),
                        c.burst_bytes,
                        c.cburst_bytes,
                        c.prio
                    );
                    if let Some(limit) = c.leaf_limit_bytes {
                        let _ = write!(
                            s,
                            "; qdisc add dev {ifname} parent 1:{:x} bfifo limit {limit}b",
                            c.minor
                        );
                    }
                }
                for f in &h.filters {
                    let _ = write!(
                        s,
                        "; filter add dev {ifname} parent 1: protocol ip prio 1 u32 match ip src \
                         {}/32 flowid 1:{:x}",
                        f.src, f.class
                    );
                }
            }
        }
        s
    }
}

/// `200Mbit`, `1Gbit`, `1500kbit`: rates as tc prints them.
fn bits(bps: u64) -> String {
    match bps {
        b if b >= 1_000_000_000 && b % 1_000_000_000 == 0 => format!("{}Gbit", b / 1_000_000_000),
        b if b >= 1_000_000 && b % 1_000_000 == 0 => format!("{}Mbit", b / 1_000_000),
        b if b >= 1000 && b % 1000 == 0 => format!("{}kbit", b / 1000),
        b => format!("{b}bit"),
    }
}

/// `struct tc_ratespec` for `rate_bytes` per second (saturated at u32; the 64-bit attribute
/// carries larger rates).
fn ratespec(rate_bytes: u64) -> [u8; 12] {
    let mut b = [0u8; 12];
    // cell_log 0, linklayer, overhead 0, cell_align -1 (as iproute2), mpu 0, rate.
    b[1] = LINKLAYER_ETHERNET;
    b[4..6].copy_from_slice(&(-1i16).to_ne_bytes());
    b[8..12].copy_from_slice(&u32::try_from(rate_bytes).unwrap_or(u32::MAX).to_ne_bytes());
    b
}

/// Time to send `bytes` at `rate_bytes` per second, in psched ticks.
fn ticks(bytes: u32, rate_bytes: u64) -> u32 {
    let ns = u128::from(bytes) * 1_000_000_000 / u128::from(rate_bytes.max(1));
    u32::try_from(ns >> PSCHED_SHIFT).unwrap_or(u32::MAX)
}

fn nla(kind: u16, value: Vec<u8>) -> TcOption {
    TcOption::Other(DefaultNla::new(kind, value))
}

fn u32s(values: &[u32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_ne_bytes()).collect()
}

/// A rate above u32 bytes per second goes in the 64-bit attribute too.
fn rate64(kind: u16, rate_bytes: u64) -> Option<TcOption> {
    (rate_bytes > u64::from(u32::MAX)).then(|| nla(kind, rate_bytes.to_ne_bytes().to_vec()))
}

fn tbf_options(t: &Tbf) -> Vec<TcOption> {
    let rate = t.rate_bps / 8;
    // struct tc_tbf_qopt: rate, peakrate (none), limit, buffer, mtu (no peak rate: 0).
    let mut qopt = ratespec(rate).to_vec();
    qopt.extend_from_slice(&[0u8; 12]);
    qopt.extend(u32s(&[t.limit_bytes, ticks(t.burst_bytes, rate), 0]));
    let mut options = vec![nla(TCA_TBF_PARMS, qopt)];
    options.extend(rate64(TCA_TBF_RATE64, rate));
    options.push(nla(TCA_TBF_BURST, t.burst_bytes.to_ne_bytes().to_vec()));
    options
}

fn htb_glob(default_class: u16) -> Vec<TcOption> {
    // struct tc_htb_glob: version, rate2quantum, defcls, debug, direct_pkts.
    vec![nla(
        TCA_HTB_INIT,
        u32s(&[HTB_VERSION, HTB_R2Q, u32::from(default_class), 0, 0]),
    )]
}

fn htb_class_options(c: &HtbClass) -> Vec<TcOption> {
    let (rate, ceil) = (c.rate_bps / 8, c.ceil_bps / 8);
    // What htb would derive from r2q, kept inside the range it accepts without a warning.
    let quantum = u32::try_from(rate / u64::from(HTB_R2Q))
        .unwrap_or(u32::MAX)
        .clamp(1000, 200_000);
    // struct tc_htb_opt: rate, ceil, buffer, cbuffer, quantum, level (kernel's), prio.
    let mut opt = ratespec(rate).to_vec();
    opt.extend_from_slice(&ratespec(ceil));
    opt.extend(u32s(&[
        ticks(c.burst_bytes, rate),
        ticks(c.cburst_bytes, ceil),
        quantum,
        0,
        c.prio,
    ]));
    let mut options = vec![nla(TCA_HTB_PARMS, opt)];
    options.extend(rate64(TCA_HTB_RATE64, rate));
    options.extend(rate64(TCA_HTB_CEIL64, ceil));
    options
}

fn handle(minor: u16) -> TcHandle {
    TcHandle {
        major: MAJOR,
        minor,
    }
}

fn message(ifindex: u32, parent: TcHandle, handle: TcHandle, kind: &str) -> TcMessage {
    let mut m = TcMessage::with_index(ifindex.cast_signed());
    m.header.parent = parent;
    m.header.handle = handle;
    m.attributes.push(TcAttribute::Kind(kind.to_owned()));
    m
}

/// The requests that build `shaper` on `ifindex`, in order.
fn requests(ifindex: u32, shaper: &Shaper) -> Vec<(String, RouteNetlinkMessage)> {
    let mut out = Vec::new();
    match shaper {
        Shaper::Tbf(t) => {
            let mut m = message(ifindex, TcHandle::ROOT, handle(0), "tbf");
            m.attributes.push(TcAttribute::Options(tbf_options(t)));
            out.push((
                "tbf root qdisc".to_owned(),
                RouteNetlinkMessage::NewQueueDiscipline(m),
            ));
        }
        Shaper::Htb(h) => {
            let mut m = message(ifindex, TcHandle::ROOT, handle(0), "htb");
            m.attributes
                .push(TcAttribute::Options(htb_glob(h.default_class)));
            out.push((
                "htb root qdisc".to_owned(),
                RouteNetlinkMessage::NewQueueDiscipline(m),
            ));
            for c in &h.classes {
                let parent = handle(c.parent.unwrap_or(0));
                let mut m = message(ifindex, parent, handle(c.minor), "htb");
                m.attributes
                    .push(TcAttribute::Options(htb_class_options(c)));
                out.push((
                    format!("htb class 1:{:x}", c.minor),
                    RouteNetlinkMessage::NewTrafficClass(m),
                ));
                if let Some(limit) = c.leaf_limit_bytes {
                    // Leaf qdisc handle: the class's minor as its major, as is customary.
                    let leaf = TcHandle {
                        major: 0x100 + c.minor,
                        minor: 0,
                    };
                    let mut m = message(ifindex, handle(c.minor), leaf, "bfifo");
                    m.attributes.push(TcAttribute::Other(DefaultNla::new(
                        TCA_OPTIONS,
                        limit.to_ne_bytes().to_vec(),
                    )));
                    out.push((
                        format!("bfifo under 1:{:x}", c.minor),
                        RouteNetlinkMessage::NewQueueDiscipline(m),
                    ));
                }
            }
            for f in &h.filters {
                let mut m = message(ifindex, handle(0), TcHandle { major: 0, minor: 0 }, "u32");
                // Preference 1, protocol in network byte order, as TC_H_MAKE(prio << 16, proto).
                m.header.info = (1 << 16) | u32::from(ETH_P_IP.to_be());
                // Both types are non_exhaustive: built from their defaults.
                let mut key = TcU32Key::default();
                key.mask = u32::MAX;
                key.val = u32::from(f.src);
                key.off = IPV4_SRC_OFFSET;
                let mut selector = TcU32Selector::default();
                selector.flags = TcU32SelectorFlags::Terminal;
                selector.nkeys = 1;
                selector.keys = vec![key];
                m.attributes.push(TcAttribute::Options(vec![
                    TcOption::U32(TcFilterU32Option::ClassId(handle(f.class))),
                    TcOption::U32(TcFilterU32Option::Selector(selector)),
                ]));
                out.push((
                    format!("u32 filter src {} -> 1:{:x}", f.src, f.class),
                    RouteNetlinkMessage::NewTrafficFilter(m),
                ));
            }
        }
    }
    out
}

/// A shaper installed on a device of the node; removed by [`Installed::remove`], or on drop
/// (best effort, e.g. after an error or Ctrl-C).
#[derive(Debug)]
pub struct Installed<'a> {
    node: &'a Node,
    ifname: String,
    removed: bool,
}

impl Installed<'_> {
    pub fn remove(mut self) -> Result<(), Error> {
        self.removed = true;
        remove_root(self.node, &self.ifname)
    }
}

impl Drop for Installed<'_> {
    fn drop(&mut self) {
        if !self.removed {
            if let Err(e) = remove_root(self.node, &self.ifname) {
                tracing::warn!(ifname = %self.ifname, error = %e, "cannot remove the baseline qdisc");
            }
        }
    }
}

/// Installs `shaper` as the root qdisc of `ifname` in the node's namespace. The device must
/// have the kernel's default root qdisc: another one is never replaced (NLM_F_EXCL). A
/// failure after the root qdisc was added removes it again.
pub fn install<'a>(node: &'a Node, ifname: &str, shaper: &Shaper) -> Result<Installed<'a>, Error> {
    let shaper = shaper.clone();
    in_node(node, ifname, async move |handle, ifindex| {
        for (i, (what, request)) in requests(ifindex, &shaper).into_iter().enumerate() {
            let mut request = NetlinkMessage::from(request);
            request.header.flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL;
            if let Err(e) = ack(&handle, request).await {
                // The first request is the root qdisc: before it, nothing of ours exists.
                if i > 0 {
                    let _ = ack(&handle, delete_root(ifindex)).await;
                }
                return Err(format!("adding the {what}: {e}"));
            }
        }
        Ok(())
    })?;
    Ok(Installed {
        node,
        ifname: ifname.to_owned(),
        removed: false,
    })
}

fn delete_root(ifindex: u32) -> NetlinkMessage<RouteNetlinkMessage> {
    let mut m = TcMessage::with_index(ifindex.cast_signed());
    m.header.parent = TcHandle::ROOT;
    let mut request = NetlinkMessage::from(RouteNetlinkMessage::DelQueueDiscipline(m));
    request.header.flags = NLM_F_REQUEST | NLM_F_ACK;
    request
}

/// Deletes the root qdisc of `ifname` (with its classes and filters); the kernel puts its
/// default back.
fn remove_root(node: &Node, ifname: &str) -> Result<(), Error> {
    in_node(node, ifname, async move |handle, ifindex| {
        ack(&handle, delete_root(ifindex))
            .await
            .map_err(|e| format!("deleting the root qdisc: {e}"))
    })
}

/// Runs `f` with a netlink handle opened inside the node's namespace.
fn in_node<F, Fut>(node: &Node, ifname: &str, f: F) -> Result<(), Error>
where
    F: FnOnce(Handle, u32) -> Fut + Send,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let fail = |message: String| Error::Qdisc {
        ifname: ifname.to_owned(),
        message,
    };
    let outcome = node.in_netns(|| {
        let ifindex = nix::net::if_::if_nametoindex(ifname)
            .map_err(|e| format!("no such device in the node: {e}"))?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("starting a netlink runtime: {e}"))?;
        rt.block_on(async {
            // The socket belongs to the namespace of the thread that opens it: this one.
            let (connection, handle, _) = rtnetlink::new_connection()
                .map_err(|e| format!("opening a netlink socket: {e}"))?;
            tokio::spawn(connection);
            f(handle, ifindex).await
        })
    })?;
    outcome.map_err(fail)
}

async fn ack(handle: &Handle, request: NetlinkMessage<RouteNetlinkMessage>) -> Result<(), String> {
    let mut responses = handle.clone().request(request).map_err(|e| e.to_string())?;
    while let Some(response) = responses.next().await {
        if let NetlinkPayload::Error(e) = response.payload {
            if e.code.is_some() {
                return Err(e.to_io().to_string());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_ne_bytes(b[at..at + 4].try_into().unwrap())
    }

    fn value(o: &TcOption) -> (u16, Vec<u8>) {
        let TcOption::Other(nla) = o else {
            panic!("not a raw attribute: {o:?}")
        };
        let mut buf = vec![0; rtnetlink::packet_core::Nla::value_len(nla)];
        rtnetlink::packet_core::Nla::emit_value(nla, &mut buf);
        (rtnetlink::packet_core::Nla::kind(nla), buf)
    }

    #[test]
    fn ratespecs_carry_the_rate_and_the_ethernet_link_layer() {
        let r = ratespec(25_000_000);
        assert_eq!(r[1], LINKLAYER_ETHERNET);
        assert_eq!(u32_at(&r, 8), 25_000_000);
        assert_eq!(u32_at(&ratespec(1 << 40), 8), u32::MAX);
    }

    #[test]
    fn burst_times_are_psched_ticks() {
        // 250 kB at 25 MB/s is 10 ms = 156250 ticks of 64 ns.
        assert_eq!(ticks(250_000, 25_000_000), 156_250);
        assert_eq!(ticks(u32::MAX, 1), u32::MAX);
    }

    #[test]
    fn tbf_options_match_the_uapi_layout() {
        let opts = tbf_options(&Tbf {
            rate_bps: 200_000_000,
            burst_bytes: 250_000,
            limit_bytes: 1_250_000,
        });
        assert_eq!(opts.len(), 2, "no RATE64 below 4 GB/s");
        let (kind, parms) = value(&opts[0]);
        assert_eq!((kind, parms.len()), (TCA_TBF_PARMS, 36));
        assert_eq!(u32_at(&parms, 8), 25_000_000, "rate");
        assert_eq!(u32_at(&parms, 20), 0, "no peak rate");
        assert_eq!(u32_at(&parms, 24), 1_250_000, "limit");
        assert_eq!(u32_at(&parms, 28), 156_250, "buffer");
        let (kind, burst) = value(&opts[1]);
        assert_eq!((kind, u32_at(&burst, 0)), (TCA_TBF_BURST, 250_000));
        let fast = tbf_options(&Tbf {
            rate_bps: 400_000_000_000,
            burst_bytes: 1,
            limit_bytes: 1,
        });
        assert_eq!(value(&fast[1]).0, TCA_TBF_RATE64);
    }

    #[test]
    fn htb_options_match_the_uapi_layout() {
        let (kind, glob) = value(&htb_glob(0x20)[0]);
        assert_eq!((kind, glob.len()), (TCA_HTB_INIT, 20));
        assert_eq!((u32_at(&glob, 0), u32_at(&glob, 8)), (3, 0x20));
        let class = HtbClass {
            minor: 0x10,
            parent: Some(1),
            rate_bps: 450_000_000,
            ceil_bps: 500_000_000,
            burst_bytes: 562_500,
            cburst_bytes: 625_000,
            prio: 0,
            leaf_limit_bytes: Some(3_125_000),
        };
        let opts = htb_class_options(&class);
        assert_eq!(opts.len(), 1);
        let (kind, opt) = value(&opts[0]);
        assert_eq!((kind, opt.len()), (TCA_HTB_PARMS, 44));
        assert_eq!(u32_at(&opt, 8), 56_250_000, "rate");
        assert_eq!(u32_at(&opt, 20), 62_500_000, "ceil");
        assert_eq!(u32_at(&opt, 24), 156_250, "buffer: 10 ms at the rate");
        assert_eq!(u32_at(&opt, 28), 156_250, "cbuffer: 10 ms at the ceil");
        assert_eq!(u32_at(&opt, 32), 200_000, "quantum clamped");
        assert_eq!(u32_at(&opt, 40), 0, "prio");
    }

    #[test]
    fn an_htb_tree_is_built_top_down_with_leaves_and_filters() {
        let htb = Htb {
            default_class: 0,
            classes: vec![HtbClass {
                minor: 1,
                parent: None,
                rate_bps: 1_000_000,
                ceil_bps: 1_000_000,
                burst_bytes: 3028,
                cburst_bytes: 3028,
                prio: 0,
                leaf_limit_bytes: Some(6250),
            }],
            filters: vec![SourceFilter {
                src: Ipv4Addr::new(10, 77, 0, 2),
                class: 1,
            }],
        };
        let what: Vec<String> = requests(7, &Shaper::Htb(htb.clone()))
            .into_iter()
            .map(|(w, _)| w)
            .collect();
        assert_eq!(
            what,
            [
                "htb root qdisc",
                "htb class 1:1",
                "bfifo under 1:1",
                "u32 filter src 10.77.0.2 -> 1:1"
            ]
        );
        let text = Shaper::Htb(htb).describe("qlh2");
        assert!(
            text.contains("classid 1:1 htb rate 1Mbit ceil 1Mbit burst 3028b cburst 3028b prio 0"),
            "{text}"
        );
        assert!(
            text.contains("match ip src 10.77.0.2/32 flowid 1:1"),
            "{text}"
        );
    }

    #[test]
    fn rates_read_like_tc_prints_them() {
        assert_eq!(bits(200_000_000), "200Mbit");
        assert_eq!(bits(1_000_000_000), "1Gbit");
        assert_eq!(bits(1_500_000), "1500kbit");
        assert_eq!(bits(7), "7bit");
    }
}

//! Which host interface a pod lives behind: the node's own route to the pod's address, as
//! the CNI installed it (a /32 or a pod subnet via the pod's veth), or, where that route
//! leads to a bridge, the bridge port the pod's MAC was learned on.
use std::net::IpAddr;

use futures::TryStreamExt as _;
use rtnetlink::packet_route::{
    link::{InfoKind, LinkAttribute, LinkInfo},
    neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourMessage},
    route::{RouteAttribute, RouteType},
    AddressFamily,
};
use rtnetlink::RouteMessageBuilder;

/// The interface name and index the node routes `ip` through, or why there is none usable.
pub async fn pod_interface(
    handle: &rtnetlink::Handle,
    ip: IpAddr,
) -> Result<(String, u32), String> {
    let prefix = if ip.is_ipv4() { 32 } else { 128 };
    let query = RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(ip, prefix)
        .map_err(|e| e.to_string())?
        .build();
    let route = handle
        .route()
        .get(query)
        .execute()
        .try_next()
        .await
        .map_err(|e| format!("no route to {ip}: {e}"))?
        .ok_or_else(|| format!("no route to {ip}"))?;
    if route.header.kind != RouteType::Unicast {
        return Err(format!(
            "{ip} is not routed to a pod interface (route type {:?}: an address of the node itself?)",
            route.header.kind
        ));
    }
    let ifindex = route
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Oif(i) => Some(*i),
            _ => None,
        })
        .ok_or_else(|| format!("the route to {ip} names no interface"))?;
    if route
        .attributes
        .iter()
        .any(|a| matches!(a, RouteAttribute::Gateway(_)))
    {
        return Err(format!(
            "{ip} is reached through a gateway, not a pod interface on this node"
        ));
    }
    let ifname = nix::net::if_::if_indextoname(ifindex)
        .map_err(|e| format!("interface {ifindex} (route to {ip}): {e}"))?
        .to_string_lossy()
        .into_owned();
    match link_kind(handle, ifindex).await? {
        None => Ok((ifname, ifindex)),
        Some(kind) if kind == "bridge" => bridge_port(handle, ip, &ifname, ifindex).await,
        Some(kind) => Err(format!(
            "{ip} is routed through {ifname}, a {kind} shared by several pods; \
             per-pod shaping needs the pod's own interface (veth or netkit, routed or bridged)"
        )),
    }
}

/// A pod behind a bridge (flannel, the bridge plugin): its MAC from the node's neighbour
/// entry for `ip` on the bridge, then the bridge port that MAC was learned on.
async fn bridge_port(
    handle: &rtnetlink::Handle,
    ip: IpAddr,
    bridge: &str,
    bridge_index: u32,
) -> Result<(String, u32), String> {
    let family = if ip.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let neighbours: Vec<NeighbourMessage> = handle
        .neighbours()
        .get()
        .set_address_family(family)
        .execute()
        .try_collect()
        .await
        .map_err(|e| format!("neighbours of {bridge}: {e}"))?;
    let mac = neighbours
        .iter()
        .filter(|n| n.header.ifindex == bridge_index)
        .find(|n| n.attributes.iter().any(|a| is_destination(a, ip)))
        .and_then(lladdr)
        .ok_or_else(|| {
            format!("{ip} is behind bridge {bridge} and has no neighbour entry there yet (it has not talked to the node)")
        })?;
    let fdb: Vec<NeighbourMessage> = handle
        .neighbours()
        .get()
        .set_address_family(AddressFamily::Bridge)
        .execute()
        .try_collect()
        .await
        .map_err(|e| format!("forwarding database of {bridge}: {e}"))?;
    let port = fdb
        .iter()
        .filter(|n| n.header.ifindex != bridge_index)
        .filter(|n| {
            n.attributes
                .iter()
                .any(|a| matches!(a, NeighbourAttribute::Controller(c) if *c == bridge_index))
        })
        .find(|n| lladdr(n).as_deref() == Some(mac.as_slice()))
        .map(|n| n.header.ifindex)
        .ok_or_else(|| {
            format!(
                "{ip} ({}) is not in {bridge}'s forwarding database yet",
                hex_mac(&mac)
            )
        })?;
    let ifname = nix::net::if_::if_indextoname(port)
        .map_err(|e| format!("bridge port {port} of {bridge}: {e}"))?
        .to_string_lossy()
        .into_owned();
    match link_kind(handle, port).await? {
        None => Ok((ifname, port)),
        Some(kind) => Err(format!(
            "{ip} is behind {ifname} on bridge {bridge}, a {kind}, not the pod's own interface"
        )),
    }
}

fn is_destination(a: &NeighbourAttribute, ip: IpAddr) -> bool {
    match (a, ip) {
        (NeighbourAttribute::Destination(NeighbourAddress::Inet(d)), IpAddr::V4(v4)) => *d == v4,
        (NeighbourAttribute::Destination(NeighbourAddress::Inet6(d)), IpAddr::V6(v6)) => *d == v6,
        _ => false,
    }
}

fn lladdr(n: &NeighbourMessage) -> Option<Vec<u8>> {
    n.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::LinkLayerAddress(mac) => Some(mac.clone()),
        _ => None,
    })
}

fn hex_mac(mac: &[u8]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The kind of a shared device (bridge, vxlan, ...), None for a per-pod one (veth, netkit).
async fn link_kind(handle: &rtnetlink::Handle, ifindex: u32) -> Result<Option<String>, String> {
    let link = handle
        .link()
        .get()
        .match_index(ifindex)
        .execute()
        .try_next()
        .await
        .map_err(|e| format!("interface {ifindex}: {e}"))?
        .ok_or_else(|| format!("interface {ifindex} is gone"))?;
    let kind = link.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
            LinkInfo::Kind(k) => Some(k.clone()),
            _ => None,
        }),
        _ => None,
    });
    Ok(match kind {
        None | Some(InfoKind::Veth | InfoKind::Netkit) => None,
        Some(other) => Some(other.to_string()),
    })
}

//! Which host interface a pod lives behind: the node's own route to the pod's address, as
//! the CNI installed it (a /32 or a pod subnet via the pod's veth).
use std::net::IpAddr;

use futures::TryStreamExt as _;
use rtnetlink::packet_route::{
    link::{InfoKind, LinkAttribute, LinkInfo},
    route::{RouteAttribute, RouteType},
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
    if let Some(kind) = link_kind(handle, ifindex).await? {
        return Err(format!(
            "{ip} is routed through {ifname}, a {kind} shared by several pods; \
             per-pod shaping needs the pod's own interface (a routed CNI: veth or netkit per pod)"
        ));
    }
    Ok((ifname, ifindex))
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

//! Links, addresses and routes over rtnetlink, and per-namespace sysctls.
//!
//! Routes are added with replace semantics (re-adding an existing route is then not an error)
//! and all point at the daemon's TUN, which the kernel deletes with its routes when the daemon
//! exits, however it exits.

use std::net::IpAddr;
use std::path::PathBuf;

use futures::TryStreamExt;
use ipnet::IpNet;
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("netlink: {0}")]
    Netlink(#[from] rtnetlink::Error),
    #[error("netlink connection: {0}")]
    Connect(std::io::Error),
    #[error("interface {0} not found")]
    NoLink(String),
    #[error("route {0}: {1}")]
    Route(IpNet, String),
    #[error("sysctl {key}: {source}")]
    Sysctl { key: String, source: std::io::Error },
}

/// A netlink handle; its connection runs as a task of the current runtime.
pub fn connect() -> Result<Handle, NetError> {
    let (conn, handle, _) = rtnetlink::new_connection().map_err(NetError::Connect)?;
    tokio::spawn(conn);
    Ok(handle)
}

pub async fn link_index(handle: &Handle, name: &str) -> Result<u32, NetError> {
    let mut links = handle.link().get().match_name(name.to_string()).execute();
    match links.try_next().await {
        Ok(Some(link)) => Ok(link.header.index),
        Ok(None) | Err(rtnetlink::Error::NetlinkError(_)) => Err(NetError::NoLink(name.into())),
        Err(e) => Err(e.into()),
    }
}

pub async fn set_up(handle: &Handle, index: u32, mtu: u32) -> Result<(), NetError> {
    handle
        .link()
        .set(LinkUnspec::new_with_index(index).mtu(mtu).up().build())
        .execute()
        .await?;
    Ok(())
}

pub async fn set_mtu(handle: &Handle, index: u32, mtu: u32) -> Result<(), NetError> {
    handle
        .link()
        .set(LinkUnspec::new_with_index(index).mtu(mtu).build())
        .execute()
        .await?;
    Ok(())
}

pub async fn add_address(
    handle: &Handle,
    index: u32,
    addr: IpAddr,
    prefix: u8,
) -> Result<(), NetError> {
    handle
        .address()
        .add(index, addr, prefix)
        .replace()
        .execute()
        .await?;
    Ok(())
}

/// The route to `dst` out of the interface `index`, as rtnetlink takes it to add or delete.
fn route_message(
    dst: IpNet,
    index: u32,
) -> Result<rtnetlink::packet_route::route::RouteMessage, NetError> {
    Ok(RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(dst.network(), dst.prefix_len())
        .map_err(|e| NetError::Route(dst, e.to_string()))?
        .output_interface(index)
        .build())
}

pub async fn replace_route(handle: &Handle, dst: IpNet, index: u32) -> Result<(), NetError> {
    let msg = route_message(dst, index)?;
    handle.route().add(msg).replace().execute().await?;
    Ok(())
}

/// Removes the route to `dst` through the TUN (a reload took it away).
pub async fn delete_route(handle: &Handle, dst: IpNet, index: u32) -> Result<(), NetError> {
    let msg = route_message(dst, index)?;
    handle.route().del(msg).execute().await?;
    Ok(())
}

fn sysctl_path(key: &str) -> PathBuf {
    PathBuf::from("/proc/sys").join(key.replace('.', "/"))
}

/// Reads a sysctl of the current network namespace (the daemon's own).
pub fn sysctl_get(key: &str) -> Result<String, NetError> {
    std::fs::read_to_string(sysctl_path(key))
        .map(|s| s.trim().to_string())
        .map_err(|source| NetError::Sysctl {
            key: key.into(),
            source,
        })
}

pub fn sysctl_set(key: &str, value: &str) -> Result<(), NetError> {
    // With the newline, an empty value is a write the kernel sees (and clears the setting).
    std::fs::write(sysctl_path(key), format!("{value}\n")).map_err(|source| NetError::Sysctl {
        key: key.into(),
        source,
    })
}

/// Sets `key` to `value` and remembers the old value, to be put back by [`restore`].
pub fn sysctl_change(
    key: &str,
    value: &str,
    changed: &mut Vec<(String, String)>,
) -> Result<(), NetError> {
    let old = sysctl_get(key)?;
    if old != value {
        sysctl_set(key, value)?;
        changed.push((key.to_string(), old));
    }
    Ok(())
}

/// Puts back what [`sysctl_change`] changed, newest first.
pub fn restore(changed: &mut Vec<(String, String)>) {
    while let Some((key, old)) = changed.pop() {
        if let Err(e) = sysctl_set(&key, &old) {
            tracing::warn!(%key, error = %e, "could not restore sysctl");
        }
    }
}

/// A TCP connection to `server` from a random port of `ports` (the pinned egress range), so
/// the VPC's ACLs need to let back only that range; any port when there is no range.
pub async fn tcp_connect_from_range(
    server: std::net::SocketAddr,
    ports: Option<(u16, u16)>,
) -> std::io::Result<tokio::net::TcpStream> {
    use rand::Rng;
    let socket = if server.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    if let Some((lo, hi)) = ports {
        socket.set_reuseaddr(true)?;
        let port = rand::rng().random_range(lo..=hi);
        let any: IpAddr = if server.is_ipv4() {
            std::net::Ipv4Addr::UNSPECIFIED.into()
        } else {
            std::net::Ipv6Addr::UNSPECIFIED.into()
        };
        socket.bind(std::net::SocketAddr::new(any, port))?;
    }
    socket.connect(server).await
}

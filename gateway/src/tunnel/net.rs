//! Links, addresses and routes over rtnetlink, and per-namespace sysctls.
//!
//! Routes all point at the daemon's TUN, which the kernel deletes with its routes when the
//! daemon exits, however it exits. A route derived from a peer is added exclusively
//! ([`add_route`]: an existing route is an error, never replaced); only a route the daemon
//! itself created before may be replaced ([`replace_route`]).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
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
    #[error("a route to {0} already exists (not created by gatewayd; left alone)")]
    Exists(IpNet),
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

/// Adds the route to `dst` only if the kernel has no route to exactly `dst` yet (NLM_F_EXCL):
/// a prefix a peer supplied never replaces anyone's route.
pub async fn add_route(handle: &Handle, dst: IpNet, index: u32) -> Result<(), NetError> {
    let msg = route_message(dst, index)?;
    match handle.route().add(msg).execute().await {
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code().abs() == libc::EEXIST => {
            Err(NetError::Exists(dst))
        }
        other => Ok(other?),
    }
}

/// The subnets of every address on links other than `except` (the TUN): what this host is
/// connected to.
pub async fn address_subnets(handle: &Handle, except: u32) -> Result<Vec<IpNet>, NetError> {
    use rtnetlink::packet_route::address::AddressAttribute;
    let mut out = Vec::new();
    let mut addrs = handle.address().get().execute();
    while let Some(a) = addrs.try_next().await? {
        if a.header.index == except {
            continue;
        }
        let ip = a
            .attributes
            .iter()
            .find_map(|at| match at {
                AddressAttribute::Local(ip) => Some(*ip),
                _ => None,
            })
            .or_else(|| {
                a.attributes.iter().find_map(|at| match at {
                    AddressAttribute::Address(ip) => Some(*ip),
                    _ => None,
                })
            });
        if let Some(net) = ip.and_then(|ip| IpNet::new(ip, a.header.prefix_len).ok()) {
            out.push(net.trunc());
        }
    }
    Ok(out)
}

/// Destinations the kernel's main and local tables route other than through `except` (the
/// TUN), default routes left out: what this host reaches without the tunnel.
pub async fn routed_prefixes(handle: &Handle, except: u32) -> Result<Vec<IpNet>, NetError> {
    use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteMessage};
    const MAIN: u32 = 254;
    const LOCAL: u32 = 255;
    let mut out = Vec::new();
    let dumps: [RouteMessage; 2] = [
        RouteMessageBuilder::<std::net::Ipv4Addr>::new().build(),
        RouteMessageBuilder::<std::net::Ipv6Addr>::new().build(),
    ];
    for dump in dumps {
        let mut routes = handle.route().get(dump).execute();
        while let Some(r) = routes.try_next().await? {
            let table = r
                .attributes
                .iter()
                .find_map(|a| match a {
                    RouteAttribute::Table(t) => Some(*t),
                    _ => None,
                })
                .unwrap_or(u32::from(r.header.table));
            let oif = r.attributes.iter().find_map(|a| match a {
                RouteAttribute::Oif(i) => Some(*i),
                _ => None,
            });
            if !(table == MAIN || table == LOCAL) || oif == Some(except) {
                continue;
            }
            let len = r.header.destination_prefix_length;
            if len == 0 {
                continue;
            }
            let dst = r.attributes.iter().find_map(|a| match a {
                RouteAttribute::Destination(RouteAddress::Inet(ip)) => Some(IpAddr::V4(*ip)),
                RouteAttribute::Destination(RouteAddress::Inet6(ip)) => Some(IpAddr::V6(*ip)),
                _ => None,
            });
            if let Some(net) = dst.and_then(|ip| IpNet::new(ip, len).ok()) {
                out.push(net.trunc());
            }
        }
    }
    out.sort();
    out.dedup();
    Ok(out)
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

/// A UDP socket on `port` that reaches IPv4 and IPv6 peers alike (an IPv6 socket that also
/// takes IPv4, whose peers read back as IPv4 through [`canonical`]); an IPv4 one where the host
/// has no IPv6. Non-blocking, for tokio or quinn.
pub fn udp_dual_stack_std(port: u16) -> std::io::Result<std::net::UdpSocket> {
    let v6 = || -> std::io::Result<std::net::UdpSocket> {
        let s = socket2::Socket::new(
            socket2::Domain::IPV6,
            socket2::Type::DGRAM,
            Some(socket2::Protocol::UDP),
        )?;
        s.set_only_v6(false)?;
        s.set_nonblocking(true)?;
        s.bind(&SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port)).into())?;
        Ok(s.into())
    };
    match v6() {
        Ok(s) => Ok(s),
        Err(_) => {
            let s = std::net::UdpSocket::bind(SocketAddr::from((
                std::net::Ipv4Addr::UNSPECIFIED,
                port,
            )))?;
            s.set_nonblocking(true)?;
            Ok(s)
        }
    }
}

/// [`udp_dual_stack_std`] for tokio.
pub async fn udp_dual_stack(port: u16) -> std::io::Result<tokio::net::UdpSocket> {
    tokio::net::UdpSocket::from_std(udp_dual_stack_std(port)?)
}

/// `a` with an IPv4-mapped IPv6 address written as the IPv4 address it is.
pub fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

/// A TCP connection to `addr` from `source_port` (0: any), Nagle off.
pub async fn tcp_connect(
    addr: SocketAddr,
    source_port: u16,
) -> anyhow::Result<tokio::net::TcpStream> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    if source_port != 0 {
        // Reuse lets a reconnect bind the port while the last connection is in TIME_WAIT.
        socket.set_reuseaddr(true)?;
        let any: IpAddr = if addr.is_ipv4() {
            Ipv4Addr::UNSPECIFIED.into()
        } else {
            Ipv6Addr::UNSPECIFIED.into()
        };
        socket
            .bind(SocketAddr::new(any, source_port))
            .map_err(|e| anyhow::anyhow!("binding TCP source port {source_port}: {e}"))?;
    }
    let stream = socket
        .connect(addr)
        .await
        .map_err(|e| anyhow::anyhow!("TCP connect to {addr}: {e}"))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

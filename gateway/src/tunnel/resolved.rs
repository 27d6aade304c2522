//! Split DNS by itself (`[client] dns = "resolved"`): systemd-resolved, over D-Bus, sends names
//! under the connector's zones to the client's DNS stub and every other name where it did
//! before. When the tunnel comes up (and whenever its zones change) the TUN link gets the stub
//! as its DNS server, a `~zone` routing domain per zone and no default route; on stop the link
//! is reverted. What to set is [`plan`], a plain function; the rest only carries it to resolved.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Mutex, watch};
use tokio::task::JoinHandle;
use zbus::Connection;

use super::status::Shared;
use crate::api::ResolvedStatus;
use crate::config::HostDns;
use crate::core::text::{PEER_NAME, PEER_TEXT, clean};

const RESOLVE1: &str = "org.freedesktop.resolve1";
const PATH: &str = "/org/freedesktop/resolve1";
const MANAGER: &str = "org.freedesktop.resolve1.Manager";
/// Routing domains set on the link at most: the zones are the connector's to choose, the
/// bound on what they make this host's resolver hold is ours.
pub const MAX_DOMAINS: usize = 64;
/// Zones left out that status names; the rest are counted.
const MAX_SKIPPED_LISTED: usize = 8;
/// One step with resolved (connecting to the bus included) takes at most this long, so a bus
/// that hangs never holds up a start or a stop for long.
const CALL_TIMEOUT: Duration = Duration::from_secs(3);
/// After a failure (resolved not running, say), setting the link is tried again this often.
const RETRY_EVERY: Duration = Duration::from_secs(5);

/// What the TUN link gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkPlan {
    /// The link's one DNS server: the stub (a stub on the unspecified address is asked on
    /// loopback, where it also listens).
    pub server: SocketAddr,
    /// Routing-only domains (`~zone`): lowercase, no trailing dot, each once, at most
    /// [`MAX_DOMAINS`]. Empty: nothing to route, the link is reverted instead.
    pub domains: Vec<String>,
    /// Zones the connector announced that are not set, each with why.
    pub skipped: Vec<(String, &'static str)>,
}

/// The link's settings for a stub at `stub` and the zones the connector announced. A zone is
/// set only if it is a host name (letters, digits, `-`, `_`; labels of 1-63, at most 253
/// characters): never the root, which would send every name into the tunnel.
pub fn plan(stub: SocketAddr, zones: &[String]) -> LinkPlan {
    let server = match stub.ip() {
        IpAddr::V4(a) if a.is_unspecified() => (Ipv4Addr::LOCALHOST, stub.port()).into(),
        IpAddr::V6(a) if a.is_unspecified() => (Ipv6Addr::LOCALHOST, stub.port()).into(),
        _ => stub,
    };
    let mut domains: Vec<String> = Vec::new();
    let mut skipped = Vec::new();
    for zone in zones {
        let name = zone.trim_end_matches('.').to_ascii_lowercase();
        let why = if name.is_empty() {
            Some("the root zone would send every name into the tunnel")
        } else if !is_host_name(&name) {
            Some("not a host name")
        } else if domains.contains(&name) {
            Some("listed twice")
        } else if domains.len() == MAX_DOMAINS {
            Some("over the bound of routing domains")
        } else {
            None
        };
        match why {
            Some(why) => skipped.push((zone.clone(), why)),
            None => domains.push(name),
        }
    }
    LinkPlan {
        server,
        domains,
        skipped,
    }
}

fn is_host_name(name: &str) -> bool {
    name.len() <= 253
        && name.split('.').all(|label| {
            (1..=63).contains(&label.len())
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// Whether the integration is used, from `[client] dns` and the system bus at start.
pub struct Choice {
    pub on: bool,
    pub reason: String,
    /// The bus, when it answered; `None` while on means "connect when setting the link".
    conn: Option<Connection>,
    error: Option<String>,
}

/// Decides at start. Unset (`Auto`): on only when resolved owns its name on the system bus
/// now. `Resolved`: on whatever the bus says; if resolved is absent the tunnel starts anyway,
/// the reason is logged as a warning and shown in status, and the link is set once resolved
/// answers. A stub on resolved's own address turns the automatic choice off.
pub async fn choose(setting: HostDns, stub: Option<SocketAddr>) -> Choice {
    let off = |reason: &str| Choice {
        on: false,
        reason: reason.into(),
        conn: None,
        error: None,
    };
    match setting {
        HostDns::None => return off("client.dns = \"none\""),
        HostDns::Auto if stub.is_some_and(|s| HostDns::is_resolved_listener(s.ip())) => {
            return off("client.dns_stub is on systemd-resolved's own address");
        }
        _ => {}
    }
    match running().await {
        Ok(conn) => Choice {
            on: true,
            reason: match setting {
                HostDns::Resolved => "client.dns = \"resolved\"".into(),
                _ => "systemd-resolved is on the system bus (client.dns unset)".into(),
            },
            conn: Some(conn),
            error: None,
        },
        Err(e) if setting == HostDns::Resolved => {
            tracing::warn!(
                error = %e,
                "client.dns = \"resolved\", but systemd-resolved does not answer: the tunnel starts \
                 without it; the TUN link is set once it answers"
            );
            Choice {
                on: true,
                reason: "client.dns = \"resolved\"".into(),
                conn: None,
                error: Some(e),
            }
        }
        Err(e) => off(&format!("client.dns unset and {e}")),
    }
}

/// A connection to the system bus on which resolved owns its name.
async fn running() -> Result<Connection, String> {
    let step = async {
        let conn = Connection::system()
            .await
            .map_err(|e| format!("no system bus: {e}"))?;
        let owned: bool = conn
            .call_method(
                Some("org.freedesktop.DBus"),
                "/org/freedesktop/DBus",
                Some("org.freedesktop.DBus"),
                "NameHasOwner",
                &(RESOLVE1,),
            )
            .await
            .and_then(|m| m.body().deserialize())
            .map_err(|e| format!("asking the system bus: {e}"))?;
        if !owned {
            return Err(format!(
                "systemd-resolved is not running ({RESOLVE1} is not on the system bus)"
            ));
        }
        // A link index means a link only in resolved's own network namespace: a daemon in
        // another one (a lab, a container sharing the host's bus) would set some other link.
        let pid: u32 = conn
            .call_method(
                Some("org.freedesktop.DBus"),
                "/org/freedesktop/DBus",
                Some("org.freedesktop.DBus"),
                "GetConnectionUnixProcessID",
                &(RESOLVE1,),
            )
            .await
            .and_then(|m| m.body().deserialize())
            .map_err(|e| format!("asking the system bus for resolved's process: {e}"))?;
        if same_network_namespace(pid) == Some(false) {
            return Err(format!(
                "systemd-resolved (pid {pid}) runs in another network namespace, where this \
                 TUN's index names another link"
            ));
        }
        Ok(conn)
    };
    tokio::time::timeout(CALL_TIMEOUT, step)
        .await
        .unwrap_or_else(|_| {
            Err(format!(
                "the system bus did not answer within {CALL_TIMEOUT:?}"
            ))
        })
}

/// Whether process `pid` shares this process's network namespace; `None` when that cannot
/// be told (another user's process, hidden by `ProtectProc=`): then it is taken to.
fn same_network_namespace(pid: u32) -> Option<bool> {
    use std::os::unix::fs::MetadataExt;
    let theirs = std::fs::metadata(format!("/proc/{pid}/ns/net")).ok()?;
    let ours = std::fs::metadata("/proc/self/ns/net").ok()?;
    Some((theirs.dev(), theirs.ino()) == (ours.dev(), ours.ino()))
}

async fn call<B>(conn: &Connection, method: &str, body: &B) -> Result<(), String>
where
    B: serde::Serialize + zbus::zvariant::DynamicType,
{
    let sent = conn.call_method(Some(RESOLVE1), PATH, Some(MANAGER), method, body);
    match tokio::time::timeout(CALL_TIMEOUT, sent).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => {
            // resolved refuses a caller that is not root unless polkit allows it.
            let hint = match &e {
                zbus::Error::MethodError(..) if !running_as_root() => POLKIT_HINT,
                _ => "",
            };
            Err(clean(&format!("{method}: {e}{hint}"), PEER_TEXT))
        }
        Err(_) => Err(format!("{method}: no answer within {CALL_TIMEOUT:?}")),
    }
}

const POLKIT_HINT: &str = " (gatewayd is not root, so resolved asks polkit: install \
                           systemd/gatewayd-resolved.rules as \
                           /etc/polkit-1/rules.d/50-gatewayd-resolved.rules)";

fn running_as_root() -> bool {
    // SAFETY: geteuid(2) cannot fail and touches no memory.
    unsafe { libc::geteuid() == 0 }
}

/// What the link task and `stop` share.
struct Inner {
    conn: Option<Connection>,
    /// A call that changes the link was sent and not reverted since.
    touched: bool,
}

/// Where the client's task sends the zones it learns.
#[derive(Clone)]
pub struct Zones(Arc<watch::Sender<Option<Vec<String>>>>);

impl Zones {
    /// The connector's zones now (tunnel up, or a new offer).
    pub fn set(&self, zones: &[String]) {
        self.0.send_replace(Some(zones.to_vec()));
    }
}

/// The TUN link's settings in resolved, for the tunnel's lifetime.
pub struct Link {
    zones: Zones,
    task: JoinHandle<()>,
    inner: Arc<Mutex<Inner>>,
    ifindex: i32,
}

impl Link {
    /// Starts the task that sets the link (`ifindex`, the TUN) for `stub` whenever
    /// [`Zones::set`] is called. `None` when the choice is off (status says why either way).
    pub fn start(
        choice: Choice,
        ifindex: u32,
        stub: Option<SocketAddr>,
        shared: &Arc<Shared>,
    ) -> Option<Link> {
        let on = choice.on && stub.is_some();
        let status = ResolvedStatus {
            on,
            reason: choice.reason,
            stub: stub.filter(|_| on).map(|s| plan(s, &[]).server.to_string()),
            domains: Vec::new(),
            skipped: Vec::new(),
            error: choice.error,
        };
        set_status(shared, |s| *s = Some(status));
        let (true, Some(stub), Ok(ifindex)) = (on, stub, i32::try_from(ifindex)) else {
            return None;
        };
        let inner = Arc::new(Mutex::new(Inner {
            conn: choice.conn,
            touched: false,
        }));
        let (zones, rx) = watch::channel(None);
        let task = tokio::spawn(follow(rx, inner.clone(), ifindex, stub, shared.clone()));
        Some(Link {
            zones: Zones(Arc::new(zones)),
            task,
            inner,
            ifindex,
        })
    }

    pub fn zones(&self) -> Zones {
        self.zones.clone()
    }

    /// Reverts the link (before the TUN goes, so resolved still knows it). Bounded in time.
    pub async fn stop(self) {
        self.task.abort();
        let _ = self.task.await;
        let mut inner = self.inner.lock().await;
        if let Err(e) = revert(&mut inner, self.ifindex).await {
            tracing::warn!(error = %e, "reverting the TUN link in systemd-resolved failed");
        }
    }
}

fn set_status(shared: &Shared, f: impl FnOnce(&mut Option<ResolvedStatus>)) {
    if let Ok(mut s) = shared.resolved.lock() {
        f(&mut s);
    }
}

/// Sets the link for each new list of zones; after a failure, tries again every
/// [`RETRY_EVERY`] until it works or the zones change.
async fn follow(
    mut zones: watch::Receiver<Option<Vec<String>>>,
    inner: Arc<Mutex<Inner>>,
    ifindex: i32,
    stub: SocketAddr,
    shared: Arc<Shared>,
) {
    loop {
        let wanted = zones.borrow_and_update().clone();
        let failed = match wanted {
            None => false,
            Some(z) => {
                let plan = plan(stub, &z);
                let mut inner = inner.lock().await;
                let result = if plan.domains.is_empty() {
                    revert(&mut inner, ifindex).await
                } else {
                    set(&mut inner, ifindex, &plan).await
                };
                let failed = result.is_err();
                if let Err(e) = &result {
                    tracing::warn!(error = %e, "setting the TUN link in systemd-resolved failed");
                    // Nothing left half-set; the next attempt starts from a new connection.
                    let _ = revert(&mut inner, ifindex).await;
                    inner.conn = None;
                } else {
                    tracing::info!(server = %plan.server, domains = ?plan.domains, "systemd-resolved routes the zones to the stub");
                }
                set_status(&shared, |s| {
                    if let Some(s) = s {
                        s.domains = if failed {
                            Vec::new()
                        } else {
                            plan.domains.clone()
                        };
                        s.skipped = skipped_for_status(&plan.skipped);
                        s.error = result.err();
                    }
                });
                failed
            }
        };
        if failed {
            tokio::select! {
                changed = zones.changed() => if changed.is_err() { return },
                _ = tokio::time::sleep(RETRY_EVERY) => {}
            }
        } else if zones.changed().await.is_err() {
            return;
        }
    }
}

/// Zones left out, as status lists them: the connector's text escaped and cut, and at most
/// [`MAX_SKIPPED_LISTED`] of them, whatever it announces.
fn skipped_for_status(skipped: &[(String, &'static str)]) -> Vec<String> {
    let mut listed: Vec<String> = skipped
        .iter()
        .take(MAX_SKIPPED_LISTED)
        .map(|(z, why)| format!("{}: {why}", clean(z, PEER_NAME)))
        .collect();
    if skipped.len() > MAX_SKIPPED_LISTED {
        listed.push(format!("and {} more", skipped.len() - MAX_SKIPPED_LISTED));
    }
    listed
}

/// DNS server, routing domains, no default route, and no LLMNR or mDNS on the TUN (their
/// multicast has nowhere to go there).
async fn set(inner: &mut Inner, ifindex: i32, plan: &LinkPlan) -> Result<(), String> {
    let conn = match &inner.conn {
        Some(c) => c.clone(),
        None => {
            let c = running().await?;
            inner.conn = Some(c.clone());
            c
        }
    };
    let (family, address) = match plan.server.ip() {
        IpAddr::V4(a) => (libc::AF_INET, a.octets().to_vec()),
        IpAddr::V6(a) => (libc::AF_INET6, a.octets().to_vec()),
    };
    inner.touched = true;
    let servers = vec![(family, address, plan.server.port(), String::new())];
    call(&conn, "SetLinkDNSEx", &(ifindex, servers)).await?;
    let domains: Vec<(&str, bool)> = plan.domains.iter().map(|d| (d.as_str(), true)).collect();
    call(&conn, "SetLinkDomains", &(ifindex, domains)).await?;
    call(&conn, "SetLinkDefaultRoute", &(ifindex, false)).await?;
    call(&conn, "SetLinkLLMNR", &(ifindex, "no")).await?;
    call(&conn, "SetLinkMulticastDNS", &(ifindex, "no")).await?;
    Ok(())
}

async fn revert(inner: &mut Inner, ifindex: i32) -> Result<(), String> {
    if !inner.touched {
        return Ok(());
    }
    let conn = match &inner.conn {
        Some(c) => c.clone(),
        None => running().await?,
    };
    call(&conn, "RevertLink", &(ifindex,)).await?;
    inner.touched = false;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zones(z: &[&str]) -> Vec<String> {
        z.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_stub_is_the_server_and_each_zone_a_routing_domain() {
        let stub: SocketAddr = "127.0.0.1:40053".parse().expect("addr");
        let p = plan(stub, &zones(&["hoge-vpc.com", "Corp.Example.", "_svc.x"]));
        assert_eq!(p.server, stub);
        assert_eq!(p.domains, ["hoge-vpc.com", "corp.example", "_svc.x"]);
        assert!(p.skipped.is_empty());
    }

    #[test]
    fn a_stub_on_every_address_is_asked_on_loopback() {
        let p = plan("0.0.0.0:5353".parse().expect("addr"), &[]);
        assert_eq!(p.server, "127.0.0.1:5353".parse().expect("addr"));
        let p = plan("[::]:53".parse().expect("addr"), &[]);
        assert_eq!(p.server, "[::1]:53".parse().expect("addr"));
    }

    #[test]
    fn the_root_odd_names_and_duplicates_are_never_set() {
        let p = plan(
            "127.0.0.1:53".parse().expect("addr"),
            &zones(&[
                ".",
                "",
                "a..b",
                "evil\u{1b}[31m.com",
                "x y.com",
                "hoge-vpc.com",
                "HOGE-vpc.com.",
            ]),
        );
        assert_eq!(p.domains, ["hoge-vpc.com"]);
        let why: Vec<&str> = p.skipped.iter().map(|(_, w)| *w).collect();
        assert_eq!(
            why,
            [
                "the root zone would send every name into the tunnel",
                "the root zone would send every name into the tunnel",
                "not a host name",
                "not a host name",
                "not a host name",
                "listed twice"
            ]
        );
        let long = format!("{}.com", "a".repeat(64));
        assert!(
            plan("127.0.0.1:53".parse().expect("addr"), &[long])
                .domains
                .is_empty()
        );
    }

    #[test]
    fn at_most_max_domains_are_set() {
        let many: Vec<String> = (0..MAX_DOMAINS + 10)
            .map(|i| format!("z{i}.example"))
            .collect();
        let p = plan("127.0.0.1:53".parse().expect("addr"), &many);
        assert_eq!(p.domains.len(), MAX_DOMAINS);
        assert_eq!(p.domains[0], "z0.example");
        assert_eq!(p.skipped.len(), 10);
        assert!(
            p.skipped
                .iter()
                .all(|(_, w)| *w == "over the bound of routing domains")
        );
    }

    #[test]
    fn status_names_a_bounded_number_of_skipped_zones_escaped() {
        let many: Vec<(String, &'static str)> = (0..1000)
            .map(|i| (format!("bad\u{1b}[{i}m"), "not a host name"))
            .collect();
        let listed = skipped_for_status(&many);
        assert_eq!(listed.len(), MAX_SKIPPED_LISTED + 1);
        assert_eq!(listed.last().map(String::as_str), Some("and 992 more"));
        assert!(listed.iter().all(|l| !l.contains('\u{1b}')), "{listed:?}");
    }

    #[test]
    fn resolved_own_listeners_are_recognised() {
        for a in ["127.0.0.53", "127.0.0.54"] {
            assert!(HostDns::is_resolved_listener(a.parse().expect("ip")), "{a}");
        }
        for a in ["127.0.0.1", "127.0.0.2", "::1", "100.64.0.2"] {
            assert!(
                !HostDns::is_resolved_listener(a.parse().expect("ip")),
                "{a}"
            );
        }
    }
}

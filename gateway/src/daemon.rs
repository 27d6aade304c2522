//! gatewayd's life: take the state directory, clean what a crashed run left, set up, serve,
//! and on SIGTERM/SIGINT undo everything in reverse order.
//!
//! Setup is all-or-nothing: if any step fails, what the earlier steps did is undone before the
//! error is returned, so a failed start leaves no program attached and no socket behind.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use gateway_common::Counter;
use tokio::signal::unix::{SignalKind, signal};

use crate::api::{
    AttachKind, InterfaceStatus, ProgramInfo, Request, Response, RouteStatus, STATUS_SCHEMA, Status,
};
use crate::config::Config;
use crate::dataplane::{self, Dataplane};
use crate::routes::{Route, RouteTable};
use crate::state::{self, Record, StateDir};

mod leftovers;

/// What the status handler reads; shared with the socket task.
struct Shared {
    /// Routes the classifier holds: the config's, or on a client those the connector sent.
    routes: Arc<Mutex<RouteTable>>,
    /// Replaced by a successful reload.
    config: Mutex<Config>,
    last_reload: Mutex<Option<crate::api::ReloadStatus>>,
    tunnel: Option<Arc<crate::tunnel::Shared>>,
    /// This node's certificate as read at start, and the verifiers (CRL) in force.
    certificate: Option<crate::pki::CertInfo>,
    trust: Option<Arc<crate::tunnel::tls::Trust>>,
    dataplane: Arc<Mutex<Dataplane>>,
    started_at: u64,
    started: Instant,
}

/// Runs until SIGTERM or SIGINT. Returns an error if setup failed (after undoing it).
pub async fn run(config: Config) -> anyhow::Result<()> {
    let missing = crate::sys::missing_capabilities().context("reading capabilities")?;
    if !missing.is_empty() {
        anyhow::bail!(
            "missing capabilities {}: run gatewayd as root, or with the capabilities \
             systemd/gatewayd.service grants",
            missing.join(", ")
        );
    }
    crate::sys::set_private_umask();
    let (state_dir, leftover) = StateDir::acquire(&config.node.state_dir)?;
    let boot_id = state::boot_id();
    if let Some(record) = leftover {
        leftovers::clean(&record, &boot_id);
    }
    state::clear_stale_socket(&config.node.socket)?;

    let started_at = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let attach = config.attach.resolve();
    // Written before anything is attached, so a crash in the middle of setup is cleaned too.
    let mut record = Record {
        pid: std::process::id(),
        started_at,
        socket: config.node.socket.clone(),
        interfaces: classified_interfaces(&config),
        nft_tables: config
            .tunnel
            .iter()
            .flat_map(|t| {
                let egress = t.egress.as_ref().map(|e| e.table.clone());
                egress.into_iter().chain(t.client_table.clone())
            })
            .collect(),
        sysctls: Vec::new(),
        tc_hooks: match attach {
            AttachKind::Tc => leftovers::tc_hooks(&config),
            AttachKind::Tcx => Vec::new(),
        },
        clsact_added: Vec::new(),
        boot_id,
    };
    record.clsact_added = leftovers::clsact_to_add(&record.tc_hooks);
    state_dir.write(&record)?;

    // Sysctls the daemon itself changes (the tunnel keeps its own list), restored on stop.
    let mut own_sysctls = Vec::new();
    check_ping_group_range(config.manage_ping_group_range, &mut own_sysctls);
    record.sysctls = own_sysctls.clone();
    state_dir.write(&record)?;

    let (dataplane, (listener, metrics)) = match set_up(&config, attach) {
        Ok(v) => v,
        Err(e) => {
            // The Dataplane, if any was made, was dropped inside set_up and detached its links.
            remove_socket(&config.node.socket);
            crate::tunnel::net::restore(&mut own_sysctls);
            state_dir.clear()?;
            return Err(e);
        }
    };

    let dataplane = Arc::new(Mutex::new(dataplane));
    let routes = Arc::new(Mutex::new(config.routes.clone()));
    let tunnel = match &config.tunnel {
        None => None,
        Some(t) => {
            let offered = config.routes.iter().map(|r| r.cidr).collect();
            let mut steered = t.lan.clone();
            steered.extend(t.dns_intercept.iter().cloned());
            let hook = learned_routes_hook(dataplane.clone(), routes.clone(), steered);
            match crate::tunnel::start(t, offered, hook).await {
                Ok(handle) => {
                    record
                        .sysctls
                        .extend(handle.changed_sysctls().iter().cloned());
                    state_dir.write(&record)?;
                    Some(handle)
                }
                Err(e) => {
                    drop(dataplane);
                    remove_socket(&config.node.socket);
                    crate::tunnel::net::restore(&mut own_sysctls);
                    state_dir.clear()?;
                    return Err(e.context("starting the tunnel"));
                }
            }
        }
    };

    let certificate = config
        .tunnel
        .as_ref()
        .and_then(|t| crate::pki::read_cert(&t.tls.cert).ok());
    if let Some(c) = &certificate
        && let Some(w) = crate::pki::list::expiry_warning(c.not_after, started_at as i64)
    {
        tracing::warn!(identity = %c.identity, "this node's certificate {w}: renew it (gatewayctl pki renew)");
    }
    let shared = Arc::new(Shared {
        tunnel: tunnel.as_ref().map(|t| t.shared.clone()),
        certificate,
        trust: tunnel.as_ref().map(|t| t.trust().clone()),
        config: Mutex::new(config),
        last_reload: Mutex::new(None),
        dataplane,
        routes,
        started_at,
        started: Instant::now(),
    });
    let handler = {
        let shared = shared.clone();
        Arc::new(move |req: Request| handle(&shared, req))
    };
    let server = tokio::spawn(crate::server::serve(listener, handler));
    let metrics = metrics.map(|l| {
        let shared = shared.clone();
        let snapshot = Arc::new(move || status(&shared).ok());
        if let Ok(addr) = l.local_addr() {
            tracing::info!(%addr, "metrics endpoint serving /metrics");
        }
        tokio::spawn(crate::metrics::serve(l, snapshot))
    });

    if let Err(e) = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]) {
        tracing::debug!(error = %e, "sd_notify READY failed (not under systemd?)");
    }
    let config = shared.config();
    tracing::info!(
        node = %config.node.name,
        socket = %config.node.socket.display(),
        interfaces = ?config.interfaces,
        routes = config.routes.len(),
        "gatewayd ready"
    );

    let watchdog = tokio::spawn(watchdog());
    wait_for_stop(|| reload(&shared, tunnel.as_ref())).await?;
    watchdog.abort();

    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    server.abort();
    if let Some(m) = metrics {
        m.abort();
    }
    remove_socket(&config.node.socket);
    if let Some(t) = tunnel {
        t.stop().await;
        tracing::info!("tunnel stopped; TUN device and its routes removed");
    }
    crate::tunnel::net::restore(&mut own_sysctls);
    let detached = shared
        .dataplane
        .lock()
        .map_err(|_| anyhow::anyhow!("dataplane lock poisoned"))?
        .detach_all();
    if let Err(e) = detached {
        tracing::error!(error = %e, "detaching the classifier failed");
    }
    state_dir.clear()?;
    tracing::info!("gatewayd stopped; classifier detached, socket removed");
    Ok(())
}

/// On a client, routes arrive from the connector: load them into the classifier and make
/// the LAN interfaces redirect matching packets into the TUN.
fn learned_routes_hook(
    dataplane: Arc<Mutex<Dataplane>>,
    routes: Arc<Mutex<RouteTable>>,
    lan: Vec<String>,
) -> crate::tunnel::RoutesHook {
    Arc::new(
        move |learned: &[ipnet::IpNet], zones: &[Vec<u8>], tun_index: u32| {
            let table = RouteTable::new(
                learned
                    .iter()
                    .take(gateway_common::MAX_ROUTES as usize)
                    .enumerate()
                    .map(|(i, net)| Route {
                        id: i as u32,
                        cidr: *net,
                        name: net.to_string(),
                    })
                    .collect(),
            );
            let mut dp = dataplane
                .lock()
                .map_err(|_| anyhow::anyhow!("dataplane lock poisoned"))?;
            dp.set_routes(&table.trie_entries())?;
            dp.set_dns_zones(zones)?;
            for iface in &lan {
                let index = crate::sys::if_index(iface)
                    .ok_or_else(|| anyhow::anyhow!("LAN interface {iface} disappeared"))?;
                dp.set_redirect(index, tun_index)?;
            }
            if let Ok(mut r) = routes.lock() {
                *r = table;
            }
            Ok(())
        },
    )
}

/// `[dataplane] interfaces` and, on a site gateway, `[client] lan`: where the classifier runs.
fn classified_interfaces(config: &Config) -> Vec<String> {
    let mut all = config.interfaces.clone();
    for l in config.tunnel.iter().flat_map(|t| t.lan.iter()) {
        if !all.contains(l) {
            all.push(l.clone());
        }
    }
    all
}

/// Checks that this daemon may open ICMP echo sockets; widens ping_group_range just enough
/// when configured to (recording the old value), and otherwise says how to fix it.
fn check_ping_group_range(manage: bool, changed: &mut Vec<(String, String)>) {
    use crate::pingrange::{SYSCTL, covers, format, gid, parse, widened};
    let current = match crate::tunnel::net::sysctl_get(SYSCTL) {
        Ok(v) => v,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read {SYSCTL}");
            return;
        }
    };
    let Some(range) = parse(&current) else {
        tracing::warn!(value = %current, "cannot parse {SYSCTL}");
        return;
    };
    let gid = gid();
    if covers(range, gid) {
        return;
    }
    let wanted = format(widened(range, gid));
    if manage {
        match crate::tunnel::net::sysctl_change(SYSCTL, &wanted, changed) {
            Ok(()) => {
                tracing::info!(old = %current, new = %wanted, "widened {SYSCTL} for ICMP echo probes")
            }
            Err(e) => tracing::warn!(error = %e, "could not widen {SYSCTL}"),
        }
    } else {
        tracing::warn!(
            value = %current, gid,
            "ICMP echo probes are impossible: run `sysctl -w {SYSCTL}=\"{wanted}\"` or set [icmp] manage_ping_group_range = true"
        );
    }
}

type Listeners = (tokio::net::UnixListener, Option<tokio::net::TcpListener>);

fn set_up(config: &Config, attach: AttachKind) -> anyhow::Result<(Dataplane, Listeners)> {
    let mut dp = Dataplane::load(attach).context("loading the eBPF classifier")?;
    dp.set_routes(&config.routes.trie_entries())
        .context("loading routes into the classifier")?;
    let how = match attach {
        AttachKind::Tcx => "TCX",
        AttachKind::Tc => "TC (clsact)",
    };
    for iface in classified_interfaces(config) {
        dp.attach(&iface)
            .with_context(|| format!("attaching the classifier to {iface}"))?;
        tracing::info!(interface = %iface, "classifier attached at {how} ingress");
    }
    for iface in config.tunnel.iter().flat_map(|t| t.dns_intercept.iter()) {
        dp.attach_dns_egress(iface)
            .with_context(|| format!("attaching DNS steering to {iface}"))?;
        tracing::info!(interface = %iface, "DNS steering attached at {how} egress");
    }
    let metrics = match config.metrics {
        None => None,
        Some(addr) => {
            let l = std::net::TcpListener::bind(addr)
                .and_then(|l| l.set_nonblocking(true).map(|()| l))
                .and_then(tokio::net::TcpListener::from_std)
                .with_context(|| format!("binding the metrics endpoint {addr}"))?;
            Some(l)
        }
    };
    let listener = crate::server::bind(&config.node.socket)
        .with_context(|| format!("binding the status socket {}", config.node.socket.display()))?;
    Ok((dp, (listener, metrics)))
}

fn remove_socket(path: &std::path::Path) {
    if let Err(e) = std::fs::remove_file(path)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(socket = %path.display(), error = %e, "could not remove socket");
    }
}

/// Runs until SIGTERM or SIGINT; SIGHUP calls `on_hup` (a reload) and carries on.
async fn wait_for_stop(on_hup: impl Fn()) -> anyhow::Result<()> {
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let mut hup = signal(SignalKind::hangup()).context("installing SIGHUP handler")?;
    loop {
        tokio::select! {
            _ = term.recv() => { tracing::info!("SIGTERM: stopping"); return Ok(()); }
            _ = int.recv() => { tracing::info!("SIGINT: stopping"); return Ok(()); }
            _ = hup.recv() => on_hup(),
        }
    }
}

/// Pings systemd's watchdog at half its interval, when the unit asks for one. The pings come
/// from the runtime that also serves the tunnel, so a wedged runtime stops them.
async fn watchdog() {
    let Some(interval) = watchdog_interval() else {
        return;
    };
    let mut tick = tokio::time::interval(interval / 2);
    loop {
        tick.tick().await;
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
    }
}

fn watchdog_interval() -> Option<std::time::Duration> {
    let mut usec = 0;
    sd_notify::watchdog_enabled(false, &mut usec).then(|| std::time::Duration::from_micros(usec))
}

/// SIGHUP: reads the config again and applies routes, policy and zones without touching the
/// tunnel's connections. A config that is invalid, or that changes what only a restart can,
/// is refused whole: the daemon keeps running the old one, and status says why.
fn reload(shared: &Shared, tunnel: Option<&crate::tunnel::TunnelHandle>) {
    let mut notify = vec![sd_notify::NotifyState::Reloading];
    if let Ok(now) = sd_notify::NotifyState::monotonic_usec_now() {
        notify.push(now);
    }
    let _ = sd_notify::notify(false, &notify);
    let old = shared.config();
    let result = apply_reload(shared, &old, tunnel);
    let status = match &result {
        Ok(message) => {
            tracing::info!(%message, "SIGHUP: config reloaded");
            crate::api::ReloadStatus {
                at: unix_now(),
                ok: true,
                message: message.clone(),
            }
        }
        Err(e) => {
            tracing::error!(error = %e, "SIGHUP: reload refused; still running the previous config");
            crate::api::ReloadStatus {
                at: unix_now(),
                ok: false,
                message: e.clone(),
            }
        }
    };
    if let Ok(mut r) = shared.last_reload.lock() {
        *r = Some(status);
    }
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
}

fn apply_reload(
    shared: &Shared,
    old: &Config,
    tunnel: Option<&crate::tunnel::TunnelHandle>,
) -> Result<String, String> {
    let new = crate::config::load(&old.path)
        .and_then(|c| crate::preflight::check_system(&c).map(|()| c))
        .map_err(|e| {
            e.0.iter()
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join("; ")
        })?;
    for warning in &new.warnings {
        tracing::warn!("config: {warning}");
    }
    let changes = crate::config::reload_changes(old, &new).map_err(|keys| {
        format!(
            "{} changed; that takes a restart (systemctl restart gatewayd)",
            keys.join(", ")
        )
    })?;
    // The CRL file is read again on every reload: revoking changes the file, not the config.
    let trust = match (tunnel, &new.tunnel) {
        (Some(handle), Some(t)) if t.tls.crl.is_some() || changes.crl => Some(
            handle
                .prepare_trust(t)
                .map_err(|e| format!("tls.crl: {e:#}"))?,
        ),
        _ => None,
    };
    if !changes.any() && trust.is_none() {
        return Ok("no change".into());
    }
    let is_client = matches!(
        new.tunnel.as_ref().map(|t| &t.role),
        Some(crate::config::Role::Client { .. })
    );
    // Everything that can refuse is asked first, so a refusal changes nothing.
    if let (Some(handle), Some(t)) = (tunnel, &new.tunnel) {
        handle.check_reload(t).map_err(|e| format!("{e:#}"))?;
    }
    // A client's classifier holds the routes its connector sent; its own [[route]]s count only
    // where there is no tunnel to learn from.
    if changes.routes && !is_client {
        let mut dp = shared
            .dataplane
            .lock()
            .map_err(|_| "dataplane lock poisoned".to_string())?;
        dp.set_routes(&new.routes.trie_entries())
            .map_err(|e| format!("loading routes into the classifier: {e}"))?;
        if let Ok(mut r) = shared.routes.lock() {
            *r = new.routes.clone();
        }
    }
    if let (Some(handle), Some(t)) = (tunnel, &new.tunnel) {
        handle.reload(t, new.routes.iter().map(|r| r.cidr).collect());
    }
    let mut applied = Vec::new();
    if let (Some(handle), Some(t), Some(v)) = (tunnel, &new.tunnel, trust) {
        let crl = match v.crl() {
            Some((path, crl)) => format!("CRL {} ({} revoked)", path.display(), crl.revoked.len()),
            None => "no CRL".into(),
        };
        let closed = handle.apply_trust(t, v);
        applied.push(match closed.is_empty() {
            true => crl,
            false => format!("{crl}, closed the session(s) of {}", closed.join(", ")),
        });
    }
    if changes.routes {
        applied.push(format!("{} route(s)", new.routes.len()));
    }
    if changes.policy {
        applied.push("policy".to_string());
    }
    if changes.zones {
        applied.push("DNS zones".to_string());
    }
    if let Ok(mut c) = shared.config.lock() {
        *c = new;
    }
    Ok(format!("applied {}", applied.join(", ")))
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Shared {
    fn config(&self) -> Config {
        match self.config.lock() {
            Ok(c) => c.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }
}

fn handle(shared: &Shared, req: Request) -> Response {
    match req {
        Request::Status => match status(shared) {
            Ok(s) => Response::Status(Box::new(s)),
            Err(e) => Response::Error {
                message: format!("{e:#}"),
            },
        },
    }
}

fn status(shared: &Shared) -> anyhow::Result<Status> {
    let dp = shared
        .dataplane
        .lock()
        .map_err(|_| anyhow::anyhow!("dataplane lock poisoned"))?;
    let ours = dp.program_id();
    let attach = dp.kind();
    let config = shared.config();
    let interfaces = classified_interfaces(&config)
        .iter()
        .map(|name| {
            interface_status(name, attach, dataplane::attached_programs(name), |p| {
                p.id == ours
            })
        })
        .collect();
    let table = shared
        .routes
        .lock()
        .map_err(|_| anyhow::anyhow!("routes lock poisoned"))?
        .clone();
    let mut routes = Vec::new();
    for r in table.iter() {
        let c = dp.route_counters(r.id)?;
        routes.push(RouteStatus {
            id: r.id,
            name: r.name.clone(),
            cidr: r.cidr.to_string(),
            packets: c.packets,
            bytes: c.bytes,
        });
    }
    let classifier = dp
        .counters()?
        .into_iter()
        .map(|(c, v): (Counter, u64)| (c.name().to_string(), v))
        .collect();
    Ok(Status {
        schema: STATUS_SCHEMA,
        version: env!("CARGO_PKG_VERSION").to_string(),
        node: config.node.name.clone(),
        pid: std::process::id(),
        config: absolute(&config.path),
        started_at: shared.started_at,
        uptime_secs: shared.started.elapsed().as_secs(),
        interfaces,
        routes,
        classifier,
        tunnel: shared.tunnel.as_ref().map(|t| t.status()),
        dns_egress: config
            .tunnel
            .iter()
            .flat_map(|t| t.dns_intercept.iter())
            .map(|name| {
                interface_status(
                    name,
                    attach,
                    dataplane::attached_egress_programs(name),
                    |p| p.name == gateway_common::programs::DNS_EGRESS,
                )
            })
            .collect(),
        icmp: Some(crate::pingrange::status(
            config.manage_ping_group_range,
            crate::tunnel::net::sysctl_get(crate::pingrange::SYSCTL)
                .unwrap_or_else(|e| format!("unreadable: {e}")),
        )),
        tls: shared
            .certificate
            .as_ref()
            .map(|c| tls_status(c, shared.trust.as_deref())),
        last_reload: shared.last_reload.lock().ok().and_then(|r| r.clone()),
    })
}

/// This node's certificate and the CRL in force, with the expiry counted from now.
fn tls_status(
    cert: &crate::pki::CertInfo,
    trust: Option<&crate::tunnel::tls::Trust>,
) -> crate::api::TlsStatus {
    let now = unix_now() as i64;
    let crl = trust.and_then(|t| t.crl());
    // Peers refuse a node whose own certificate its CRL lists: say so before anything else.
    let revoked = crl
        .as_ref()
        .is_some_and(|(_, c)| c.find(&cert.serial).is_some());
    crate::api::TlsStatus {
        identity: cert.identity.clone(),
        profile: cert.profile_name(),
        serial: cert.serial_hex(),
        not_after: cert.not_after,
        expires_in_days: (cert.not_after - now).div_euclid(86_400),
        warning: match revoked {
            true => Some("REVOKED by the CRL in force: peers refuse it".into()),
            false => crate::pki::list::expiry_warning(cert.not_after, now),
        },
        crl: crl.map(|(path, crl)| crate::api::CrlStatus {
            path: absolute(&path),
            revoked: crl.revoked.len() as u64,
            number: crl.number,
            issued_at: crl.this_update,
        }),
    }
}

/// What the kernel reported at one interface, with our program marked.
fn interface_status(
    name: &str,
    attach: AttachKind,
    programs: Result<Vec<dataplane::AttachedProgram>, dataplane::DataplaneError>,
    ours: impl Fn(&dataplane::AttachedProgram) -> bool,
) -> InterfaceStatus {
    match programs {
        Ok(programs) => {
            let programs: Vec<ProgramInfo> = programs
                .into_iter()
                .map(|p| ProgramInfo {
                    ours: ours(&p),
                    id: p.id,
                    name: p.name,
                    mode: Some(p.kind),
                })
                .collect();
            InterfaceStatus {
                name: name.to_string(),
                classifier_attached: programs.iter().any(|p| p.ours),
                programs,
                attach: Some(attach),
                error: None,
            }
        }
        Err(e) => InterfaceStatus {
            name: name.to_string(),
            classifier_attached: false,
            programs: vec![],
            attach: Some(attach),
            error: Some(e.to_string()),
        },
    }
}

fn absolute(p: &std::path::Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_owned())
}

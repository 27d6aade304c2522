//! gatewayd's life: take the state directory, clean what a crashed run left, set up, serve,
//! and on SIGTERM/SIGINT undo everything in reverse order.
//!
//! Setup is all-or-nothing: if any step fails, what the earlier steps did is undone before the
//! error is returned, so a failed start leaves no program attached and no socket behind.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::Context;
use tokio::signal::unix::{SignalKind, signal};

use crate::api::{AttachKind, Request};
use crate::config::Config;
use crate::dataplane::Dataplane;
use crate::routes::{Route, RouteTable};
use crate::state::{self, Record, StateDir};

mod leftovers;
mod reload;
mod status;

use reload::reload;
use status::{handle, status};

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

    let started_at = crate::sys::unix_now();
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
            undo_start(&config, &mut own_sysctls, &state_dir)?;
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
                    undo_start(&config, &mut own_sysctls, &state_dir)?;
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

/// What a failed start undoes once the dataplane is gone (dropped, it detaches its own
/// links): the status socket, the sysctls the daemon changed, and the state record, so the
/// next start finds nothing to clean.
fn undo_start(
    config: &Config,
    own_sysctls: &mut Vec<(String, String)>,
    state_dir: &StateDir,
) -> anyhow::Result<()> {
    remove_socket(&config.node.socket);
    crate::tunnel::net::restore(own_sysctls);
    state_dir.clear()?;
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

impl Shared {
    fn config(&self) -> Config {
        match self.config.lock() {
            Ok(c) => c.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }
}

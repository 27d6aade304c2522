//! What an operator does with a hub beyond relaying (issue 13): revoking a client or a
//! connector with a CRL reload on the hub, and `gatewayctl access` through it. Each test runs in
//! the hub lab (`gateway_lab::hub`), where both VPC gateways drop every inbound connection
//! attempt.

mod common;
#[path = "common/pair.rs"]
mod pair;
#[path = "hub/setup.rs"]
mod setup;

use std::time::Duration;

use common::*;
use gateway_lab::{Host, addr};
use setup::*;

#[test]
fn a_crl_reload_on_the_hub_cuts_the_live_links_of_a_revoked_client_and_connector() {
    let mut h = start_hub();
    h.start_connector(Host::VpcGateway, GW_A, "");
    h.start_client("");
    let ping = ["ping", "-c", "2", "-i", "0.2", "-W", "2", addr::VPC_HOST];
    h.lab
        .run_ok(Host::Operator, &ping)
        .expect("ping through the hub");
    let revoked = |h: &HubLab, name: &str| {
        pki_issue(
            &h.lab,
            &h.pki,
            &["revoke", name, "--reason", "key-compromise"],
        );
        h.hub
            .as_ref()
            .expect("hub")
            .signal(libc::SIGHUP)
            .expect("SIGHUP");
    };
    let listed = |t: &gateway::api::TunnelStatus, name: &str| {
        t.refusals.iter().any(|r| {
            r.identity.as_deref() == Some(name)
                && r.reason == "certificate revoked (key-compromise)"
        })
    };

    // Only the hub reads the new CRL: the connector still admits the client, so what ends its
    // session is the hub closing the live outer link.
    revoked(&h, CLIENT);
    wait_hub(
        &h,
        Duration::from_secs(2),
        "the client's relay closed",
        |t| listed(t, CLIENT) && t.hub.as_ref().is_some_and(|r| r.clients.is_empty()),
    );
    let hub = status_json(&h.lab, Host::Hub, &h.hub_socket);
    let reload = hub.last_reload.expect("reload reported");
    assert!(
        reload.ok
            && reload
                .message
                .contains(&format!("closed the session(s) of {CLIENT}")),
        "{reload:?}"
    );
    // It dials again at once and is refused in the handshake; nothing is relayed for it.
    wait_hub(
        &h,
        Duration::from_secs(15),
        "the client's redial refused",
        |t| {
            t.refusals
                .iter()
                .any(|r| r.remote.starts_with(addr::OP_WAN) && r.reason.contains("Revoked"))
        },
    );
    assert!(
        hub_now(&h).hub.is_some_and(|r| r.clients.is_empty()),
        "{}",
        h.logs()
    );
    assert!(
        h.lab.run_ok(Host::Operator, &ping).is_err(),
        "ping after revocation"
    );

    // A revoked connector leaves the hub's table, and its redial is refused too.
    revoked(&h, GW_A);
    wait_hub(
        &h,
        Duration::from_secs(2),
        "the connector's link closed",
        |t| listed(t, GW_A) && t.hub.as_ref().is_some_and(|r| r.connectors.is_empty()),
    );
    std::thread::sleep(Duration::from_secs(2));
    assert!(!h.hub_lists(GW_A), "{}", h.logs());
}

#[test]
fn access_reaches_ssh_through_the_hub_with_no_tunnel_on_the_host() {
    let mut h = start_hub();
    h.start_connector(Host::VpcGateway, GW_A, "");
    // No client daemon, no TUN, no route: only `gatewayctl access` and a config whose targets
    // are the hub.
    let config = write_config(
        &h.lab,
        "access",
        &[],
        &format!(
            "[tunnel]\nconnect = [\"{}\"]\ngroup = \"{GROUP}\"\n\n{}",
            hub_target(),
            tls(&h.pki, CLIENT)
        ),
    );
    let ping = ["ping", "-c", "1", "-W", "1", addr::VPC_HOST];
    assert!(
        h.lab.run_ok(Host::Operator, &ping).is_err(),
        "a path of its own"
    );
    let proxy = format!("ProxyCommand={GATEWAYCTL} access ssh --hostname %h --port %p");
    let env = format!("GATEWAY_CONFIG={}", config.display());
    let argv = gateway_lab::ssh_argv_with(
        h.lab.ssh_key(),
        &["-o", &proxy, "-o", "ConnectTimeout=10"],
        addr::VPC_HOST,
        "echo via-hub-$((6*7))",
    );
    let mut full = vec!["env", env.as_str()];
    full.extend(argv.iter().map(String::as_str));
    let out = h.lab.run(Host::Operator, &full).expect("ssh");
    assert!(
        out.status.success(),
        "ssh through access and the hub: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        h.logs()
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "via-hub-42");
    // The hub relayed it as a session of the user's identity (there is no other path).
    let hub_log = h.hub.as_ref().expect("hub").log();
    assert!(
        hub_log
            .lines()
            .any(|l| l.contains("client relayed") && l.contains(CLIENT)),
        "{hub_log}"
    );
}

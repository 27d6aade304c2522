//! Routes a peer asks for: a client's advertised prefixes on the connector, and the
//! connector's routes on a client.

use std::time::{Duration, Instant};

use gateway::tunnel::control::Control;
use gateway_lab::{Host, addr};

use super::common::*;
use super::peer;
use super::{connector_config, refused, start};

/// Waits (bounded) until `ok` holds for the VPC gateway's routes of `family`.
fn wait_routes(h: &super::Hostile, family: &str, what: &str, ok: impl Fn(&str) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let routes = h.gw_routes(family);
        if ok(&routes) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}:\n{routes}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn advertised_prefixes_are_refused_unless_granted_and_never_hijack_the_vpc_or_another_client() {
    let mut h = start(Some(true), &[]);
    // The granted advertise (the office LAN) works as before.
    h.ssh_ok(Host::Office);
    let (v4, v6) = (h.gw_routes("-4"), h.gw_routes("-6"));
    assert!(v4.contains("10.128.0.0/16 dev vpc0"), "{v4}");
    assert!(v4.contains("192.0.2.0/24 dev gwtun"), "{v4}");
    assert!(v6.contains("2001:db8:2::/64 dev gwtun"), "{v6}");
    let victim = h.ticking_ssh(Host::Operator, 8, "victim-ssh.log");

    let mallory = h.target("ops-mallory");
    let attempts: &[(&str, &str)] = &[
        ("100.64.0.2/32", "overlaps the overlay 100.64.0.0/24"),
        ("fd00:64::2/128", "overlaps the overlay fd00:64::/64"),
        (
            "10.128.0.0/16",
            "overlaps the connector's route 10.128.0.0/16",
        ),
        (
            "10.128.5.0/24",
            "overlaps the connector's route 10.128.0.0/16",
        ),
        ("0.0.0.0/0", "default route"),
        ("::/0", "default route"),
        ("198.18.0.0/24", "not in any [[policy]] advertise list"),
        ("192.0.2.0/24", "held by ops-alice"),
        ("2001:db8:2::/64", "held by ops-alice"),
        ("203.0.113.0/25", "which the connector routes itself"),
    ];
    for (prefix, says) in attempts {
        let t = mallory.clone();
        let p = prefix.to_string();
        let reason = refused(peer::in_ns(&t.ns.clone(), move || async move {
            peer::advertise(&t, &[p.as_str()]).await
        }));
        assert!(
            reason.contains(&format!("advertised prefix {prefix}")) && reason.contains(says),
            "{prefix}: {reason}"
        );
    }
    // One bad prefix among good-looking ones refuses the whole hello.
    let t = mallory.clone();
    let reason = refused(peer::in_ns(&t.ns.clone(), move || async move {
        peer::advertise(&t, &["198.51.100.128/25", "100.64.0.3/32"]).await
    }));
    assert!(reason.contains("198.51.100.128/25"), "{reason}");

    let tunnel = h.connector_status().tunnel.expect("tunnel");
    let mallorys: Vec<&str> = tunnel
        .refusals
        .iter()
        .filter(|r| r.identity.as_deref() == Some("ops-mallory"))
        .map(|r| r.reason.as_str())
        .collect();
    for (prefix, _) in attempts {
        assert!(
            mallorys
                .iter()
                .any(|r| r.contains(&format!("prefix {prefix}:"))),
            "{prefix} not in status: {mallorys:#?}"
        );
    }
    assert!(tunnel.limits.get("advertise_refused").copied().unwrap_or(0) >= 11);
    let alice = tunnel
        .peers
        .iter()
        .find(|p| p.identity == "ops-alice")
        .expect("alice");
    assert_eq!(alice.advertised, ["192.0.2.0/24", "2001:db8:2::/64"]);

    // The victim did not notice; the connector's routes are exactly as they were.
    h.ping_ok(Host::Operator);
    h.ping_ok(Host::Office);
    h.ticked(victim, 8);
    assert_eq!(h.gw_routes("-4"), v4);
    assert_eq!(h.gw_routes("-6"), v6);

    // Alice leaves: her routes go with her session.
    stop_cleanly(h.client.as_mut().expect("client"));
    wait_routes(&h, "-4", "alice's LAN route outlived her session", |r| {
        !r.contains("192.0.2.0/24")
    });
    wait_routes(&h, "-6", "alice's LAN route outlived her session", |r| {
        !r.contains("2001:db8:2::/64")
    });
    // Now the (granted, free) office LAN is Mallory's while her session lasts, and only then.
    let t = mallory.clone();
    let gw = h.lab.ns(Host::VpcGateway);
    let during = peer::in_ns(&t.ns.clone(), move || async move {
        let (answer, tls) = peer::open_session(&t, &peer::hello(&["192.0.2.0/24"], None))
            .await
            .expect("session");
        assert!(matches!(answer, Control::Welcome { .. }), "{answer:?}");
        let routes = std::process::Command::new("ip")
            .args(["-n", &gw, "-4", "route", "show"])
            .output()
            .expect("ip route");
        drop(tls);
        String::from_utf8_lossy(&routes.stdout).into_owned()
    });
    assert!(during.contains("192.0.2.0/24 dev gwtun"), "{during}");
    wait_routes(&h, "-4", "mallory's route outlived her session", |r| {
        !r.contains("192.0.2.0/24")
    });
    assert!(h.gw_routes("-4").contains("10.128.0.0/16 dev vpc0"));
}

#[test]
fn a_reload_that_withdraws_an_advertise_grant_closes_the_session_and_removes_its_routes() {
    let h = start(Some(true), &[]);
    assert!(h.gw_routes("-4").contains("192.0.2.0/24 dev gwtun"));
    connector_config(&h.lab, &h.pki, false, &[]);
    h.connector.signal(libc::SIGHUP).expect("SIGHUP");
    wait_routes(&h, "-4", "the withdrawn grant's route stayed", |r| {
        !r.contains("192.0.2.0/24")
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let t = h.connector_status().tunnel.expect("tunnel");
        let refused_again = t.refusals.iter().any(|r| {
            r.identity.as_deref() == Some("ops-alice")
                && r.reason
                    .contains("advertised prefix 192.0.2.0/24: not in any [[policy]]")
                && !r.reason.starts_with("session closed")
        });
        let client = status_json(&h.lab, Host::Operator, &h.client_socket)
            .tunnel
            .expect("tunnel");
        if refused_again
            && client
                .state
                .contains("refused by the connector: advertised prefix")
        {
            assert!(
                t.peers.iter().all(|p| p.identity != "ops-alice"),
                "{:?}",
                t.peers
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no refusal after the reload: {:#?}\nclient: {}",
            t.refusals,
            client.state
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(h.gw_routes("-4").contains("10.128.0.0/16 dev vpc0"));
}

#[test]
fn a_client_keeps_its_own_subnets_and_routes_when_the_connector_offers_them() {
    // A route the operator host has on its own, and a connector offering it and the office LAN
    // the operator host is connected to.
    let lab_routes = ["10.200.0.0/16", "192.0.2.0/24"];
    let h = {
        let h = start(None, &lab_routes);
        h.lab
            .run_ok(
                Host::Operator,
                &["ip", "route", "add", "10.200.0.0/16", "via", addr::UL_OP],
            )
            .expect("the host's own route");
        let oc = super::client_config(&h.lab, &h.pki, false);
        let c = start_daemon(&h.lab, Host::Operator, &oc, &h.client_socket, "client.log");
        super::wait_connected(&h.lab, &h.client_socket);
        super::Hostile {
            client: Some(c),
            ..h
        }
    };
    let client = status_json(&h.lab, Host::Operator, &h.client_socket)
        .tunnel
        .expect("tunnel");
    let reasons: Vec<&str> = client.refusals.iter().map(|r| r.reason.as_str()).collect();
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("learned route 192.0.2.0/24 refused: overlaps 192.0.2.0/24")),
        "{reasons:#?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r
                .contains("learned route 10.200.0.0/16 refused: this host already has a route")),
        "{reasons:#?}"
    );
    assert_eq!(
        client.limits.get("learned_route_refused"),
        Some(&2),
        "{:?}",
        client.limits
    );
    let routes = h
        .lab
        .run_ok(Host::Operator, &["ip", "-4", "route", "show"])
        .expect("ip");
    assert!(
        routes.contains("10.200.0.0/16 via 198.51.100.1 dev wan0"),
        "{routes}"
    );
    assert!(routes.contains("192.0.2.0/24 dev lan0"), "{routes}");
    assert!(!routes.contains("192.0.2.0/24 dev optun"), "{routes}");
    assert!(routes.contains("10.128.0.0/16 dev optun"), "{routes}");
    h.ping_ok(Host::Operator);
}

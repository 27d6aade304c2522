//! The hub's keys: `[tunnel] role` and `group`, what each role may set, what is inferred.

use std::path::Path;

use super::*;

const TLS: &str = "[tls]\nca = \"/p/ca.pem\"\ncert = \"/p/n.pem\"\nkey = \"/p/n.key\"\n";

fn tunnel(lines: &str) -> Result<Tunnel, ConfigError> {
    parse(
        Path::new("/t.toml"),
        &format!("[node]\nname = \"n\"\n[tunnel]\n{lines}\n{TLS}"),
    )
    .map(|c| c.tunnel.expect("tunnel"))
}

fn keys(e: ConfigError) -> Vec<String> {
    e.0.into_iter().map(|i| i.key).collect()
}

#[test]
fn a_hub_listens_and_nothing_else() {
    let t = tunnel("role = \"hub\"\nlisten = \"0.0.0.0:7844\"").expect("valid");
    assert_eq!(
        t.role,
        Role::Hub {
            listen: "0.0.0.0:7844".parse().expect("addr")
        }
    );
    let e = tunnel("role = \"hub\"\nlisten = \"0.0.0.0:7844\"\nconnect = [\"a:1\"]\ngroup = \"g\"")
        .expect_err("a hub dials nobody");
    assert_eq!(keys(e), ["tunnel.connect", "tunnel.group"]);
    let e = tunnel("role = \"hub\"").expect_err("no listen");
    assert_eq!(keys(e), ["tunnel.listen"]);
    let e = tunnel("role = \"relay\"\nlisten = \"0.0.0.0:1\"").expect_err("unknown role");
    assert_eq!(keys(e), ["tunnel.role"]);
}

#[test]
fn a_connector_may_dial_hubs_from_its_pinned_port_with_or_without_listening() {
    let t = tunnel(
        "role = \"connector\"\nconnect = [\"hub.example.net:7844\"]\nsource_port = 7844\n\
         group = \"vpc\"",
    )
    .expect("valid");
    assert_eq!(
        t.role,
        Role::Connector {
            listen: None,
            hubs: vec!["hub.example.net:7844".into()],
            source_port: 7844,
        }
    );
    assert_eq!(t.group.as_deref(), Some("vpc"));
    let t = tunnel(
        "role = \"connector\"\nlisten = \"0.0.0.0:7844\"\nconnect = [\"hub:7844\"]\n\
         source_port = 7845",
    )
    .expect("both");
    assert!(matches!(
        t.role,
        Role::Connector {
            listen: Some(_),
            ..
        }
    ));
    // Without role, listen and connect together are still a mistake, named.
    let e = tunnel("listen = \"0.0.0.0:7844\"\nconnect = [\"hub:7844\"]").expect_err("which?");
    assert_eq!(keys(e), ["tunnel.connect"]);
    let e = tunnel("role = \"connector\"").expect_err("nothing to do");
    assert_eq!(keys(e), ["tunnel"]);
}

#[test]
fn relay_is_on_by_default_and_only_for_what_goes_through_hubs() {
    let t = tunnel("connect = [\"198.18.0.10:7844\"]\ngroup = \"vpc\"").expect("valid");
    assert!(t.relay);
    let t =
        tunnel("connect = [\"198.18.0.10:7844\"]\ngroup = \"vpc\"\nrelay = false").expect("valid");
    assert!(!t.relay);
    tunnel("role = \"hub\"\nlisten = \"0.0.0.0:7844\"\nrelay = false").expect("a hub");
    tunnel("role = \"connector\"\nconnect = [\"hub:7844\"]\nsource_port = 7844\nrelay = false")
        .expect("a connector behind hubs");
    let e = tunnel("connect = [\"gw:7844\"]\nrelay = false").expect_err("a direct client");
    assert_eq!(keys(e), ["tunnel.relay"]);
    let e = tunnel("role = \"connector\"\nlisten = \"0.0.0.0:7844\"\nrelay = true")
        .expect_err("a connector that only listens");
    assert_eq!(keys(e), ["tunnel.relay"]);
}

#[test]
fn a_client_with_a_group_goes_through_hubs_and_checks_the_groups_name() {
    let t = tunnel("connect = [\"198.18.0.10:7844\"]\ngroup = \"vpc\"").expect("valid");
    let Role::Client { server_name, .. } = &t.role else {
        panic!("{:?}", t.role);
    };
    assert_eq!(server_name, "vpc");
    let e = tunnel("role = \"client\"\nlisten = \"0.0.0.0:1\"\nconnect = [\"a:1\"]")
        .expect_err("a client does not listen");
    assert_eq!(keys(e), ["tunnel.listen"]);
    let e = tunnel("connect = [\"a:1\"]\ngroup = \"bad\\u001bname\"").expect_err("escape");
    assert_eq!(keys(e), ["tunnel.group"]);
}

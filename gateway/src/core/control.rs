//! Control messages on the tunnel's control channel (the first QUIC stream, or Control frames
//! on the TCP fallback): hello, welcome or refusal, keepalives, route offers, access requests.
//!
//! Each message is a JSON object behind a 4-byte big-endian length. Control is rare, so
//! readability beats compactness; packets never travel here (they are DATAGRAM frames). The
//! types and their encoding are pure, so the sans-IO node speaks them; `tunnel::control` reads
//! and writes them on streams.

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// Bumped when a message changes meaning. Nodes one version apart work together (the newer
/// one keeps what the older understands), so a fleet is upgraded one node at a time; a peer
/// further apart is refused with a message that says so.
pub const PROTOCOL_VERSION: u32 = 1;

/// Whether a peer speaking `version` works with this one: the same, or one apart.
pub fn compatible(version: u32) -> bool {
    version >= 1 && version.abs_diff(PROTOCOL_VERSION) <= 1
}

/// This build's version, as a hello or welcome names it.
pub fn software() -> Option<String> {
    Some(env!("CARGO_PKG_VERSION").to_string())
}
/// No control message comes near this; more is a broken or hostile peer. What a client may
/// receive (a welcome or routes update listing many routes and zones).
pub const MAX_MESSAGE: usize = 64 * 1024;
/// What a connector reads from a client, the hello included (and an access request): a hello
/// with [`core::advertise::MAX_ADVERTISED`] IPv6 prefixes and a transport reason is under
/// 4 KiB; keepalives are tiny. Nothing bigger is read before the welcome.
///
/// [`core::advertise::MAX_ADVERTISED`]: super::advertise::MAX_ADVERTISED
pub const MAX_CLIENT_MESSAGE: usize = 8 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Control {
    Hello {
        version: u32,
        node: String,
        /// The client's release (newer clients say; a 0.1.0 client did not).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        software: Option<String>,
        /// Prefixes behind the client (its LANs), routed back to it by the connector.
        advertise: Vec<IpNet>,
        /// Why the client uses the transport it does, for the connector's status.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        transport_reason: Option<String>,
    },
    Welcome {
        version: u32,
        node: String,
        /// The connector's release.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        software: Option<String>,
        address_v4: Ipv4Addr,
        address_v6: Ipv6Addr,
        /// Prefix lengths of the overlay the addresses come from.
        prefix_v4: u8,
        prefix_v6: u8,
        /// Destinations the client should send into the tunnel.
        routes: Vec<IpNet>,
        keepalive_secs: u64,
        /// Private DNS zones the connector answers through the tunnel.
        #[serde(default)]
        zones: Vec<String>,
    },
    Refused {
        reason: String,
    },
    Keepalive {
        seq: u64,
    },
    /// Connector to client, after a reload: the routes and zones offered now (all of them).
    Routes {
        routes: Vec<IpNet>,
        zones: Vec<String>,
    },
    /// `gatewayctl access`: the first and only message on an access connection, asking for a
    /// byte stream to `host` (an address, or a name under one of the connector's zones).
    Open {
        version: u32,
        host: String,
        port: u16,
    },
    /// The stream is connected to `address`; raw bytes follow both ways.
    Opened {
        address: std::net::SocketAddr,
    },
    /// A message type from a newer peer: skipped, not fatal.
    #[serde(other)]
    Unknown,
}

/// Why bytes are not a control message.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("control message of {0} bytes exceeds this side's limit")]
    TooLong(usize),
    #[error("control message is not valid: {0}")]
    Decode(#[from] serde_json::Error),
}

/// The JSON body alone, for transports that frame it themselves.
pub fn encode_body(msg: &Control) -> Result<Vec<u8>, CodecError> {
    let body = serde_json::to_vec(msg)?;
    if body.len() > MAX_MESSAGE {
        return Err(CodecError::TooLong(body.len()));
    }
    Ok(body)
}

/// Length prefix and body.
pub fn encode(msg: &Control) -> Result<Vec<u8>, CodecError> {
    let body = encode_body(msg)?;
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

pub fn decode(body: &[u8]) -> Result<Control, CodecError> {
    Ok(serde_json::from_slice(body)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_with_their_length_prefix() {
        let hello = Control::Hello {
            version: PROTOCOL_VERSION,
            node: "ops-alice".into(),
            software: software(),
            advertise: vec!["192.0.2.0/24".parse().expect("net")],
            transport_reason: Some("no QUIC handshake in 1.5 s".into()),
        };
        let bytes = encode(&hello).expect("encode");
        let len = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize;
        assert_eq!(len, bytes.len() - 4);
        assert_eq!(decode(&bytes[4..]).expect("decode"), hello);
    }

    #[test]
    fn unknown_types_from_newer_peers_are_skippable() {
        assert_eq!(
            decode(br#"{"type":"route_update","routes":[]}"#).expect("decode"),
            Control::Unknown
        );
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(decode(b"\xff\x00").is_err());
        assert!(decode(br#"{"type":"hello"}"#).is_err());
        assert!(decode(b"").is_err());
    }
}

//! The dial rule, once: which transports to try, in which order, for how long each, and how to
//! say why a link is on the one it got. The tunnel's client and `gatewayctl access` both follow
//! it; only the tunnel keeps probing QUIC afterwards.

use std::time::Duration;

use super::{HANDSHAKE_TIMEOUT, LinkKind};
use crate::config::Transport;

/// One transport to try, and how long it gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    pub kind: LinkKind,
    pub timeout: Duration,
}

/// `auto`: QUIC for `quic_timeout`, then TLS over TCP; `quic` or `tcp`: that one alone.
pub fn plan(transport: Transport, quic_timeout: Duration) -> Vec<Step> {
    let quic = |timeout| Step {
        kind: LinkKind::Quic,
        timeout,
    };
    let tcp = Step {
        kind: LinkKind::Tcp,
        timeout: HANDSHAKE_TIMEOUT,
    };
    match transport {
        Transport::Auto => vec![quic(quic_timeout), tcp],
        Transport::Quic => vec![quic(HANDSHAKE_TIMEOUT)],
        Transport::Tcp => vec![tcp],
    }
}

/// Why a link that opened after the steps that failed with `errors` is on its transport:
/// empty on QUIC, the pinned transport, or why QUIC did not answer.
pub fn reason(transport: Transport, errors: &[String]) -> String {
    match (transport, errors.first()) {
        (Transport::Tcp, _) => "transport = \"tcp\" in the config".into(),
        (_, Some(e)) => e.clone(),
        (_, None) => String::new(),
    }
}

/// What to say when every step failed.
pub fn failure(transport: Transport, errors: &[String]) -> String {
    match (transport, errors) {
        (Transport::Auto, [quic, tcp, ..]) => format!("QUIC: {quic}; TCP fallback: {tcp}"),
        (_, [one, ..]) => one.clone(),
        (_, []) => "no transport to try".into(),
    }
}

/// The error a step that timed out reports.
pub fn timed_out(step: Step) -> String {
    match step.kind {
        LinkKind::Quic => format!("no QUIC handshake in {}", super::secs(step.timeout)),
        LinkKind::Tcp => format!("no TCP+TLS handshake in {}", super::secs(step.timeout)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_tries_quic_briefly_then_tcp_and_says_why() {
        let p = plan(Transport::Auto, Duration::from_millis(1500));
        assert_eq!(p.len(), 2);
        assert_eq!((p[0].kind, p[1].kind), (LinkKind::Quic, LinkKind::Tcp));
        assert_eq!(timed_out(p[0]), "no QUIC handshake in 1.5 s");
        let errors = vec![timed_out(p[0])];
        assert_eq!(
            reason(Transport::Auto, &errors),
            "no QUIC handshake in 1.5 s"
        );
        assert_eq!(reason(Transport::Auto, &[]), "");
        let both = vec![timed_out(p[0]), "connection refused".into()];
        assert_eq!(
            failure(Transport::Auto, &both),
            "QUIC: no QUIC handshake in 1.5 s; TCP fallback: connection refused"
        );
        assert_eq!(
            reason(Transport::Tcp, &[]),
            "transport = \"tcp\" in the config"
        );
        assert_eq!(
            plan(Transport::Quic, Duration::ZERO)[0].timeout,
            HANDSHAKE_TIMEOUT
        );
    }
}

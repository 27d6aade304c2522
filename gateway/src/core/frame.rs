//! Frames for a byte-stream transport (the TLS-over-TCP fallback of issue 5): the same
//! control messages, IP packets and DNS messages the QUIC transport carries in streams and
//! datagrams, each as `[type: u8][length: u16 BE][payload]`.
//!
//! The decoder is a state machine fed arbitrary chunks (`push`), yielding whole frames
//! (`next_frame`); it never allocates per frame beyond the payload it returns, never panics,
//! and reports an unknown type, a type this side never receives, or a length above its
//! [`Limits`] as an error as soon as the 3-byte header is in (before any of the payload is
//! waited for), after which the stream is not trusted any more.

/// Largest payload: an IP packet of the largest TUN MTU, or a DNS message.
pub const MAX_PAYLOAD: usize = 65_535;
/// Type and length.
pub const HEADER: usize = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameType {
    /// A control message (JSON, as on the QUIC control stream).
    Control = 0,
    /// One IP packet.
    Packet = 1,
    /// A DNS query: 4-byte request id, then the message.
    DnsQuery = 2,
    /// The answer to the DnsQuery with the same id.
    DnsAnswer = 3,
}

impl FrameType {
    fn from_u8(b: u8) -> Option<FrameType> {
        Some(match b {
            0 => FrameType::Control,
            1 => FrameType::Packet,
            2 => FrameType::DnsQuery,
            3 => FrameType::DnsAnswer,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameError {
    UnknownType(u8),
    TooLong(usize),
    /// A type this side never receives (a connector gets no DNS answers, a client no queries).
    Unexpected(FrameType),
}

impl FrameError {
    /// A fixed name for counters.
    pub const fn name(self) -> &'static str {
        match self {
            FrameError::UnknownType(_) => "frame_unknown_type",
            FrameError::TooLong(_) => "frame_too_long",
            FrameError::Unexpected(_) => "frame_unexpected_type",
        }
    }
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameError::UnknownType(t) => write!(f, "unknown frame type {t}"),
            FrameError::TooLong(n) => write!(f, "frame of {n} bytes is above this side's limit"),
            FrameError::Unexpected(t) => write!(f, "{t:?} frame, which this side never receives"),
        }
    }
}

/// Largest payload accepted per frame type; `None`: that type is a protocol error here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub control: usize,
    pub packet: usize,
    pub dns_query: Option<usize>,
    pub dns_answer: Option<usize>,
}

impl Limits {
    /// Everything up to [`MAX_PAYLOAD`]: only for tests and tools; links use their side's.
    pub const ANY: Limits = Limits {
        control: MAX_PAYLOAD,
        packet: MAX_PAYLOAD,
        dns_query: Some(MAX_PAYLOAD),
        dns_answer: Some(MAX_PAYLOAD),
    };

    fn max(&self, kind: FrameType) -> Option<usize> {
        match kind {
            FrameType::Control => Some(self.control),
            FrameType::Packet => Some(self.packet),
            FrameType::DnsQuery => self.dns_query,
            FrameType::DnsAnswer => self.dns_answer,
        }
    }
}

/// The type and payload length a frame header announces, if `limits` accept them: checked
/// before the payload is read or buffered.
pub fn check_header(
    header: [u8; HEADER],
    limits: &Limits,
) -> Result<(FrameType, usize), FrameError> {
    let kind = FrameType::from_u8(header[0]).ok_or(FrameError::UnknownType(header[0]))?;
    let len = usize::from(u16::from_be_bytes([header[1], header[2]]));
    match limits.max(kind) {
        None => Err(FrameError::Unexpected(kind)),
        Some(max) if len > max => Err(FrameError::TooLong(len)),
        Some(_) => Ok((kind, len)),
    }
}

/// Appends one frame to `out`.
pub fn encode(kind: FrameType, payload: &[u8], out: &mut Vec<u8>) -> Result<(), FrameError> {
    let len = u16::try_from(payload.len()).map_err(|_| FrameError::TooLong(payload.len()))?;
    out.push(kind as u8);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(payload);
    Ok(())
}

#[derive(Debug)]
pub struct Decoder {
    buf: Vec<u8>,
    start: usize,
    failed: Option<FrameError>,
    limits: Limits,
}

impl Default for Decoder {
    /// A decoder with [`Limits::ANY`].
    fn default() -> Decoder {
        Decoder::new(Limits::ANY)
    }
}

impl Decoder {
    pub fn new(limits: Limits) -> Decoder {
        Decoder {
            buf: Vec::new(),
            start: 0,
            failed: None,
            limits,
        }
    }

    pub fn push(&mut self, bytes: &[u8]) {
        if self.start > 0 && self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The next whole frame, `Ok(None)` when more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<(FrameType, Vec<u8>)>, FrameError> {
        if let Some(e) = self.failed {
            return Err(e);
        }
        let pending = &self.buf[self.start..];
        if pending.len() < HEADER {
            return Ok(None);
        }
        let (kind, len) = match check_header([pending[0], pending[1], pending[2]], &self.limits) {
            Ok(h) => h,
            Err(e) => {
                self.failed = Some(e);
                return Err(e);
            }
        };
        if pending.len() < HEADER + len {
            return Ok(None);
        }
        let payload = pending[HEADER..HEADER + len].to_vec();
        self.start += HEADER + len;
        if self.start > 64 * 1024 {
            // Keep the buffer from growing: drop what was consumed.
            self.buf.drain(..self.start);
            self.start = 0;
        }
        Ok(Some((kind, payload)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_survive_any_chunking() {
        let mut wire = Vec::new();
        encode(
            FrameType::Control,
            br#"{"type":"keepalive","seq":1}"#,
            &mut wire,
        )
        .expect("encode");
        encode(FrameType::Packet, &[0x45; 1400], &mut wire).expect("encode");
        encode(FrameType::DnsQuery, &[0, 0, 0, 7, 1, 2, 3], &mut wire).expect("encode");
        encode(FrameType::Packet, &[], &mut wire).expect("encode");
        for chunk in [1, 2, 3, 7, 100, wire.len()] {
            let mut d = Decoder::default();
            let mut got = Vec::new();
            for piece in wire.chunks(chunk) {
                d.push(piece);
                while let Some(f) = d.next_frame().expect("valid stream") {
                    got.push(f);
                }
            }
            let kinds: Vec<_> = got.iter().map(|(k, p)| (*k, p.len())).collect();
            assert_eq!(
                kinds,
                [
                    (FrameType::Control, 28),
                    (FrameType::Packet, 1400),
                    (FrameType::DnsQuery, 7),
                    (FrameType::Packet, 0)
                ],
                "chunk {chunk}"
            );
        }
    }

    #[test]
    fn garbage_fails_the_stream_and_long_payloads_are_refused() {
        let mut d = Decoder::default();
        d.push(&[9, 0, 1, 0]);
        assert_eq!(d.next_frame(), Err(FrameError::UnknownType(9)));
        d.push(&[1, 0, 0]);
        assert_eq!(
            d.next_frame(),
            Err(FrameError::UnknownType(9)),
            "stays failed"
        );
        let mut out = Vec::new();
        assert_eq!(
            encode(FrameType::Packet, &vec![0; MAX_PAYLOAD + 1], &mut out),
            Err(FrameError::TooLong(MAX_PAYLOAD + 1))
        );
        assert!(out.is_empty());
    }

    #[test]
    fn headers_are_checked_against_the_limits_before_the_payload() {
        let limits = Limits {
            control: 8,
            packet: 1360,
            dns_query: Some(100),
            dns_answer: None,
        };
        assert_eq!(
            check_header([0, 0, 8], &limits),
            Ok((FrameType::Control, 8))
        );
        assert_eq!(
            check_header([0, 0, 9], &limits),
            Err(FrameError::TooLong(9))
        );
        assert_eq!(
            check_header([1, 0xff, 0xff], &limits),
            Err(FrameError::TooLong(65_535))
        );
        assert_eq!(
            check_header([3, 0, 4], &limits),
            Err(FrameError::Unexpected(FrameType::DnsAnswer))
        );
        assert_eq!(
            check_header([7, 0, 0], &limits),
            Err(FrameError::UnknownType(7))
        );
        // The decoder refuses a 64 KiB packet frame from its header alone.
        let mut d = Decoder::new(limits);
        d.push(&[1, 0xff, 0xff]);
        assert_eq!(d.next_frame(), Err(FrameError::TooLong(65_535)));
        let mut d = Decoder::new(limits);
        d.push(&[1, 0x05, 0x50]);
        d.push(&[0; 100]);
        assert_eq!(d.next_frame(), Ok(None), "1360 bytes fit; waiting for them");
    }

    #[test]
    fn a_long_stream_does_not_grow_the_buffer_without_bound() {
        let mut d = Decoder::default();
        let mut frame = Vec::new();
        encode(FrameType::Packet, &[1; 1000], &mut frame).expect("encode");
        for _ in 0..1000 {
            d.push(&frame);
            assert!(d.next_frame().expect("valid").is_some());
        }
        assert!(d.buf.capacity() < 256 * 1024, "{}", d.buf.capacity());
    }
}

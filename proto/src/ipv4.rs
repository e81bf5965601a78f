//! IPv4 headers (RFC 791): a checked zero-copy view and an owned representation for building.
//!
//! [`Ipv4Packet::new_checked`] validates version, header length and total length once; every
//! accessor afterwards is panic-free. Options are carried but not interpreted: they are part
//! of [`Ipv4Packet::header`] and skipped by [`Ipv4Packet::payload`].

use std::net::Ipv4Addr;

use crate::checksum;
use crate::error::{need, Layer, WireError};

/// Length of an IPv4 header without options.
pub const HEADER_LEN: usize = 20;

/// IPv4 protocol numbers used by podnet (IANA "Assigned Internet Protocol Numbers").
pub mod protocol {
    /// Internet Control Message Protocol.
    pub const ICMP: u8 = 1;
    /// IPv4 encapsulated in IPv4 (RFC 2003).
    pub const IPIP: u8 = 4;
    /// Transmission Control Protocol.
    pub const TCP: u8 = 6;
    /// User Datagram Protocol.
    pub const UDP: u8 = 17;
}

/// Byte offsets of the header fields.
pub(crate) mod field {
    use core::ops::Range;
    pub const VER_IHL: usize = 0;
    pub const TOS: usize = 1;
    pub const TOTAL_LEN: Range<usize> = 2..4;
    pub const IDENT: Range<usize> = 4..6;
    pub const FLAGS_FRAG: Range<usize> = 6..8;
    pub const TTL: usize = 8;
    pub const PROTOCOL: usize = 9;
    pub const CHECKSUM: Range<usize> = 10..12;
    pub const SRC: Range<usize> = 12..16;
    pub const DST: Range<usize> = 16..20;
}

const FLAG_DF: u16 = 0x4000;
const FLAG_MF: u16 = 0x2000;
const FRAG_OFFSET_MASK: u16 = 0x1fff;

/// A validated view of an IPv4 packet at the start of `buffer`.
///
/// Invariant (established by [`Ipv4Packet::new_checked`]): version 4, IHL >= 5, and
/// `header_len <= total_len <= buffer.len()`. Bytes after `total_len` (link padding) are ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Ipv4Packet<T> {
    /// Validates `buf` as an IPv4 packet: version 4, IHL >= 5, and
    /// `IHL * 4 <= total length <= buf.len()`. The checksum is not verified here (see
    /// [`verify_checksum`](Self::verify_checksum)).
    pub fn new_checked(buf: T) -> Result<Self, WireError> {
        Self::new_checked_at(buf, Layer::Ipv4)
    }

    /// [`new_checked`](Self::new_checked), reporting truncation at `layer`.
    pub(crate) fn new_checked_at(buf: T, layer: Layer) -> Result<Self, WireError> {
        let b = buf.as_ref();
        need(layer, b, HEADER_LEN)?;
        let version = b[field::VER_IHL] >> 4;
        if version != 4 {
            return Err(WireError::BadVersion(version));
        }
        let ihl = b[field::VER_IHL] & 0x0f;
        if ihl < 5 {
            return Err(WireError::BadHeaderLen(ihl));
        }
        let header_len = usize::from(ihl) * 4;
        need(layer, b, header_len)?;
        let total_len = u16::from_be_bytes([b[2], b[3]]);
        if usize::from(total_len) < header_len {
            return Err(WireError::BadTotalLen(total_len));
        }
        need(layer, b, usize::from(total_len))?;
        Ok(Ipv4Packet { buffer: buf })
    }

    fn b(&self) -> &[u8] {
        self.buffer.as_ref()
    }

    fn u16_at(&self, at: core::ops::Range<usize>) -> u16 {
        let b = &self.b()[at];
        u16::from_be_bytes([b[0], b[1]])
    }

    /// Header length in bytes, options included (IHL * 4).
    pub fn header_len(&self) -> usize {
        usize::from(self.b()[field::VER_IHL] & 0x0f) * 4
    }

    /// Total length field: header plus payload, in bytes.
    pub fn total_len(&self) -> usize {
        usize::from(self.u16_at(field::TOTAL_LEN))
    }

    /// Source address.
    pub fn src(&self) -> Ipv4Addr {
        let b = &self.b()[field::SRC];
        Ipv4Addr::new(b[0], b[1], b[2], b[3])
    }

    /// Destination address.
    pub fn dst(&self) -> Ipv4Addr {
        let b = &self.b()[field::DST];
        Ipv4Addr::new(b[0], b[1], b[2], b[3])
    }

    /// Protocol of the payload (see [`protocol`]).
    pub fn protocol(&self) -> u8 {
        self.b()[field::PROTOCOL]
    }

    /// Time to live.
    pub fn ttl(&self) -> u8 {
        self.b()[field::TTL]
    }

    /// The whole second byte: DSCP (upper 6 bits) and ECN (lower 2 bits).
    pub fn tos(&self) -> u8 {
        self.b()[field::TOS]
    }

    /// Identification field.
    pub fn ident(&self) -> u16 {
        self.u16_at(field::IDENT)
    }

    /// Don't Fragment flag.
    pub fn dont_frag(&self) -> bool {
        self.u16_at(field::FLAGS_FRAG) & FLAG_DF != 0
    }

    /// More Fragments flag.
    pub fn more_frags(&self) -> bool {
        self.u16_at(field::FLAGS_FRAG) & FLAG_MF != 0
    }

    /// Fragment offset in units of 8 bytes, as carried on the wire (0 for a first fragment or
    /// an unfragmented packet).
    pub fn frag_offset(&self) -> u16 {
        self.u16_at(field::FLAGS_FRAG) & FRAG_OFFSET_MASK
    }

    /// True for any fragment of a fragmented packet (MF set or a non-zero offset).
    pub fn is_fragment(&self) -> bool {
        self.more_frags() || self.frag_offset() != 0
    }

    /// True if the header checksum verifies.
    pub fn verify_checksum(&self) -> bool {
        checksum::checksum(self.header()) == 0
    }

    /// The header, options included.
    pub fn header(&self) -> &[u8] {
        &self.b()[..self.header_len()]
    }

    /// The payload: from the end of the header to `total_len` (trailing padding excluded).
    pub fn payload(&self) -> &[u8] {
        &self.b()[self.header_len()..self.total_len()]
    }

    /// The packet bytes up to `total_len`.
    pub fn packet(&self) -> &[u8] {
        &self.b()[..self.total_len()]
    }

    /// Gives back the underlying buffer.
    pub fn into_inner(self) -> T {
        self.buffer
    }
}

impl<'a> Ipv4Packet<&'a [u8]> {
    /// The payload with the lifetime of the underlying slice rather than of the view.
    pub fn into_payload(self) -> &'a [u8] {
        let (start, end) = (self.header_len(), self.total_len());
        &self.buffer[start..end]
    }

    /// The packet up to `total_len`, with the lifetime of the underlying slice.
    pub fn into_packet(self) -> &'a [u8] {
        let end = self.total_len();
        &self.buffer[..end]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Ipv4Packet<T> {
    fn b_mut(&mut self) -> &mut [u8] {
        self.buffer.as_mut()
    }

    /// Sets the TTL. The checksum is not updated: call [`fill_checksum`](Self::fill_checksum).
    pub fn set_ttl(&mut self, ttl: u8) {
        self.b_mut()[field::TTL] = ttl;
    }

    /// Sets the identification field. The checksum is not updated.
    pub fn set_ident(&mut self, id: u16) {
        self.b_mut()[field::IDENT].copy_from_slice(&id.to_be_bytes());
    }

    /// Sets the total length field. The checksum is not updated.
    ///
    /// # Panics
    /// If `len` is shorter than the header or longer than the buffer: the view's invariant
    /// would break, which is a bug in the caller, never a property of received bytes.
    pub fn set_total_len(&mut self, len: u16) {
        let header_len = self.header_len();
        let buf_len = self.b().len();
        assert!(
            (header_len..=buf_len).contains(&usize::from(len)),
            "IPv4 total length {len} outside header length {header_len}..=buffer length {buf_len}"
        );
        self.b_mut()[field::TOTAL_LEN].copy_from_slice(&len.to_be_bytes());
    }

    /// Recomputes and stores the header checksum.
    pub fn fill_checksum(&mut self) {
        let header_len = self.header_len();
        let h = &mut self.b_mut()[..header_len];
        h[field::CHECKSUM].fill(0);
        let c = checksum::checksum(h);
        h[field::CHECKSUM].copy_from_slice(&c.to_be_bytes());
    }

    /// The payload, mutable (header end to `total_len`).
    pub fn payload_mut(&mut self) -> &mut [u8] {
        let (start, end) = (self.header_len(), self.total_len());
        &mut self.b_mut()[start..end]
    }
}

/// An IPv4 header without options, for building packets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Repr {
    /// Source address.
    pub src: Ipv4Addr,
    /// Destination address.
    pub dst: Ipv4Addr,
    /// Payload protocol (see [`protocol`]).
    pub protocol: u8,
    /// Time to live.
    pub ttl: u8,
    /// DSCP and ECN byte.
    pub tos: u8,
    /// Identification.
    pub ident: u16,
    /// Don't Fragment flag.
    pub dont_frag: bool,
    /// Payload length in bytes (at most 65535 - 20).
    pub payload_len: usize,
}

/// Largest payload that fits behind a 20-byte header.
pub const MAX_PAYLOAD_LEN: usize = u16::MAX as usize - HEADER_LEN;

impl Ipv4Repr {
    /// The fields of a validated packet (options, MF and fragment offset are not represented).
    pub fn parse<T: AsRef<[u8]>>(packet: &Ipv4Packet<T>) -> Ipv4Repr {
        Ipv4Repr {
            src: packet.src(),
            dst: packet.dst(),
            protocol: packet.protocol(),
            ttl: packet.ttl(),
            tos: packet.tos(),
            ident: packet.ident(),
            dont_frag: packet.dont_frag(),
            payload_len: packet.total_len() - packet.header_len(),
        }
    }

    /// Writes the 20-byte header, checksum included, into `buf[..20]`.
    ///
    /// A `payload_len` above [`MAX_PAYLOAD_LEN`] is a caller bug; the total length is then
    /// clamped to 65535 (and a debug build panics).
    ///
    /// # Panics
    /// If `buf` is shorter than 20 bytes.
    pub fn emit(&self, buf: &mut [u8]) {
        debug_assert!(
            self.payload_len <= MAX_PAYLOAD_LEN,
            "IPv4 payload {} too long",
            self.payload_len
        );
        let total = u16::try_from(HEADER_LEN + self.payload_len).unwrap_or(u16::MAX);
        let h = &mut buf[..HEADER_LEN];
        h[field::VER_IHL] = 0x45;
        h[field::TOS] = self.tos;
        h[field::TOTAL_LEN].copy_from_slice(&total.to_be_bytes());
        h[field::IDENT].copy_from_slice(&self.ident.to_be_bytes());
        let flags = if self.dont_frag { FLAG_DF } else { 0 };
        h[field::FLAGS_FRAG].copy_from_slice(&flags.to_be_bytes());
        h[field::TTL] = self.ttl;
        h[field::PROTOCOL] = self.protocol;
        h[field::CHECKSUM].fill(0);
        h[field::SRC].copy_from_slice(&self.src.octets());
        h[field::DST].copy_from_slice(&self.dst.octets());
        let c = checksum::checksum(h);
        h[field::CHECKSUM].copy_from_slice(&c.to_be_bytes());
    }
}

/// A hash of the flow `packet` belongs to: its addresses and protocol, plus the TCP or UDP
/// ports when it is not a fragment (fragments carry no ports after the first, so no fragment
/// uses them and all fragments of a datagram hash alike). Every packet of a flow hashes alike,
/// which is what choosing among equal paths needs: the VXLAN outer source port (RFC 7348
/// section 5 recommends a hash of the inner headers, so underlay ECMP and receive-side
/// scaling can spread flows without reordering any). Never panics: bytes too short to hold a
/// field leave it out.
pub fn flow_hash(packet: &[u8]) -> u32 {
    hash_flow(packet, false)
}

/// [`flow_hash`] that is the same in both directions: a packet and its reply (addresses and
/// ports swapped) hash alike. For choosing a TUN queue, whose flow steering pairs a flow's
/// outgoing packets with the queue its incoming ones were written on.
pub fn flow_hash_symmetric(packet: &[u8]) -> u32 {
    hash_flow(packet, true)
}

fn hash_flow(packet: &[u8], symmetric: bool) -> u32 {
    let Some(h) = packet.get(..HEADER_LEN) else {
        return 0;
    };
    let proto = h[field::PROTOCOL];
    let fragment = u16::from_be_bytes([h[6], h[7]]) & 0x3fff != 0;
    let ihl = usize::from(h[field::VER_IHL] & 0x0f) * 4;
    let ports = match proto {
        protocol::TCP | protocol::UDP if !fragment => packet.get(ihl..ihl + 4),
        _ => None,
    };
    // Endpoints as (address, port): in the symmetric hash the smaller one goes first.
    let mut a = [0u8; 6];
    let mut b = [0u8; 6];
    a[..4].copy_from_slice(&h[field::SRC]);
    b[..4].copy_from_slice(&h[field::DST]);
    if let Some(p) = ports {
        a[4..].copy_from_slice(&p[..2]);
        b[4..].copy_from_slice(&p[2..]);
    }
    if symmetric && a > b {
        std::mem::swap(&mut a, &mut b);
    }
    mix(a.iter().chain(&b).chain(std::iter::once(&proto)))
}

/// The flow hash of a key (the IPv4 and IPv6 flow hashes share it): FNV-1a over the bytes,
/// then a murmur3 finaliser so every bit of the key reaches the low bits a caller takes the
/// hash modulo by.
#[inline]
pub(crate) fn mix<'a>(key: impl Iterator<Item = &'a u8>) -> u32 {
    let mut x = key.fold(0x811c_9dc5u32, |acc, &b| {
        (acc ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    x ^= x >> 16;
    x = x.wrapping_mul(0x85eb_ca6b);
    x ^= x >> 13;
    x = x.wrapping_mul(0xc2b2_ae35);
    x ^ (x >> 16)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// ICMP echo request 10.244.1.2 -> 10.244.2.3, TTL 64, DF, id 0x1c46, 8 bytes of ICMP.
    /// The header checksum is left 0 here and filled in by `ping()`.
    const PING: [u8; 28] = [
        0x45, 0x00, 0x00, 0x1c, // version 4, IHL 5, TOS 0, total length 28
        0x1c, 0x46, 0x40, 0x00, // ident 0x1c46, DF, offset 0
        0x40, 0x01, 0x00, 0x00, // TTL 64, ICMP, checksum (0 here)
        0x0a, 0xf4, 0x01, 0x02, // 10.244.1.2
        0x0a, 0xf4, 0x02, 0x03, // 10.244.2.3
        0x08, 0x00, 0xf7, 0xff, 0x00, 0x00, 0x00, 0x00, // echo request, id 0, seq 0
    ];

    fn ping() -> Vec<u8> {
        let mut p = PING.to_vec();
        let c = checksum::checksum(&p[..20]);
        p[10..12].copy_from_slice(&c.to_be_bytes());
        p
    }

    #[test]
    fn parse_fixture() {
        // The well-known header 192.168.0.1 -> 192.168.0.199 with checksum 0xb861.
        let mut bytes = vec![
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0xb8, 0x61, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        bytes.resize(0x73 + 4, 0xee); // payload plus 4 bytes of link padding
        let p = Ipv4Packet::new_checked(&bytes[..]).unwrap();
        assert_eq!(p.header_len(), 20);
        assert_eq!(p.total_len(), 0x73);
        assert_eq!(p.src(), Ipv4Addr::new(192, 168, 0, 1));
        assert_eq!(p.dst(), Ipv4Addr::new(192, 168, 0, 199));
        assert_eq!(p.protocol(), protocol::UDP);
        assert_eq!(p.ttl(), 64);
        assert_eq!(p.tos(), 0);
        assert_eq!(p.ident(), 0);
        assert!(p.dont_frag());
        assert!(!p.more_frags());
        assert_eq!(p.frag_offset(), 0);
        assert!(!p.is_fragment());
        assert!(p.verify_checksum());
        assert_eq!(p.payload().len(), 0x73 - 20, "padding is not payload");
        assert_eq!(p.packet().len(), 0x73);
        assert_eq!(p.into_payload(), &bytes[20..0x73]);
        assert_eq!(p.into_packet(), &bytes[..0x73]);
    }

    #[test]
    fn emit_fixture_matches_etherparse() {
        let repr = Ipv4Repr {
            src: Ipv4Addr::new(10, 244, 1, 2),
            dst: Ipv4Addr::new(10, 244, 2, 3),
            protocol: protocol::ICMP,
            ttl: 64,
            tos: 0,
            ident: 0x1c46,
            dont_frag: true,
            payload_len: 8,
        };
        let mut buf = [0u8; 28];
        buf[20..].copy_from_slice(&PING[20..]);
        repr.emit(&mut buf);
        assert_eq!(&buf[..], &ping()[..]);

        let eh = etherparse::Ipv4HeaderSlice::from_slice(&buf).unwrap();
        assert_eq!(eh.source_addr(), repr.src);
        assert_eq!(eh.destination_addr(), repr.dst);
        assert_eq!(eh.protocol(), etherparse::IpNumber::ICMP);
        assert_eq!(eh.ttl(), 64);
        assert_eq!(eh.identification(), 0x1c46);
        assert!(eh.dont_fragment());
        assert_eq!(eh.total_len(), 28);
        assert_eq!(
            eh.header_checksum(),
            eh.to_header().calc_header_checksum(),
            "etherparse agrees with our header checksum"
        );
    }

    #[test]
    fn rejects_bad_headers() {
        let good = ping();
        let mut v6 = good.clone();
        v6[0] = 0x65;
        assert_eq!(
            Ipv4Packet::new_checked(&v6[..]),
            Err(WireError::BadVersion(6))
        );
        let mut ihl = good.clone();
        ihl[0] = 0x44;
        assert_eq!(
            Ipv4Packet::new_checked(&ihl[..]),
            Err(WireError::BadHeaderLen(4))
        );
        let mut short_total = good.clone();
        short_total[2..4].copy_from_slice(&19u16.to_be_bytes());
        assert_eq!(
            Ipv4Packet::new_checked(&short_total[..]),
            Err(WireError::BadTotalLen(19))
        );
        let mut long_total = good.clone();
        long_total[2..4].copy_from_slice(&29u16.to_be_bytes());
        assert_eq!(
            Ipv4Packet::new_checked(&long_total[..]),
            Err(WireError::Truncated {
                layer: Layer::Ipv4,
                required: 29,
                len: 28
            })
        );
        let mut options_past_end = good.clone();
        options_past_end[0] = 0x4f; // 60-byte header in a 28-byte buffer
        assert_eq!(
            Ipv4Packet::new_checked(&options_past_end[..]),
            Err(WireError::Truncated {
                layer: Layer::Ipv4,
                required: 60,
                len: 28
            })
        );
        let mut bad_sum = good;
        bad_sum[8] = 63;
        assert!(!Ipv4Packet::new_checked(&bad_sum[..])
            .unwrap()
            .verify_checksum());
    }

    #[test]
    fn options_are_skipped() {
        // IHL 6: one 4-byte option (4 NOPs... here NOP NOP NOP EOL), then 4 payload bytes.
        let mut b = vec![
            0x46, 0, 0, 28, 0, 1, 0, 0, 64, 17, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2, 1, 1, 1, 0, 0xa,
            0xb, 0xc, 0xd,
        ];
        let mut p = Ipv4Packet::new_checked(&mut b[..]).unwrap();
        p.fill_checksum();
        assert!(p.verify_checksum());
        assert_eq!(p.header_len(), 24);
        assert_eq!(p.payload(), &[0xa, 0xb, 0xc, 0xd]);
        let eh = etherparse::Ipv4HeaderSlice::from_slice(&b).unwrap();
        assert_eq!(eh.header_checksum(), eh.to_header().calc_header_checksum());
    }

    #[test]
    fn fragments() {
        let mut b = ping();
        b[6..8].copy_from_slice(&0x2000u16.to_be_bytes()); // MF, offset 0: a first fragment
        let p = Ipv4Packet::new_checked(&b[..]).unwrap();
        assert!(p.more_frags() && p.is_fragment() && p.frag_offset() == 0 && !p.dont_frag());
        b[6..8].copy_from_slice(&0x00b9u16.to_be_bytes()); // last fragment at 185 * 8 bytes
        let p = Ipv4Packet::new_checked(&b[..]).unwrap();
        assert!(!p.more_frags() && p.is_fragment());
        assert_eq!(p.frag_offset(), 185);
    }

    #[test]
    fn setters_then_checksum() {
        let mut b = ping();
        b.extend_from_slice(&[0; 10]);
        let mut p = Ipv4Packet::new_checked(&mut b[..]).unwrap();
        p.set_ttl(3);
        p.set_ident(0xbeef);
        p.set_total_len(38);
        p.payload_mut()[8..].copy_from_slice(&[7; 10]);
        p.fill_checksum();
        assert!(p.verify_checksum());
        let p = Ipv4Packet::new_checked(p.into_inner()).unwrap();
        assert_eq!((p.ttl(), p.ident(), p.total_len()), (3, 0xbeef, 38));
        assert_eq!(&p.payload()[8..], &[7; 10]);
    }

    #[test]
    #[should_panic(expected = "outside header length")]
    fn set_total_len_refuses_to_break_the_invariant() {
        let mut b = ping();
        Ipv4Packet::new_checked(&mut b[..])
            .unwrap()
            .set_total_len(29);
    }

    #[test]
    fn every_truncation_is_an_error() {
        let b = ping();
        for n in 0..b.len() {
            assert!(
                matches!(
                    Ipv4Packet::new_checked(&b[..n]),
                    Err(WireError::Truncated { layer: Layer::Ipv4, required, len }) if len == n && required > n
                ),
                "prefix of {n} bytes"
            );
        }
        assert!(Ipv4Packet::new_checked(&b[..]).is_ok());
    }

    fn arb_repr() -> impl Strategy<Value = Ipv4Repr> {
        (
            any::<u32>(),
            any::<u32>(),
            any::<u8>(),
            any::<u8>(),
            any::<u8>(),
            any::<u16>(),
            any::<bool>(),
            0usize..2000,
        )
            .prop_map(
                |(s, d, protocol, ttl, tos, ident, dont_frag, payload_len)| Ipv4Repr {
                    src: s.into(),
                    dst: d.into(),
                    protocol,
                    ttl,
                    tos,
                    ident,
                    dont_frag,
                    payload_len,
                },
            )
    }

    proptest! {
        #[test]
        fn emit_parse_round_trip(repr in arb_repr()) {
            let mut buf = vec![0u8; HEADER_LEN + repr.payload_len];
            repr.emit(&mut buf);
            let p = Ipv4Packet::new_checked(&buf[..]).unwrap();
            prop_assert!(p.verify_checksum());
            prop_assert_eq!(Ipv4Repr::parse(&p), repr);
            let eh = etherparse::Ipv4HeaderSlice::from_slice(&buf).unwrap();
            prop_assert_eq!(eh.header_checksum(), eh.to_header().calc_header_checksum());
            prop_assert_eq!(usize::from(eh.total_len()), buf.len());
        }

        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..100)) {
            if let Ok(p) = Ipv4Packet::new_checked(&data[..]) {
                let _ = (p.src(), p.dst(), p.protocol(), p.ttl(), p.tos(), p.ident());
                let _ = (p.is_fragment(), p.verify_checksum(), p.header(), p.payload());
                prop_assert!(p.header_len() <= p.total_len() && p.total_len() <= data.len());
            }
        }
    }
    fn udp_or_tcp(
        proto: u8,
        src: [u8; 4],
        dst: [u8; 4],
        sport: u16,
        dport: u16,
        frag: u16,
    ) -> Vec<u8> {
        let mut p = vec![0u8; 28];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&28u16.to_be_bytes());
        p[6..8].copy_from_slice(&frag.to_be_bytes());
        p[8] = 64;
        p[9] = proto;
        p[12..16].copy_from_slice(&src);
        p[16..20].copy_from_slice(&dst);
        p[20..22].copy_from_slice(&sport.to_be_bytes());
        p[22..24].copy_from_slice(&dport.to_be_bytes());
        p
    }

    #[test]
    fn flow_hash_follows_the_flow() {
        let (a, b) = ([10, 244, 1, 2], [10, 244, 2, 2]);
        let base = udp_or_tcp(protocol::TCP, a, b, 40000, 5201, 0);
        // Same flow, other bytes (TTL, payload, ID) differ: same hash.
        let mut other = base.clone();
        other[8] = 12;
        other[4] = 99;
        other[27] = 7;
        assert_eq!(flow_hash(&base), flow_hash(&other));
        // Any field of the 5-tuple changes it (these particular values; a hash may collide).
        let variants = [
            udp_or_tcp(protocol::TCP, a, b, 40001, 5201, 0),
            udp_or_tcp(protocol::TCP, a, b, 40000, 5202, 0),
            udp_or_tcp(protocol::UDP, a, b, 40000, 5201, 0),
            udp_or_tcp(protocol::TCP, [10, 244, 1, 3], b, 40000, 5201, 0),
            udp_or_tcp(protocol::TCP, a, [10, 244, 3, 2], 40000, 5201, 0),
        ];
        for v in &variants {
            assert_ne!(flow_hash(&base), flow_hash(v));
        }
    }

    #[test]
    fn flow_hash_spreads_ports_over_the_low_bits() {
        // 4096 source ports into 16 buckets: every bucket used, none with more than twice its share.
        let mut buckets = [0u32; 16];
        for port in 30000..30000 + 4096u16 {
            let p = udp_or_tcp(
                protocol::TCP,
                [10, 244, 1, 2],
                [10, 244, 2, 2],
                port,
                5201,
                0,
            );
            buckets[flow_hash(&p) as usize % 16] += 1;
        }
        assert!(buckets.iter().all(|&n| n > 0 && n < 512), "{buckets:?}");
    }

    #[test]
    fn fragments_of_a_datagram_hash_alike_and_without_ports() {
        let (a, b) = ([10, 244, 1, 2], [10, 244, 2, 2]);
        let first = udp_or_tcp(protocol::UDP, a, b, 1111, 53, 0x2000); // MF
        let mut later = udp_or_tcp(protocol::UDP, a, b, 0, 0, 185); // offset, no ports
        later[20..28].copy_from_slice(b"payload!");
        assert_eq!(flow_hash(&first), flow_hash(&later));
        let whole = udp_or_tcp(protocol::UDP, a, b, 1111, 53, 0);
        assert_ne!(flow_hash(&whole), flow_hash(&first));
    }

    #[test]
    fn symmetric_flow_hash_pairs_a_packet_with_its_reply() {
        let (a, b) = ([10, 244, 1, 2], [10, 244, 2, 2]);
        for proto in [protocol::TCP, protocol::UDP] {
            let there = udp_or_tcp(proto, a, b, 40000, 5201, 0);
            let back = udp_or_tcp(proto, b, a, 5201, 40000, 0);
            assert_eq!(flow_hash_symmetric(&there), flow_hash_symmetric(&back));
            assert_ne!(
                flow_hash(&there),
                flow_hash(&back),
                "the plain hash is directed"
            );
            let other = udp_or_tcp(proto, a, b, 40001, 5201, 0);
            assert_ne!(flow_hash_symmetric(&there), flow_hash_symmetric(&other));
        }
        let ping = udp_or_tcp(protocol::ICMP, a, b, 0, 0, 0);
        let pong = udp_or_tcp(protocol::ICMP, b, a, 7, 7, 0);
        assert_eq!(flow_hash_symmetric(&ping), flow_hash_symmetric(&pong));
    }

    #[test]
    fn flow_hash_takes_any_bytes() {
        for len in 0..40 {
            let p = vec![0x4fu8; len];
            let _ = (flow_hash(&p), flow_hash_symmetric(&p));
        }
        assert_eq!(flow_hash(&[]), 0);
        // ICMP has no ports: the hash is of addresses and protocol only.
        let mut icmp = udp_or_tcp(protocol::ICMP, [1, 2, 3, 4], [5, 6, 7, 8], 1, 2, 0);
        let h = flow_hash(&icmp);
        icmp[20..24].copy_from_slice(&[9, 9, 9, 9]);
        assert_eq!(flow_hash(&icmp), h);
    }
}

//! IPv6 headers (RFC 8200): a checked zero-copy view, the walk over the extension headers to
//! the transport header, and an owned representation for building.
//!
//! [`Ipv6Packet::new_checked`] validates the version and the payload length once; every
//! accessor afterwards is panic-free. The extension headers are not checked then: the data
//! path only needs them for packets it filters or hashes, so [`Ipv6Packet::transport`] walks
//! them on demand and says where the transport header is, whether a fragment header made it
//! absent, and whether a routing header was on the way (the forwarder refuses those: a routing
//! header names further destinations past the one its route was chosen for).

use std::net::Ipv6Addr;

use crate::checksum;
use crate::error::{need, Layer, WireError};

/// Length of the fixed IPv6 header.
pub const HEADER_LEN: usize = 40;

/// The smallest MTU an IPv6 link may have (RFC 8200 section 5): no Packet Too Big may ask for
/// less.
pub const MIN_MTU: usize = 1280;

/// How many extension headers [`Ipv6Packet::transport`] follows before it gives up. RFC 8200
/// puts at most one of each kind in a chain (destination options twice): six, plus AH and room
/// for a tunnel's own. A longer chain is a packet built to make a parser work.
pub const MAX_EXT_HEADERS: usize = 8;

/// Next Header values used by podnet (IANA "Assigned Internet Protocol Numbers").
pub mod next_header {
    /// Hop-by-hop options (RFC 8200 section 4.3).
    pub const HOP_BY_HOP: u8 = 0;
    /// Transmission Control Protocol.
    pub const TCP: u8 = 6;
    /// User Datagram Protocol.
    pub const UDP: u8 = 17;
    /// Routing header (RFC 8200 section 4.4).
    pub const ROUTING: u8 = 43;
    /// Fragment header (RFC 8200 section 4.5).
    pub const FRAGMENT: u8 = 44;
    /// Encapsulating Security Payload (RFC 4303): what follows is opaque.
    pub const ESP: u8 = 50;
    /// Authentication header (RFC 4302).
    pub const AH: u8 = 51;
    /// ICMPv6 (RFC 4443).
    pub const ICMPV6: u8 = 58;
    /// No next header (RFC 8200 section 4.7).
    pub const NO_NEXT: u8 = 59;
    /// Destination options (RFC 8200 section 4.6).
    pub const DEST_OPTS: u8 = 60;
}

/// Byte offsets of the header fields.
mod field {
    use core::ops::Range;
    pub const PAYLOAD_LEN: Range<usize> = 4..6;
    pub const NEXT_HEADER: usize = 6;
    pub const HOP_LIMIT: usize = 7;
    pub const SRC: Range<usize> = 8..24;
    pub const DST: Range<usize> = 24..40;
}

/// A validated view of an IPv6 packet at the start of `buffer`.
///
/// Invariant (established by [`Ipv6Packet::new_checked`]): version 6 and
/// `40 + payload length <= buffer.len()`. Bytes after that (link padding) are ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv6Packet<T: AsRef<[u8]>> {
    buffer: T,
}

/// Where an IPv6 packet's transport header is, found by [`Ipv6Packet::transport`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transport {
    /// The Next Header value that ended the walk: TCP, UDP, ICMPv6, ESP, no next header, or
    /// (after a non-first fragment) whatever the fragment header names.
    pub protocol: u8,
    /// Where that header starts, from the start of the IPv6 header.
    pub offset: usize,
    /// The fragment header on the way, if any.
    pub fragment: Option<Fragment>,
    /// Whether a routing header was on the way.
    pub routing: bool,
}

impl Transport {
    /// Whether the bytes at [`Transport::offset`] are the start of the transport header: not
    /// when a fragment header says they are the middle of a datagram.
    pub fn header_present(&self) -> bool {
        self.fragment.is_none_or(|f| f.offset == 0)
    }
}

/// The fields of a fragment header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fragment {
    /// Offset of this fragment's data, in 8-byte units.
    pub offset: u16,
    /// More fragments follow.
    pub more: bool,
    /// Identification.
    pub ident: u32,
}

impl<T: AsRef<[u8]>> Ipv6Packet<T> {
    /// Validates `buf` as an IPv6 packet: version 6 and `40 + payload length <= buf.len()`.
    /// A payload length of 0 is taken as it stands (jumbograms, RFC 2675, are not carried: their
    /// hop-by-hop header then lies past the payload and [`transport`](Self::transport) refuses
    /// it as truncated).
    pub fn new_checked(buf: T) -> Result<Self, WireError> {
        let b = buf.as_ref();
        need(Layer::Ipv6, b, HEADER_LEN)?;
        let version = b[0] >> 4;
        if version != 6 {
            return Err(WireError::NotIpv6(version));
        }
        let payload_len = usize::from(u16::from_be_bytes([b[4], b[5]]));
        need(Layer::Ipv6, b, HEADER_LEN + payload_len)?;
        Ok(Ipv6Packet { buffer: buf })
    }

    fn b(&self) -> &[u8] {
        self.buffer.as_ref()
    }

    /// Traffic class (DSCP and ECN).
    pub fn traffic_class(&self) -> u8 {
        let b = self.b();
        (b[0] << 4) | (b[1] >> 4)
    }

    /// Flow label (20 bits).
    pub fn flow_label(&self) -> u32 {
        let b = self.b();
        u32::from_be_bytes([0, b[1] & 0x0f, b[2], b[3]])
    }

    /// Payload length field: everything after the fixed header, extension headers included.
    pub fn payload_len(&self) -> usize {
        let b = &self.b()[field::PAYLOAD_LEN];
        usize::from(u16::from_be_bytes([b[0], b[1]]))
    }

    /// The Next Header field of the fixed header.
    pub fn next_header(&self) -> u8 {
        self.b()[field::NEXT_HEADER]
    }

    /// Hop limit.
    pub fn hop_limit(&self) -> u8 {
        self.b()[field::HOP_LIMIT]
    }

    /// Source address.
    pub fn src(&self) -> Ipv6Addr {
        addr(&self.b()[field::SRC])
    }

    /// Destination address.
    pub fn dst(&self) -> Ipv6Addr {
        addr(&self.b()[field::DST])
    }

    /// The fixed header.
    pub fn header(&self) -> &[u8] {
        &self.b()[..HEADER_LEN]
    }

    /// Everything after the fixed header (extension headers and upper layer), without padding.
    pub fn payload(&self) -> &[u8] {
        &self.b()[HEADER_LEN..HEADER_LEN + self.payload_len()]
    }

    /// The whole packet, without link padding.
    pub fn packet(&self) -> &[u8] {
        &self.b()[..HEADER_LEN + self.payload_len()]
    }

    /// Walks the extension headers (hop-by-hop, routing, destination options, fragment, AH)
    /// to the first header that is none of them. Fails when a header runs past the payload,
    /// a hop-by-hop header is not the first, or the chain is longer than [`MAX_EXT_HEADERS`].
    /// A non-first fragment ends the walk at its fragment header: what follows is data.
    pub fn transport(&self) -> Result<Transport, WireError> {
        let packet = self.packet();
        let mut walk = Transport {
            protocol: self.next_header(),
            offset: HEADER_LEN,
            fragment: None,
            routing: false,
        };
        for count in 0..=MAX_EXT_HEADERS {
            let at = walk.offset;
            let len = match walk.protocol {
                next_header::HOP_BY_HOP if count > 0 => return Err(WireError::HopByHopNotFirst),
                next_header::HOP_BY_HOP | next_header::ROUTING | next_header::DEST_OPTS => {
                    need(Layer::Ipv6Ext, packet, at + 2)?;
                    (usize::from(packet[at + 1]) + 1) * 8
                }
                next_header::FRAGMENT => 8,
                // RFC 4302 section 2.2: the length is in 4-byte units, minus 2.
                next_header::AH => {
                    need(Layer::Ipv6Ext, packet, at + 2)?;
                    (usize::from(packet[at + 1]) + 2) * 4
                }
                _ => return Ok(walk),
            };
            if count == MAX_EXT_HEADERS {
                break;
            }
            need(Layer::Ipv6Ext, packet, at + len)?;
            let header = &packet[at..at + len];
            walk.routing |= walk.protocol == next_header::ROUTING;
            if walk.protocol == next_header::FRAGMENT {
                let word = u16::from_be_bytes([header[2], header[3]]);
                walk.fragment = Some(Fragment {
                    offset: word >> 3,
                    more: word & 1 != 0,
                    ident: u32::from_be_bytes([header[4], header[5], header[6], header[7]]),
                });
            }
            walk.protocol = header[0];
            walk.offset = at + len;
            if !walk.header_present() {
                return Ok(walk);
            }
        }
        Err(WireError::TooManyExtHeaders(MAX_EXT_HEADERS))
    }

    /// Consumes the view, returning the buffer.
    pub fn into_inner(self) -> T {
        self.buffer
    }
}

impl<'a> Ipv6Packet<&'a [u8]> {
    /// [`payload`](Self::payload) with the buffer's lifetime.
    pub fn into_payload(self) -> &'a [u8] {
        let len = self.payload_len();
        &self.buffer[HEADER_LEN..HEADER_LEN + len]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Ipv6Packet<T> {
    /// Sets the hop limit (IPv6 has no header checksum to fix).
    pub fn set_hop_limit(&mut self, hops: u8) {
        self.buffer.as_mut()[field::HOP_LIMIT] = hops;
    }
}

fn addr(b: &[u8]) -> Ipv6Addr {
    let mut octets = [0u8; 16];
    octets.copy_from_slice(&b[..16]);
    Ipv6Addr::from(octets)
}

/// A fixed IPv6 header, for building packets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv6Repr {
    /// Source address.
    pub src: Ipv6Addr,
    /// Destination address.
    pub dst: Ipv6Addr,
    /// The Next Header field (see [`next_header`]).
    pub next_header: u8,
    /// Hop limit.
    pub hop_limit: u8,
    /// Traffic class (DSCP and ECN).
    pub traffic_class: u8,
    /// Flow label (the low 20 bits are used).
    pub flow_label: u32,
    /// Payload length in bytes (at most 65535).
    pub payload_len: usize,
}

impl Ipv6Repr {
    /// The fields of a validated packet's fixed header.
    pub fn parse<T: AsRef<[u8]>>(packet: &Ipv6Packet<T>) -> Ipv6Repr {
        Ipv6Repr {
            src: packet.src(),
            dst: packet.dst(),
            next_header: packet.next_header(),
            hop_limit: packet.hop_limit(),
            traffic_class: packet.traffic_class(),
            flow_label: packet.flow_label(),
            payload_len: packet.payload_len(),
        }
    }

    /// Writes the 40-byte header into `buf[..40]`.
    ///
    /// A `payload_len` above 65535 is a caller bug; the field is then clamped to 65535 (and a
    /// debug build panics).
    ///
    /// # Panics
    /// If `buf` is shorter than 40 bytes.
    pub fn emit(&self, buf: &mut [u8]) {
        debug_assert!(
            self.payload_len <= usize::from(u16::MAX),
            "IPv6 payload {} too long",
            self.payload_len
        );
        let len = u16::try_from(self.payload_len).unwrap_or(u16::MAX);
        let h = &mut buf[..HEADER_LEN];
        let first =
            (6u32 << 28) | (u32::from(self.traffic_class) << 20) | (self.flow_label & 0xfffff);
        h[..4].copy_from_slice(&first.to_be_bytes());
        h[field::PAYLOAD_LEN].copy_from_slice(&len.to_be_bytes());
        h[field::NEXT_HEADER] = self.next_header;
        h[field::HOP_LIMIT] = self.hop_limit;
        h[field::SRC].copy_from_slice(&self.src.octets());
        h[field::DST].copy_from_slice(&self.dst.octets());
    }
}

/// The running sum of the IPv6 pseudo header for an upper-layer checksum (RFC 8200 section
/// 8.1): source, destination, the upper-layer length and the next header value.
pub fn pseudo_header(src: Ipv6Addr, dst: Ipv6Addr, next_header: u8, len: u32) -> u64 {
    let addrs = checksum::partial(&src.octets(), checksum::partial(&dst.octets(), 0));
    addrs + u64::from(len >> 16) + u64::from(len & 0xffff) + u64::from(next_header)
}

/// A hash of the flow an IPv6 packet belongs to, like [`crate::ipv4::flow_hash`]: its
/// addresses, its upper-layer protocol and, for TCP and UDP with their header present, the
/// ports. The flow label is left out: a host may change it in the middle of a flow (RFC 6437
/// lets it), and the packets of a flow must hash alike. Never panics: a packet that is not a
/// valid IPv6 packet, or whose extension headers do not parse, hashes by what the fixed header
/// holds.
pub fn flow_hash(packet: &[u8]) -> u32 {
    let Ok(ip) = Ipv6Packet::new_checked(packet) else {
        return packet
            .get(8..HEADER_LEN)
            .map_or(0, |a| crate::ipv4::mix(a.iter()));
    };
    let (protocol, ports) = match ip.transport() {
        Ok(t) => {
            let ports = match t.protocol {
                next_header::TCP | next_header::UDP if t.header_present() => {
                    ip.packet().get(t.offset..t.offset + 4)
                }
                _ => None,
            };
            (t.protocol, ports)
        }
        Err(_) => (ip.next_header(), None),
    };
    let key = packet[8..HEADER_LEN]
        .iter()
        .chain(ports.unwrap_or(&[]))
        .chain(std::iter::once(&protocol));
    crate::ipv4::mix(key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SRC: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x244, 1, 0, 0, 0, 2);
    const DST: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x244, 2, 0, 0, 0, 3);

    /// A UDP datagram SRC -> DST behind `exts` (each an extension header kind and its bytes,
    /// whose first byte is filled in with the next one's kind), built by hand.
    fn packet(exts: &[(u8, Vec<u8>)], payload: &[u8]) -> Vec<u8> {
        let mut body = Vec::new();
        for (i, (_, bytes)) in exts.iter().enumerate() {
            let mut h = bytes.clone();
            h[0] = exts.get(i + 1).map_or(next_header::UDP, |e| e.0);
            body.extend_from_slice(&h);
        }
        let mut udp = vec![0x30, 0x39, 0x00, 0x35, 0, 0, 0, 0];
        udp.extend_from_slice(payload);
        let udp_len = udp.len() as u16;
        udp[4..6].copy_from_slice(&udp_len.to_be_bytes());
        body.extend_from_slice(&udp);
        let repr = Ipv6Repr {
            src: SRC,
            dst: DST,
            next_header: exts.first().map_or(next_header::UDP, |e| e.0),
            hop_limit: 64,
            traffic_class: 0xb8,
            flow_label: 0x12345,
            payload_len: body.len(),
        };
        let mut p = vec![0u8; HEADER_LEN];
        repr.emit(&mut p);
        p.extend_from_slice(&body);
        p
    }

    /// An options-style extension header (hop-by-hop, routing, destination options) of
    /// `words` 8-byte units, padded with PadN.
    fn options(words: usize) -> Vec<u8> {
        let mut h = vec![0u8; words * 8];
        h[1] = (words - 1) as u8;
        h[2] = 1; // PadN
        h[3] = (words * 8 - 4) as u8;
        h
    }

    fn fragment(offset: u16, more: bool, ident: u32) -> Vec<u8> {
        let mut h = vec![0u8; 8];
        h[2..4].copy_from_slice(&((offset << 3) | u16::from(more)).to_be_bytes());
        h[4..8].copy_from_slice(&ident.to_be_bytes());
        h
    }

    /// An AH of `words32` 4-byte units (at least 3: the fixed part is 12 bytes).
    fn ah(words32: usize) -> Vec<u8> {
        let mut h = vec![0u8; words32 * 4];
        h[1] = (words32 - 2) as u8;
        h
    }

    #[test]
    fn fixed_header_fields_match_etherparse() {
        let p = packet(&[], b"hello");
        let ip = Ipv6Packet::new_checked(&p[..]).unwrap();
        let eh = etherparse::Ipv6HeaderSlice::from_slice(&p).unwrap();
        assert_eq!(ip.src(), eh.source_addr());
        assert_eq!(ip.dst(), eh.destination_addr());
        assert_eq!(ip.next_header(), eh.next_header().0);
        assert_eq!(ip.hop_limit(), eh.hop_limit());
        assert_eq!(ip.traffic_class(), eh.traffic_class());
        assert_eq!(ip.flow_label(), eh.flow_label().value());
        assert_eq!(ip.payload_len(), usize::from(eh.payload_length()));
        assert_eq!((ip.traffic_class(), ip.flow_label()), (0xb8, 0x12345));
        let t = ip.transport().unwrap();
        assert_eq!(
            t,
            Transport {
                protocol: next_header::UDP,
                offset: 40,
                fragment: None,
                routing: false
            }
        );
        assert_eq!(&p[t.offset + 8..], b"hello");
    }

    #[test]
    fn checked_view_refuses_short_buffers_and_other_versions() {
        let p = packet(&[], b"hello");
        assert_eq!(
            Ipv6Packet::new_checked(&p[..39]),
            Err(WireError::Truncated {
                layer: Layer::Ipv6,
                required: 40,
                len: 39
            })
        );
        let mut v4 = p.clone();
        v4[0] = 0x45;
        assert_eq!(Ipv6Packet::new_checked(&v4[..]), Err(WireError::NotIpv6(4)));
        // A payload length past the buffer; padding after it is ignored.
        assert_eq!(
            Ipv6Packet::new_checked(&p[..p.len() - 1]),
            Err(WireError::Truncated {
                layer: Layer::Ipv6,
                required: p.len(),
                len: p.len() - 1
            })
        );
        let mut padded = p.clone();
        padded.extend_from_slice(&[0xee; 6]);
        let ip = Ipv6Packet::new_checked(&padded[..]).unwrap();
        assert_eq!(ip.packet(), &p[..]);
        assert_eq!(ip.into_payload(), &p[40..]);
    }

    #[test]
    fn the_walk_crosses_every_extension_header_kind() {
        let exts = [
            (next_header::HOP_BY_HOP, options(1)),
            (next_header::DEST_OPTS, options(2)),
            (next_header::ROUTING, options(3)),
            (next_header::FRAGMENT, fragment(0, true, 0xdead_beef)),
            (next_header::AH, ah(6)),
            (next_header::DEST_OPTS, options(1)),
        ];
        let p = packet(&exts, b"data");
        let t = Ipv6Packet::new_checked(&p[..])
            .unwrap()
            .transport()
            .unwrap();
        assert_eq!(t.protocol, next_header::UDP);
        assert_eq!(t.offset, 40 + 8 + 16 + 24 + 8 + 24 + 8);
        assert!(t.routing);
        assert_eq!(
            t.fragment,
            Some(Fragment {
                offset: 0,
                more: true,
                ident: 0xdead_beef
            })
        );
        assert!(t.header_present());
        // etherparse finds the same transport header.
        let eh = etherparse::Ipv6Slice::from_slice(&p).unwrap();
        assert_eq!(eh.payload().ip_number.0, t.protocol);
        assert_eq!(eh.payload().payload, &p[t.offset..]);
    }

    #[test]
    fn a_later_fragment_ends_the_walk_without_a_transport_header() {
        let p = packet(&[(next_header::FRAGMENT, fragment(185, false, 7))], b"tail");
        let t = Ipv6Packet::new_checked(&p[..])
            .unwrap()
            .transport()
            .unwrap();
        assert_eq!(t.offset, 48);
        assert_eq!(t.fragment.map(|f| (f.offset, f.more)), Some((185, false)));
        assert!(!t.header_present());
    }

    #[test]
    fn malformed_chains_are_refused_by_reason() {
        // A hop-by-hop header after another extension header.
        let p = packet(
            &[
                (next_header::DEST_OPTS, options(1)),
                (next_header::HOP_BY_HOP, options(1)),
            ],
            b"",
        );
        let ip = Ipv6Packet::new_checked(&p[..]).unwrap();
        assert_eq!(ip.transport(), Err(WireError::HopByHopNotFirst));
        // A header whose length runs past the payload: cut the packet inside a routing header.
        let p = packet(&[(next_header::ROUTING, options(4))], b"");
        let mut cut = p[..40 + 16].to_vec();
        cut[4..6].copy_from_slice(&16u16.to_be_bytes());
        let ip = Ipv6Packet::new_checked(&cut[..]).unwrap();
        assert_eq!(
            ip.transport(),
            Err(WireError::Truncated {
                layer: Layer::Ipv6Ext,
                required: 40 + 32,
                len: 56
            })
        );
        // A chain that ends right after the fixed header.
        let mut bare = packet(&[], b"");
        bare[6] = next_header::FRAGMENT;
        bare[4..6].copy_from_slice(&0u16.to_be_bytes());
        bare.truncate(40);
        let ip = Ipv6Packet::new_checked(&bare[..]).unwrap();
        assert_eq!(
            ip.transport(),
            Err(WireError::Truncated {
                layer: Layer::Ipv6Ext,
                required: 48,
                len: 40
            })
        );
        // Nine destination options headers: one more than the walk follows.
        let long: Vec<_> = (0..9)
            .map(|_| (next_header::DEST_OPTS, options(1)))
            .collect();
        let p = packet(&long, b"");
        let ip = Ipv6Packet::new_checked(&p[..]).unwrap();
        assert_eq!(
            ip.transport(),
            Err(WireError::TooManyExtHeaders(MAX_EXT_HEADERS))
        );
        let eight = packet(&long[..8], b"");
        assert!(Ipv6Packet::new_checked(&eight[..])
            .unwrap()
            .transport()
            .is_ok());
    }

    #[test]
    fn repr_round_trips_and_the_hop_limit_is_writable() {
        let mut p = packet(&[(next_header::DEST_OPTS, options(1))], b"x");
        let repr = Ipv6Repr::parse(&Ipv6Packet::new_checked(&p[..]).unwrap());
        let mut again = vec![0u8; 40];
        repr.emit(&mut again);
        assert_eq!(&again[..], &p[..40]);
        let mut ip = Ipv6Packet::new_checked(&mut p[..]).unwrap();
        ip.set_hop_limit(63);
        assert_eq!(ip.hop_limit(), 63);
    }

    #[test]
    fn pseudo_header_checksum_matches_etherparse() {
        let payload = b"pseudo header";
        let mut buf = Vec::new();
        etherparse::PacketBuilder::ipv6(SRC.octets(), DST.octets(), 64)
            .udp(4000, 53)
            .write(&mut buf, payload)
            .unwrap();
        let udp = &buf[40..];
        let sum = pseudo_header(SRC, DST, next_header::UDP, udp.len() as u32);
        // A datagram whose checksum field is right sums to zero with its pseudo header.
        assert_eq!(checksum::finish(checksum::partial(udp, sum)), 0);
    }

    #[test]
    fn flow_hash_covers_ports_behind_extension_headers_and_skips_the_flow_label() {
        let a = packet(&[(next_header::DEST_OPTS, options(1))], b"a");
        let mut relabelled = a.clone();
        relabelled[3] ^= 0x55;
        assert_eq!(flow_hash(&a), flow_hash(&relabelled));
        let mut other_port = a.clone();
        other_port[48 + 1] ^= 1;
        assert_ne!(flow_hash(&a), flow_hash(&other_port));
        // A later fragment has no ports to hash; a truncated packet still hashes.
        let later = packet(&[(next_header::FRAGMENT, fragment(10, false, 1))], b"abcd");
        let mut later_other = later.clone();
        later_other[48 + 1] ^= 1;
        assert_eq!(flow_hash(&later), flow_hash(&later_other));
        assert_eq!(flow_hash(&a[..30]), flow_hash(&a[..30]));
        assert_eq!(flow_hash(&[]), 0);
    }

    fn ext_kind() -> impl Strategy<Value = u8> {
        prop_oneof![
            Just(next_header::DEST_OPTS),
            Just(next_header::ROUTING),
            Just(next_header::FRAGMENT),
            Just(next_header::AH),
        ]
    }

    proptest! {
        /// Any well-formed chain (a hop-by-hop header first or none, then up to the walk's
        /// limit of the others, a first fragment at most) reaches the same transport header
        /// etherparse finds.
        #[test]
        fn walk_agrees_with_etherparse(
            hbh in any::<bool>(),
            kinds in proptest::collection::vec((ext_kind(), 1usize..4), 0..6),
            payload in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let mut exts = Vec::new();
            if hbh {
                exts.push((next_header::HOP_BY_HOP, options(1)));
            }
            let mut fragmented = false;
            for (kind, size) in kinds {
                let bytes = match kind {
                    next_header::FRAGMENT if fragmented => continue,
                    next_header::FRAGMENT => { fragmented = true; fragment(0, true, 9) }
                    next_header::AH => ah(size + 2),
                    _ => options(size),
                };
                exts.push((kind, bytes));
            }
            let p = packet(&exts, &payload);
            let t = Ipv6Packet::new_checked(&p[..]).unwrap().transport().unwrap();
            let eh = etherparse::Ipv6Slice::from_slice(&p).unwrap();
            prop_assert_eq!(eh.payload().ip_number.0, t.protocol);
            prop_assert_eq!(eh.payload().payload, &p[t.offset..]);
            prop_assert_eq!(t.routing, exts.iter().any(|e| e.0 == next_header::ROUTING));
        }

        /// Arbitrary bytes never make the view or the walk panic, and a walk that succeeds
        /// stays inside the packet.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = flow_hash(&bytes);
            if let Ok(ip) = Ipv6Packet::new_checked(&bytes[..]) {
                if let Ok(t) = ip.transport() {
                    prop_assert!(t.offset <= ip.packet().len());
                }
            }
        }
    }
}

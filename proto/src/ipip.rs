//! IP-in-IP encapsulation (RFC 2003) with ECN handling per RFC 6040.
//!
//! The outer header is a plain 20-byte IPv4 header with protocol 4, written into headroom in
//! front of the pod's packet; the result goes to an `IP_HDRINCL` raw socket. On receive the raw
//! socket hands over the whole outer packet, which [`decapsulate`] checks before trusting it.

use std::net::Ipv4Addr;

use crate::error::{Layer, WireError};
use crate::ipv4::{self, protocol, Ipv4Packet, Ipv4Repr};

/// Bytes the outer header adds.
pub const OVERHEAD: usize = ipv4::HEADER_LEN;

/// TTL of the outer header (the kernel's default `ip_default_ttl`).
pub const OUTER_TTL: u8 = 64;

/// Prepends an outer IPv4 header to the inner IPv4 packet at `buf[start..start + inner_len]`,
/// writing into the headroom `buf[start - 20..start]`. Returns the new start: the outer packet is
/// `buf[new_start..start + inner_len]`.
///
/// The outer header has protocol 4, TTL 64, the given identification and a valid checksum. Its
/// TOS byte is copied from the inner header: DSCP as in the uniform model (RFC 2983) and ECN as
/// in RFC 6040 normal mode, so congestion marks set on the underlay can be propagated back. DF is
/// copied from the inner header (RFC 2003 section 3.1), so path-MTU discovery keeps working
/// end to end.
///
/// Errors if the inner bytes are not a valid IPv4 packet or the result would exceed 65535 bytes.
///
/// # Panics
/// If `start < 20` or `start + inner_len > buf.len()`: the caller's buffer bookkeeping is wrong.
pub fn encapsulate(
    buf: &mut [u8],
    start: usize,
    inner_len: usize,
    outer_src: Ipv4Addr,
    outer_dst: Ipv4Addr,
    ident: u16,
) -> Result<usize, WireError> {
    assert!(
        start >= OVERHEAD,
        "IP-in-IP encapsulation needs {OVERHEAD} bytes of headroom, packet starts at {start}"
    );
    let inner = Ipv4Packet::new_checked(&buf[start..start + inner_len])?;
    let outer = outer_header(&inner, inner_len, outer_src, outer_dst, ident)?;
    let new_start = start - OVERHEAD;
    outer.emit(&mut buf[new_start..start]);
    Ok(new_start)
}

/// The outer header [`encapsulate`] writes in front of an `inner_len`-byte inner packet whose
/// TOS and DF are those of `inner`, for senders that emit it apart from the inner bytes (a
/// segmenter handing the kernel header and payload slices: `inner` is then the super-packet
/// and `inner_len` one segment's length, which shares its TOS and DF).
///
/// Errors if the outer packet would exceed 65535 bytes.
pub fn outer_header<T: AsRef<[u8]>>(
    inner: &Ipv4Packet<T>,
    inner_len: usize,
    outer_src: Ipv4Addr,
    outer_dst: Ipv4Addr,
    ident: u16,
) -> Result<Ipv4Repr, WireError> {
    if inner_len > ipv4::MAX_PAYLOAD_LEN {
        return Err(WireError::BadTotalLen(u16::MAX));
    }
    Ok(Ipv4Repr {
        src: outer_src,
        dst: outer_dst,
        protocol: protocol::IPIP,
        ttl: OUTER_TTL,
        tos: inner.tos(),
        ident,
        dont_frag: inner.dont_frag(),
        payload_len: inner_len,
    })
}

/// Checks an outer packet as a raw socket delivers it and returns its source address and the
/// inner bytes (not yet validated as IPv4).
///
/// Checks, in order: version 4, IHL, total length against the buffer, header checksum,
/// protocol 4, and that it is not a fragment (podnet never fragments its own outer packets, and
/// a raw socket sees reassembled packets, so a fragment here is junk).
pub fn decapsulate(outer: &[u8]) -> Result<(Ipv4Addr, &[u8]), WireError> {
    let p = Ipv4Packet::new_checked_at(outer, Layer::OuterIpv4)?;
    if !p.verify_checksum() {
        return Err(WireError::BadChecksum(Layer::OuterIpv4));
    }
    if p.protocol() != protocol::IPIP {
        return Err(WireError::WrongProtocol(p.protocol()));
    }
    if p.is_fragment() {
        return Err(WireError::Fragmented);
    }
    Ok((p.src(), p.into_payload()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// An IP-in-IP packet as `tcpdump -xx -i eth0 ip proto 4` shows it (Ethernet stripped):
    /// node 198.18.0.1 carries pod 10.244.1.2's ping to 10.244.2.3 to node 198.18.0.2. The kernel's
    /// ipip driver builds the same header: TTL 64, DF and TOS inherited from the inner packet.
    const PACKET: &[u8] = &[
        // outer IPv4: TOS 0x02 (ECT(0)), total 48, id 0x0001, DF, TTL 64, proto 4, checksum 0xae9f
        0x45, 0x02, 0x00, 0x30, 0x00, 0x01, 0x40, 0x00, 0x40, 0x04, 0xae, 0x9f, 0xc6, 0x12, 0x00,
        0x01, 0xc6, 0x12, 0x00, 0x02,
        // inner IPv4: TOS 0x02, total 28, id 0x1c46, DF, TTL 64, ICMP, checksum 0x05ad
        0x45, 0x02, 0x00, 0x1c, 0x1c, 0x46, 0x40, 0x00, 0x40, 0x01, 0x05, 0xad, 0x0a, 0xf4, 0x01,
        0x02, 0x0a, 0xf4, 0x02, 0x03, // ICMP echo request, id 0, seq 0
        0x08, 0x00, 0xf7, 0xff, 0x00, 0x00, 0x00, 0x00,
    ];
    const H1: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
    const H2: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);

    #[test]
    fn fixture_checks_out_with_etherparse() {
        let outer = etherparse::Ipv4Slice::from_slice(PACKET).unwrap();
        let h = outer.header();
        assert_eq!(h.header_checksum(), h.to_header().calc_header_checksum());
        assert_eq!(outer.payload_ip_number(), etherparse::IpNumber::IPV4);
        let inner = etherparse::Ipv4HeaderSlice::from_slice(outer.payload().payload).unwrap();
        assert_eq!(
            inner.header_checksum(),
            inner.to_header().calc_header_checksum()
        );
    }

    #[test]
    fn encapsulate_reproduces_fixture() {
        let mut buf = vec![0xaa; 24 + 28];
        buf[24..].copy_from_slice(&PACKET[20..]);
        let start = encapsulate(&mut buf, 24, 28, H1, H2, 1).unwrap();
        assert_eq!(start, 4);
        assert_eq!(&buf[start..], PACKET);
        assert_eq!(&buf[..start], &[0xaa; 4], "wrote outside headroom");
    }

    #[test]
    fn decapsulate_fixture() {
        assert_eq!(decapsulate(PACKET), Ok((H1, &PACKET[20..])));
        // Link-layer padding after total length is not part of the inner packet.
        let mut padded = PACKET.to_vec();
        padded.extend_from_slice(&[0; 6]);
        assert_eq!(decapsulate(&padded), Ok((H1, &PACKET[20..])));
    }

    #[test]
    fn outer_copies_tos_and_df_from_inner() {
        for (tos, df) in [(0x00, false), (0xb8, true), (0x03, true), (0x01, false)] {
            let mut buf = vec![0u8; 20 + 28];
            buf[20..].copy_from_slice(&PACKET[20..]);
            buf[21] = tos;
            buf[26] = if df { 0x40 } else { 0 };
            let start = encapsulate(&mut buf, 20, 28, H1, H2, 7).unwrap();
            let outer = Ipv4Packet::new_checked(&buf[start..]).unwrap();
            assert_eq!(outer.tos(), tos);
            assert_eq!(outer.dont_frag(), df);
            assert_eq!(outer.ttl(), OUTER_TTL);
            assert!(outer.verify_checksum());
        }
    }

    #[test]
    fn outer_header_for_a_segment_matches_encapsulating_it() {
        // A "super-packet" with TOS 0xb8 and DF; a 28-byte segment of it gets the header
        // encapsulate gives the segment itself.
        let mut sup = vec![0u8; 1000];
        sup[..28].copy_from_slice(&PACKET[20..]);
        sup[1] = 0xb8;
        sup[2..4].copy_from_slice(&1000u16.to_be_bytes());
        let sup = Ipv4Packet::new_checked(&sup[..]).unwrap();
        let mut seg = vec![0u8; 20 + 28];
        seg[20..].copy_from_slice(&PACKET[20..]);
        seg[21] = 0xb8;
        encapsulate(&mut seg, 20, 28, H1, H2, 9).unwrap();
        let mut out = [0u8; OVERHEAD];
        outer_header(&sup, 28, H1, H2, 9).unwrap().emit(&mut out);
        assert_eq!(&out[..], &seg[..20]);
        assert_eq!(
            outer_header(&sup, ipv4::MAX_PAYLOAD_LEN + 1, H1, H2, 0),
            Err(WireError::BadTotalLen(u16::MAX))
        );
    }

    #[test]
    fn encapsulate_rejects_non_ipv4_and_oversize() {
        let mut buf = vec![0u8; 20 + 40];
        buf[20] = 0x60; // IPv6
        assert_eq!(
            encapsulate(&mut buf, 20, 40, H1, H2, 0),
            Err(WireError::BadVersion(6))
        );
        let mut big = vec![0u8; 20 + 65535];
        Ipv4Repr {
            src: H1,
            dst: H2,
            protocol: protocol::UDP,
            ttl: 64,
            tos: 0,
            ident: 0,
            dont_frag: true,
            payload_len: 65535 - 20,
        }
        .emit(&mut big[20..]);
        assert_eq!(
            encapsulate(&mut big, 20, 65535, H1, H2, 0),
            Err(WireError::BadTotalLen(u16::MAX))
        );
        assert_eq!(encapsulate(&mut big, 20, 65535 - 20, H1, H2, 0).ok(), None);
    }

    #[test]
    #[should_panic(expected = "headroom")]
    fn encapsulate_without_headroom_is_a_bug() {
        let mut buf = PACKET[20..].to_vec();
        let _ = encapsulate(&mut buf, 0, 28, H1, H2, 0);
    }

    #[test]
    fn decapsulate_rejects_bad_outer() {
        let with = |i: usize, v: u8| {
            let mut p = PACKET.to_vec();
            p[i] = v;
            p
        };
        assert_eq!(decapsulate(&with(0, 0x65)), Err(WireError::BadVersion(6)));
        assert_eq!(decapsulate(&with(0, 0x43)), Err(WireError::BadHeaderLen(3)));
        assert_eq!(decapsulate(&with(3, 0x10)), Err(WireError::BadTotalLen(16)));
        assert_eq!(
            decapsulate(&with(3, 0x31)),
            Err(WireError::Truncated {
                layer: Layer::OuterIpv4,
                required: 49,
                len: 48
            })
        );
        assert_eq!(
            decapsulate(&with(8, 63)),
            Err(WireError::BadChecksum(Layer::OuterIpv4))
        );
        let refill = |mut p: Vec<u8>| {
            Ipv4Packet::new_checked(&mut p[..]).unwrap().fill_checksum();
            p
        };
        assert_eq!(
            decapsulate(&refill(with(9, protocol::UDP))),
            Err(WireError::WrongProtocol(protocol::UDP))
        );
        assert_eq!(
            decapsulate(&refill(with(6, 0x60))), // DF + MF
            Err(WireError::Fragmented)
        );
        assert_eq!(
            decapsulate(&refill(with(7, 0x01))), // DF, offset 8
            Err(WireError::Fragmented)
        );
    }

    #[test]
    fn every_truncation_is_an_error() {
        for n in 0..PACKET.len() {
            assert!(
                matches!(
                    decapsulate(&PACKET[..n]),
                    Err(WireError::Truncated { layer: Layer::OuterIpv4, len, .. }) if len == n
                ),
                "prefix of {n} bytes"
            );
        }
    }

    fn inner_packet() -> impl Strategy<Value = Vec<u8>> {
        (
            any::<u8>(),
            any::<u16>(),
            any::<bool>(),
            any::<u8>(),
            proptest::collection::vec(any::<u8>(), 0..1500),
        )
            .prop_map(|(tos, ident, dont_frag, ttl, payload)| {
                let mut p = vec![0u8; 20 + payload.len()];
                Ipv4Repr {
                    src: Ipv4Addr::new(10, 244, 1, 2),
                    dst: Ipv4Addr::new(10, 244, 2, 3),
                    protocol: protocol::TCP,
                    ttl,
                    tos,
                    ident,
                    dont_frag,
                    payload_len: payload.len(),
                }
                .emit(&mut p);
                p[20..].copy_from_slice(&payload);
                p
            })
    }

    proptest! {
        #[test]
        fn encap_decap_round_trip(
            inner in inner_packet(),
            headroom in OVERHEAD..64usize,
            src in any::<u32>(),
            dst in any::<u32>(),
            ident in any::<u16>(),
        ) {
            let (src, dst) = (Ipv4Addr::from(src), Ipv4Addr::from(dst));
            let mut buf = vec![0u8; headroom + inner.len()];
            buf[headroom..].copy_from_slice(&inner);
            let start = encapsulate(&mut buf, headroom, inner.len(), src, dst, ident).unwrap();
            prop_assert_eq!(start, headroom - OVERHEAD);
            prop_assert_eq!(decapsulate(&buf[start..]), Ok((src, &inner[..])));

            // etherparse as an independent oracle for the outer header.
            let outer = etherparse::Ipv4Slice::from_slice(&buf[start..]).unwrap();
            let h = outer.header();
            prop_assert_eq!(h.header_checksum(), h.to_header().calc_header_checksum());
            prop_assert_eq!(h.protocol(), etherparse::IpNumber::IPV4);
            prop_assert_eq!(h.ttl(), OUTER_TTL);
            prop_assert_eq!(h.source_addr(), src);
            prop_assert_eq!(h.destination_addr(), dst);
            prop_assert_eq!(h.identification(), ident);
            prop_assert_eq!(h.dont_fragment(), inner[6] & 0x40 != 0);
            prop_assert_eq!(h.ecn().value(), inner[1] & 0x03);
            prop_assert_eq!(h.dcp().value(), inner[1] >> 2);
            prop_assert_eq!(outer.payload().payload, &inner[..]);
        }

        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..80)) {
            if let Ok((_, inner)) = decapsulate(&data) {
                prop_assert!(inner.len() + 20 <= data.len());
            }
        }
    }
}

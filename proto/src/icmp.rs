//! ICMP destination-unreachable errors (RFC 792, RFC 1191, RFC 1812 section 4.3).
//!
//! When the forwarder has no route for a pod packet, or the packet is too big for the overlay
//! MTU and has DF set, it answers with an ICMP type 3 error back into `tunl0`. This module builds
//! that reply into a caller-owned buffer and decides when an error must not be sent at all.

use std::net::Ipv4Addr;

use crate::checksum;
use crate::error::{Layer, WireError};
use crate::ipv4::{self, protocol, Ipv4Packet, Ipv4Repr};

/// ICMP type of destination unreachable.
pub const TYPE_DEST_UNREACHABLE: u8 = 3;

/// Destination-unreachable codes podnet sends (RFC 792, RFC 1191).
pub mod code {
    /// No route to the destination network.
    pub const NET_UNREACHABLE: u8 = 0;
    /// The destination host cannot be reached.
    pub const HOST_UNREACHABLE: u8 = 1;
    /// Fragmentation needed and DF set; bytes 6..8 carry the next-hop MTU (RFC 1191).
    pub const FRAG_NEEDED: u8 = 4;
}

/// Largest ICMP error datagram, IP header included (RFC 1812 section 4.3.2.3).
pub const MAX_ERROR_LEN: usize = 576;

/// Length of the ICMP header of an error message (type, code, checksum, 4 more bytes).
pub const HEADER_LEN: usize = 8;

/// TTL of generated errors (the kernel's default `ip_default_ttl`).
pub const ERROR_TTL: u8 = 64;

/// TOS of generated errors: precedence "internetwork control", as Linux's `icmp_send` uses.
const ERROR_TOS: u8 = 0xc0;

/// Byte offsets of the ICMP header fields.
mod field {
    use core::ops::Range;
    pub const TYPE: usize = 0;
    pub const CODE: usize = 1;
    pub const CHECKSUM: Range<usize> = 2..4;
    pub const UNUSED: Range<usize> = 4..6;
    pub const NEXT_HOP_MTU: Range<usize> = 6..8;
}

/// ICMP types that are error messages (RFC 1122 section 3.2.2): destination unreachable,
/// source quench, redirect, time exceeded, parameter problem.
const ERROR_TYPES: [u8; 5] = [3, 4, 5, 11, 12];

/// Builds a complete IPv4 packet carrying an ICMP destination-unreachable error with `code`,
/// from `src` back to the sender of `original`, into `out`. Returns the number of bytes written.
///
/// The message quotes the original IP header and as much of its payload as fits in
/// [`MAX_ERROR_LEN`] bytes (and in `out`). For [`code::FRAG_NEEDED`], `next_hop_mtu` is written
/// in bytes 6..8 (RFC 1191); for other codes those bytes are zero.
///
/// Returns `Ok(None)`, and writes nothing, when an error must not be sent (RFC 1122 3.2.2,
/// RFC 1812 4.3.2.7): `original` is itself an ICMP error (or too short to tell), it is a
/// fragment other than the first, its source is not a single host (0.0.0.0, loopback,
/// broadcast, multicast, class E), or its destination is broadcast or multicast.
///
/// Errors if `original` is not a valid IPv4 packet, or if `out` cannot hold even the IP header
/// and the first 8 payload bytes of `original` behind the two headers (reported as
/// `Truncated { layer: Icmp, .. }`).
pub fn dest_unreachable(
    original: &[u8],
    code: u8,
    next_hop_mtu: u16,
    src: Ipv4Addr,
    out: &mut [u8],
) -> Result<Option<usize>, WireError> {
    let orig = Ipv4Packet::new_checked(original)?;
    if !may_answer(&orig) {
        return Ok(None);
    }

    let headers = ipv4::HEADER_LEN + HEADER_LEN;
    // RFC 792 requires at least the IP header and 64 bits of payload; RFC 1812 asks for as
    // much as fits in 576 bytes.
    let required = headers + (orig.header_len() + 8).min(orig.total_len());
    if out.len() < required {
        return Err(WireError::Truncated {
            layer: Layer::Icmp,
            required,
            len: out.len(),
        });
    }
    let quote_len = orig
        .total_len()
        .min(MAX_ERROR_LEN - headers)
        .min(out.len() - headers);
    let total = headers + quote_len;

    let (ip, rest) = out.split_at_mut(ipv4::HEADER_LEN);
    let (icmp, rest) = rest.split_at_mut(HEADER_LEN);
    rest[..quote_len].copy_from_slice(&orig.packet()[..quote_len]);

    icmp[field::TYPE] = TYPE_DEST_UNREACHABLE;
    icmp[field::CODE] = code;
    icmp[field::CHECKSUM].fill(0);
    icmp[field::UNUSED].fill(0);
    let mtu = if code == code::FRAG_NEEDED {
        next_hop_mtu
    } else {
        0
    };
    icmp[field::NEXT_HOP_MTU].copy_from_slice(&mtu.to_be_bytes());
    let sum = checksum::partial(&rest[..quote_len], checksum::partial(icmp, 0));
    icmp[field::CHECKSUM].copy_from_slice(&checksum::finish(sum).to_be_bytes());

    Ipv4Repr {
        src,
        dst: orig.src(),
        protocol: protocol::ICMP,
        ttl: ERROR_TTL,
        tos: ERROR_TOS,
        // No counter in a pure function; the original's ident varies per packet, and a 576-byte
        // datagram is practically never fragmented.
        ident: orig.ident(),
        dont_frag: false,
        payload_len: HEADER_LEN + quote_len,
    }
    .emit(ip);
    Ok(Some(total))
}

/// Whether RFC 1122 / RFC 1812 allow an ICMP error about `orig`.
fn may_answer(orig: &Ipv4Packet<&[u8]>) -> bool {
    if orig.frag_offset() != 0 {
        return false;
    }
    let s = orig.src();
    let single_host = !(s.is_unspecified()
        || s.is_loopback()
        || s.is_broadcast()
        || s.is_multicast()
        || s.octets()[0] >= 240);
    let d = orig.dst();
    if !single_host || d.is_broadcast() || d.is_multicast() {
        return false;
    }
    if orig.protocol() == protocol::ICMP {
        // Never answer an error with an error; an ICMP packet too short to show its type might
        // be one.
        return match orig.payload().first() {
            Some(t) => !ERROR_TYPES.contains(t),
            None => false,
        };
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::{Icmpv4Type, IpNumber};
    use proptest::prelude::*;

    const GW: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 0);
    const POD: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
    const FAR: Ipv4Addr = Ipv4Addr::new(10, 244, 9, 3);

    /// A packet from `src` to `dst` with `payload_len` bytes of `protocol` payload.
    fn packet(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, payload: &[u8]) -> Vec<u8> {
        let mut p = vec![0u8; 20 + payload.len()];
        Ipv4Repr {
            src,
            dst,
            protocol,
            ttl: 63,
            tos: 0x10,
            ident: 0x4242,
            dont_frag: true,
            payload_len: payload.len(),
        }
        .emit(&mut p);
        p[20..].copy_from_slice(payload);
        p
    }

    fn udp(len: usize) -> Vec<u8> {
        packet(
            POD,
            FAR,
            protocol::UDP,
            &(0..len).map(|i| i as u8).collect::<Vec<_>>(),
        )
    }

    /// Checks `out` with etherparse and returns (type, quoted bytes).
    fn oracle(out: &[u8]) -> (Icmpv4Type, Vec<u8>) {
        let ip = etherparse::Ipv4Slice::from_slice(out).unwrap();
        let h = ip.header();
        assert_eq!(h.header_checksum(), h.to_header().calc_header_checksum());
        assert_eq!(h.protocol(), IpNumber::ICMP);
        assert_eq!(h.ttl(), ERROR_TTL);
        assert_eq!(usize::from(h.total_len()), out.len());
        assert!(out.len() <= MAX_ERROR_LEN);
        let icmp = etherparse::Icmpv4Slice::from_slice(ip.payload().payload).unwrap();
        let expected = etherparse::Icmpv4Header::with_checksum(icmp.icmp_type(), icmp.payload());
        assert_eq!(icmp.checksum(), expected.checksum, "ICMP checksum");
        (icmp.icmp_type(), icmp.payload().to_vec())
    }

    #[test]
    fn fixture_net_unreachable_for_small_udp() {
        // 10.244.1.2 -> 10.244.9.3 UDP with 8 bytes, no route: the full original is quoted.
        let orig = udp(8);
        let mut out = [0u8; MAX_ERROR_LEN];
        let n = dest_unreachable(&orig, code::NET_UNREACHABLE, 0, GW, &mut out)
            .unwrap()
            .unwrap();
        assert_eq!(n, 20 + 8 + 28);
        let icmp_sum = u16::from_be_bytes([out[22], out[23]]);
        let ip_sum = u16::from_be_bytes([out[10], out[11]]);
        let mut expected = vec![
            0x45, 0xc0, 0x00, 0x38, 0x42, 0x42, 0x00, 0x00, // len 56, ident from original
            0x40, 0x01, 0x00, 0x00, 0x0a, 0xf4, 0x01, 0x00, // TTL 64, ICMP, from 10.244.1.0
            0x0a, 0xf4, 0x01, 0x02, // to the original sender
            0x03, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // type 3 code 0
        ];
        expected[10..12].copy_from_slice(&ip_sum.to_be_bytes());
        expected[22..24].copy_from_slice(&icmp_sum.to_be_bytes());
        expected.extend_from_slice(&orig);
        assert_eq!(&out[..n], &expected[..]);
        assert_eq!(checksum::checksum(&out[..20]), 0);
        assert_eq!(checksum::checksum(&out[20..n]), 0);
        let (t, quoted) = oracle(&out[..n]);
        assert_eq!(
            t,
            Icmpv4Type::DestinationUnreachable(etherparse::icmpv4::DestUnreachableHeader::Network)
        );
        assert_eq!(quoted, orig);
    }

    #[test]
    fn frag_needed_carries_mtu_and_truncates_quote() {
        let orig = udp(1472);
        let mut out = [0u8; 2000];
        let n = dest_unreachable(&orig, code::FRAG_NEEDED, 1450, GW, &mut out)
            .unwrap()
            .unwrap();
        assert_eq!(n, MAX_ERROR_LEN);
        assert_eq!(&out[26..28], &1450u16.to_be_bytes());
        let (t, quoted) = oracle(&out[..n]);
        assert_eq!(
            t,
            Icmpv4Type::DestinationUnreachable(
                etherparse::icmpv4::DestUnreachableHeader::FragmentationNeeded {
                    next_hop_mtu: 1450
                }
            )
        );
        assert_eq!(quoted, &orig[..MAX_ERROR_LEN - 28]);
        let ip = Ipv4Packet::new_checked(&out[..n]).unwrap();
        assert_eq!((ip.src(), ip.dst()), (GW, POD));
    }

    #[test]
    fn mtu_only_for_frag_needed() {
        let mut out = [0u8; MAX_ERROR_LEN];
        dest_unreachable(&udp(8), code::HOST_UNREACHABLE, 1450, GW, &mut out)
            .unwrap()
            .unwrap();
        assert_eq!(out[21], code::HOST_UNREACHABLE);
        assert_eq!(&out[24..28], &[0, 0, 0, 0]);
    }

    #[test]
    fn small_output_buffer_shrinks_quote_to_minimum() {
        let orig = udp(100);
        let mut out = [0u8; 28 + 28];
        let n = dest_unreachable(&orig, code::NET_UNREACHABLE, 0, GW, &mut out)
            .unwrap()
            .unwrap();
        assert_eq!(n, 56);
        assert_eq!(oracle(&out).1, &orig[..28]);
        let mut tiny = [0u8; 55];
        assert_eq!(
            dest_unreachable(&orig, code::NET_UNREACHABLE, 0, GW, &mut tiny),
            Err(WireError::Truncated {
                layer: Layer::Icmp,
                required: 56,
                len: 55
            })
        );
    }

    #[test]
    fn never_answers_icmp_errors() {
        let mut out = [0u8; MAX_ERROR_LEN];
        for t in ERROR_TYPES {
            let orig = packet(POD, FAR, protocol::ICMP, &[t, 0, 0, 0, 0, 0, 0, 0]);
            assert_eq!(
                dest_unreachable(&orig, code::NET_UNREACHABLE, 0, GW, &mut out),
                Ok(None),
                "type {t}"
            );
        }
        let empty_icmp = packet(POD, FAR, protocol::ICMP, &[]);
        assert_eq!(dest_unreachable(&empty_icmp, 0, 0, GW, &mut out), Ok(None));
        // Echo request (8) and echo reply (0) are queries: answered.
        for t in [0, 8] {
            let orig = packet(POD, FAR, protocol::ICMP, &[t, 0, 0xf7, 0xff, 0, 0, 0, 0]);
            assert!(dest_unreachable(&orig, 0, 0, GW, &mut out)
                .unwrap()
                .is_some());
        }
    }

    #[test]
    fn never_answers_non_first_fragments() {
        let mut out = [0u8; MAX_ERROR_LEN];
        let mut orig = udp(16);
        orig[6..8].copy_from_slice(&0x2000u16.to_be_bytes()); // first fragment: answered
        Ipv4Packet::new_checked(&mut orig[..])
            .unwrap()
            .fill_checksum();
        assert!(dest_unreachable(&orig, 0, 0, GW, &mut out)
            .unwrap()
            .is_some());
        orig[6..8].copy_from_slice(&0x0003u16.to_be_bytes()); // last fragment at 24 bytes
        assert_eq!(dest_unreachable(&orig, 0, 0, GW, &mut out), Ok(None));
    }

    #[test]
    fn never_answers_non_unicast_sources_or_group_destinations() {
        let mut out = [0u8; MAX_ERROR_LEN];
        for src in [
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::BROADCAST,
            Ipv4Addr::new(224, 0, 0, 251),
            Ipv4Addr::new(239, 1, 2, 3),
            Ipv4Addr::LOCALHOST,
            Ipv4Addr::new(240, 0, 0, 1),
        ] {
            let orig = packet(src, FAR, protocol::UDP, &[0; 8]);
            assert_eq!(
                dest_unreachable(&orig, 0, 0, GW, &mut out),
                Ok(None),
                "{src}"
            );
        }
        for dst in [Ipv4Addr::BROADCAST, Ipv4Addr::new(224, 0, 0, 1)] {
            let orig = packet(POD, dst, protocol::UDP, &[0; 8]);
            assert_eq!(
                dest_unreachable(&orig, 0, 0, GW, &mut out),
                Ok(None),
                "{dst}"
            );
        }
        assert!(out.iter().all(|&b| b == 0), "nothing written");
    }

    #[test]
    fn malformed_original_is_an_error() {
        let orig = udp(8);
        let mut out = [0u8; MAX_ERROR_LEN];
        for n in 0..orig.len() {
            assert!(
                matches!(
                    dest_unreachable(&orig[..n], 0, 0, GW, &mut out),
                    Err(WireError::Truncated {
                        layer: Layer::Ipv4,
                        ..
                    })
                ),
                "prefix of {n} bytes"
            );
        }
        let mut v6 = orig;
        v6[0] = 0x60;
        assert_eq!(
            dest_unreachable(&v6, 0, 0, GW, &mut out),
            Err(WireError::BadVersion(6))
        );
    }

    proptest! {
        #[test]
        fn any_unicast_packet_gets_a_valid_error(
            payload_len in 0usize..2000,
            proto in prop_oneof![Just(protocol::TCP), Just(protocol::UDP), Just(protocol::IPIP)],
            code in prop_oneof![Just(code::NET_UNREACHABLE), Just(code::HOST_UNREACHABLE), Just(code::FRAG_NEEDED)],
            mtu in any::<u16>(),
            out_len in 56usize..700,
        ) {
            let payload: Vec<u8> = (0..payload_len).map(|i| (i * 7) as u8).collect();
            let orig = packet(POD, FAR, proto, &payload);
            let mut out = vec![0u8; out_len];
            let n = dest_unreachable(&orig, code, mtu, GW, &mut out).unwrap().unwrap();
            let expect_quote = orig.len().min(MAX_ERROR_LEN - 28).min(out_len - 28);
            prop_assert_eq!(n, 28 + expect_quote);
            let (t, quoted) = oracle(&out[..n]);
            prop_assert_eq!(&quoted[..], &orig[..expect_quote]);
            let expected = etherparse::icmpv4::DestUnreachableHeader::from_values(code, mtu).unwrap();
            prop_assert_eq!(t, Icmpv4Type::DestinationUnreachable(expected));
        }

        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..700)) {
            let mut out = [0u8; MAX_ERROR_LEN];
            if let Ok(Some(n)) = dest_unreachable(&data, code::FRAG_NEEDED, 1400, GW, &mut out) {
                oracle(&out[..n]);
            }
        }
    }
}

//! ICMPv6 errors (RFC 4443): destination unreachable and Packet Too Big, the IPv6 forms of
//! the errors [`crate::icmp`] builds for IPv4.
//!
//! The forwarder answers a pod's IPv6 packet it cannot deliver (no node owns the address) or
//! that does not fit the overlay MTU with one of these, back into `tunl0`. This module builds
//! the reply into a caller-owned buffer and decides when an error must not be sent at all;
//! rate limiting is the caller's, as for IPv4.

use std::net::Ipv6Addr;

use crate::checksum;
use crate::error::{Layer, WireError};
use crate::ipv6::{self, next_header, Ipv6Packet, Ipv6Repr};

/// ICMPv6 type of destination unreachable.
pub const TYPE_DEST_UNREACHABLE: u8 = 1;

/// ICMPv6 type of Packet Too Big.
pub const TYPE_PACKET_TOO_BIG: u8 = 2;

/// ICMPv6 type of a redirect (RFC 4861), about which no error is sent either.
const TYPE_REDIRECT: u8 = 137;

/// Destination-unreachable codes podnet sends (RFC 4443 section 3.1).
pub mod code {
    /// No route to the destination.
    pub const NO_ROUTE: u8 = 0;
    /// The address is unreachable (no node owns it).
    pub const ADDRESS_UNREACHABLE: u8 = 3;
}

/// Length of the ICMPv6 header of an error message (type, code, checksum, 4 more bytes).
pub const HEADER_LEN: usize = 8;

/// Largest ICMPv6 error, IPv6 header included: the minimum IPv6 MTU (RFC 4443 section 2.4 c).
pub const MAX_ERROR_LEN: usize = ipv6::MIN_MTU;

/// Hop limit of generated errors (the kernel's default `hop_limit`).
pub const ERROR_HOP_LIMIT: u8 = 64;

/// What to send back about a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error6 {
    /// Destination unreachable with this code (see [`code`]).
    Unreachable(u8),
    /// Packet Too Big: the packet does not fit this MTU (never stated below 1280, RFC 8200
    /// section 5: a link with a smaller MTU must fragment and reassemble below IPv6).
    TooBig(u32),
}

/// Builds a complete IPv6 packet carrying `error` from `src` back to the sender of `original`
/// into `out`; returns the number of bytes written.
///
/// The message quotes as much of `original` as fits in [`MAX_ERROR_LEN`] bytes (and in `out`).
///
/// Returns `Ok(None)`, and writes nothing, when RFC 4443 section 2.4 (e) forbids an error:
/// `original` is itself an ICMPv6 error or a redirect (or its extension headers cannot be
/// walked to tell), its source does not name a single node (unspecified or multicast), or it
/// went to a multicast address (allowed for Packet Too Big only).
///
/// Errors if `original` is not a valid IPv6 packet, or if `out` cannot hold the two headers
/// and the original's fixed header (`Truncated { layer: Icmp, .. }`).
pub fn error(
    original: &[u8],
    error: Error6,
    src: Ipv6Addr,
    out: &mut [u8],
) -> Result<Option<usize>, WireError> {
    let orig = Ipv6Packet::new_checked(original)?;
    if !may_answer(&orig, error) {
        return Ok(None);
    }
    let headers = ipv6::HEADER_LEN + HEADER_LEN;
    let required = headers + ipv6::HEADER_LEN;
    if out.len() < required {
        return Err(WireError::Truncated {
            layer: Layer::Icmp,
            required,
            len: out.len(),
        });
    }
    let packet = orig.packet();
    let quote_len = packet
        .len()
        .min(MAX_ERROR_LEN - headers)
        .min(out.len() - headers);
    let payload_len = HEADER_LEN + quote_len;
    let dst = orig.src();

    let (ip, rest) = out.split_at_mut(ipv6::HEADER_LEN);
    let (icmp, rest) = rest.split_at_mut(HEADER_LEN);
    rest[..quote_len].copy_from_slice(&packet[..quote_len]);
    let (kind, code, word) = match error {
        Error6::Unreachable(code) => (TYPE_DEST_UNREACHABLE, code, 0),
        Error6::TooBig(mtu) => (TYPE_PACKET_TOO_BIG, 0, mtu.max(ipv6::MIN_MTU as u32)),
    };
    icmp[0] = kind;
    icmp[1] = code;
    icmp[2..4].fill(0);
    icmp[4..8].copy_from_slice(&word.to_be_bytes());
    let pseudo = ipv6::pseudo_header(src, dst, next_header::ICMPV6, payload_len as u32);
    let sum = checksum::partial(&rest[..quote_len], checksum::partial(icmp, pseudo));
    icmp[2..4].copy_from_slice(&checksum::finish(sum).to_be_bytes());

    Ipv6Repr {
        src,
        dst,
        next_header: next_header::ICMPV6,
        hop_limit: ERROR_HOP_LIMIT,
        traffic_class: 0,
        flow_label: 0,
        payload_len,
    }
    .emit(ip);
    Ok(Some(ipv6::HEADER_LEN + payload_len))
}

/// Whether RFC 4443 section 2.4 (e) allows an error about `orig`.
fn may_answer(orig: &Ipv6Packet<&[u8]>, error: Error6) -> bool {
    let s = orig.src();
    if s.is_unspecified() || s.is_multicast() {
        return false;
    }
    if orig.dst().is_multicast() && !matches!(error, Error6::TooBig(_)) {
        return false;
    }
    let Ok(t) = orig.transport() else {
        return false;
    };
    if t.protocol != next_header::ICMPV6 {
        return true;
    }
    if !t.header_present() {
        // A later fragment of an ICMPv6 message: its type is in the first one.
        return false;
    }
    // Types below 128 are errors (RFC 4443 section 2.1).
    match orig.packet().get(t.offset) {
        Some(&kind) => kind >= 128 && kind != TYPE_REDIRECT,
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::{Icmpv6Slice, Icmpv6Type, Ipv6HeaderSlice, PacketBuilder};

    const POD: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x244, 1, 0, 0, 0, 2);
    const AWAY: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x244, 9, 0, 0, 0, 7);
    const GATEWAY: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x244, 1, 0, 0, 0, 1);

    fn udp(src: Ipv6Addr, dst: Ipv6Addr, payload_len: usize) -> Vec<u8> {
        let mut p = Vec::new();
        PacketBuilder::ipv6(src.octets(), dst.octets(), 64)
            .udp(4000, 53)
            .write(&mut p, &vec![0x5a; payload_len])
            .unwrap();
        p
    }

    fn icmp(kind: u8, code: u8) -> Vec<u8> {
        let mut p = vec![0u8; 48];
        Ipv6Repr {
            src: POD,
            dst: AWAY,
            next_header: next_header::ICMPV6,
            hop_limit: 64,
            traffic_class: 0,
            flow_label: 0,
            payload_len: 8,
        }
        .emit(&mut p);
        p[40] = kind;
        p[41] = code;
        p
    }

    /// The reply parsed by etherparse: its IPv6 header, its ICMPv6 message with the checksum
    /// checked, and the quoted bytes.
    fn parse(out: &[u8]) -> (Ipv6HeaderSlice<'_>, Icmpv6Slice<'_>) {
        let ip = Ipv6HeaderSlice::from_slice(out).unwrap();
        assert_eq!(usize::from(ip.payload_length()) + 40, out.len());
        let msg = Icmpv6Slice::from_slice(&out[40..]).unwrap();
        assert!(msg.is_checksum_valid(ip.source(), ip.destination()));
        (ip, msg)
    }

    #[test]
    fn unreachable_quotes_the_packet_back_to_its_sender() {
        let orig = udp(POD, AWAY, 100);
        let mut out = [0u8; 2000];
        let n = error(
            &orig,
            Error6::Unreachable(code::ADDRESS_UNREACHABLE),
            GATEWAY,
            &mut out,
        )
        .unwrap()
        .unwrap();
        assert_eq!(n, 40 + 8 + orig.len());
        let (ip, msg) = parse(&out[..n]);
        assert_eq!((ip.source_addr(), ip.destination_addr()), (GATEWAY, POD));
        assert_eq!(ip.hop_limit(), ERROR_HOP_LIMIT);
        assert!(matches!(
            msg.icmp_type(),
            Icmpv6Type::DestinationUnreachable(etherparse::icmpv6::DestUnreachableCode::Address)
        ));
        assert_eq!(msg.payload(), &orig[..]);
    }

    #[test]
    fn packet_too_big_states_the_mtu_never_below_1280_and_quotes_at_most_1280_bytes() {
        let orig = udp(POD, AWAY, 1452);
        let mut out = [0u8; 2000];
        let n = error(&orig, Error6::TooBig(1430), GATEWAY, &mut out)
            .unwrap()
            .unwrap();
        assert_eq!(n, MAX_ERROR_LEN, "quoted up to the minimum MTU");
        let (_, msg) = parse(&out[..n]);
        assert_eq!(msg.icmp_type(), Icmpv6Type::PacketTooBig { mtu: 1430 });
        assert_eq!(msg.payload(), &orig[..MAX_ERROR_LEN - 48]);
        let n = error(&orig, Error6::TooBig(1000), GATEWAY, &mut out)
            .unwrap()
            .unwrap();
        assert_eq!(
            parse(&out[..n]).1.icmp_type(),
            Icmpv6Type::PacketTooBig { mtu: 1280 }
        );
        // A smaller buffer quotes less, but not less than the fixed header.
        let mut small = [0u8; 200];
        let n = error(&orig, Error6::TooBig(1430), GATEWAY, &mut small)
            .unwrap()
            .unwrap();
        assert_eq!(n, 200);
        parse(&small[..n]);
        assert_eq!(
            error(&orig, Error6::TooBig(1430), GATEWAY, &mut small[..87]),
            Err(WireError::Truncated {
                layer: Layer::Icmp,
                required: 88,
                len: 87
            })
        );
    }

    #[test]
    fn no_error_about_errors_redirects_multicast_or_unnamed_senders() {
        let mut out = [0u8; 2000];
        let unreachable = Error6::Unreachable(code::NO_ROUTE);
        let mut send = |p: &[u8], e| error(p, e, GATEWAY, &mut out).unwrap().is_some();
        // ICMPv6 errors and redirects get nothing; informational messages (echo) do.
        assert!(!send(&icmp(1, 0), unreachable));
        assert!(!send(&icmp(2, 0), Error6::TooBig(1280)));
        assert!(!send(&icmp(127, 0), unreachable));
        assert!(!send(&icmp(TYPE_REDIRECT, 0), unreachable));
        assert!(send(&icmp(128, 0), unreachable), "an echo request");
        // Senders that name no single node.
        assert!(!send(&udp(Ipv6Addr::UNSPECIFIED, AWAY, 8), unreachable));
        assert!(!send(
            &udp("ff02::1".parse().unwrap(), AWAY, 8),
            unreachable
        ));
        // To a multicast group: Packet Too Big only.
        let group = udp(POD, "ff05::2".parse().unwrap(), 8);
        assert!(!send(&group, unreachable));
        assert!(send(&group, Error6::TooBig(1280)));
        // Extension headers that do not walk: the type cannot be told.
        let mut bad = udp(POD, AWAY, 8);
        bad[6] = next_header::HOP_BY_HOP;
        bad[41] = 200; // a hop-by-hop header longer than the packet
        assert!(!send(&bad, unreachable));
        // Not IPv6 at all.
        assert_eq!(
            error(&[0x45; 40], unreachable, GATEWAY, &mut out),
            Err(WireError::NotIpv6(4))
        );
    }
}

//! Shared fixtures for the podnet benches: TCP/IPv4 packets as pods send them, TSO
//! super-packets as a TUN with offloads hands them out, and route tables for the LPM.
//!
//! Everything is deterministic (a fixed xorshift seed) so runs compare across commits.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use podnet_proto::checksum;
use podnet_proto::gso::tcp;
use podnet_proto::ipv4::{self, Ipv4Repr};
use podnet_proto::virtio::{VirtioNetHdr, F_NEEDS_CSUM, GSO_TCPV4};

/// Pod source address used by the fixtures.
pub const POD_SRC: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
/// Pod destination address used by the fixtures.
pub const POD_DST: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 3);
/// Underlay address of the sending node.
pub const NODE_A: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// Underlay address of the receiving node.
pub const NODE_B: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// TCP header length with the timestamp option Linux always sends.
pub const TCP_LEN: usize = 32;
/// MSS inside a VXLAN overlay on a 1500-byte underlay: 1450 - 20 - 32.
pub const VXLAN_MSS: u16 = 1398;
/// Payload of the largest TSO super-packet with timestamps: 65535 - 20 - 32.
pub const MAX_TSO_PAYLOAD: usize = u16::MAX as usize - ipv4::HEADER_LEN - TCP_LEN;

/// A TCP/IPv4 packet with `payload_len` bytes of payload, sequence number `seq`, IP ID
/// `ident`, ACK flag, timestamps, and valid IPv4 and TCP checksums.
pub fn tcp_packet(payload_len: usize, seq: u32, ident: u16) -> Vec<u8> {
    let mut p = tcp_with_seed(payload_len, seq, ident);
    let l4 = &p[ipv4::HEADER_LEN..];
    let acc = checksum::pseudo_header(POD_SRC, POD_DST, ipv4::protocol::TCP, l4.len() as u16);
    let c = ipv4::HEADER_LEN + tcp::CHECKSUM;
    p[c..c + 2].fill(0);
    let sum = checksum::finish(checksum::partial(&p[ipv4::HEADER_LEN..], acc));
    p[c..c + 2].copy_from_slice(&sum.to_be_bytes());
    p
}

/// Like [`tcp_packet`] but with the TCP checksum field holding the pseudo-header seed, as a
/// TUN read with `F_NEEDS_CSUM` delivers it.
fn tcp_with_seed(payload_len: usize, seq: u32, ident: u16) -> Vec<u8> {
    let l4_len = TCP_LEN + payload_len;
    let mut p = vec![0u8; ipv4::HEADER_LEN + l4_len];
    Ipv4Repr {
        src: POD_SRC,
        dst: POD_DST,
        protocol: ipv4::protocol::TCP,
        ttl: 64,
        tos: 0,
        ident,
        dont_frag: true,
        payload_len: l4_len,
    }
    .emit(&mut p[..ipv4::HEADER_LEN]);
    let t = &mut p[ipv4::HEADER_LEN..];
    t[0..2].copy_from_slice(&40000u16.to_be_bytes());
    t[2..4].copy_from_slice(&5201u16.to_be_bytes());
    t[tcp::SEQ..tcp::SEQ + 4].copy_from_slice(&seq.to_be_bytes());
    t[tcp::ACK..tcp::ACK + 4].copy_from_slice(&7u32.to_be_bytes());
    t[tcp::DATA_OFFSET] = ((TCP_LEN / 4) as u8) << 4;
    t[tcp::FLAGS] = tcp::ACK_FLAG;
    t[14..16].copy_from_slice(&502u16.to_be_bytes());
    // NOP NOP timestamps, as Linux sends on every segment.
    t[20..32].copy_from_slice(&[1, 1, 8, 10, 0, 0, 1, 0, 0, 0, 2, 0]);
    let mut x = seq | 1;
    for b in &mut t[TCP_LEN..] {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        *b = x as u8;
    }
    let seed = checksum::fold(checksum::pseudo_header(
        POD_SRC,
        POD_DST,
        ipv4::protocol::TCP,
        l4_len as u16,
    ));
    t[tcp::CHECKSUM..tcp::CHECKSUM + 2].copy_from_slice(&seed.to_be_bytes());
    p
}

/// A TSO super-packet with `payload_len` bytes of payload for segments of `mss`, and the
/// virtio header a TUN read puts in front of it.
pub fn super_packet(payload_len: usize, mss: u16) -> (VirtioNetHdr, Vec<u8>) {
    let p = tcp_with_seed(payload_len, 1_000_000, 100);
    let hdr = VirtioNetHdr {
        flags: F_NEEDS_CSUM,
        gso_type: GSO_TCPV4,
        hdr_len: (ipv4::HEADER_LEN + TCP_LEN) as u16,
        gso_size: mss,
        csum_start: ipv4::HEADER_LEN as u16,
        csum_offset: 16,
    };
    (hdr, p)
}

/// `n` consecutive full-size segments of one flow, as they arrive after decapsulation.
pub fn flow_segments(n: usize, mss: u16) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| {
            let seq = 1_000_000u32.wrapping_add((i * usize::from(mss)) as u32);
            tcp_packet(usize::from(mss), seq, 100u16.wrapping_add(i as u16))
        })
        .collect()
}

/// A small deterministic generator (xorshift64*).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator with a fixed seed.
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// The next 32 random bits.
    pub fn next_u32(&mut self) -> u32 {
        (self.next_u64() >> 32) as u32
    }
}

/// `n` distinct prefixes shaped like a real table: mostly per-node /24s and /26s inside
/// 10.0.0.0/8, plus some /16s, /20s and /32s, each with a value.
pub fn routes(n: usize) -> Vec<(Ipv4Net, u32)> {
    let mut rng = Rng::new(0x9e37_79b9_7f4a_7c15);
    let mut seen = std::collections::HashSet::with_capacity(n);
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let r = rng.next_u32();
        let len = match r % 16 {
            0 => 16,
            1 => 20,
            2 | 3 => 32,
            4..=7 => 26,
            _ => 24,
        };
        let addr = Ipv4Addr::from(0x0a00_0000 | (rng.next_u32() & 0x00ff_ffff));
        let Ok(net) = Ipv4Net::new(addr, len) else {
            continue;
        };
        let net = net.trunc();
        if seen.insert(net) {
            out.push((net, out.len() as u32));
        }
    }
    out
}

/// `n` lookup addresses: three quarters inside a random route of `routes`, the rest random
/// addresses in 10.0.0.0/8 (which may or may not match).
pub fn lookup_addrs(routes: &[(Ipv4Net, u32)], n: usize) -> Vec<Ipv4Addr> {
    let mut rng = Rng::new(42);
    (0..n)
        .map(|_| {
            let r = rng.next_u32();
            if !r.is_multiple_of(4) && !routes.is_empty() {
                let (net, _) = routes[(rng.next_u32() as usize) % routes.len()];
                let host = rng.next_u32() & !u32::from(net.netmask());
                Ipv4Addr::from(u32::from(net.network()) | host)
            } else {
                Ipv4Addr::from(0x0a00_0000 | (rng.next_u32() & 0x00ff_ffff))
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use podnet_proto::gso;

    #[test]
    fn fixtures_are_valid_packets() {
        let p = tcp_packet(1398, 5, 6);
        assert_eq!(p.len(), 20 + 32 + 1398);
        assert_eq!(checksum::checksum(&p[..20]), 0);
        let acc = checksum::pseudo_header(POD_SRC, POD_DST, 6, (p.len() - 20) as u16);
        assert_eq!(checksum::finish(checksum::partial(&p[20..], acc)), 0);

        let (hdr, sp) = super_packet(MAX_TSO_PAYLOAD, VXLAN_MSS);
        assert_eq!(sp.len(), u16::MAX as usize);
        let plan = gso::plan(&hdr, &sp, 22).unwrap();
        assert_eq!(plan.count, MAX_TSO_PAYLOAD.div_ceil(1398));
    }

    #[test]
    fn routes_are_distinct_and_addresses_hit() {
        let r = routes(1000);
        let set: std::collections::HashSet<_> = r.iter().map(|(n, _)| *n).collect();
        assert_eq!(set.len(), 1000);
        let a = lookup_addrs(&r, 1000);
        let hits = a
            .iter()
            .filter(|ip| r.iter().any(|(n, _)| n.contains(*ip)))
            .count();
        assert!(hits >= 700, "{hits} of 1000 addresses match a route");
    }
}

//! One function per fuzz target: run the parser on arbitrary bytes, panic if an invariant breaks.
//!
//! Each check compares the parser against an independent restatement of its rules (written
//! here from the RFCs and DESIGN.md, not from the parser's code), so a parser that accepts what
//! it should refuse, or refuses what it should accept, is found as surely as one that panics.

use std::net::Ipv4Addr;
use std::sync::Arc;

use ipnet::Ipv4Net;
use podnet_dataplane::core::drops::{Counters, DropReason};
use podnet_dataplane::core::forward::{
    Forwarder, Inbound, NodeConfig, Outbound, SendPaths, HEADROOM, SCRATCH_LEN,
};
use podnet_dataplane::core::table::{Peer, PeerEncap, RouteTable};
use podnet_proto::api::{
    validate_node_name, Encap, RegisterRequest, WatchEvent, MAX_NODE_NAME_LEN,
};
use podnet_proto::ethernet::MacAddr;
use podnet_proto::gro::{Coalescer, Span};
use podnet_proto::ipv4::{self, Ipv4Packet, Ipv4Repr};
use podnet_proto::ipv6::{self, Ipv6Packet, Ipv6Repr};
use podnet_proto::virtio::{VirtioNetHdr, GSO_NONE, GSO_TCPV4};
use podnet_proto::vxlan::{self, Vni};
use podnet_proto::{checksum, gso, ipip};

/// A check: panics if the input breaks the target's invariant.
pub type Check = fn(&[u8]);

/// Every target by name, as `fuzz/run-bounded` and the corpus folders name them.
pub const TARGETS: [(&str, Check); 11] = [
    ("ipv4", ipv4),
    ("ipv6", ipv6),
    ("ipip_decap", ipip_decap),
    ("vxlan_decap", vxlan_decap),
    ("inbound", inbound),
    ("outbound", outbound),
    ("gso", gso),
    ("gro", gro),
    ("api_json", api_json),
    ("wireguard_inbound", wireguard_inbound),
    ("policy_documents", policy_documents),
];

/// The rules of an IPv4 header view (RFC 791): version 4, IHL at least 5 words, and
/// `IHL * 4 <= total length <= bytes received`.
fn ipv4_valid(data: &[u8]) -> bool {
    if data.len() < ipv4::HEADER_LEN || data[0] >> 4 != 4 || data[0] & 0x0f < 5 {
        return false;
    }
    let header_len = usize::from(data[0] & 0x0f) * 4;
    let total_len = usize::from(u16::from_be_bytes([data[2], data[3]]));
    header_len <= total_len && total_len <= data.len()
}

fn addr(b: &[u8]) -> Ipv4Addr {
    Ipv4Addr::new(b[0], b[1], b[2], b[3])
}

/// `Ipv4Packet::new_checked`: accepts exactly the valid headers, and then every accessor
/// stays within the buffer, agrees with the raw bytes, and survives a repr round trip.
pub fn ipv4(data: &[u8]) {
    let valid = ipv4_valid(data);
    let ip = match Ipv4Packet::new_checked(data) {
        Ok(ip) => ip,
        Err(e) => {
            assert!(!valid, "valid header refused: {e:?}");
            return;
        }
    };
    assert!(valid, "invalid header accepted");
    let header_len = usize::from(data[0] & 0x0f) * 4;
    let total_len = usize::from(u16::from_be_bytes([data[2], data[3]]));
    assert_eq!(ip.header_len(), header_len);
    assert_eq!(ip.total_len(), total_len);
    assert_eq!(ip.header(), &data[..header_len]);
    assert_eq!(ip.payload(), &data[header_len..total_len]);
    assert!(crate::is_subslice(data, ip.payload()));
    assert_eq!(ip.src(), addr(&data[12..16]));
    assert_eq!(ip.dst(), addr(&data[16..20]));
    assert_eq!(ip.protocol(), data[9]);
    assert_eq!(
        ip.verify_checksum(),
        checksum::checksum(&data[..header_len]) == 0
    );
    let frag = u16::from_be_bytes([data[6], data[7]]);
    assert_eq!(ip.dont_frag(), frag & 0x4000 != 0);
    assert_eq!(ip.is_fragment(), frag & 0x3fff != 0);

    // Rebuilding the header from its repr gives a valid packet with the same fields.
    let repr = Ipv4Repr::parse(&ip);
    let mut rebuilt = vec![0u8; ipv4::HEADER_LEN + repr.payload_len];
    repr.emit(&mut rebuilt);
    rebuilt[ipv4::HEADER_LEN..].copy_from_slice(ip.payload());
    let again = Ipv4Packet::new_checked(&rebuilt[..]).expect("emitted header parses");
    assert!(again.verify_checksum());
    assert_eq!(Ipv4Repr::parse(&again), repr);
    assert_eq!(again.payload(), ip.payload());
}

/// Where the transport header of `data` is by the rules of RFC 8200 sections 3 and 4, restated:
/// `None` unless version 6 and `40 + payload length <= bytes received`; then, walking from the
/// fixed header's Next Header within the payload: hop-by-hop (0) only as the very first
/// header, routing (43) and destination options (60) `8 * (1 + byte 1)` bytes long, fragment
/// (44) 8 bytes and the end of the chain when its offset is not 0, AH (51)
/// `4 * (2 + byte 1)`; any other value is the transport; at most 8 extension headers.
/// `Some(Ok((protocol, offset, routing seen)))` or `Some(Err(()))` for a chain the walk refuses.
#[allow(clippy::type_complexity)]
fn ipv6_walk(data: &[u8]) -> Option<Result<(u8, usize, bool), ()>> {
    if data.len() < 40 || data[0] >> 4 != 6 {
        return None;
    }
    let end = 40 + usize::from(u16::from_be_bytes([data[4], data[5]]));
    if end > data.len() {
        return None;
    }
    let (mut next, mut at, mut routing) = (data[6], 40, false);
    for count in 0..=8 {
        let len_byte = |at: usize| data[..end].get(at + 1).copied().map(usize::from);
        let len = match next {
            0 if count > 0 => return Some(Err(())),
            0 | 43 | 60 => len_byte(at).map(|l| (l + 1) * 8),
            44 => Some(8),
            51 => len_byte(at).map(|l| (l + 2) * 4),
            _ => return Some(Ok((next, at, routing))),
        };
        let Some(len) = len.filter(|&l| count < 8 && at + l <= end) else {
            return Some(Err(()));
        };
        routing |= next == 43;
        let later_fragment =
            next == 44 && u16::from_be_bytes([data[at + 2], data[at + 3]]) >> 3 != 0;
        next = data[at];
        at += len;
        if later_fragment {
            return Some(Ok((next, at, routing)));
        }
    }
    Some(Err(()))
}

/// `Ipv6Packet::new_checked` and `transport`: accept exactly what the restated rules accept,
/// find the same transport header, and the fixed header survives a repr round trip; the flow
/// hash never panics and ignores the flow label.
pub fn ipv6(data: &[u8]) {
    let expect = ipv6_walk(data);
    let hash = ipv6::flow_hash(data);
    if data.len() >= 4 {
        let mut relabelled = data.to_vec();
        relabelled[1] ^= 0x0f;
        relabelled[2] ^= 0xff;
        assert_eq!(
            ipv6::flow_hash(&relabelled),
            hash,
            "the flow label moved the hash"
        );
    }
    let ip = match (Ipv6Packet::new_checked(data), expect) {
        (Ok(ip), Some(_)) => ip,
        (Err(_), None) => return,
        (Ok(_), None) => panic!("invalid IPv6 header accepted"),
        (Err(e), Some(_)) => panic!("valid IPv6 header refused: {e:?}"),
    };
    let end = 40 + usize::from(u16::from_be_bytes([data[4], data[5]]));
    assert_eq!(ip.packet(), &data[..end]);
    assert_eq!(ip.payload(), &data[40..end]);
    match (ip.transport(), expect.expect("checked above")) {
        (Ok(t), Ok((protocol, offset, routing))) => {
            assert_eq!(
                (t.protocol, t.offset, t.routing),
                (protocol, offset, routing)
            );
            assert!(t.offset <= end);
        }
        (Err(_), Err(())) => {}
        (Ok(t), Err(())) => panic!("a chain the rules refuse was walked: {t:?}"),
        (Err(e), Ok(_)) => panic!("a valid chain was refused: {e:?}"),
    }
    let repr = Ipv6Repr::parse(&ip);
    let mut rebuilt = vec![0u8; ipv6::HEADER_LEN];
    repr.emit(&mut rebuilt);
    assert_eq!(&rebuilt[..], &data[..40]);
}

/// `ipip::decapsulate`: accepts exactly valid, checksummed, unfragmented protocol-4 packets,
/// and the inner bytes are the outer payload, in place.
pub fn ipip_decap(data: &[u8]) {
    let expect = ipv4_valid(data)
        .then(|| Ipv4Packet::new_checked(data).expect("valid"))
        .filter(|ip| {
            ip.verify_checksum() && ip.protocol() == ipv4::protocol::IPIP && !ip.is_fragment()
        });
    match (ipip::decapsulate(data), expect) {
        (Ok((src, inner)), Some(ip)) => {
            assert_eq!(src, addr(&data[12..16]));
            assert_eq!(crate::offset_in(data, inner), ip.header_len());
            assert_eq!(inner.len(), ip.total_len() - ip.header_len());
        }
        (Err(_), None) => {}
        (Ok(_), None) => panic!("invalid outer packet decapsulated"),
        (Err(e), Some(_)) => panic!("valid outer packet refused: {e:?}"),
    }
}

/// `vxlan::decapsulate` (RFC 7348): needs 8 + 14 bytes, the I flag, EtherType IPv4; the VNI
/// is bytes 4..7 and the inner packet everything after the inner Ethernet header, in place.
pub fn vxlan_decap(data: &[u8]) {
    let expect = data.len() >= vxlan::ENCAP_LEN
        && data[0] & 0x08 != 0
        && u16::from_be_bytes([data[20], data[21]]) == 0x0800;
    match vxlan::decapsulate(data) {
        Ok(frame) => {
            assert!(expect, "invalid VXLAN datagram decapsulated");
            let vni = u32::from_be_bytes([0, data[4], data[5], data[6]]);
            assert_eq!(frame.vni.get(), vni);
            assert_eq!(crate::offset_in(data, frame.inner), vxlan::ENCAP_LEN);
            assert_eq!(frame.inner.len(), data.len() - vxlan::ENCAP_LEN);
            assert_eq!(frame.dst_mac.0, data[8..14]);
            assert_eq!(frame.src_mac.0, data[14..20]);
        }
        Err(e) => assert!(!expect, "valid VXLAN datagram refused: {e:?}"),
    }
}

/// The fixed cluster the forwarding targets run in: this node 198.18.0.1 with pods in
/// 10.244.1.0/24, peers .2 (10.244.2.0/24) and .3 (10.244.3.0/24), VNI 42 for VXLAN.
pub mod cluster {
    use super::*;

    pub const SELF: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
    pub const PEER2: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
    pub const PEER3: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 3);
    pub const STRANGER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 99);
    pub const VNI: u32 = 42;
    pub const MTU: u16 = 1450;
    /// Outer sources the inbound target picks from (selector byte bits 1..3).
    pub const SENDERS: [Ipv4Addr; 4] = [PEER2, PEER3, STRANGER, SELF];

    pub fn own_cidr() -> Ipv4Net {
        "10.244.1.0/24".parse().expect("literal")
    }

    pub fn cluster_cidr() -> Ipv4Net {
        "10.244.0.0/16".parse().expect("literal")
    }

    pub fn peers() -> Vec<Peer> {
        [(PEER2, "10.244.2.0/24"), (PEER3, "10.244.3.0/24")]
            .into_iter()
            .map(|(ip, cidr)| Peer {
                node: format!("h{}", ip.octets()[3]),
                underlay_ip: ip,
                vtep_mac: MacAddr::vtep_for(ip),
                pod_cidr: cidr.parse().expect("literal"),
                encap: PeerEncap::Vxlan,
            })
            .collect()
    }

    /// A fresh forwarder (fresh counters) for `encap`, and its table.
    pub fn forwarder(vxlan: bool) -> (Forwarder, RouteTable) {
        let encap = if vxlan { Encap::Vxlan } else { Encap::Ipip };
        let config = NodeConfig {
            node: "h1".into(),
            underlay_ip: SELF,
            vtep_mac: MacAddr::vtep_for(SELF),
            pod_cidr: own_cidr(),
            cluster_cidr: cluster_cidr(),
            encap,
            vni: Vni::new(VNI).expect("24-bit"),
            mtu: MTU,
            send: SendPaths::all(MTU, u32::from(MTU) + 50),
            icmp_source: Ipv4Addr::new(10, 244, 1, 1),
        };
        let peers = peers()
            .into_iter()
            .map(|p| Peer {
                encap: PeerEncap::of(encap, None),
                ..p
            })
            .collect();
        let table = RouteTable::build(1, peers).expect("disjoint peers");
        (Forwarder::new(config, Arc::new(Counters::new())), table)
    }
}

/// Exactly one drop reason was counted, once, and it is `reason`.
fn counted_once(counters: &Counters, reason: DropReason) {
    assert_eq!(counters.total_drops(), 1, "drop not counted exactly once");
    assert_eq!(counters.drops(reason), 1, "{reason} not counted");
}

/// The full inbound decision (`inbound_ipip` / `inbound_vxlan`) over the fixed cluster.
///
/// Input: a selector byte (bit 0: VXLAN; bits 1-2: outer source, see
/// [`cluster::SENDERS`]; bit 3: for IP-in-IP, write that source into the outer header), then
/// the raw outer IPv4 packet (IP-in-IP) or UDP payload (VXLAN).
///
/// Invariants: a delivered packet is a valid IPv4 packet inside the input, exactly its total
/// length, from a peer, addressed into this node's pod CIDR, sourced from that peer's pod CIDR,
/// and counted as received; anything else is a drop counted exactly once under the reason
/// returned, and a stranger's packet is always `unknown_peer`.
pub fn inbound(data: &[u8]) {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let vxlan = selector & 1 != 0;
    let sender = cluster::SENDERS[usize::from(selector >> 1) & 3];
    let mut packet = rest.to_vec();
    if !vxlan && selector & 8 != 0 && packet.len() >= 16 {
        packet[12..16].copy_from_slice(&sender.octets());
    }
    let (fwd, table) = cluster::forwarder(vxlan);
    let (verdict, outer_src) = if vxlan {
        (fwd.inbound_vxlan(&table, sender, &packet), Some(sender))
    } else {
        let src = packet.get(12..16).map(addr);
        (fwd.inbound_ipip(&table, &packet), src)
    };
    let counters = fwd.counters();
    let peer = outer_src.and_then(|ip| cluster::peers().into_iter().find(|p| p.underlay_ip == ip));
    match verdict {
        Inbound::Deliver(inner) => {
            let peer = peer.expect("delivered a packet from a non-peer");
            assert!(crate::is_subslice(&packet, inner));
            let ip = Ipv4Packet::new_checked(inner).expect("delivered invalid IPv4");
            assert!(ip.verify_checksum(), "delivered a bad inner checksum");
            assert_eq!(ip.total_len(), inner.len());
            assert!(cluster::own_cidr().contains(&ip.dst()), "not for our pods");
            assert!(
                peer.pod_cidr.contains(&ip.src()),
                "spoofed source delivered"
            );
            if vxlan {
                let frame = vxlan::decapsulate(&packet).expect("delivered");
                assert_eq!(frame.vni.get(), cluster::VNI, "wrong VNI delivered");
            } else {
                ipip::decapsulate(&packet).expect("delivered from a bad outer header");
            }
            assert_eq!(counters.total_drops(), 0);
            assert_eq!(counters.rx.snapshot().packets, 1);
            assert_eq!(counters.rx.snapshot().bytes, inner.len() as u64);
        }
        Inbound::Drop(reason) => {
            counted_once(counters, reason);
            assert_eq!(counters.rx.snapshot().packets, 0);
            match (peer, outer_src) {
                (None, Some(_)) => assert_eq!(reason, DropReason::UnknownPeer),
                (None, None) => assert_eq!(reason, DropReason::Malformed, "no outer source"),
                (Some(_), _) => assert_ne!(reason, DropReason::UnknownPeer),
            }
        }
    }
}

/// `Forwarder::outbound` on a packet from a pod (pods are tenants: their bytes are untrusted).
///
/// Input: selector byte (bit 0: VXLAN), then the packet as read from `tunl0`.
/// Invariants: a sent packet decapsulates back to exactly the valid inner packet, for the
/// peer whose pod CIDR holds its destination, within the MTU; a reply is a valid ICMP error to
/// the original source; everything else is counted exactly once.
pub fn outbound(data: &[u8]) {
    let Some((&selector, packet)) = data.split_first() else {
        return;
    };
    let vxlan = selector & 1 != 0;
    let (fwd, table) = cluster::forwarder(vxlan);
    let mut buf = vec![0u8; HEADROOM + packet.len()];
    buf[HEADROOM..].copy_from_slice(packet);
    let mut scratch = vec![0u8; SCRATCH_LEN];
    let counters = fwd.counters().clone();
    match fwd.outbound(&table, &mut buf, HEADROOM, packet.len(), &mut scratch) {
        Outbound::Send { peer, bytes, .. } => {
            let peer = cluster::peers()
                .into_iter()
                .find(|p| p.underlay_ip == peer)
                .expect("sent to a non-peer");
            let inner = if vxlan {
                let frame = vxlan::decapsulate(bytes).expect("own VXLAN decapsulates");
                assert_eq!(frame.vni.get(), cluster::VNI);
                assert_eq!(frame.dst_mac, peer.vtep_mac);
                frame.inner
            } else {
                let (src, inner) = ipip::decapsulate(bytes).expect("own IP-in-IP decapsulates");
                assert_eq!(src, cluster::SELF);
                inner
            };
            let ip = Ipv4Packet::new_checked(inner).expect("sent invalid IPv4");
            assert!(ip.verify_checksum());
            assert_eq!(inner, &packet[..ip.total_len()], "inner bytes changed");
            assert!(inner.len() <= usize::from(cluster::MTU));
            assert!(peer.pod_cidr.contains(&ip.dst()));
            assert_eq!(counters.total_drops(), 0);
            assert_eq!(counters.tx.snapshot().packets, 1);
        }
        Outbound::Reply(reply) => {
            let ip = Ipv4Packet::new_checked(reply).expect("ICMP error is IPv4");
            assert!(ip.verify_checksum());
            assert_eq!(ip.protocol(), ipv4::protocol::ICMP);
            assert!(reply.len() <= 576, "RFC 1812: ICMP errors fit 576 bytes");
            assert_eq!(ip.dst(), addr(&packet[12..16]), "reply to the sender");
            assert_eq!(checksum::checksum(ip.payload()), 0, "ICMP checksum");
            assert_eq!(counters.total_drops(), 1);
            assert_eq!(counters.icmp_sent(), 1);
        }
        Outbound::Drop(reason) => {
            counted_once(&counters, reason);
            assert_eq!(counters.tx.snapshot().packets, 0);
        }
    }
}

/// TCP payload of a valid TCP/IPv4 packet, checking both checksums.
fn tcp_payload(packet: &[u8]) -> &[u8] {
    let ip = Ipv4Packet::new_checked(packet).expect("segment is IPv4");
    assert!(ip.verify_checksum(), "segment IPv4 checksum");
    assert_eq!(ip.protocol(), ipv4::protocol::TCP);
    assert_eq!(ip.total_len(), packet.len());
    let l4 = ip.payload();
    let sum = checksum::pseudo_header(ip.src(), ip.dst(), ipv4::protocol::TCP, l4.len() as u16);
    assert_eq!(
        checksum::finish(checksum::partial(l4, sum)),
        0,
        "segment TCP checksum"
    );
    let data_offset = usize::from(l4[12] >> 4) * 4;
    &packet[ip.header_len() + data_offset..]
}

/// `gso::segment` on a super-packet with a virtio header from the input, then `gro` on the
/// segments.
///
/// Input: 10 bytes of virtio header, one byte of prefix length (mod 64), the packet.
/// Invariants: every segment is a valid TCP/IPv4 packet with correct checksums, at most
/// `gso_size` payload bytes, placed where `Segments` says; their payloads concatenate to the
/// original payload; coalescing the segments again gives back that payload, in order.
pub fn gso(data: &[u8]) {
    let Ok(hdr) = VirtioNetHdr::parse(data) else {
        return;
    };
    let Some((&prefix, packet)) = data[10..].split_first() else {
        return;
    };
    let prefix_len = usize::from(prefix % 64);
    let Ok(plan) = gso::plan(&hdr, packet, prefix_len) else {
        assert!(gso::segment(&hdr, packet, prefix_len, &mut [], |_, _| {}).is_err());
        return;
    };
    let mut out = vec![0xa5u8; plan.total_len() + 7];
    let mut prefixes_seen = 0;
    let segs = gso::segment(&hdr, packet, prefix_len, &mut out, |p, _| {
        assert_eq!(p.len(), prefix_len);
        prefixes_seen += 1;
    })
    .expect("plan said it fits");
    assert_eq!(segs, plan);
    assert_eq!(prefixes_seen, segs.count);
    assert!(
        out[segs.total_len()..].iter().all(|&b| b == 0xa5),
        "wrote past the end"
    );

    let ip = Ipv4Packet::new_checked(packet).expect("segmented a non-IPv4 packet");
    let original_payload = {
        let l4 = ip.payload();
        &l4[usize::from(l4[12] >> 4) * 4..]
    };
    let mss = match hdr.gso_type & 0x7f {
        GSO_NONE => original_payload.len().max(1),
        GSO_TCPV4 => usize::from(hdr.gso_size),
        other => panic!("segmented GSO type {other}"),
    };
    let mut joined = Vec::with_capacity(original_payload.len());
    let mut gro = Coalescer::new();
    let mut regrouped = Vec::new();
    let bufs = [&out[..]];
    for range in segs.iter() {
        let segment = &out[range.start + prefix_len..range.end];
        let payload = tcp_payload(segment);
        assert!(payload.len() <= mss, "segment over gso_size");
        joined.extend_from_slice(payload);
        let at = Span {
            buf: 0,
            start: range.start + prefix_len,
            end: range.end,
        };
        gro.push(&bufs, at, |b| regrouped.push(gather(b)));
    }
    gro.flush(&bufs, |b| regrouped.push(gather(b)));
    assert_eq!(joined, original_payload, "segments lost or reordered bytes");

    let mut rejoined = Vec::with_capacity(joined.len());
    for output in &regrouped {
        rejoined.extend_from_slice(tcp_payload_of_output(output));
    }
    assert_eq!(rejoined, joined, "coalescing lost or reordered bytes");
}

/// One coalescer output as contiguous bytes.
fn gather(parts: &[std::io::IoSlice<'_>]) -> Vec<u8> {
    parts.iter().flat_map(|p| p.iter().copied()).collect()
}

/// TCP payload of one coalescer output (`[virtio header][IPv4 packet]`).
fn tcp_payload_of_output(output: &[u8]) -> &[u8] {
    let hdr = VirtioNetHdr::parse(output).expect("output has a virtio header");
    let packet = &output[10..];
    let ip = Ipv4Packet::new_checked(packet).expect("output is IPv4");
    assert!(ip.verify_checksum());
    assert_eq!(ip.total_len(), packet.len());
    if hdr.gso_kind() == GSO_TCPV4 {
        assert!(hdr.gso_size > 0);
        // The kernel segments it again; our segmenter must accept what our coalescer built.
        gso::plan(&hdr, packet, 0).expect("coalesced packet segments");
    }
    let l4 = ip.payload();
    &packet[ip.header_len() + usize::from(l4[12] >> 4) * 4..]
}

/// `gro::Coalescer` on a receive batch of arbitrary packets.
///
/// Input: packets, each preceded by a 2-byte big-endian length (the rest of the input if
/// shorter). Invariant: every input comes out exactly once, alone or inside a super-packet:
/// counting a `GSO_TCPV4` output as the number of segments it stands for, outputs equal inputs;
/// every output carries a parseable virtio header, and a pass-through is the input unchanged.
pub fn gro(data: &[u8]) {
    let mut packets = Vec::new();
    let mut rest = data;
    while rest.len() >= 2 && packets.len() < 64 {
        let len = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
        let body = &rest[2..];
        let take = len.min(body.len());
        packets.push(&body[..take]);
        rest = &body[take..];
    }
    let mut coalescer = Coalescer::with_flows(2);
    let mut outputs: Vec<Vec<u8>> = Vec::new();
    for (i, p) in packets.iter().enumerate() {
        coalescer.push(&packets, Span::whole(i, p.len()), |b| {
            outputs.push(gather(b))
        });
    }
    coalescer.flush(&packets, |b| outputs.push(gather(b)));
    assert_eq!(coalescer.held(), 0, "flush left flows held");

    let mut represented = 0usize;
    for output in &outputs {
        let hdr = VirtioNetHdr::parse(output).expect("every output has a virtio header");
        let packet = &output[10..];
        if hdr.gso_kind() == GSO_TCPV4 {
            let plan = gso::plan(&hdr, packet, 0).expect("coalesced packet segments");
            assert!(plan.count >= 2, "a super-packet of one segment");
            tcp_payload_of_output(output);
            represented += plan.count;
        } else {
            assert!(
                packets.iter().any(|p| p.starts_with(packet)),
                "pass-through output is not one of the inputs"
            );
            represented += 1;
        }
    }
    assert_eq!(represented, packets.len(), "packets lost or duplicated");
}

/// The control API's JSON bodies and node names.
///
/// Input: one byte selecting what to parse, then the body or name.
/// Invariants: the server's registration parser never panics and what it accepts
/// re-serializes to a body it and the typed parser accept again unchanged;
/// a name passes validation only if it is a DNS label (so never a path separator, `..`, a
/// control character or over 63 bytes); watch events the agent reads parse or fail cleanly.
pub fn api_json(data: &[u8]) {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    match selector % 3 {
        0 => {
            let Ok(req) = podnet_control::server::parse_register(body) else {
                return;
            };
            let text = serde_json::to_vec(&req).expect("requests serialize");
            let again = podnet_control::server::parse_register(&text).expect("re-parses");
            assert_eq!(again, req);
            // The agent's side of the contract: what the server accepts, the typed parser
            // reads the same way once re-serialized.
            let typed: RegisterRequest = serde_json::from_slice(&text).expect("typed parse");
            assert_eq!(typed, req);
        }
        1 => {
            let Ok(name) = std::str::from_utf8(body) else {
                return;
            };
            let dns_label = !name.is_empty()
                && name.len() <= MAX_NODE_NAME_LEN
                && name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !name.starts_with('-')
                && !name.ends_with('-');
            assert_eq!(validate_node_name(name).is_ok(), dns_label, "{name:?}");
            if dns_label {
                assert!(!name.contains(['/', '\\', '.', '\0']));
                assert!(!name.chars().any(char::is_control));
            }
        }
        _ => {
            if let Ok(event) = serde_json::from_slice::<WatchEvent>(body) {
                let text = serde_json::to_vec(&event).expect("events serialize");
                let again: WatchEvent = serde_json::from_slice(&text).expect("re-parses");
                assert_eq!(again, event);
            }
        }
    }
}

/// Two WireGuard nodes with a completed handshake: `.0` receives from `.1` (at 198.18.0.2).
struct WgPair {
    rx: std::sync::Arc<podnet_dataplane::wireguard::Tunnel>,
    tx: std::sync::Arc<podnet_dataplane::wireguard::Tunnel>,
    _nodes: [podnet_dataplane::wireguard::Wireguard; 2],
}

const WG_TX: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);

fn wg_pair() -> WgPair {
    use podnet_dataplane::wireguard::{Keys, Opened, Sealed, Wireguard};
    let node = |own: u8, peer_ip: Ipv4Addr, peer: u8| {
        let w = Wireguard::new(Keys::from_private([own; 32]));
        let key = Keys::from_private([peer; 32]).public();
        let peer = Peer {
            node: "peer".into(),
            underlay_ip: peer_ip,
            vtep_mac: MacAddr::vtep_for(peer_ip),
            pod_cidr: "10.244.9.0/24".parse().unwrap(),
            encap: PeerEncap::Wireguard(key),
        };
        w.sync(&RouteTable::build(1, vec![peer]).unwrap());
        w
    };
    let rx_ip = Ipv4Addr::new(198, 18, 0, 1);
    let (a, b) = (node(1, WG_TX, 2), node(2, rx_ip, 1));
    let (rx, tx) = (a.tunnel(WG_TX).unwrap(), b.tunnel(rx_ip).unwrap());
    let (mut m, mut r) = (vec![0u8; 2048], vec![0u8; 2048]);
    let Sealed::Handshake(n) = tx.seal(&[], &mut m) else {
        panic!("no handshake")
    };
    let Opened::Control { reply, .. } = rx.open(WG_TX, &m[..n], &mut r) else {
        panic!("initiation refused")
    };
    tx.open(rx_ip, &r[..reply], &mut m);
    WgPair {
        rx,
        tx,
        _nodes: [a, b],
    }
}

thread_local! {
    static WG: WgPair = wg_pair();
}

/// The inbound WireGuard path (what a node does with a datagram on UDP 51820).
///
/// Byte 0 picks the case. Even: the rest is a datagram from a peer's address; no forgery can
/// authenticate, so it never yields an inner packet or a handshake answer, only a drop under
/// `malformed` or a `wg_*` reason. Odd: the peer seals the rest as an inner packet; opening
/// it gives back exactly the IPv4 packet it holds (cut to its total length), a keepalive for
/// nothing, and a drop for anything else; the same message with a ciphertext byte flipped
/// (byte 1 picks which) is `wg_bad_mac`.
pub fn wireguard_inbound(data: &[u8]) {
    use podnet_dataplane::wireguard::{Opened, Sealed};
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut out = vec![0u8; rest.len() + 256];
    WG.with(|wg| {
        if mode % 2 == 0 {
            match wg.rx.open(WG_TX, rest, &mut out) {
                Opened::Drop(r) => assert!(
                    r == DropReason::Malformed || r.name().starts_with("wg_"),
                    "forgery dropped as {r}"
                ),
                other => panic!("a forged message was accepted: {other:?}"),
            }
            return;
        }
        let mut sealed = vec![0u8; rest.len() + 256];
        let Sealed::Data(n) = wg.tx.seal(rest, &mut sealed) else {
            panic!("the session is established")
        };
        assert_eq!(n, rest.len() + 32, "no padding");
        if n > 16 && rest.len() > 1 {
            let mut bad = sealed[..n].to_vec();
            bad[16 + usize::from(rest[0]) % (n - 16)] ^= 1;
            assert_eq!(
                wg.rx.open(WG_TX, &bad, &mut out),
                Opened::Drop(DropReason::WgBadMac),
                "tampered ciphertext"
            );
        }
        let opened = wg.rx.open(WG_TX, &sealed[..n], &mut out);
        let ipv4_len = (rest.len() >= 20 && rest[0] >> 4 == 4)
            .then(|| usize::from(u16::from_be_bytes([rest[2], rest[3]])))
            .filter(|&len| len <= rest.len());
        match (opened, ipv4_len) {
            (Opened::Packet(r), Some(len)) => assert_eq!(&out[r], &rest[..len]),
            (Opened::Control { reply: 0, .. }, None) if rest.is_empty() => {}
            (Opened::Drop(DropReason::NotIpv4 | DropReason::Malformed), None) => {}
            (other, len) => panic!(
                "sealed {} bytes (IPv4 length {len:?}): {other:?}",
                rest.len()
            ),
        }
    });
}

/// A policy file (`podnet-control policy apply -f`): any bytes end in policies or an error,
/// never a panic. What is accepted passes validation, reads back unchanged from its own JSON,
/// and, compiled into a node's rules for the probe layout (9 pods, 3 namespaces), allows exactly
/// what Kubernetes' semantics decide for every pair, on TCP and UDP ports 80 and 81.
pub fn policy_documents(data: &[u8]) {
    use podnet_control::documents::read_policies;
    use podnet_proto::policy::{fixtures::probe_cluster, Protocol};
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(policies) = read_policies(text) else {
        return;
    };
    for p in &policies {
        p.validate().expect("an accepted policy validates");
        let json = serde_json::to_string(p).expect("policies serialize");
        let again = read_policies(&json).expect("a policy's own JSON reads again");
        assert_eq!(again, std::slice::from_ref(p));
    }
    let cluster = probe_cluster(policies);
    let rules = podnet_dataplane::core::policy::compile(&cluster, &cluster.pods);
    for src in &cluster.pods {
        for dst in cluster.pods.iter().filter(|d| *d != src) {
            let (std::net::IpAddr::V4(s), std::net::IpAddr::V4(d)) = (src.ips[0], dst.ips[0])
            else {
                unreachable!("the probe layout is IPv4")
            };
            for protocol in [Protocol::Tcp, Protocol::Udp] {
                for port in [80, 81] {
                    let want = cluster
                        .decide(src.ips[0], dst.ips[0], port, protocol)
                        .allowed();
                    assert_eq!(
                        rules.allows(s, d, port, Some(protocol)),
                        want,
                        "{}/{} -> {}/{} {port}/{protocol}",
                        src.namespace,
                        src.name,
                        dst.namespace,
                        dst.name
                    );
                }
            }
        }
    }
}

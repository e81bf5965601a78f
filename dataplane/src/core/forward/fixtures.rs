//! Packets, nodes and tables shared by the forwarder's unit tests.

use std::net::Ipv4Addr;
use std::sync::Arc;

use ipnet::Ipv4Net;
use podnet_proto::ethernet::MacAddr;
use podnet_proto::vxlan::Vni;

use podnet_proto::api::Encap;

use super::config::{NodeConfig, SendPaths};
use super::forwarder::Forwarder;
use super::outbound::{Outbound, HEADROOM, SCRATCH_LEN};
use crate::core::drops::{Counters, DropReason};
use crate::core::table::{Peer, PeerEncap, RouteTable};

/// UDP 10.244.1.2:12345 -> 10.244.2.3:53, DF, TTL 64, payload "hi" (30 bytes).
pub(crate) const INNER: [u8; 30] = [
    0x45, 0x00, 0x00, 0x1e, 0x00, 0x01, 0x40, 0x00, 0x40, 0x11, 0x21, 0xe2, // IPv4
    0x0a, 0xf4, 0x01, 0x02, 0x0a, 0xf4, 0x02, 0x03, //
    0x30, 0x39, 0x00, 0x35, 0x00, 0x0a, 0x00, 0x00, // UDP, no checksum
    b'h', b'i',
];

/// Outer IPv4 for [`INNER`] from 198.18.0.1 to 198.18.0.2: protocol 4, TTL 64, DF copied,
/// identification 0 (the first packet of a forwarder).
pub(crate) const IPIP_OUTER: [u8; 20] = [
    0x45, 0x00, 0x00, 0x32, 0x00, 0x00, 0x40, 0x00, 0x40, 0x04, 0xae, 0xa0, //
    0xc6, 0x12, 0x00, 0x01, 0xc6, 0x12, 0x00, 0x02,
];

/// VXLAN (I flag, VNI 1) + Ethernet 02:00:c6:12:00:02 <- 02:00:c6:12:00:01, IPv4.
pub(crate) const VXLAN_PREFIX: [u8; 22] = [
    0x08, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01, 0x00, //
    0x02, 0x00, 0xc6, 0x12, 0x00, 0x02, 0x02, 0x00, 0xc6, 0x12, 0x00, 0x01, 0x08, 0x00,
];

pub(crate) fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

pub(crate) use crate::core::table::test_peer as peer;

pub(crate) fn table() -> RouteTable {
    table_of(Encap::Vxlan)
}

/// Nodes a, b, c (1-3), all receiving `encap`.
pub(crate) fn table_of(encap: Encap) -> RouteTable {
    let peers = [peer("a", 1), peer("b", 2), peer("c", 3)]
        .map(|p| Peer {
            encap: PeerEncap::of(encap, None),
            ..p
        })
        .to_vec();
    RouteTable::build(1, peers).unwrap()
}

/// Node `n` of `encap`, and a table of nodes that all receive `encap`.
pub(crate) fn pair(n: u8, encap: Encap) -> (Forwarder, RouteTable) {
    (node(n, encap), table_of(encap))
}

pub(crate) fn node(n: u8, encap: Encap) -> Forwarder {
    let underlay_ip = Ipv4Addr::new(198, 18, 0, n);
    let config = NodeConfig {
        node: format!("n{n}"),
        underlay_ip,
        vtep_mac: MacAddr::vtep_for(underlay_ip),
        pod_cidr: Ipv4Net::new(Ipv4Addr::new(10, 244, n, 0), 24).unwrap(),
        cluster_cidr: "10.244.0.0/16".parse().unwrap(),
        encap,
        vni: Vni::default(),
        mtu: 1450,
        send: SendPaths::all(1450, 1500),
        icmp_source: Ipv4Addr::new(10, 244, 0, 254),
    };
    Forwarder::new(config, Arc::new(Counters::new()))
}

/// Node `n` receiving VXLAN with network identifier `vni`.
pub(crate) fn vxlan_node(n: u8, vni: Vni) -> Forwarder {
    let mut config = node(n, Encap::Vxlan).config().clone();
    config.vni = vni;
    Forwarder::new(config, Arc::new(Counters::new()))
}

/// `packet` placed after `HEADROOM` bytes of headroom.
pub(crate) fn with_headroom(packet: &[u8]) -> Vec<u8> {
    let mut buf = vec![0xee; HEADROOM];
    buf.extend_from_slice(packet);
    buf
}

/// Re-computes the IPv4 header checksum after a test edits a header field.
pub(crate) fn fix_checksum(packet: &mut [u8]) {
    packet[10..12].fill(0);
    let c = podnet_proto::checksum::checksum(&packet[..20]);
    packet[10..12].copy_from_slice(&c.to_be_bytes());
}

pub(crate) fn out(
    fwd: &Forwarder,
    table: &RouteTable,
    packet: &[u8],
) -> (Vec<u8>, Option<Ipv4Addr>) {
    let mut buf = with_headroom(packet);
    let mut scratch = [0; SCRATCH_LEN];
    match fwd.outbound(table, &mut buf, HEADROOM, packet.len(), &mut scratch) {
        Outbound::Send { peer, bytes, .. } => (bytes.to_vec(), Some(peer)),
        Outbound::Reply(r) => (r.to_vec(), None),
        Outbound::Drop(r) => panic!("dropped: {r}"),
    }
}

pub(crate) fn out_drop(fwd: &Forwarder, table: &RouteTable, packet: &[u8]) -> DropReason {
    let mut buf = with_headroom(packet);
    let mut scratch = [0; SCRATCH_LEN];
    match fwd.outbound(table, &mut buf, HEADROOM, packet.len(), &mut scratch) {
        Outbound::Drop(r) => r,
        other => panic!("not dropped: {other:?}"),
    }
}

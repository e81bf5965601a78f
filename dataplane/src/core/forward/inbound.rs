//! Inbound: a tunnel packet from a peer checked (its sender, its encapsulation, its inner
//! addresses) and its inner packet delivered into `tunl0`, or dropped under a named reason.

use std::net::Ipv4Addr;

use podnet_proto::api::Encap;
use podnet_proto::ipv4;
use podnet_proto::vxlan::{self, Vni};
use podnet_proto::{ipip, WireError};

use super::forwarder::{parse_ipv4, Forwarder};
use crate::core::drops::DropReason;
use crate::core::dropwatch::DropContext;
use crate::core::table::RouteTable;

/// Result of [`Forwarder::inbound_ipip`] and [`Forwarder::inbound_vxlan`].
#[derive(Debug, PartialEq, Eq)]
pub enum Inbound<'a> {
    /// Write this inner IPv4 packet into `tunl0`.
    Deliver(&'a [u8]),
    /// Drop the packet (already counted).
    Drop(DropReason),
}

/// Delivered traffic not yet added to the shared counters. The receive path tallies a whole
/// batch here ([`Forwarder::inbound_vxlan_tallied`]) and adds it with one update per counter
/// ([`commit`](Self::commit)) instead of four atomic additions per packet.
#[derive(Debug, Default)]
pub struct RxTally {
    /// The sending peer of what is tallied (its index in the table of this batch).
    peer: Option<usize>,
    packets: u64,
    bytes: u64,
}

impl RxTally {
    fn add(&mut self, fwd: &Forwarder, table: &RouteTable, peer: usize, bytes: usize) {
        if self.peer != Some(peer) {
            self.commit(fwd, table);
            self.peer = Some(peer);
        }
        self.packets += 1;
        self.bytes += bytes as u64;
    }

    /// Adds what is tallied to the node's and the peer's counters and starts over. `table`
    /// must be the one the packets were tallied with.
    pub fn commit(&mut self, fwd: &Forwarder, table: &RouteTable) {
        if let Some(peer) = self.peer.take() {
            fwd.counters.rx.add_many(self.packets, self.bytes);
            table.counters(peer).rx.add_many(self.packets, self.bytes);
        }
        self.packets = 0;
        self.bytes = 0;
    }
}

impl Forwarder {
    /// Handles one IP-in-IP packet as the raw socket delivers it (outer header included).
    ///
    /// Checks, in order: outer source is a current peer (`unknown_peer`), outer header and
    /// decapsulation (`malformed`), then the inner checks of [`inbound_vxlan`](Self::inbound_vxlan).
    pub fn inbound_ipip<'a>(&self, table: &RouteTable, outer: &'a [u8]) -> Inbound<'a> {
        self.counted_at_once(table, |tally| {
            self.inbound_ipip_tallied(table, outer, tally)
        })
    }

    /// [`inbound_ipip`](Self::inbound_ipip) for a receive batch: a delivered packet is counted
    /// in `tally`, which the caller commits once per batch. Drops are counted at once.
    pub fn inbound_ipip_tallied<'a>(
        &self,
        table: &RouteTable,
        outer: &'a [u8],
        tally: &mut RxTally,
    ) -> Inbound<'a> {
        // The source is read before the outer header is validated so that packets from
        // strangers are counted as such, whatever their shape.
        let Some(src) = outer.get(12..16) else {
            let ctx = DropContext {
                outer_src: None,
                ..DropContext::rx(Ipv4Addr::UNSPECIFIED, outer)
            };
            return self.deliver_drop(DropReason::Malformed, table, None, ctx);
        };
        let src = Ipv4Addr::new(src[0], src[1], src[2], src[3]);
        // For the drop sampler only: where the inner packet would start.
        let ctx = DropContext::rx(src, outer.get(ipv4::HEADER_LEN..).unwrap_or_default());
        let Some(index) = table.by_underlay(src) else {
            return self.deliver_drop(DropReason::UnknownPeer, table, None, ctx);
        };
        let inner = match ipip::decapsulate(outer) {
            Ok((_, inner)) => inner,
            Err(_) => return self.deliver_drop(DropReason::Malformed, table, Some(index), ctx),
        };
        self.inner(table, index, inner, tally)
    }

    /// Handles one VXLAN UDP payload received from `outer_src`.
    ///
    /// Checks, in order: `outer_src` is a current peer (`unknown_peer`), VXLAN header and inner
    /// Ethernet (`malformed`; a non-IPv4 EtherType is `not_ipv4`), VNI (`wrong_vni`), inner
    /// IPv4 valid (`not_ipv4` / `malformed`), inner destination in this node's pod CIDR
    /// (`not_local`), inner source in the sending peer's pod CIDR (`spoofed`). The inner
    /// Ethernet addresses are not checked: a kernel VXLAN peer may use its device MAC as source.
    pub fn inbound_vxlan<'a>(
        &self,
        table: &RouteTable,
        outer_src: Ipv4Addr,
        udp_payload: &'a [u8],
    ) -> Inbound<'a> {
        self.counted_at_once(table, |tally| {
            self.inbound_vxlan_tallied(table, outer_src, udp_payload, tally)
        })
    }

    /// Runs one tallied receive decision and commits its tally right away: the per-packet
    /// entry points.
    fn counted_at_once<'a>(
        &self,
        table: &RouteTable,
        decide: impl FnOnce(&mut RxTally) -> Inbound<'a>,
    ) -> Inbound<'a> {
        let mut tally = RxTally::default();
        let verdict = decide(&mut tally);
        tally.commit(self, table);
        verdict
    }

    /// [`inbound_vxlan`](Self::inbound_vxlan) for a receive batch: a delivered packet is
    /// counted in `tally`, which the caller commits once per batch. Drops are counted at once.
    pub fn inbound_vxlan_tallied<'a>(
        &self,
        table: &RouteTable,
        outer_src: Ipv4Addr,
        udp_payload: &'a [u8],
        tally: &mut RxTally,
    ) -> Inbound<'a> {
        // For the drop sampler only: where the inner packet would start.
        let ctx = DropContext::rx(
            outer_src,
            udp_payload.get(vxlan::ENCAP_LEN..).unwrap_or_default(),
        );
        let Some(index) = table.by_underlay(outer_src) else {
            return self.deliver_drop(DropReason::UnknownPeer, table, None, ctx);
        };
        let frame = match vxlan::decapsulate(udp_payload) {
            Ok(f) => f,
            Err(WireError::BadEtherType(_)) => {
                return self.deliver_drop(DropReason::NotIpv4, table, Some(index), ctx)
            }
            Err(_) => return self.deliver_drop(DropReason::Malformed, table, Some(index), ctx),
        };
        let expected = match self.config.encap {
            Encap::Vxlan => self.config.vni,
            Encap::Ipip | Encap::None | Encap::Wireguard => Vni::default(),
        };
        if frame.vni != expected {
            return self.deliver_drop(DropReason::WrongVni, table, Some(index), ctx);
        }
        self.inner(table, index, frame.inner, tally)
    }

    /// The checks of an inner packet that WireGuard decrypted from the peer at `index` (the
    /// session the message belonged to): those of [`inbound_vxlan`](Self::inbound_vxlan) after
    /// the VNI. The sending peer's pod CIDR is its allowed IPs: `spoofed` is WireGuard's
    /// cryptokey routing check.
    pub fn inbound_decrypted_tallied<'a>(
        &self,
        table: &RouteTable,
        index: usize,
        inner: &'a [u8],
        tally: &mut RxTally,
    ) -> Inbound<'a> {
        self.inner(table, index, inner, tally)
    }

    /// Counts an inbound message from `src` dropped for `reason` before it yielded an inner
    /// packet (a WireGuard message that failed its checks), against the peer at `peer` when
    /// it came from one.
    pub fn drop_inbound(
        &self,
        reason: DropReason,
        table: &RouteTable,
        peer: Option<usize>,
        src: Ipv4Addr,
        bytes: &[u8],
    ) {
        self.deliver_drop(reason, table, peer, DropContext::rx(src, bytes));
    }

    /// Inner-packet checks shared by every encapsulation; `index` is the sending peer.
    fn inner<'a>(
        &self,
        table: &RouteTable,
        index: usize,
        inner: &'a [u8],
        tally: &mut RxTally,
    ) -> Inbound<'a> {
        let ctx = DropContext::rx(table.peer(index).underlay_ip, inner);
        let ip = match parse_ipv4(inner) {
            Ok(ip) => ip,
            Err(reason) => return self.deliver_drop(reason, table, Some(index), ctx),
        };
        if !self.config.pod_cidr.contains(&ip.dst()) {
            return self.deliver_drop(DropReason::NotLocal, table, Some(index), ctx);
        }
        if !table.peer(index).pod_cidr.contains(&ip.src()) {
            return self.deliver_drop(DropReason::Spoofed, table, Some(index), ctx);
        }
        // Trailing bytes after the IPv4 total length (link padding) are not delivered.
        let packet = &inner[..ip.total_len()];
        tally.add(self, table, index, packet.len());
        Inbound::Deliver(packet)
    }

    /// Counts an inbound drop, against the sending peer at `peer` when it is known.
    fn deliver_drop<'a>(
        &self,
        reason: DropReason,
        table: &RouteTable,
        peer: Option<usize>,
        ctx: DropContext<'_>,
    ) -> Inbound<'a> {
        let peer = peer.map(|i| &**table.counters(i));
        self.counters.record_drop(reason, peer, &ctx);
        Inbound::Drop(reason)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::forward::fixtures::*;

    /// Node 2 receiving [`INNER`] (10.244.1.2 -> 10.244.2.3) from node 1.
    fn ipip_from_1(inner: &[u8]) -> Vec<u8> {
        let mut outer = IPIP_OUTER.to_vec();
        outer[2..4].copy_from_slice(&((20 + inner.len()) as u16).to_be_bytes());
        fix_checksum(&mut outer);
        outer.extend_from_slice(inner);
        outer
    }

    #[test]
    fn inbound_ipip_delivers_inner_packet() {
        let (fwd, t) = pair(2, Encap::Ipip);
        let mut outer = IPIP_OUTER.to_vec();
        outer.extend_from_slice(&INNER);
        assert_eq!(fwd.inbound_ipip(&t, &outer), Inbound::Deliver(&INNER[..]));
        let a = t.by_underlay(ip("198.18.0.1")).unwrap();
        assert_eq!(t.counters(a).snapshot().rx.bytes, 30);
        assert_eq!(fwd.counters().rx.snapshot().packets, 1);
    }

    #[test]
    fn a_batch_is_counted_once_at_commit_and_drops_at_once() {
        let (fwd, t) = pair(2, Encap::Vxlan);
        let mut payload = VXLAN_PREFIX.to_vec();
        payload.extend_from_slice(&INNER);
        let (from_a, stranger) = (ip("198.18.0.1"), ip("198.18.0.99"));
        let a = t.by_underlay(from_a).unwrap();
        let mut tally = RxTally::default();
        for _ in 0..3 {
            let verdict = fwd.inbound_vxlan_tallied(&t, from_a, &payload, &mut tally);
            assert_eq!(verdict, Inbound::Deliver(&INNER[..]));
        }
        let verdict = fwd.inbound_vxlan_tallied(&t, stranger, &payload, &mut tally);
        assert_eq!(verdict, Inbound::Drop(DropReason::UnknownPeer));
        assert_eq!(
            fwd.counters().rx.snapshot().packets,
            0,
            "tallied, not yet counted"
        );
        assert_eq!(fwd.counters().drops(DropReason::UnknownPeer), 1);
        tally.commit(&fwd, &t);
        let (node_rx, peer_rx) = (fwd.counters().rx.snapshot(), t.counters(a).snapshot().rx);
        assert_eq!((node_rx.packets, node_rx.bytes), (3, 90));
        assert_eq!((peer_rx.packets, peer_rx.bytes), (3, 90));
        tally.commit(&fwd, &t);
        assert_eq!(
            fwd.counters().rx.snapshot().packets,
            3,
            "a commit empties the tally"
        );
    }

    #[test]
    fn inbound_ipip_checks_in_order() {
        let (fwd, t) = pair(2, Encap::Ipip);
        let drop = |outer: &[u8]| match fwd.inbound_ipip(&t, outer) {
            Inbound::Drop(r) => r,
            Inbound::Deliver(_) => panic!("delivered"),
        };
        assert_eq!(drop(&IPIP_OUTER[..10]), DropReason::Malformed);
        let mut stranger = ipip_from_1(&INNER);
        stranger[12..16].copy_from_slice(&[198, 18, 0, 99]);
        fix_checksum(&mut stranger);
        assert_eq!(drop(&stranger), DropReason::UnknownPeer);
        // A stranger's garbage is unknown_peer, not malformed.
        stranger[0] = 0;
        assert_eq!(drop(&stranger), DropReason::UnknownPeer);
        let mut bad_outer = ipip_from_1(&INNER);
        bad_outer[11] ^= 0xff;
        assert_eq!(drop(&bad_outer), DropReason::Malformed);
        assert_eq!(drop(&ipip_from_1(&INNER[..25])), DropReason::Malformed);

        let mut v6 = INNER;
        v6[0] = 0x60;
        assert_eq!(drop(&ipip_from_1(&v6)), DropReason::NotIpv4);
        let mut bad_inner = INNER;
        bad_inner[11] ^= 1;
        assert_eq!(drop(&ipip_from_1(&bad_inner)), DropReason::Malformed);

        let with = |src: [u8; 4], dst: [u8; 4]| {
            let mut p = INNER;
            p[12..16].copy_from_slice(&src);
            p[16..20].copy_from_slice(&dst);
            fix_checksum(&mut p);
            ipip_from_1(&p)
        };
        assert_eq!(
            drop(&with([10, 244, 1, 2], [10, 244, 3, 3])),
            DropReason::NotLocal
        );
        assert_eq!(
            drop(&with([10, 244, 3, 2], [10, 244, 2, 3])),
            DropReason::Spoofed
        );
        // NotLocal is checked before Spoofed.
        assert_eq!(
            drop(&with([10, 244, 3, 2], [10, 244, 3, 3])),
            DropReason::NotLocal
        );
        let c = fwd.counters();
        assert_eq!(c.drops(DropReason::Malformed), 4);
        assert_eq!(c.drops(DropReason::UnknownPeer), 2);
        assert_eq!(c.drops(DropReason::NotLocal), 2);
        assert_eq!(c.drops(DropReason::Spoofed), 1);
        assert_eq!(c.rx.snapshot().packets, 0);
    }

    #[test]
    fn inbound_vxlan_delivers_and_checks_vni() {
        let (fwd, t) = pair(2, Encap::Vxlan);
        let mut payload = VXLAN_PREFIX.to_vec();
        payload.extend_from_slice(&INNER);
        let from1 = ip("198.18.0.1");
        assert_eq!(
            fwd.inbound_vxlan(&t, from1, &payload),
            Inbound::Deliver(&INNER[..])
        );
        assert_eq!(
            fwd.inbound_vxlan(&t, ip("198.18.0.99"), &payload),
            Inbound::Drop(DropReason::UnknownPeer)
        );
        let mut other_vni = payload.clone();
        other_vni[6] = 2;
        assert_eq!(
            fwd.inbound_vxlan(&t, from1, &other_vni),
            Inbound::Drop(DropReason::WrongVni)
        );
        let mut no_i_flag = payload.clone();
        no_i_flag[0] = 0;
        assert_eq!(
            fwd.inbound_vxlan(&t, from1, &no_i_flag),
            Inbound::Drop(DropReason::Malformed)
        );
        let mut ipv6_frame = payload.clone();
        ipv6_frame[20..22].copy_from_slice(&[0x86, 0xdd]);
        assert_eq!(
            fwd.inbound_vxlan(&t, from1, &ipv6_frame),
            Inbound::Drop(DropReason::NotIpv4)
        );
        assert_eq!(
            fwd.inbound_vxlan(&t, from1, &payload[..30]),
            Inbound::Drop(DropReason::Malformed)
        );
        // The spoofing check uses the peer the packet came from, not the inner source's owner.
        assert_eq!(
            fwd.inbound_vxlan(&t, ip("198.18.0.3"), &payload),
            Inbound::Drop(DropReason::Spoofed)
        );
    }

    #[test]
    fn nonzero_vni_is_honoured() {
        let vni = Vni::new(0x00ab_cdef).unwrap();
        let (a, b, t) = (vxlan_node(1, vni), vxlan_node(2, vni), table());
        let (bytes, _) = out(&a, &t, &INNER);
        assert_eq!(bytes[4..7], [0xab, 0xcd, 0xef]);
        assert_eq!(
            b.inbound_vxlan(&t, ip("198.18.0.1"), &bytes),
            Inbound::Deliver(&INNER[..])
        );
        let default = node(2, Encap::Vxlan);
        assert_eq!(
            default.inbound_vxlan(&t, ip("198.18.0.1"), &bytes),
            Inbound::Drop(DropReason::WrongVni)
        );
    }
}

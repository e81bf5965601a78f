//! Outbound: a pod packet read from `tunl0` routed to the peer that holds its destination and
//! encapsulated for it, one packet or a TSO super-packet at a time, or refused with an ICMP error.

use std::net::Ipv4Addr;
use std::sync::atomic::Ordering::Relaxed;

use podnet_proto::gso::{self, HeaderPlan};
use podnet_proto::icmp;
use podnet_proto::ipv4::Ipv4Packet;
use podnet_proto::virtio::VirtioNetHdr;
use podnet_proto::vxlan;
use podnet_proto::{ipip, WireError};

use super::config::NodeConfig;
use super::forwarder::{parse_ipv4, Forwarder};
use crate::core::drops::DropReason;
use crate::core::dropwatch::DropContext;
use crate::core::table::{Peer, PeerEncap, RouteTable};

/// Bytes the caller must reserve in front of an outbound packet: room for the largest
/// prefix we write (VXLAN header + inner Ethernet; IP-in-IP needs 20).
pub const HEADROOM: usize = vxlan::ENCAP_LEN;

/// Minimum size of the scratch buffer for ICMP replies.
pub const SCRATCH_LEN: usize = icmp::MAX_ERROR_LEN;

/// The routing decision for one outbound packet, without encapsulation (see
/// [`Forwarder::classify`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// Send to the peer at this index of the table.
    Peer(usize),
    /// No node serves the destination: drop with `reason` and answer with ICMP destination
    /// unreachable `code`.
    Unreachable { reason: DropReason, code: u8 },
    /// Drop silently.
    Drop(DropReason),
}

/// Result of [`Forwarder::outbound_super`].
#[derive(Debug)]
pub enum SuperOutbound<'a> {
    /// Send the super-packet as `plan.segs.count` packets to the peer at `index`: packet `i` is
    /// `headers[i * plan.header_len..(i + 1) * plan.header_len]` (encapsulation, IPv4 and TCP
    /// headers) followed by `packet[plan.piece(i)]`, the payload where it was read. Counted.
    Send {
        index: usize,
        plan: HeaderPlan,
        headers: &'a [u8],
    },
    /// Write this ICMP error into `tunl0`; the super-packet is dropped (and counted).
    Reply(&'a [u8]),
    /// Dropped (counted); `offload` when the segmenter refused the virtio header.
    Drop { reason: DropReason, offload: bool },
}

/// A super-packet whose segments would be larger than the chosen peer's MTU
/// ([`Forwarder::classify_super`]): answer with fragmentation needed carrying `mtu` when it has
/// DF, else drop it (`too_big`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TooBig {
    pub mtu: u16,
}

/// Result of [`Forwarder::outbound`].
#[derive(Debug, PartialEq, Eq)]
pub enum Outbound<'a> {
    /// Send `bytes` to the peer at underlay address `peer` (at `index` in the table the packet
    /// was routed with), in the encapsulation it receives: for IP-in-IP the full outer IPv4
    /// packet (for an `IP_HDRINCL` raw socket), for VXLAN the UDP payload (for port 4789).
    Send {
        peer: Ipv4Addr,
        index: usize,
        bytes: &'a [u8],
    },
    /// Write this ICMP error into `tunl0`; the original packet is dropped (and counted).
    Reply(&'a [u8]),
    /// Drop the packet (already counted).
    Drop(DropReason),
}

impl Forwarder {
    /// Decides where an outbound pod packet goes, counting nothing: the routing step of
    /// [`outbound`](Self::outbound) on its own, for the offload path that segments a
    /// super-packet after the decision (and then counts itself).
    ///
    /// Checks, in order: IPv4 (`not_ipv4`), header valid with a good checksum (`malformed`),
    /// destination not in this node's pod CIDR (`own_cidr`), inside the cluster CIDR (else
    /// unreachable, `outside_cluster`), a peer holds it (else unreachable, `no_route`), and that
    /// peer is not this node (`own_cidr`). The MTU is not checked here.
    pub fn classify(&self, table: &RouteTable, packet: &[u8]) -> Route {
        match parse_ipv4(packet) {
            Ok(ip) => self.route(table, ip.dst()),
            Err(reason) => Route::Drop(reason),
        }
    }

    /// [`classify`](Self::classify) for a TSO super-packet (`packet` behind virtio header
    /// `hdr`), which the caller cuts into segments of `hdr.gso_size` payload bytes: also checks
    /// that those segments fit the chosen peer's MTU, which is below the `tunl0` MTU when the
    /// peer receives an encapsulation with more overhead than this node's ([`TooBig`]).
    pub fn classify_super(
        &self,
        table: &RouteTable,
        hdr: &VirtioNetHdr,
        packet: &[u8],
    ) -> Result<Route, TooBig> {
        let route = self.classify(table, packet);
        let Route::Peer(i) = route else {
            return Ok(route);
        };
        let Ok(mtu) = self.config.mtu_to(&table.peer(i).encap) else {
            return Ok(route);
        };
        // IPv4 and TCP header lengths of the first segment; classify() parsed the IPv4
        // header, and the segmenter refuses what else does not parse, so a short packet is
        // left to it.
        let ip_len = usize::from(packet[0] & 0x0f) * 4;
        let Some(doff) = packet.get(ip_len + 12) else {
            return Ok(route);
        };
        let segment = ip_len + usize::from(doff >> 4) * 4 + usize::from(hdr.gso_size);
        if segment > usize::from(mtu) {
            return Err(TooBig { mtu });
        }
        Ok(route)
    }

    /// Handles one TSO super-packet read from `tunl0` (`packet` behind virtio header `hdr`):
    /// routes it once ([`classify_super`](Self::classify_super)), then writes every segment's
    /// headers behind the peer's encapsulation into `headers` (IP-in-IP: each segment's own
    /// outer header), for a zero-copy send of header and payload slices. Refusals are answered
    /// into `scratch` like [`outbound`](Self::outbound)'s. `headers` must hold
    /// [`gso::segment_headers`]' output for the largest super-packet (see `SEGMENT_BUF` in the
    /// data path).
    pub fn outbound_super<'a>(
        &self,
        table: &RouteTable,
        hdr: &VirtioNetHdr,
        packet: &[u8],
        headers: &'a mut [u8],
        scratch: &'a mut [u8],
    ) -> SuperOutbound<'a> {
        let index = match self.route_super(table, hdr, packet, scratch) {
            Ok(i) => i,
            Err(refused) => return refused,
        };
        let peer = table.peer(index);
        if peer.encap.wireguard_key().is_some() {
            // The WireGuard path segments and encrypts itself (route_super, then
            // the wireguard module); a WireGuard peer never gets a bare segment.
            self.drop_outbound(DropReason::PeerEncap, packet);
            return SuperOutbound::Drop {
                reason: DropReason::PeerEncap,
                offload: false,
            };
        }
        let prefix = self.vxlan_prefix(peer);
        // IP-in-IP: segments behind a blank outer header, filled in per segment below.
        let blank = [0u8; ipip::OVERHEAD];
        let head: &[u8] = prefix.as_ref().map_or(&blank, |p| p);
        let plan = match gso::segment_headers(hdr, packet, head, headers) {
            Ok(plan) => plan,
            Err(_) => {
                self.drop_outbound(DropReason::Malformed, packet);
                return SuperOutbound::Drop {
                    reason: DropReason::Malformed,
                    offload: true,
                };
            }
        };
        let headers = &mut headers[..plan.segs.count * plan.header_len];
        if prefix.is_none()
            && self
                .ipip_outer_headers(peer, packet, &plan, headers)
                .is_err()
        {
            self.drop_outbound(DropReason::Malformed, packet);
            return SuperOutbound::Drop {
                reason: DropReason::Malformed,
                offload: false,
            };
        }
        // Counted once per super-packet: inner bytes, encapsulation excluded.
        let segs = &plan.segs;
        let inner_bytes = (segs.total_len() - segs.count * segs.prefix_len) as u64;
        self.count_tx(table, index, segs.count as u64, inner_bytes);
        SuperOutbound::Send {
            index,
            plan,
            headers,
        }
    }

    /// The routing step of [`outbound_super`](Self::outbound_super): the peer's index, or the
    /// refusal (counted, answered into `scratch` where ICMP allows).
    pub fn route_super<'a>(
        &self,
        table: &RouteTable,
        hdr: &VirtioNetHdr,
        packet: &[u8],
        scratch: &'a mut [u8],
    ) -> Result<usize, SuperOutbound<'a>> {
        let refused = match self.classify_super(table, hdr, packet) {
            Ok(Route::Peer(i)) => Ok(i),
            Ok(Route::Unreachable { reason, code }) => {
                Err(self.reject_outbound(packet, reason, code, 0, scratch))
            }
            Ok(Route::Drop(reason)) => Err(self.drop_outbound(reason, packet)),
            Err(TooBig { mtu }) => Err(self.too_big(packet, mtu, scratch)),
        };
        match refused {
            Ok(i) => Ok(i),
            Err(Outbound::Reply(b)) => Err(SuperOutbound::Reply(b)),
            Err(Outbound::Drop(reason)) => Err(SuperOutbound::Drop {
                reason,
                offload: false,
            }),
            // None of the three refusers sends; were one to, nothing goes out.
            Err(Outbound::Send { .. }) => Err(SuperOutbound::Drop {
                reason: DropReason::Malformed,
                offload: false,
            }),
        }
    }

    /// Counts `packets` inner packets of `bytes` bytes in all sent to the peer at `index`.
    pub fn count_tx(&self, table: &RouteTable, index: usize, packets: u64, bytes: u64) {
        self.counters.tx.add_many(packets, bytes);
        table.counters(index).tx.add_many(packets, bytes);
    }

    /// Routing for a valid packet to `dst`.
    #[inline]
    fn route(&self, table: &RouteTable, dst: Ipv4Addr) -> Route {
        route(&self.config, table, dst)
    }

    /// Handles one packet read from `tunl0`, sitting at `buf[start..start + len]` with at least
    /// [`HEADROOM`] bytes in front of it. On [`Outbound::Send`] the encapsulation has been
    /// written into that headroom. ICMP errors are built into `scratch`.
    ///
    /// # Panics
    ///
    /// If `start < HEADROOM`, `start + len > buf.len()` or `scratch.len() < SCRATCH_LEN`:
    /// caller bugs, never caused by packet contents.
    pub fn outbound<'a>(
        &self,
        table: &RouteTable,
        buf: &'a mut [u8],
        start: usize,
        len: usize,
        scratch: &'a mut [u8],
    ) -> Outbound<'a> {
        assert!(
            start >= HEADROOM,
            "outbound needs {HEADROOM} bytes of headroom"
        );
        assert!(
            scratch.len() >= SCRATCH_LEN,
            "ICMP scratch buffer too small"
        );
        let ip = match parse_ipv4(&buf[start..start + len]) {
            Ok(ip) => ip,
            Err(reason) => return self.drop_outbound(reason, &buf[start..start + len]),
        };
        let packet = ip.packet();
        let index = match self.route(table, ip.dst()) {
            Route::Peer(i) => i,
            Route::Unreachable { reason, code } => {
                return self.reject_outbound(packet, reason, code, 0, scratch);
            }
            Route::Drop(reason) => return self.drop_outbound(reason, packet),
        };
        let total_len = packet.len();
        let peer = table.peer(index);
        // route() only picks peers this node can send to.
        let mtu = self.config.mtu_to(&peer.encap).unwrap_or(self.config.mtu);
        if total_len > usize::from(mtu) {
            return self.too_big(packet, mtu, scratch);
        }
        let end = start + total_len;
        let new_start = match self.encapsulate(peer, buf, start, total_len) {
            Ok(s) => s,
            Err(_) => return self.drop_outbound(DropReason::Malformed, &buf[start..end]),
        };
        self.counters.tx.add(total_len);
        table.counters(index).tx.add(total_len);
        Outbound::Send {
            peer: peer.underlay_ip,
            index,
            bytes: &buf[new_start..end],
        }
    }

    /// Refuses valid `packet`, larger than `mtu` on its way to a peer. RFC 1191: with DF set
    /// it gets fragmentation needed carrying `mtu`. Without DF the kernel fragments to the
    /// tunl0 MTU before we see the packet, and a peer of another encapsulation may take less
    /// (per-peer MTU); userspace does not fragment, so it is dropped. Counted as `too_big`.
    pub fn too_big<'a>(&self, packet: &[u8], mtu: u16, scratch: &'a mut [u8]) -> Outbound<'a> {
        let df = packet.get(6).is_some_and(|f| f & 0x40 != 0);
        if df {
            self.reject_outbound(
                packet,
                DropReason::TooBig,
                icmp::code::FRAG_NEEDED,
                mtu,
                scratch,
            )
        } else {
            self.drop_outbound(DropReason::TooBig, packet)
        }
    }

    /// Writes this node's encapsulation for `peer` in front of the inner packet at
    /// `buf[start..start + len]`; returns where the encapsulated bytes now start. Needs
    /// `start >= HEADROOM`.
    pub fn encapsulate(
        &self,
        peer: &Peer,
        buf: &mut [u8],
        start: usize,
        len: usize,
    ) -> Result<usize, WireError> {
        match &peer.encap {
            PeerEncap::Ipip => {
                let ident = self.ident.fetch_add(1, Relaxed);
                ipip::encapsulate(
                    buf,
                    start,
                    len,
                    self.config.underlay_ip,
                    peer.underlay_ip,
                    ident,
                )
            }
            PeerEncap::Vxlan => Ok(vxlan::encapsulate(
                buf,
                start,
                self.config.vni,
                self.config.vtep_mac,
                peer.vtep_mac,
            )),
            // WireGuard encrypts the packet where it lies (the data path's wireguard module).
            PeerEncap::Wireguard(_) => Ok(start),
            // route() answers packets for such a peer (peer_encap) before they get here; if
            // one ever did, it is dropped (the caller counts it malformed), never sent bare.
            PeerEncap::Unsupported(_) => Err(WireError::Truncated {
                layer: podnet_proto::error::Layer::Ipv4,
                required: 0,
                len: 0,
            }),
        }
    }

    /// Writes the IP-in-IP outer headers of a super-packet that
    /// [`podnet_proto::gso::segment_headers`] cut behind a blank [`ipip::OVERHEAD`]-byte
    /// prefix: `headers` holds `plan`'s header slots, and the first 20 bytes of slot `i` become
    /// the outer header of segment `i` (its own length, consecutive identifications, TOS and
    /// DF of the super-packet `packet`), as [`Forwarder::encapsulate`] would write it in front
    /// of that segment.
    pub fn ipip_outer_headers(
        &self,
        peer: &Peer,
        packet: &[u8],
        plan: &HeaderPlan,
        headers: &mut [u8],
    ) -> Result<(), WireError> {
        let inner = Ipv4Packet::new_checked(packet)?;
        let count = plan.segs.count;
        let first = self.ident.fetch_add(count as u16, Relaxed);
        let slots = headers.chunks_exact_mut(plan.header_len).take(count);
        for (i, slot) in slots.enumerate() {
            let inner_len = plan.header_len - ipip::OVERHEAD + plan.piece(i).len();
            let ident = first.wrapping_add(i as u16);
            let (src, dst) = (self.config.underlay_ip, peer.underlay_ip);
            ipip::outer_header(&inner, inner_len, src, dst, ident)?.emit(slot);
        }
        Ok(())
    }

    /// The 22-byte VXLAN + inner Ethernet prefix for packets to `peer` (for segmenters that
    /// repeat it in front of every segment); `None` for IP-in-IP, whose outer header depends on
    /// each packet.
    pub fn vxlan_prefix(&self, peer: &Peer) -> Option<[u8; vxlan::ENCAP_LEN]> {
        match peer.encap {
            PeerEncap::Vxlan => {
                let mut out = [0; vxlan::ENCAP_LEN];
                vxlan::write_header(
                    &mut out,
                    self.config.vni,
                    self.config.vtep_mac,
                    peer.vtep_mac,
                );
                Some(out)
            }
            PeerEncap::Ipip | PeerEncap::Wireguard(_) | PeerEncap::Unsupported(_) => None,
        }
    }

    /// Drops an outbound `packet` for `reason` (counted and sampled for `drops --watch`) and
    /// builds the ICMP destination-unreachable `code` for it into `scratch`: what the offload
    /// path does for a super-packet that [`classify`](Self::classify) rejected.
    pub fn reject_outbound<'a>(
        &self,
        packet: &[u8],
        reason: DropReason,
        code: u8,
        mtu: u16,
        scratch: &'a mut [u8],
    ) -> Outbound<'a> {
        self.counters
            .record_drop(reason, None, &DropContext::tx(packet));
        match self.icmp_error(packet, code, mtu, scratch) {
            Some(reply) => Outbound::Reply(reply),
            None => Outbound::Drop(reason),
        }
    }

    /// Drops an outbound `packet` for `reason`, counted and sampled like every other drop.
    pub fn drop_outbound<'a>(&self, reason: DropReason, packet: &[u8]) -> Outbound<'a> {
        self.counters
            .record_drop(reason, None, &DropContext::tx(packet));
        Outbound::Drop(reason)
    }
}

/// The routing rules for a valid packet to `dst` from `config`'s node, in the order
/// [`Forwarder::classify`] documents; shared with `podnet-agent why`.
#[inline]
pub fn route(config: &NodeConfig, table: &RouteTable, dst: Ipv4Addr) -> Route {
    if config.pod_cidr.contains(&dst) {
        return Route::Drop(DropReason::OwnCidr);
    }
    if !config.cluster_cidr.contains(&dst) {
        return Route::Unreachable {
            reason: DropReason::OutsideCluster,
            code: icmp::code::NET_UNREACHABLE,
        };
    }
    match table.lookup(dst) {
        None => Route::Unreachable {
            reason: DropReason::NoRoute,
            code: icmp::code::HOST_UNREACHABLE,
        },
        Some(i) if table.peer(i).underlay_ip == config.underlay_ip => {
            Route::Drop(DropReason::OwnCidr)
        }
        Some(i) if config.mtu_to(&table.peer(i).encap).is_err() => Route::Unreachable {
            reason: DropReason::PeerEncap,
            code: icmp::code::HOST_UNREACHABLE,
        },
        Some(i) => Route::Peer(i),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use podnet_proto::ipv4;
    use podnet_proto::vxlan::Vni;

    use super::*;
    use crate::core::drops::Counters;
    use crate::core::forward::config::SendPaths;
    use crate::core::forward::fixtures::*;
    use podnet_proto::api::Encap;

    #[test]
    fn fixture_is_valid() {
        let ip = Ipv4Packet::new_checked(&INNER[..]).unwrap();
        assert!(ip.verify_checksum());
        assert_eq!(podnet_proto::checksum::checksum(&IPIP_OUTER), 0);
    }

    #[test]
    fn outbound_vxlan_prepends_header_and_inner_ethernet() {
        let (fwd, t) = pair(1, Encap::Vxlan);
        let (bytes, peer) = out(&fwd, &t, &INNER);
        assert_eq!(peer, Some(ip("198.18.0.2")));
        assert_eq!(bytes[..22], VXLAN_PREFIX);
        assert_eq!(bytes[22..], INNER);
        assert_eq!(fwd.vxlan_prefix(t.peer(1)), Some(VXLAN_PREFIX));
    }

    #[test]
    fn outbound_ipip_writes_outer_header_with_fresh_ident() {
        let (fwd, t) = pair(1, Encap::Ipip);
        let (bytes, peer) = out(&fwd, &t, &INNER);
        assert_eq!(peer, Some(ip("198.18.0.2")));
        assert_eq!(bytes[..20], IPIP_OUTER);
        assert_eq!(bytes[20..], INNER);
        let (second, _) = out(&fwd, &t, &INNER);
        assert_eq!(second[4..6], [0, 1], "identification advances per packet");
        assert_eq!(fwd.vxlan_prefix(t.peer(1)), None);
    }

    #[test]
    fn ipip_outer_headers_match_encapsulating_each_segment() {
        use podnet_proto::gso;
        use podnet_proto::virtio::{VirtioNetHdr, F_NEEDS_CSUM, GSO_TCPV4};
        let data: Vec<u8> = (0..5000u32).map(|i| (i * 7 + i / 251) as u8).collect();
        let mut packet = Vec::new();
        etherparse::PacketBuilder::ipv4([10, 244, 1, 2], [10, 244, 2, 3], 64)
            .tcp(40000, 5201, 7, 502)
            .write(&mut packet, &data)
            .unwrap();
        packet[1] = 0xb8; // DSCP EF: the outer header copies it, as it does DF
        packet[6] = 0x40;
        fix_checksum(&mut packet);
        let hdr = VirtioNetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV4,
            hdr_len: 40,
            gso_size: 1400,
            csum_start: 20,
            csum_offset: 16,
        };
        let t = table_of(Encap::Ipip);
        let peer = t.peer(1);
        // What the copying path sends: the segments in one buffer, each encapsulated in place.
        let copying = node(1, Encap::Ipip);
        let mut segbuf = vec![0u8; 16_384];
        let segs = gso::segment(&hdr, &packet, ipip::OVERHEAD, &mut segbuf, |_, _| {}).unwrap();
        let mut expected = Vec::new();
        for r in segs.iter() {
            let len = r.len() - ipip::OVERHEAD;
            copying
                .encapsulate(peer, &mut segbuf[r.clone()], ipip::OVERHEAD, len)
                .unwrap();
            expected.push(segbuf[r].to_vec());
        }
        // The zero-copy path: header slots, the payload left in the super-packet.
        let fwd = node(1, Encap::Ipip);
        let mut headers = vec![0u8; 4096];
        let plan = gso::segment_headers(&hdr, &packet, &[0; ipip::OVERHEAD], &mut headers).unwrap();
        fwd.ipip_outer_headers(peer, &packet, &plan, &mut headers)
            .unwrap();
        let hl = plan.header_len;
        let got: Vec<Vec<u8>> = (0..plan.segs.count)
            .map(|i| [&headers[i * hl..(i + 1) * hl], &packet[plan.piece(i)]].concat())
            .collect();
        assert_eq!(got.len(), 4, "5000 bytes at MSS 1400");
        assert_eq!(got, expected);
        for (i, g) in got.iter().enumerate() {
            let outer = etherparse::Ipv4HeaderSlice::from_slice(g).unwrap();
            assert_eq!(usize::from(outer.total_len()), g.len());
            assert_eq!(
                outer.header_checksum(),
                outer.to_header().calc_header_checksum()
            );
            assert_eq!(outer.identification(), i as u16);
            assert_eq!(
                (outer.dcp().value(), outer.dont_fragment()),
                (0xb8 >> 2, true)
            );
            assert_eq!(outer.protocol(), etherparse::IpNumber::IPV4);
        }
        // The identifications were taken from the forwarder's counter: the next packet follows.
        let (next, _) = out(&fwd, &t, &INNER);
        assert_eq!(next[4..6], [0, 4]);
    }

    #[test]
    fn outbound_counts_inner_bytes_per_peer() {
        let (fwd, t) = pair(1, Encap::Ipip);
        out(&fwd, &t, &INNER);
        out(&fwd, &t, &INNER);
        let b = t.by_underlay(ip("198.18.0.2")).unwrap();
        assert_eq!(t.counters(b).snapshot().tx.packets, 2);
        assert_eq!(t.counters(b).snapshot().tx.bytes, 60);
        assert_eq!(fwd.counters().tx.snapshot().bytes, 60);
        assert_eq!(fwd.counters().total_drops(), 0);
    }

    #[test]
    fn outbound_ignores_trailing_bytes_after_total_len() {
        let (fwd, t) = pair(1, Encap::Vxlan);
        let mut padded = INNER.to_vec();
        padded.extend_from_slice(&[0; 10]);
        let (bytes, _) = out(&fwd, &t, &padded);
        assert_eq!(bytes[22..], INNER);
    }

    #[test]
    fn outbound_leaves_ttl_alone() {
        let (fwd, t) = pair(1, Encap::Vxlan);
        let mut p = INNER;
        p[8] = 1;
        fix_checksum(&mut p);
        let (bytes, _) = out(&fwd, &t, &p);
        assert_eq!(bytes[22..], p);
    }

    #[test]
    fn classify_reasons() {
        let (fwd, t) = pair(1, Encap::Vxlan);
        assert_eq!(fwd.classify(&t, &INNER), Route::Peer(1));
        let mut v6 = INNER;
        v6[0] = 0x60;
        assert_eq!(fwd.classify(&t, &v6), Route::Drop(DropReason::NotIpv4));
        assert_eq!(
            fwd.classify(&t, &INNER[..19]),
            Route::Drop(DropReason::Malformed)
        );
        assert_eq!(fwd.classify(&t, &[]), Route::Drop(DropReason::Malformed));
        let mut bad_sum = INNER;
        bad_sum[11] ^= 1;
        assert_eq!(
            fwd.classify(&t, &bad_sum),
            Route::Drop(DropReason::Malformed)
        );
        let to = |dst: [u8; 4]| {
            let mut p = INNER;
            p[16..20].copy_from_slice(&dst);
            fix_checksum(&mut p);
            fwd.classify(&t, &p)
        };
        assert_eq!(to([10, 244, 1, 9]), Route::Drop(DropReason::OwnCidr));
        assert_eq!(to([10, 244, 3, 9]), Route::Peer(2));
        assert_eq!(
            to([10, 244, 9, 9]),
            Route::Unreachable {
                reason: DropReason::NoRoute,
                code: icmp::code::HOST_UNREACHABLE
            }
        );
        assert_eq!(
            to([192, 0, 2, 1]),
            Route::Unreachable {
                reason: DropReason::OutsideCluster,
                code: icmp::code::NET_UNREACHABLE
            }
        );
        assert_eq!(fwd.counters().total_drops(), 0, "classify counts nothing");
    }

    #[test]
    fn route_back_to_own_underlay_is_a_loop() {
        // The table still maps 10.244.9.0/24 to this node (its CIDR changed under it).
        let mut me = peer("me", 1);
        me.pod_cidr = "10.244.9.0/24".parse().unwrap();
        let t = RouteTable::build(2, vec![me, peer("b", 2)]).unwrap();
        let fwd = node(1, Encap::Ipip);
        let mut p = INNER;
        p[16..20].copy_from_slice(&[10, 244, 9, 1]);
        fix_checksum(&mut p);
        assert_eq!(out_drop(&fwd, &t, &p), DropReason::OwnCidr);
        assert_eq!(fwd.counters().drops(DropReason::OwnCidr), 1);
    }

    #[test]
    fn no_route_answers_host_unreachable_quoting_the_packet() {
        let (fwd, t) = pair(1, Encap::Vxlan);
        let mut p = INNER;
        p[16..20].copy_from_slice(&[10, 244, 77, 1]);
        fix_checksum(&mut p);
        let (reply, peer) = out(&fwd, &t, &p);
        assert_eq!(peer, None);
        let r = Ipv4Packet::new_checked(&reply[..]).unwrap();
        assert!(r.verify_checksum());
        assert_eq!(r.protocol(), ipv4::protocol::ICMP);
        assert_eq!(r.src(), ip("10.244.0.254"));
        assert_eq!(r.dst(), ip("10.244.1.2"));
        let icmp = r.payload();
        assert_eq!(icmp[..2], [3, icmp::code::HOST_UNREACHABLE]);
        assert_eq!(podnet_proto::checksum::checksum(icmp), 0);
        assert_eq!(icmp[8..], p, "the whole short original is quoted");
        assert_eq!(fwd.counters().drops(DropReason::NoRoute), 1);
        assert_eq!(fwd.counters().icmp_sent(), 1);
    }

    #[test]
    fn outside_cluster_answers_net_unreachable() {
        let (fwd, t) = pair(1, Encap::Ipip);
        let mut p = INNER;
        p[16..20].copy_from_slice(&[192, 0, 2, 1]);
        fix_checksum(&mut p);
        let (reply, _) = out(&fwd, &t, &p);
        assert_eq!(reply[20..22], [3, icmp::code::NET_UNREACHABLE]);
        assert_eq!(fwd.counters().drops(DropReason::OutsideCluster), 1);
    }

    #[test]
    fn icmp_errors_are_rate_limited_like_the_kernels() {
        // Through the forwarder: a flood to an unowned address gets one burst of errors; every
        // packet is still dropped and counted under its reason. (The bucket's own arithmetic
        // is tested in bucket.rs.)
        let (fwd, t) = pair(1, Encap::Ipip);
        fwd.tick(1_000);
        let mut p = INNER;
        p[16..20].copy_from_slice(&[10, 244, 77, 1]);
        fix_checksum(&mut p);
        let mut buf = [0u8; 2048];
        let mut scratch = [0u8; SCRATCH_LEN];
        let mut flood = |n: usize| {
            (0..n)
                .filter(|_| {
                    buf[HEADROOM..HEADROOM + p.len()].copy_from_slice(&p);
                    matches!(
                        fwd.outbound(&t, &mut buf, HEADROOM, p.len(), &mut scratch),
                        Outbound::Reply(_)
                    )
                })
                .count()
        };
        assert_eq!(flood(200), 50, "one burst");
        // 10 ms later, 10 more (1000/s); 5 s later, never more than the burst.
        fwd.tick(1_010);
        assert_eq!(flood(100), 10);
        fwd.tick(6_010);
        assert_eq!(flood(100), 50);
        let c = fwd.counters();
        assert_eq!(c.drops(DropReason::NoRoute), 400);
        assert_eq!(c.icmp_sent(), 110);
        assert_eq!(c.icmp_ratelimited(), 290);
    }

    #[test]
    fn workers_count_apart_but_share_one_icmp_rate_limit() {
        // Two workers' forwarders: each counts its own drops, and a flood spread over both
        // gets one burst of ICMP errors between them, the node's limit, not one each.
        let (fwd, t) = pair(1, Encap::Ipip);
        let other = fwd.for_worker();
        fwd.tick(1_000);
        other.tick(1_000);
        let mut p = INNER;
        p[16..20].copy_from_slice(&[10, 244, 77, 1]);
        fix_checksum(&mut p);
        let mut buf = [0u8; 2048];
        let mut scratch = [0u8; SCRATCH_LEN];
        let mut replies = 0;
        for i in 0..200 {
            let f = if i % 2 == 0 { &fwd } else { &other };
            buf[HEADROOM..HEADROOM + p.len()].copy_from_slice(&p);
            if let Outbound::Reply(_) = f.outbound(&t, &mut buf, HEADROOM, p.len(), &mut scratch) {
                replies += 1;
            }
        }
        assert_eq!(replies, 50, "one burst for the node");
        for f in [&fwd, &other] {
            let c = f.counters();
            assert_eq!(c.drops(DropReason::NoRoute), 100);
            assert_eq!(c.icmp_sent() + c.icmp_ratelimited(), 100);
        }
        assert_eq!(
            fwd.counters().icmp_sent() + other.counters().icmp_sent(),
            50
        );
    }

    #[test]
    fn icmp_errors_are_never_answered() {
        let (fwd, t) = pair(1, Encap::Ipip);
        // An ICMP destination-unreachable to an unknown node: counted, not answered.
        let mut p = INNER;
        p[9] = ipv4::protocol::ICMP;
        p[16..20].copy_from_slice(&[10, 244, 77, 1]);
        p[20..22].copy_from_slice(&[3, 1]);
        fix_checksum(&mut p);
        assert_eq!(out_drop(&fwd, &t, &p), DropReason::NoRoute);
        assert_eq!(fwd.counters().icmp_sent(), 0);
        assert_eq!(
            fwd.counters().icmp_ratelimited(),
            0,
            "not an error held back"
        );
    }

    /// [`INNER`] grown to `len` bytes with the DF flag as given.
    fn big(len: usize, dont_frag: bool) -> Vec<u8> {
        let mut p = INNER.to_vec();
        p.resize(len, 0x55);
        p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        p[6] = if dont_frag { 0x40 } else { 0 };
        fix_checksum(&mut p);
        p
    }

    #[test]
    fn mtu_sized_packet_passes() {
        let (fwd, t) = pair(1, Encap::Vxlan);
        let (bytes, peer) = out(&fwd, &t, &big(1450, true));
        assert!(peer.is_some());
        assert_eq!(bytes.len(), 1450 + 22);
    }

    #[test]
    fn too_big_with_df_answers_frag_needed_with_overlay_mtu() {
        let (fwd, t) = pair(1, Encap::Vxlan);
        let p = big(1451, true);
        let (reply, peer) = out(&fwd, &t, &p);
        assert_eq!(peer, None);
        assert_eq!(reply[20..22], [3, icmp::code::FRAG_NEEDED]);
        assert_eq!(reply[26..28], 1450u16.to_be_bytes(), "next-hop MTU");
        assert_eq!(reply[28..48], p[..20], "quotes the original header");
        assert!(reply.len() <= icmp::MAX_ERROR_LEN);
        assert_eq!(fwd.counters().drops(DropReason::TooBig), 1);
    }

    /// Node 1 on IP-in-IP with a 1480-byte tunl0 over a 1500-byte underlay, VNI 7 for what it
    /// sends in VXLAN; its peers: a (1) IP-in-IP, b (2) VXLAN, c (3) an encapsulation it does
    /// not speak.
    fn mixed() -> (Forwarder, RouteTable) {
        let mut config = node(1, Encap::Ipip).config().clone();
        config.mtu = 1480;
        config.vni = Vni::new(7).unwrap();
        config.send = SendPaths::all(1480, 1500);
        let encaps = [
            PeerEncap::Ipip,
            PeerEncap::Vxlan,
            PeerEncap::Unsupported("wireguard".into()),
        ];
        let peers = [peer("a", 1), peer("b", 2), peer("c", 3)]
            .into_iter()
            .zip(encaps)
            .map(|(p, encap)| Peer { encap, ..p })
            .collect();
        let fwd = Forwarder::new(config, Arc::new(Counters::new()));
        (fwd, RouteTable::build(1, peers).unwrap())
    }

    /// [`INNER`] sent to node `n`'s pod CIDR, DF set, `len` bytes.
    fn to_node(n: u8, len: usize) -> Vec<u8> {
        let mut p = big(len, true);
        p[18] = n;
        fix_checksum(&mut p);
        p
    }

    #[test]
    fn each_peer_is_sent_the_encapsulation_it_receives() {
        let (fwd, t) = mixed();
        // A VXLAN peer gets VXLAN with the configured VNI...
        let (bytes, to) = out(&fwd, &t, &to_node(2, 100));
        assert_eq!(to, Some(ip("198.18.0.2")));
        let frame = vxlan::decapsulate(&bytes).unwrap();
        assert_eq!(frame.vni, Vni::new(7).unwrap());
        assert_eq!(frame.inner, &to_node(2, 100)[..]);
        // ...and an IP-in-IP peer IP-in-IP (node 1 is this node, so use another).
        let mut d = peer("d", 5);
        d.encap = PeerEncap::Ipip;
        let t = RouteTable::build(2, vec![t.peer(1).clone(), d]).unwrap();
        let (bytes, to) = out(&fwd, &t, &to_node(5, 100));
        assert_eq!(to, Some(ip("198.18.0.5")));
        let outer = Ipv4Packet::new_checked(&bytes[..]).unwrap();
        assert_eq!(outer.protocol(), ipv4::protocol::IPIP);
        assert_eq!(outer.payload(), &to_node(5, 100)[..]);
    }

    #[test]
    fn the_mtu_is_per_peer_and_too_big_quotes_the_peers() {
        let (fwd, t) = mixed();
        // 1480 fits tunl0 but not VXLAN on a 1500-byte underlay: frag-needed carrying 1450.
        let (reply, peer) = out(&fwd, &t, &to_node(2, 1451));
        assert_eq!(peer, None);
        assert_eq!(reply[20..22], [3, icmp::code::FRAG_NEEDED]);
        assert_eq!(reply[26..28], 1450u16.to_be_bytes());
        let (bytes, _) = out(&fwd, &t, &to_node(2, 1450));
        assert_eq!(bytes.len(), 1450 + vxlan::ENCAP_LEN);
        assert_eq!(fwd.config().mtu_to(&PeerEncap::Ipip), Ok(1480));
        // A super-packet whose segments (20 + 20 + 1440 = 1480) exceed the VXLAN peer's MTU.
        let mut sp = to_node(2, 3000);
        sp[9] = ipv4::protocol::TCP;
        sp[20 + 12] = 5 << 4;
        fix_checksum(&mut sp);
        let hdr = |gso_size| VirtioNetHdr {
            gso_size,
            ..VirtioNetHdr::NONE
        };
        assert_eq!(
            fwd.classify_super(&t, &hdr(1440), &sp),
            Err(TooBig { mtu: 1450 })
        );
        assert_eq!(fwd.classify_super(&t, &hdr(1410), &sp), Ok(Route::Peer(1)));
        // Its reply is the same as a small packet's.
        let mut scratch = [0; SCRATCH_LEN];
        match fwd.too_big(&sp, 1450, &mut scratch) {
            Outbound::Reply(r) => assert_eq!(r[26..28], 1450u16.to_be_bytes()),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_peer_this_node_cannot_send_to_is_unreachable_not_silence() {
        let (fwd, t) = mixed();
        let (reply, peer) = out(&fwd, &t, &to_node(3, 100));
        assert_eq!(peer, None);
        assert_eq!(reply[20..22], [3, icmp::code::HOST_UNREACHABLE]);
        assert_eq!(fwd.counters().drops(DropReason::PeerEncap), 1);
        assert_eq!(fwd.counters().tx.snapshot().packets, 0);
        // So is a peer whose encapsulation's send socket could not be opened.
        let mut config = fwd.config().clone();
        config.send.vxlan = Err("cannot open the VXLAN send sockets: denied".into());
        let fwd = Forwarder::new(config, Arc::new(Counters::new()));
        let (reply, _) = out(&fwd, &t, &to_node(2, 100));
        assert_eq!(reply[20..22], [3, icmp::code::HOST_UNREACHABLE]);
        assert_eq!(fwd.counters().drops(DropReason::PeerEncap), 1);
        assert_eq!(
            fwd.config().mtu_to(&PeerEncap::Vxlan),
            Err("cannot open the VXLAN send sockets: denied")
        );
    }

    #[test]
    fn too_big_without_df_is_dropped_not_fragmented() {
        let (fwd, t) = pair(1, Encap::Ipip);
        assert_eq!(out_drop(&fwd, &t, &big(1500, false)), DropReason::TooBig);
        assert_eq!(fwd.counters().icmp_sent(), 0);
        assert_eq!(fwd.counters().tx.snapshot().packets, 0);
    }

    #[test]
    #[should_panic(expected = "headroom")]
    fn missing_headroom_is_a_caller_bug() {
        let (fwd, t) = pair(1, Encap::Vxlan);
        let mut buf = INNER;
        let mut scratch = [0; SCRATCH_LEN];
        let _ = fwd.outbound(&t, &mut buf, 0, INNER.len(), &mut scratch);
    }
}

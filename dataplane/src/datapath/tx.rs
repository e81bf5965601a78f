//! The outbound direction: TUN reads routed and encapsulated by the forwarder, small packets
//! gathered into one `sendmmsg` per lane, super-packets sent as segment trains, WireGuard
//! packets sealed into the batch.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::atomic::Ordering::Relaxed;

use podnet_proto::virtio::{self, VirtioNetHdr, GSO_NONE};
use podnet_proto::{gso, ipv4, vxlan};

use crate::core::batch::TxBatch;
use crate::core::drops::DropReason;
use crate::core::forward::{Outbound, SuperOutbound, HEADROOM, SCRATCH_LEN};
use crate::core::table::{Peer, PeerEncap, RouteTable};
use crate::sys::tun::MAX_READ;
use crate::sys::{self, Transmit, MAX_BATCH};
use crate::wireguard::{self, Sealed};

use super::shared::Shared;
use super::worker::{write_tun, Worker};

/// Output room for one segmented super-packet: the payload plus, per segment, a prefix and
/// the copied headers (at most 60 + 60 bytes each, at least one payload byte per segment
/// only in pathological cases, so bound the count by the batch instead).
pub(super) const SEGMENT_BUF: usize = 4 * MAX_READ;

/// Filler for the fixed-size transmit arrays (no allocation per super-packet).
const EMPTY: Transmit<'static> = Transmit {
    dst: SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0),
    data: &[],
    segment_size: None,
};

/// Where packets for `peer` go: UDP port 4789 for VXLAN, 51820 for WireGuard, the bare
/// address for a raw socket.
fn dst_of(peer: &Peer) -> SocketAddrV4 {
    match peer.encap {
        PeerEncap::Vxlan => SocketAddrV4::new(peer.underlay_ip, vxlan::PORT),
        PeerEncap::Wireguard(_) => wireguard::endpoint(peer.underlay_ip),
        _ => SocketAddrV4::new(peer.underlay_ip, 0),
    }
}

/// The outbound direction's buffers (allocated once).
pub(super) struct TxPath {
    vnet: usize,
    rx: Vec<u8>,
    segbuf: Vec<u8>,
    /// ICMP replies go back into the TUN behind an all-zero virtio header in offload mode.
    reply: Vec<u8>,
    /// Small packets of this turn, sent together by [`TxPath::flush`].
    batch: TxBatch,
}

impl TxPath {
    pub(super) fn new(shared: &Shared) -> TxPath {
        TxPath {
            vnet: shared.tun.vnet_hdr_len(),
            rx: vec![0u8; HEADROOM + MAX_READ],
            segbuf: vec![0u8; SEGMENT_BUF],
            reply: vec![0u8; virtio::HEADER_LEN + SCRATCH_LEN],
            batch: TxBatch::new(TX_BATCH_BYTES),
        }
    }

    /// Sends the small packets gathered so far (one `sendmmsg` per lane in use).
    pub(super) fn flush(&mut self, shared: &Shared) {
        send_batched(shared, &mut self.batch);
    }

    /// Where the next TUN read goes (after the encapsulation headroom).
    pub(super) fn read_buf(&mut self) -> &mut [u8] {
        &mut self.rx[HEADROOM..]
    }

    /// Forwards the `n` bytes just read into [`TxPath::read_buf`].
    pub(super) fn handle(&mut self, w: &Worker<'_>, n: usize) {
        let (shared, fwd) = (w.shared, w.fwd);
        let vnet = self.vnet;
        let rx = &mut self.rx;
        if n <= vnet {
            fwd.drop_outbound(DropReason::Malformed, &[]);
            return;
        }
        let start = HEADROOM + vnet;
        let end = HEADROOM + n;
        let hdr = if vnet > 0 {
            VirtioNetHdr::parse(&rx[HEADROOM..start]).unwrap_or(VirtioNetHdr::NONE)
        } else {
            VirtioNetHdr::NONE
        };
        let table = shared.table.load();
        let reply = &mut self.reply;
        let (reply_hdr, scratch) = reply.split_at_mut(virtio::HEADER_LEN);
        let reply_hdr_len = reply_hdr[..vnet].len();
        if hdr.gso_kind() == GSO_NONE {
            if gso::complete_checksum(&hdr, &mut rx[start..end]).is_err() {
                fwd.drop_outbound(DropReason::Malformed, &rx[start..end]);
                return;
            }
            let hash = ipv4::flow_hash(&rx[start..end]);
            match fwd.outbound(&table, rx, start, end - start, scratch) {
                Outbound::Send { index, bytes, .. } if peer_is_wireguard(&table, index) => {
                    seal_into_batch(w, &table, index, [bytes].into_iter(), &mut self.batch);
                }
                Outbound::Send { index, bytes, .. } => {
                    let peer = table.peer(index);
                    let dst = dst_of(peer);
                    let lane = shared.underlay.lane_for(&peer.encap, hash);
                    let batch = &mut self.batch;
                    if !batch.push(dst, lane, bytes) {
                        send_batched(shared, batch);
                        if !batch.push(dst, lane, bytes) {
                            // Larger than the whole batch (a jumbo MTU): on its own.
                            let item = Transmit {
                                dst,
                                data: bytes,
                                segment_size: None,
                            };
                            send(shared, lane, &[item]);
                        }
                    }
                }
                Outbound::Reply(bytes) => {
                    let len = bytes.len();
                    write_tun(
                        w,
                        &reply[virtio::HEADER_LEN - reply_hdr_len..virtio::HEADER_LEN + len],
                        reply_hdr_len,
                    );
                }
                Outbound::Drop(_) => {}
            }
            return;
        }
        // A TSO super-packet: route once, then segment behind the encapsulation. The small
        // packets read before it go first, so a flow's packets stay in order.
        send_batched(shared, &mut self.batch);
        let packet = &rx[start..end];
        if shared.wireguard.is_some() {
            return self.seal_super(w, &table, &hdr, start, end, reply_hdr_len);
        }
        let (index, plan, headers) =
            match fwd.outbound_super(&table, &hdr, packet, &mut self.segbuf, scratch) {
                SuperOutbound::Send {
                    index,
                    plan,
                    headers,
                } => (index, plan, headers),
                SuperOutbound::Reply(b) => {
                    let len = b.len();
                    write_tun(
                        w,
                        &reply[virtio::HEADER_LEN - reply_hdr_len..virtio::HEADER_LEN + len],
                        reply_hdr_len,
                    );
                    return;
                }
                SuperOutbound::Drop { offload, .. } => {
                    if offload {
                        shared.io_errors.offload.fetch_add(1, Relaxed);
                    }
                    return;
                }
            };
        let peer = table.peer(index);
        let dst = dst_of(peer);
        let lane = shared
            .underlay
            .lane_for(&peer.encap, ipv4::flow_hash(packet));
        let mut parts: [[&[u8]; 2]; sys::MAX_SEGMENTS] = [[&[]; 2]; sys::MAX_SEGMENTS];
        let mut slots = headers.chunks_exact(plan.header_len).enumerate().peekable();
        // A train longer than the iovec array (an MSS of a few bytes) goes out in parts.
        while slots.peek().is_some() {
            let mut n = 0;
            for (part, (i, h)) in parts.iter_mut().zip(slots.by_ref()) {
                *part = [h, &packet[plan.piece(i)]];
                n += 1;
            }
            let failed = shared
                .underlay
                .send_segments(lane, dst, &parts[..n], plan.segs.stride);
            shared.io_errors.send.fetch_add(failed as u64, Relaxed);
        }
    }
}

impl TxPath {
    /// A TSO super-packet to a WireGuard peer: routed once, cut into wire-sized packets,
    /// each encrypted into the batch, which sends them as one UDP GSO train (all but the last
    /// are the same size: WireGuard adds 32 bytes and no padding).
    fn seal_super(
        &mut self,
        w: &Worker<'_>,
        table: &RouteTable,
        hdr: &VirtioNetHdr,
        start: usize,
        end: usize,
        reply_hdr_len: usize,
    ) {
        let (shared, fwd) = (w.shared, w.fwd);
        let packet = &self.rx[start..end];
        let (_, scratch) = self.reply.split_at_mut(virtio::HEADER_LEN);
        let index = match fwd.route_super(table, hdr, packet, scratch) {
            Ok(i) => i,
            Err(SuperOutbound::Reply(b)) => {
                let len = b.len();
                write_tun(
                    w,
                    &self.reply[virtio::HEADER_LEN - reply_hdr_len..virtio::HEADER_LEN + len],
                    reply_hdr_len,
                );
                return;
            }
            Err(_) => return,
        };
        let segs = match gso::segment(hdr, packet, 0, &mut self.segbuf, |_, _| {}) {
            Ok(segs) => segs,
            Err(_) => {
                shared.io_errors.offload.fetch_add(1, Relaxed);
                fwd.drop_outbound(DropReason::Malformed, packet);
                return;
            }
        };
        let pieces = segs.iter().map(|r| &self.segbuf[r]);
        seal_into_batch(w, table, index, pieces, &mut self.batch);
        fwd.count_tx(table, index, segs.count as u64, segs.total_len() as u64);
        send_batched(shared, &mut self.batch);
    }
}

/// Whether the peer at `index` receives WireGuard.
fn peer_is_wireguard(table: &RouteTable, index: usize) -> bool {
    matches!(table.peer(index).encap, PeerEncap::Wireguard(_))
}

/// Encrypts `packets` for the WireGuard peer at `index` straight into `batch` (under one lock
/// of its tunnel), sending the batch whenever it fills. Before the first handshake the packets
/// wait in the tunnel and a handshake initiation goes out instead.
fn seal_into_batch<'p>(
    w: &Worker<'_>,
    table: &RouteTable,
    index: usize,
    packets: impl Iterator<Item = &'p [u8]>,
    batch: &mut TxBatch,
) {
    let peer = table.peer(index);
    let Some(tunnel) = w
        .shared
        .wireguard
        .as_ref()
        .and_then(|wg| wg.tunnel(peer.underlay_ip))
    else {
        // The tunnels follow the table before it is swapped in; a peer without one is gone.
        w.fwd.drop_outbound(DropReason::PeerEncap, &[]);
        return;
    };
    let dst = dst_of(peer);
    let mut sealer = tunnel.sealer();
    for packet in packets {
        let room = (packet.len() + wireguard::DATA_OVERHEAD).max(wireguard::HANDSHAKE_ROOM);
        let mut seal = |out: &mut [u8]| match sealer.seal(packet, out) {
            Sealed::Data(n) | Sealed::Handshake(n) => n,
        };
        if batch.push_with(dst, 0, room, &mut seal).is_none() {
            send_batched(w.shared, batch);
            if batch.push_with(dst, 0, room, &mut seal).is_none() {
                w.shared.io_errors.send.fetch_add(1, Relaxed);
            }
        }
    }
}

/// Sends one WireGuard message (a handshake message, a keepalive, a cookie reply) from the
/// node's WireGuard socket.
pub fn send_control(shared: &Shared, dst: SocketAddrV4, bytes: &[u8]) {
    let item = Transmit {
        dst,
        data: bytes,
        segment_size: None,
    };
    send(shared, 0, &[item]);
}

/// Room for the small packets of one turn: [`MAX_BATCH`] packets of a 1500-byte MTU with
/// their encapsulation. Larger packets (jumbo MTUs) make the batch go out sooner.
const TX_BATCH_BYTES: usize = MAX_BATCH * 1600;

/// Sends `items` from `lane`, counting what the kernel refused in [`IoErrors::send`](super::shared::IoErrors::send).
fn send(shared: &Shared, lane: usize, items: &[Transmit<'_>]) {
    let failed = shared.underlay.send_batch(lane, items);
    shared.io_errors.send.fetch_add(failed as u64, Relaxed);
}

/// Sends what `batch` holds, one `sendmmsg` per lane in use (UDP GSO trains where the
/// datagrams allow, see [`TxBatch::trains`]), and empties it.
fn send_batched(shared: &Shared, batch: &mut TxBatch) {
    if batch.is_empty() {
        return;
    }
    let mut lanes = batch.lanes();
    while lanes != 0 {
        let lane = lanes.trailing_zeros() as usize;
        lanes &= lanes - 1;
        let mut items = [EMPTY; MAX_BATCH];
        let n = batch.trains(lane, &mut items);
        send(shared, lane, &items[..n]);
    }
    batch.clear();
}

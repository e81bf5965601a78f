//! The two packet-moving loops of the agent, one dedicated thread each.
//!
//! `outbound`: tunl0 -> [`Forwarder`] -> underlay socket. With TUN offload a read may be a
//! 64 KiB TCP super-packet; it is routed once, cut into wire-sized segments behind their
//! encapsulation by [`gso::segment`] and sent as UDP GSO trains (VXLAN) or one `sendmmsg`
//! batch (IP-in-IP).
//! `inbound`: underlay socket (`recvmmsg`, UDP GRO) -> [`Forwarder`] -> [`Coalescer`] -> tunl0,
//! so a receive batch of one flow becomes one GSO write.
//!
//! Each loop owns its buffers (allocated once at start), reads the current route table
//! through `ArcSwap` without locking, and stops when the shared [`Stop`] is raised.

use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use arc_swap::ArcSwap;
use podnet_proto::gro::Coalescer;
use podnet_proto::virtio::{self, VirtioNetHdr, GSO_NONE};
use podnet_proto::{gso, vxlan};

use crate::drops::DropReason;
use crate::forward::{Encap, Forwarder, Inbound, Outbound, Route, HEADROOM, SCRATCH_LEN};
use crate::sys::raw::IpipSocket;
use crate::sys::tun::{Tun, MAX_READ};
use crate::sys::udp::{VxlanSocket, GRO_BUFFER_BYTES};
use crate::sys::{RecvMeta, Stop, Transmit, MAX_BATCH};
use crate::table::RouteTable;

/// The underlay socket of one encapsulation.
#[derive(Debug)]
pub enum Underlay {
    Vxlan(VxlanSocket),
    Ipip(IpipSocket),
}

impl Underlay {
    fn send_batch(&self, items: &[Transmit<'_>]) -> usize {
        let sent = match self {
            Underlay::Vxlan(s) => s.send_batch(items),
            Underlay::Ipip(s) => s.send_batch(items),
        };
        sent.failed
    }

    fn recv_batch<B: AsMut<[u8]>>(
        &self,
        bufs: &mut [B],
        meta: &mut [RecvMeta],
        stop: &Stop,
    ) -> io::Result<usize> {
        match self {
            Underlay::Vxlan(s) => s.recv_batch(bufs, meta, stop),
            Underlay::Ipip(s) => s.recv_batch(bufs, meta, stop),
        }
    }
}

/// Failures of the OS around the data path (not drops of bad packets, which the forwarder
/// counts by reason): sends the kernel refused, TUN writes that failed.
#[derive(Debug, Default)]
pub struct IoErrors {
    pub send: AtomicU64,
    pub tun_write: AtomicU64,
    pub offload: AtomicU64,
}

/// Everything both loops share.
pub struct Shared {
    pub forwarder: Forwarder,
    pub table: ArcSwap<RouteTable>,
    pub tun: Tun,
    pub underlay: Underlay,
    pub stop: Stop,
    pub io_errors: IoErrors,
}

/// Output room for one segmented super-packet: the payload plus, per segment, a prefix and
/// the copied headers (at most 60 + 60 bytes each, at least one payload byte per segment
/// only in pathological cases, so bound the count by the batch instead).
const SEGMENT_BUF: usize = 4 * MAX_READ;

/// Filler for the fixed-size transmit arrays (no allocation per super-packet).
const EMPTY: Transmit<'static> = Transmit {
    dst: SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0),
    data: &[],
    segment_size: None,
};

fn dst_of(encap: Encap, peer: Ipv4Addr) -> SocketAddrV4 {
    match encap {
        Encap::Vxlan { .. } => SocketAddrV4::new(peer, vxlan::PORT),
        Encap::Ipip => SocketAddrV4::new(peer, 0),
    }
}

/// tunl0 -> underlay, until `shared.stop` is raised.
pub fn outbound(shared: &Shared) -> io::Result<()> {
    let fwd = &shared.forwarder;
    let encap = fwd.config().encap;
    let vnet = shared.tun.vnet_hdr_len();
    let mut rx = vec![0u8; HEADROOM + MAX_READ];
    let mut segbuf = vec![0u8; SEGMENT_BUF];
    // ICMP replies go back into the TUN behind an all-zero virtio header in offload mode.
    let mut reply = vec![0u8; virtio::HEADER_LEN + SCRATCH_LEN];
    loop {
        let n = shared.tun.read(&mut rx[HEADROOM..], &shared.stop)?;
        if n == 0 {
            return Ok(());
        }
        if n <= vnet {
            fwd.counters().count_drop(DropReason::Malformed);
            continue;
        }
        let start = HEADROOM + vnet;
        let end = HEADROOM + n;
        let hdr = if vnet > 0 {
            VirtioNetHdr::parse(&rx[HEADROOM..start]).unwrap_or(VirtioNetHdr::NONE)
        } else {
            VirtioNetHdr::NONE
        };
        let table = shared.table.load();
        let (reply_hdr, scratch) = reply.split_at_mut(virtio::HEADER_LEN);
        let reply_hdr_len = reply_hdr[..vnet].len();
        if hdr.gso_kind() == GSO_NONE {
            if gso::complete_checksum(&hdr, &mut rx[start..end]).is_err() {
                fwd.counters().count_drop(DropReason::Malformed);
                continue;
            }
            match fwd.outbound(&table, &mut rx, start, end - start, scratch) {
                Outbound::Send { peer, bytes } => {
                    let item = Transmit {
                        dst: dst_of(encap, peer),
                        data: bytes,
                        segment_size: None,
                    };
                    let failed = shared.underlay.send_batch(&[item]);
                    shared.io_errors.send.fetch_add(failed as u64, Relaxed);
                }
                Outbound::Reply(bytes) => {
                    let len = bytes.len();
                    write_tun(
                        shared,
                        &reply[virtio::HEADER_LEN - reply_hdr_len..virtio::HEADER_LEN + len],
                    );
                }
                Outbound::Drop(_) => {}
            }
            continue;
        }
        // A TSO super-packet: route once, then segment behind the encapsulation.
        let packet = &rx[start..end];
        let index = match fwd.classify(&table, packet) {
            Route::Peer(i) => i,
            Route::Unreachable { reason, code } => {
                fwd.counters().count_drop(reason);
                if let Some(b) = fwd.icmp_error(packet, code, 0, scratch) {
                    let len = b.len();
                    write_tun(
                        shared,
                        &reply[virtio::HEADER_LEN - reply_hdr_len..virtio::HEADER_LEN + len],
                    );
                }
                continue;
            }
            Route::Drop(reason) => {
                fwd.counters().count_drop(reason);
                continue;
            }
        };
        let peer = table.peer(index);
        let dst = dst_of(encap, peer.underlay_ip);
        let (prefix_len, prefix) = match fwd.vxlan_prefix(peer) {
            Some(p) => (vxlan::ENCAP_LEN, Some(p)),
            None => (podnet_proto::ipip::OVERHEAD, None),
        };
        let segs = match gso::segment(&hdr, packet, prefix_len, &mut segbuf, |p, _| {
            if let Some(prefix) = &prefix {
                p.copy_from_slice(prefix);
            }
        }) {
            Ok(s) => s,
            Err(_) => {
                shared.io_errors.offload.fetch_add(1, Relaxed);
                fwd.counters().count_drop(DropReason::Malformed);
                continue;
            }
        };
        let inner_bytes = (segs.total_len() - segs.count * prefix_len) as u64;
        fwd.counters().tx.add_many(segs.count as u64, inner_bytes);
        table
            .counters(index)
            .tx
            .add_many(segs.count as u64, inner_bytes);
        match encap {
            Encap::Vxlan { .. } => {
                // One train: the shell cuts it into UDP_SEGMENT messages within kernel limits.
                let item = Transmit {
                    dst,
                    data: &segbuf[..segs.total_len()],
                    segment_size: Some(segs.stride as u16),
                };
                let failed = shared.underlay.send_batch(&[item]);
                shared.io_errors.send.fetch_add(failed as u64, Relaxed);
            }
            Encap::Ipip => {
                for range in segs.iter() {
                    let len = range.len() - prefix_len;
                    // Cannot fail: the segment is a valid IPv4 packet we just built.
                    let _ = fwd.encapsulate(peer, &mut segbuf[range], prefix_len, len);
                }
                for first in (0..segs.count).step_by(MAX_BATCH) {
                    let mut items = [EMPTY; MAX_BATCH];
                    let last = (first + MAX_BATCH).min(segs.count);
                    for (slot, i) in items.iter_mut().zip(first..last) {
                        let range = segs.range(i).unwrap_or(0..0);
                        *slot = Transmit {
                            dst,
                            data: &segbuf[range],
                            segment_size: None,
                        };
                    }
                    let failed = shared.underlay.send_batch(&items[..last - first]);
                    shared.io_errors.send.fetch_add(failed as u64, Relaxed);
                }
            }
        }
    }
}

fn write_tun(shared: &Shared, bytes: &[u8]) {
    if shared.tun.write(bytes).is_err() {
        shared.io_errors.tun_write.fetch_add(1, Relaxed);
    }
}

/// underlay -> tunl0, until `shared.stop` is raised.
pub fn inbound(shared: &Shared) -> io::Result<()> {
    let fwd = &shared.forwarder;
    let vnet = shared.tun.vnet_hdr_len();
    let mut bufs: Vec<Vec<u8>> = (0..MAX_BATCH)
        .map(|_| vec![0u8; GRO_BUFFER_BYTES])
        .collect();
    let mut meta = vec![RecvMeta::default(); MAX_BATCH];
    let mut coalescer = Coalescer::new();
    // Without offload each packet is written as is; with it, behind a virtio header, which
    // the coalescer adds itself.
    loop {
        let n = shared
            .underlay
            .recv_batch(&mut bufs, &mut meta, &shared.stop)?;
        if n == 0 {
            return Ok(());
        }
        let table = shared.table.load();
        for (buf, m) in bufs.iter().zip(&meta).take(n) {
            if m.truncated {
                fwd.counters().count_drop(DropReason::Malformed);
                continue;
            }
            let step = if m.segment_size == 0 {
                m.len
            } else {
                m.segment_size
            };
            for datagram in buf[..m.len].chunks(step.max(1)) {
                let verdict = match &shared.underlay {
                    Underlay::Vxlan(_) => fwd.inbound_vxlan(&table, *m.src.ip(), datagram),
                    Underlay::Ipip(_) => fwd.inbound_ipip(&table, datagram),
                };
                if let Inbound::Deliver(inner) = verdict {
                    if vnet > 0 {
                        coalescer.push(inner, |out| write_tun(shared, out));
                    } else {
                        write_tun(shared, inner);
                    }
                }
            }
        }
        if vnet > 0 {
            coalescer.flush(|out| write_tun(shared, out));
        }
    }
}

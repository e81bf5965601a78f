//! The inbound direction: received datagrams checked by the forwarder (WireGuard ones opened
//! first) and their inner packets coalesced into GSO writes on the TUN.

use std::net::Ipv4Addr;

use podnet_proto::api::Encap;
use podnet_proto::gro::{Coalescer, Span};
use podnet_proto::gso;
use podnet_proto::virtio;

use crate::core::drops::DropReason;
use crate::core::forward::{Inbound, RxTally};
use crate::sys::tun::MAX_READ;
use crate::sys::udp::GRO_BUFFER_BYTES;
use crate::sys::{RecvMeta, MAX_BATCH};
use crate::wireguard::{self, Opened, Wireguard};

use super::rewrite::RewritePath;
use super::tx::{send_control, SEGMENT_BUF};
use super::worker::{drop_malformed, write_tun, write_tun_vectored, Worker};

/// Where `part`, a piece of receive buffer `index` (`buf`), lies in it.
fn span_in(index: usize, buf: &[u8], part: &[u8]) -> Span {
    let start = (part.as_ptr() as usize).wrapping_sub(buf.as_ptr() as usize);
    debug_assert!(start + part.len() <= buf.len(), "not a piece of the buffer");
    Span {
        buf: index,
        start,
        end: start + part.len(),
    }
}

/// The inbound direction's buffers and coalescer (allocated once).
pub(super) struct RxPath {
    pub(super) bufs: Vec<Vec<u8>>,
    pub(super) meta: Vec<RecvMeta>,
    coalescer: Coalescer,
    rewrite: RewritePath,
    /// WireGuard: the decrypted packets of message `k` of `bufs` go to `plain[k]`, at the
    /// offset of their datagram (so the coalescer finds them in place). Empty otherwise.
    plain: Vec<Vec<u8>>,
    /// WireGuard: where the packets a tunnel queued before its handshake are sealed when it
    /// completes (each up to the largest inner packet plus 32 bytes).
    queued: Vec<u8>,
}

impl RxPath {
    pub(super) fn new(wireguard: bool) -> RxPath {
        RxPath {
            plain: match wireguard {
                // A handshake answer may be written where a short datagram was.
                true => (0..MAX_BATCH)
                    .map(|_| vec![0u8; GRO_BUFFER_BYTES + wireguard::HANDSHAKE_ROOM])
                    .collect(),
                false => Vec::new(),
            },
            queued: match wireguard {
                true => vec![0u8; MAX_READ + wireguard::DATA_OVERHEAD],
                false => Vec::new(),
            },
            bufs: (0..MAX_BATCH)
                .map(|_| vec![0u8; GRO_BUFFER_BYTES])
                .collect(),
            meta: vec![RecvMeta::default(); MAX_BATCH],
            coalescer: Coalescer::new(),
            rewrite: RewritePath {
                out: vec![0u8; virtio::HEADER_LEN + MAX_READ],
                segbuf: vec![0u8; SEGMENT_BUF],
            },
        }
    }

    /// Forwards the `n` messages just received into `bufs`/`meta`.
    pub(super) fn handle(&mut self, w: &Worker<'_>, n: usize) {
        if let Some(wg) = &w.shared.wireguard {
            return self.handle_wireguard(w, wg, n);
        }
        let (shared, fwd) = (w.shared, w.fwd);
        let vnet = shared.tun.vnet_hdr_len();
        let coalescer = &mut self.coalescer;
        let rewrite = &mut self.rewrite;
        let bufs = &self.bufs;
        let table = shared.table.load();
        let mut tally = RxTally::default();
        let receives_vxlan = fwd.config().encap == Encap::Vxlan;
        for (k, (buf, m)) in bufs.iter().zip(&self.meta).take(n).enumerate() {
            if m.truncated {
                drop_malformed(fwd, *m.src.ip(), &[]);
                continue;
            }
            let step = if m.segment_size == 0 {
                m.len
            } else {
                m.segment_size
            };
            // An empty datagram still goes to the forwarder, which counts it as malformed;
            // `chunks` of an empty slice would yield nothing and the drop would go uncounted.
            let datagrams = buf[..m.len].chunks(step.max(1));
            let empty: &[u8] = &[];
            let datagrams = datagrams.chain((m.len == 0).then_some(empty));
            for datagram in datagrams {
                let verdict = if receives_vxlan {
                    fwd.inbound_vxlan_tallied(&table, *m.src.ip(), datagram, &mut tally)
                } else {
                    fwd.inbound_ipip_tallied(&table, datagram, &mut tally)
                };
                if let Inbound::Deliver(inner) = verdict {
                    let at = span_in(k, buf, inner);
                    deliver(w, coalescer, rewrite, bufs, at, *m.src.ip());
                }
            }
        }
        tally.commit(fwd, &table);
        if vnet > 0 {
            coalescer.flush(bufs, |out| write_tun_vectored(w, out));
        }
    }
}

impl RxPath {
    /// [`RxPath::handle`] for a WireGuard node: each datagram is opened by the tunnel of the
    /// peer it came from (the known-peer check is its source address, as for VXLAN), its
    /// inner packet checked by the forwarder and delivered like a VXLAN one. Handshake
    /// answers go back at once, and a completed handshake sends what waited for it.
    fn handle_wireguard(&mut self, w: &Worker<'_>, wg: &Wireguard, n: usize) {
        let fwd = w.fwd;
        let table = w.shared.table.load();
        let mut tally = RxTally::default();
        let (bufs, plain) = (&self.bufs, &mut self.plain);
        for (k, (buf, m)) in bufs.iter().zip(&self.meta).take(n).enumerate() {
            let src = *m.src.ip();
            if m.truncated {
                drop_malformed(fwd, src, &[]);
                continue;
            }
            let step = match m.segment_size {
                0 => m.len.max(1),
                s => s,
            };
            let index = table.by_underlay(src);
            let tunnel = index.and(wg.tunnel(src));
            let mut at = 0;
            while at < m.len.max(1) {
                let datagram = &buf[at..(at + step).min(m.len)];
                let offset = at;
                at += step;
                let (Some(index), Some(tunnel)) = (index, &tunnel) else {
                    fwd.drop_inbound(DropReason::UnknownPeer, &table, None, src, datagram);
                    continue;
                };
                match tunnel.open(src, datagram, &mut plain[k][offset..]) {
                    Opened::Packet(r) => {
                        let inner = &plain[k][offset + r.start..offset + r.end];
                        let verdict =
                            fwd.inbound_decrypted_tallied(&table, index, inner, &mut tally);
                        if let Inbound::Deliver(inner) = verdict {
                            let at = span_in(k, &plain[k], inner);
                            deliver(w, &mut self.coalescer, &mut self.rewrite, plain, at, src);
                        }
                    }
                    Opened::Control { reply, completed } => {
                        if reply > 0 {
                            send_control(w.shared, m.src, &plain[k][offset..offset + reply]);
                        }
                        if completed {
                            tunnel.flush_queued(&mut self.queued, |b| {
                                send_control(w.shared, wireguard::endpoint(src), b)
                            });
                        }
                    }
                    Opened::Cookie(len) => {
                        send_control(w.shared, m.src, &plain[k][offset..offset + len]);
                        let reason = DropReason::WgCookie;
                        fwd.drop_inbound(reason, &table, Some(index), src, datagram);
                    }
                    Opened::Drop(reason) => {
                        fwd.drop_inbound(reason, &table, Some(index), src, datagram)
                    }
                }
            }
        }
        tally.commit(fwd, &table);
        if w.shared.tun.vnet_hdr_len() > 0 {
            self.coalescer
                .flush(plain, |out| write_tun_vectored(w, out));
        }
    }
}

/// Delivers inner packet `at` of `bufs` (received from `src`) to the TUN: through the
/// coalescer with offload, rewritten where it must be (see [`RewritePath`]), else as it is.
fn deliver(
    w: &Worker<'_>,
    coalescer: &mut Coalescer,
    rewrite: &mut RewritePath,
    bufs: &[Vec<u8>],
    at: Span,
    src: Ipv4Addr,
) {
    let inner = &bufs[at.buf][at.start..at.end];
    let mtu = usize::from(w.fwd.config().mtu);
    // Without offload each packet is written as is; with it, behind a virtio header, which
    // the coalescer adds itself.
    if inner.len() > mtu {
        // Whatever the coalescer holds arrived first.
        coalescer.flush(bufs, |out| write_tun_vectored(w, out));
        rewrite.deliver(w, src, inner);
    } else if w.shared.tun.vnet_hdr_len() > 0 {
        coalescer.push(bufs, at, |out| write_tun_vectored(w, out));
    } else if let Some(hdr) = gso::partial_checksum(inner) {
        rewrite.complete(w, src, inner, &hdr);
    } else {
        write_tun(w, inner, 0);
    }
}

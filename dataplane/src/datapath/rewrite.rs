//! Inner packets that cannot be written from where they were received: longer than the tunl0
//! MTU, or with a checksum to complete for a TUN without offload.

use std::net::Ipv4Addr;
use std::sync::atomic::Ordering::Relaxed;

use podnet_proto::virtio::{self, VirtioNetHdr};
use podnet_proto::{gro, gso};

use super::worker::{drop_malformed, write_tun, Worker};

/// Buffers for inner packets that cannot be written from where they were received: longer
/// than the tunl0 MTU ([`RewritePath::deliver`]), or with a checksum to complete and no TUN
/// offload to hand it over ([`RewritePath::complete`]).
pub(super) struct RewritePath {
    /// `[virtio header][packet]`.
    pub(super) out: Vec<u8>,
    /// Wire-sized segments when the TUN has no offload.
    pub(super) segbuf: Vec<u8>,
}

impl RewritePath {
    /// Writes `inner` with the checksum a sender's offload left partial (`hdr`, from
    /// [`gso::partial_checksum`]) computed, for a TUN without virtio header: the kernel takes
    /// what it reads from such a TUN as checksummed, and the pod would drop the packet.
    pub(super) fn complete(
        &mut self,
        w: &Worker<'_>,
        src: Ipv4Addr,
        inner: &[u8],
        hdr: &VirtioNetHdr,
    ) {
        let packet = &mut self.out[..inner.len()];
        packet.copy_from_slice(inner);
        match gso::complete_checksum(hdr, packet) {
            Ok(()) => write_tun(w, packet, 0),
            // partial_checksum found the field inside the packet.
            Err(_) => drop_malformed(w.fwd, src, inner),
        }
    }

    /// Delivers an inner packet longer than the tunl0 MTU: IP-in-IP TCP segments the host's
    /// GRO merged before our raw socket saw them ([`gro::offload_merged`]). With TUN offload
    /// it is one GSO write; without, it is cut back into MTU-sized segments here. A packet
    /// that does not verify is dropped as `malformed`.
    pub(super) fn deliver(&mut self, w: &Worker<'_>, src: Ipv4Addr, inner: &[u8]) {
        let (shared, fwd) = (w.shared, w.fwd);
        let h = virtio::HEADER_LEN;
        let packet = &mut self.out[h..h + inner.len()];
        packet.copy_from_slice(inner);
        let Ok(hdr) = gro::offload_merged(packet, fwd.config().mtu) else {
            return drop_malformed(fwd, src, inner);
        };
        let vnet = shared.tun.vnet_hdr_len();
        if vnet > 0 {
            self.out[..h].copy_from_slice(&hdr.to_bytes());
            write_tun(w, &self.out[h - vnet..h + inner.len()], vnet);
            return;
        }
        match gso::segment(&hdr, packet, 0, &mut self.segbuf, |_, _| {}) {
            Ok(segs) => {
                for range in segs.iter() {
                    write_tun(w, &self.segbuf[range], 0);
                }
            }
            // Only an MTU so small that the segments outgrow the buffer gets here.
            Err(_) => {
                shared.io_errors.offload.fetch_add(1, Relaxed);
                drop_malformed(fwd, src, inner);
            }
        }
    }
}

//! One data-path worker's share of the TUN queues and receive sockets, and its writes into
//! the TUN on the queue of each packet's flow.

use std::io::IoSlice;
use std::net::Ipv4Addr;
use std::sync::atomic::Ordering::Relaxed;

use podnet_proto::ipv4;
use podnet_proto::virtio;

use crate::core::drops::DropReason;
use crate::core::dropwatch::DropContext;
use crate::core::forward::Forwarder;
use crate::sys::tun::Tun;

use super::shared::Shared;

/// What one data-path worker serves: its forwarder, its TUN queues and its receive sockets.
/// Worker `w` of `n` takes the queues and sockets whose index is `w` modulo `n`.
pub struct Worker<'a> {
    pub(super) shared: &'a Shared,
    pub(super) fwd: &'a Forwarder,
    /// Indexes of its TUN queues (at least one).
    pub(super) queues: Vec<usize>,
    /// Indexes of its receive sockets (none with `--encap none`).
    pub(super) receivers: Vec<usize>,
}

impl<'a> Worker<'a> {
    /// Worker `index` of `shared.workers()`.
    ///
    /// # Panics
    /// When `index` is not below the worker count, or there are more workers than TUN queues:
    /// the agent sizes both.
    pub fn new(shared: &'a Shared, index: usize) -> Worker<'a> {
        let n = shared.workers();
        assert!(
            index < n && n <= shared.queue_count(),
            "worker {index} of {n}"
        );
        let mine = |count: usize| (index..count).step_by(n).collect::<Vec<_>>();
        Worker {
            shared,
            fwd: &shared.forwarders[index],
            queues: mine(shared.queue_count()),
            receivers: mine(shared.underlay.receiver_count()),
        }
    }

    pub(super) fn queue(&self, i: usize) -> &'a Tun {
        self.shared.queue(self.queues[i])
    }

    /// The TUN queue to write inner packet `ip` (IPv4 header first) on: one of this worker's,
    /// by a flow hash that is the same in both directions. The kernel steers a flow's
    /// outgoing packets to the queue its incoming ones were last written on, so a flow that
    /// arrives on this worker is also read by it (both directions on one thread, in order),
    /// and different flows go to different queues (see [`run`](super::run)).
    fn queue_for(&self, ip: &[u8]) -> &'a Tun {
        match self.queues.len() {
            1 => self.queue(0),
            n => self.queue(ipv4::flow_hash_symmetric(ip) as usize % n),
        }
    }
}

/// Writes one packet whose IPv4 header starts at `ip_at` (after the virtio header, if any) on
/// its flow's queue.
pub(super) fn write_tun(w: &Worker<'_>, bytes: &[u8], ip_at: usize) {
    let queue = w.queue_for(bytes.get(ip_at..).unwrap_or_default());
    if queue.write(bytes).is_err() {
        w.shared.io_errors.tun_write.fetch_add(1, Relaxed);
    }
}

/// Writes one coalescer output (a virtio header, the packet's headers, the payloads, in place
/// in the receive buffers) on its flow's queue.
pub(super) fn write_tun_vectored(w: &Worker<'_>, parts: &[IoSlice<'_>]) {
    // The coalescer puts the headers in the first part, right after the virtio header, or a
    // whole packet in the second part after a bare virtio header.
    let ip = match parts {
        [first, ..] if first.len() > virtio::HEADER_LEN => &first[virtio::HEADER_LEN..],
        [_, second, ..] => second,
        _ => &[],
    };
    if w.queue_for(ip).write_vectored(parts).is_err() {
        w.shared.io_errors.tun_write.fetch_add(1, Relaxed);
    }
}

/// Counts a received datagram (or the inner packet in it) from `src` as `malformed`, without a
/// peer to charge: the forwarder's checks had not placed it yet, or it failed a later one.
pub(super) fn drop_malformed(fwd: &Forwarder, src: Ipv4Addr, bytes: &[u8]) {
    fwd.counters()
        .record_drop(DropReason::Malformed, None, &DropContext::rx(src, bytes));
}

//! The packet-moving loop of the agent, on its dedicated data-path thread.
//!
//! Outbound: tunl0 -> [`Forwarder`] -> underlay socket. With TUN offload a read may be a
//! 64 KiB TCP super-packet; it is routed once and [`gso::segment_headers`] builds each
//! wire-sized segment's headers behind its encapsulation, sent with the payload left where
//! the TUN read put it (VXLAN as UDP GSO trains, IP-in-IP one packet per `sendmmsg`
//! message). Small packets (ACKs, pings, DNS) are gathered over a turn in a [`TxBatch`] and
//! sent with one `sendmmsg` per lane (VXLAN outer source port) in use.
//! Inbound: underlay sockets (`recvmmsg`, UDP GRO; VXLAN a `SO_REUSEPORT` group served in
//! turn) -> [`Forwarder`] -> [`Coalescer`] -> tunl0, so the segments of one flow become one
//! GSO write.
//!
//! [`run`] serves both directions on one thread, which on a small machine moves the same
//! bytes with fewer context switches (see its doc).
//!
//! The loop owns its buffers (allocated once at start), reads the current route table
//! through `ArcSwap` without locking, and stops when the shared [`Stop`] is raised.

use std::io::{self, IoSlice};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use podnet_proto::gro::{Coalescer, Span};
use podnet_proto::virtio::{self, VirtioNetHdr, GSO_NONE};
use podnet_proto::{gro, gso, ipv4, vxlan};

use crate::core::batch::TxBatch;
use crate::core::drops::{CountersSnapshot, DropReason};
use crate::core::dropwatch::DropContext;
use crate::core::forward::{
    Encap, Forwarder, Inbound, Outbound, RxTally, SuperOutbound, HEADROOM, SCRATCH_LEN,
};
use crate::core::table::{Peer, PeerEncap, RouteTable};
use crate::sys::raw::IpipSocket;
use crate::sys::tun::{self, Tun, MAX_READ};
use crate::sys::udp::{VxlanSocket, GRO_BUFFER_BYTES};
use crate::sys::{self, Readiness, RecvMeta, Stop, Transmit, MAX_BATCH};
use crate::wireguard::{self, Opened, Sealed, Wireguard};

/// The underlay sockets. This node receives its own encapsulation only, on that
/// encapsulation's socket(s); peers are sent what they receive, so the other encapsulation has
/// a send-only socket (`None` when it could not be opened).
#[derive(Debug)]
pub struct Underlay {
    own: Own,
    other_vxlan: Option<VxlanSocket>,
    other_ipip: Option<IpipSocket>,
}

/// The sockets this node receives on (and sends to peers of its own kind from).
#[derive(Debug)]
enum Own {
    Vxlan(VxlanSocket),
    /// One per worker ([`IpipSocket::bind_share`]); the first also sends.
    Ipip(Vec<IpipSocket>),
    /// `--encap none`: nothing arrives through a tunnel, and nothing is sent through one.
    None,
    /// `--encap wireguard`: UDP 51820 (a `SO_REUSEPORT` group like VXLAN's); this node sends
    /// only to WireGuard peers, from the same port, as standard WireGuard peers expect.
    Wireguard(VxlanSocket),
}

/// The lane of IP-in-IP sends in a [`TxBatch`] (VXLAN lanes are its outer source ports,
/// numbered from 0; there are far fewer of them).
const IPIP_LANE: usize = crate::core::batch::MAX_LANES - 1;

impl Underlay {
    /// A VXLAN node's sockets; `ipip` sends to IP-in-IP peers.
    pub fn vxlan(own: VxlanSocket, ipip: Option<IpipSocket>) -> Underlay {
        Underlay {
            own: Own::Vxlan(own),
            other_vxlan: None,
            other_ipip: ipip,
        }
    }

    /// An IP-in-IP node's sockets (one receive socket per worker, at least one); `vxlan`
    /// sends to VXLAN peers.
    pub fn ipip(own: Vec<IpipSocket>, vxlan: Option<VxlanSocket>) -> Underlay {
        assert!(!own.is_empty(), "an IP-in-IP node needs its socket");
        Underlay {
            own: Own::Ipip(own),
            other_vxlan: vxlan,
            other_ipip: None,
        }
    }

    /// A WireGuard node's socket(s).
    pub fn wireguard(own: VxlanSocket) -> Underlay {
        Underlay {
            own: Own::Wireguard(own),
            other_vxlan: None,
            other_ipip: None,
        }
    }

    /// A `--encap none` node: no tunnel sockets at all.
    pub fn none() -> Underlay {
        Underlay {
            own: Own::None,
            other_vxlan: None,
            other_ipip: None,
        }
    }

    /// The socket VXLAN goes out from (this node's own, or its send-only one), or a
    /// WireGuard node's UDP socket.
    pub fn vxlan_socket(&self) -> Option<&VxlanSocket> {
        match &self.own {
            Own::Vxlan(s) | Own::Wireguard(s) => Some(s),
            Own::Ipip(_) | Own::None => self.other_vxlan.as_ref(),
        }
    }

    /// The socket IP-in-IP goes out from.
    fn ipip_socket(&self) -> Option<&IpipSocket> {
        match &self.own {
            Own::Ipip(s) => s.first(),
            Own::Vxlan(_) | Own::None | Own::Wireguard(_) => self.other_ipip.as_ref(),
        }
    }

    /// Datagrams the kernel dropped at the receive sockets because they were full: lost before
    /// the data path saw them, so no drop reason of ours counts them.
    pub fn receive_drops(&self) -> u64 {
        match &self.own {
            Own::Vxlan(s) | Own::Wireguard(s) => s.receive_drops(),
            Own::Ipip(s) => s.iter().map(IpipSocket::receive_drops).sum(),
            Own::None => 0,
        }
    }

    /// Sends `items` from `lane` ([`Underlay::lane_for`]); returns how many the kernel refused
    /// (all of them when the encapsulation has no socket, which routing rules out).
    fn send_batch(&self, lane: usize, items: &[Transmit<'_>]) -> usize {
        let sent = match lane {
            IPIP_LANE => self.ipip_socket().map(|s| s.send_batch(items)),
            _ => self.vxlan_socket().map(|s| s.send_batch(lane, items)),
        };
        sent.map_or(items.len(), |s| s.failed)
    }

    /// Sends a train of packets to `dst`, each a header slice and a payload slice, every one
    /// but the last `stride` bytes long (VXLAN: from `lane`, as UDP GSO where it can); returns
    /// how many messages the kernel refused.
    fn send_segments(
        &self,
        lane: usize,
        dst: SocketAddrV4,
        parts: &[[&[u8]; 2]],
        stride: usize,
    ) -> usize {
        let sent = match lane {
            IPIP_LANE => self.ipip_socket().map(|s| s.send_segments(dst, parts)),
            _ => self
                .vxlan_socket()
                .map(|s| s.send_segments(lane, dst, parts, stride as u16)),
        };
        sent.map_or(parts.len(), |s| s.failed)
    }

    /// The lane a flow with inner flow hash `hash` to a peer receiving `encap` sends from:
    /// VXLAN's outer source port by flow, or the IP-in-IP socket.
    fn lane_for(&self, encap: &PeerEncap, hash: u32) -> usize {
        match (encap, self.vxlan_socket()) {
            (PeerEncap::Vxlan, Some(s)) if s.lanes() > 1 => s.lane(hash),
            (PeerEncap::Vxlan | PeerEncap::Wireguard(_), _) => 0,
            _ => IPIP_LANE,
        }
    }

    /// Receives what receive socket `i` holds (up to the buffers given), without waiting.
    fn try_recv_batch<B: AsMut<[u8]>>(
        &self,
        i: usize,
        bufs: &mut [B],
        meta: &mut [RecvMeta],
    ) -> io::Result<usize> {
        match &self.own {
            Own::Vxlan(s) | Own::Wireguard(s) => s.try_recv_batch(i, bufs, meta),
            Own::Ipip(s) => s[i].try_recv_batch(bufs, meta),
            Own::None => Ok(0),
        }
    }

    /// Receive sockets: VXLAN may have several (one `SO_REUSEPORT` group, where the kernel
    /// keeps each outer 4-tuple, and so each inner flow, on one socket); IP-in-IP one per
    /// worker (each with a filter for its share); `--encap none` none.
    pub fn receiver_count(&self) -> usize {
        match &self.own {
            Own::Vxlan(s) | Own::Wireguard(s) => s.receiver_count(),
            Own::Ipip(s) => s.len(),
            Own::None => 0,
        }
    }

    /// The descriptors of the receive sockets, for the loop's epoll set.
    fn receivers(&self) -> Vec<BorrowedFd<'_>> {
        match &self.own {
            Own::Vxlan(s) | Own::Wireguard(s) => {
                (0..s.receiver_count()).map(|i| s.receiver(i)).collect()
            }
            Own::Ipip(s) => s.iter().map(AsFd::as_fd).collect(),
            Own::None => Vec::new(),
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

/// Everything the workers share.
pub struct Shared {
    /// `--encap wireguard`: the node's keys and its tunnels to the peers.
    pub wireguard: Option<Wireguard>,
    /// One per worker ([`Forwarder::for_worker`]): the node's forwarder, each with its own
    /// counters.
    pub forwarders: Vec<Forwarder>,
    pub table: ArcSwap<RouteTable>,
    /// The TUN device (its first queue).
    pub tun: Tun,
    /// Its other queues (`--tun-queues`; empty with one queue).
    pub tun_queues: Vec<Tun>,
    pub underlay: Underlay,
    pub stop: Stop,
    pub io_errors: IoErrors,
    /// How long [`run`] keeps polling after its last packet before it sleeps (`--busy-poll`).
    pub busy_poll: Duration,
    /// The forwarders' clock (they never read one themselves): one for every worker, so
    /// the ICMP rate limit they share is refilled on one time line.
    pub epoch: Instant,
}

impl Shared {
    /// The node's forwarder (worker 0's): its configuration, and the drop samples all share.
    pub fn forwarder(&self) -> &Forwarder {
        &self.forwarders[0]
    }

    /// How many data-path workers there are.
    pub fn workers(&self) -> usize {
        self.forwarders.len()
    }

    /// The node's counters: the sum of the workers'.
    pub fn counters(&self) -> CountersSnapshot {
        CountersSnapshot::sum(&self.worker_counters())
    }

    /// Each worker's counters.
    pub fn worker_counters(&self) -> Vec<CountersSnapshot> {
        self.forwarders
            .iter()
            .map(|f| f.counters().snapshot())
            .collect()
    }

    /// How many TUN queues there are.
    pub fn queue_count(&self) -> usize {
        1 + self.tun_queues.len()
    }

    /// TUN queue `i` (0 is [`Shared::tun`]).
    pub fn queue(&self, i: usize) -> &Tun {
        match i {
            0 => &self.tun,
            _ => &self.tun_queues[i - 1],
        }
    }
}

/// What one data-path worker serves: its forwarder, its TUN queues and its receive sockets.
/// Worker `w` of `n` takes the queues and sockets whose index is `w` modulo `n`.
pub struct Worker<'a> {
    shared: &'a Shared,
    fwd: &'a Forwarder,
    /// Indexes of its TUN queues (at least one).
    queues: Vec<usize>,
    /// Indexes of its receive sockets (none with `--encap none`).
    receivers: Vec<usize>,
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

    fn queue(&self, i: usize) -> &'a Tun {
        self.shared.queue(self.queues[i])
    }

    /// The TUN queue to write inner packet `ip` (IPv4 header first) on: one of this worker's,
    /// by a flow hash that is the same in both directions. The kernel steers a flow's
    /// outgoing packets to the queue its incoming ones were last written on, so a flow that
    /// arrives on this worker is also read by it (both directions on one thread, in order),
    /// and different flows go to different queues (see [`run`]).
    fn queue_for(&self, ip: &[u8]) -> &'a Tun {
        match self.queues.len() {
            1 => self.queue(0),
            n => self.queue(ipv4::flow_hash_symmetric(ip) as usize % n),
        }
    }
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

/// Where packets for `peer` go: UDP port 4789 for VXLAN, 51820 for WireGuard, the bare
/// address for a raw socket.
fn dst_of(peer: &Peer) -> SocketAddrV4 {
    match peer.encap {
        PeerEncap::Vxlan => SocketAddrV4::new(peer.underlay_ip, vxlan::PORT),
        PeerEncap::Wireguard(_) => wireguard::endpoint(peer.underlay_ip),
        _ => SocketAddrV4::new(peer.underlay_ip, 0),
    }
}

/// Bytes of TUN reads handled before the loop of [`run`] looks at the underlay again: about
/// as many wire packets (a TSO super-packet counts as the segments it becomes) as one receive
/// batch of [`MAX_BATCH`] messages, so a flood on one side cannot starve the other.
const TX_BUDGET_BYTES: usize = MAX_BATCH * 1500;

/// Bytes one receive socket of several may hand over per turn, as a message count from the
/// size of its last messages: two GRO-merged 64 KiB datagrams of a bulk flow, all of
/// [`MAX_BATCH`] for small ones. A flow on another socket then waits for that much of a
/// stream, not for its backlog, and a flood of small datagrams is still read in full batches.
const RX_BUDGET_BYTES: usize = 128 * 1024;

/// How many messages to ask one of `receivers` sockets for when its last batch averaged
/// `mean` bytes a message (0: nothing read yet). A single socket always gets a full batch.
fn rx_batch(receivers: usize, mean: usize) -> usize {
    match (receivers, mean) {
        (1, _) | (_, 0) => MAX_BATCH,
        (_, m) => (RX_BUDGET_BYTES / m).clamp(1, MAX_BATCH),
    }
}

/// Worker `index`: both directions of its flows on one thread, until `shared.stop` is raised.
///
/// On a machine with few cores this moves the same bytes with fewer context switches than a
/// reader thread per direction (bench/RESULTS.md): the TCP ACKs and ping replies that a TUN write
/// produces (the kernel runs the receiving socket inline in that write) are read back from the
/// TUN by the same thread at once instead of waking another one, and ACKs arriving from the
/// peer are picked up between data reads. Work per turn is bounded (`TX_BUDGET_BYTES` of
/// TUN reads, one receive batch per ready socket, `RX_BUDGET_BYTES` each when there are
/// several) so neither direction starves the other.
pub fn run(shared: &Shared, index: usize) -> io::Result<()> {
    let w = Worker::new(shared, index);
    let queues = w.queues.len();
    let receivers = w.receivers.len();
    // Bits of `ready`: one per TUN queue, then one per receive socket.
    let tun_bits: u32 = (1 << queues) - 1;
    let rx_bits: u32 = ((1 << receivers) - 1) << queues;
    // Per receive socket, the mean size of the messages it last gave (see `rx_batch`).
    let mut rx_mean = vec![0usize; receivers];
    let mut tx = TxPath::new(shared);
    let mut rx = RxPath::new(shared.wireguard.is_some());
    let mut fds: Vec<BorrowedFd<'_>> = (0..queues).map(|q| w.queue(q).as_fd()).collect();
    let sockets = shared.underlay.receivers();
    fds.extend(w.receivers.iter().map(|&r| sockets[r]));
    let watch = sys::Watch::new(&fds, &shared.stop)?;
    let spin = shared.busy_poll;
    let mut idle_since: Option<Instant> = None;
    // Which descriptors to read on this turn: all after traffic with one queue and one
    // socket, else what the watch reported.
    let mut ready = tun_bits | rx_bits;
    loop {
        w.fwd.tick(shared.epoch.elapsed().as_millis() as u64);
        let mut busy = false;
        // A queue whose device was deleted: epoll reports it ready until it is rebuilt.
        let mut detached = false;
        let mut budget = TX_BUDGET_BYTES;
        let mut reads = 0;
        // Round robin over the ready queues, one packet from each per pass: what waits on one
        // queue (a ping, a DNS query) does not wait behind a bulk flow's backlog on another.
        let mut pending = ready & tun_bits;
        'reads: while pending != 0 {
            for q in 0..queues {
                if pending & (1 << q) == 0 {
                    continue;
                }
                let read = match w.queue(q).try_read(tx.read_buf()) {
                    Ok(read) => read,
                    // The agent's host watch rebuilds the device on these descriptors
                    // (crate::agent::host); until then the queue has nothing to read.
                    Err(e) if tun::is_detached(&e) => {
                        detached = true;
                        None
                    }
                    Err(e) => return Err(e),
                };
                match read {
                    Some(0) | None => pending &= !(1 << q),
                    Some(n) => {
                        busy = true;
                        reads += 1;
                        tx.handle(&w, n);
                        budget = budget.saturating_sub(n.max(1500));
                        if budget == 0 || reads == MAX_BATCH {
                            break 'reads;
                        }
                    }
                }
            }
        }
        tx.flush(shared);
        for (r, mean) in rx_mean.iter_mut().enumerate() {
            if ready & (1 << (queues + r)) == 0 {
                continue;
            }
            let want = rx_batch(receivers, *mean);
            let (bufs, meta) = (&mut rx.bufs[..want], &mut rx.meta[..want]);
            let n = shared.underlay.try_recv_batch(w.receivers[r], bufs, meta)?;
            if n == 0 {
                continue;
            }
            busy = true;
            *mean = meta[..n].iter().map(|m| m.len).sum::<usize>() / n;
            rx.handle(&w, n);
        }
        if busy {
            idle_since = None;
            // With one queue and one socket, trying both costs at most one empty read; with
            // more, one `epoll_wait` says which have packets.
            ready = if queues == 1 && receivers == 1 {
                tun_bits | rx_bits
            } else {
                match watch.ready()? {
                    Readiness::Stopped => return Ok(()),
                    Readiness::Ready(bits) => bits,
                }
            };
            continue;
        }
        if detached {
            // Sleep instead of spinning on the detached queue's readiness until the device
            // is back (the host watch repairs it within its period).
            std::thread::sleep(DETACHED_PAUSE);
        }
        // Idle for now: keep polling for a while after traffic instead of sleeping. One
        // zero-timeout `epoll_wait` per turn asks every descriptor (and the stop signal) at once;
        // between polls the CPU goes to whatever else is runnable (iperf3, the pods' stacks).
        let since = *idle_since.get_or_insert_with(Instant::now);
        if since.elapsed() < spin {
            match watch.ready()? {
                Readiness::Stopped => return Ok(()),
                Readiness::Ready(0) => {
                    std::thread::yield_now();
                    ready = 0;
                }
                Readiness::Ready(bits) => ready = bits,
            }
            continue;
        }
        idle_since = None;
        ready = watch.wait()?;
        if ready == 0 {
            return Ok(());
        }
    }
}

/// How long [`run`] pauses between turns while a TUN queue is detached (its device deleted).
const DETACHED_PAUSE: Duration = Duration::from_millis(10);

/// How long [`run`] keeps polling (a zero-timeout `epoll_wait` on its descriptors,
/// `sched_yield` between polls) after its last packet before it sleeps in `epoll_wait`.
///
/// A sleeping data-path thread costs a wake-up per packet that finds it asleep, and on a VM
/// waking a halted vCPU is most of a round trip: with four wake-ups per ping (two agents,
/// both directions) podnet's RTT was 3.6x the kernel VXLAN's. Polling through the gaps of a
/// conversation removes them. Measured on the 2-vCPU bench VM (ping every 10 ms, bench/RESULTS.md):
/// a window of 100 us or 2 ms leaves most pings to arrive at a sleeping agent (RTT 2.8-3.6x),
/// 20 ms covers the gap (RTT 1.5-1.7x); single-stream throughput is unchanged because the
/// polls yield. The price is CPU while traffic trickles: an agent that forwards at least one
/// packet every 20 ms polls continuously (its CPU time grows to what the scheduler leaves it
/// between yields); an idle one polls for 20 ms after its last packet and then sleeps.
/// `--busy-poll` sets it (0 turns polling off).
pub const DEFAULT_BUSY_POLL: Duration = Duration::from_millis(20);

/// TUN queues [`run`] reads in turn (`--tun-queues`), and as many VXLAN receive sockets. A
/// bulk TCP flow keeps about a millisecond of data queued in tunl0 (TCP small queues allows
/// that much below the socket), and with one queue every other packet of the host waits
/// behind it; on the receiving side the backlog sits in the UDP socket instead. With several
/// queues and sockets the kernel puts flows on different ones (a given pair shares one time
/// in eight) and the loop serves them in turn: one packet per TUN queue, about 128 KiB per
/// socket. Measured (bench/RESULTS.md), median ping under one VXLAN stream: 0.95-1.5 ms with
/// one queue; with eight queues and one socket 0.34-1.68 ms (median 0.85 over ten fresh
/// testbeds), with eight of each 0.32-0.82 (0.42).
pub const DEFAULT_TUN_QUEUES: u8 = 8;

/// The outbound direction's buffers (allocated once).
struct TxPath {
    vnet: usize,
    rx: Vec<u8>,
    segbuf: Vec<u8>,
    /// ICMP replies go back into the TUN behind an all-zero virtio header in offload mode.
    reply: Vec<u8>,
    /// Small packets of this turn, sent together by [`TxPath::flush`].
    batch: TxBatch,
}

impl TxPath {
    fn new(shared: &Shared) -> TxPath {
        TxPath {
            vnet: shared.tun.vnet_hdr_len(),
            rx: vec![0u8; HEADROOM + MAX_READ],
            segbuf: vec![0u8; SEGMENT_BUF],
            reply: vec![0u8; virtio::HEADER_LEN + SCRATCH_LEN],
            batch: TxBatch::new(TX_BATCH_BYTES),
        }
    }

    /// Sends the small packets gathered so far (one `sendmmsg` per lane in use).
    fn flush(&mut self, shared: &Shared) {
        send_batched(shared, &mut self.batch);
    }

    /// Where the next TUN read goes (after the encapsulation headroom).
    fn read_buf(&mut self) -> &mut [u8] {
        &mut self.rx[HEADROOM..]
    }

    /// Forwards the `n` bytes just read into [`TxPath::read_buf`].
    fn handle(&mut self, w: &Worker<'_>, n: usize) {
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

/// Sends `items` from `lane`, counting what the kernel refused in [`IoErrors::send`].
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

/// Counts a received datagram (or the inner packet in it) from `src` as `malformed`, without a
/// peer to charge: the forwarder's checks had not placed it yet, or it failed a later one.
fn drop_malformed(fwd: &Forwarder, src: Ipv4Addr, bytes: &[u8]) {
    fwd.counters()
        .record_drop(DropReason::Malformed, None, &DropContext::rx(src, bytes));
}

/// Writes one packet whose IPv4 header starts at `ip_at` (after the virtio header, if any) on
/// its flow's queue.
fn write_tun(w: &Worker<'_>, bytes: &[u8], ip_at: usize) {
    let queue = w.queue_for(bytes.get(ip_at..).unwrap_or_default());
    if queue.write(bytes).is_err() {
        w.shared.io_errors.tun_write.fetch_add(1, Relaxed);
    }
}

/// Writes one coalescer output (a virtio header, the packet's headers, the payloads, in place
/// in the receive buffers) on its flow's queue.
fn write_tun_vectored(w: &Worker<'_>, parts: &[IoSlice<'_>]) {
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
struct RxPath {
    bufs: Vec<Vec<u8>>,
    meta: Vec<RecvMeta>,
    coalescer: Coalescer,
    rewrite: RewritePath,
    /// WireGuard: the decrypted packets of message `k` of `bufs` go to `plain[k]`, at the
    /// offset of their datagram (so the coalescer finds them in place). Empty otherwise.
    plain: Vec<Vec<u8>>,
    /// WireGuard: where the packets a tunnel queued before its handshake are sealed when it
    /// completes (each up to the largest inner packet plus 32 bytes).
    queued: Vec<u8>,
}

/// Buffers for inner packets that cannot be written from where they were received: longer
/// than the tunl0 MTU ([`RewritePath::deliver`]), or with a checksum to complete and no TUN
/// offload to hand it over ([`RewritePath::complete`]).
struct RewritePath {
    /// `[virtio header][packet]`.
    out: Vec<u8>,
    /// Wire-sized segments when the TUN has no offload.
    segbuf: Vec<u8>,
}

impl RxPath {
    fn new(wireguard: bool) -> RxPath {
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
    fn handle(&mut self, w: &Worker<'_>, n: usize) {
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
        let receives_vxlan = matches!(fwd.config().encap, Encap::Vxlan { .. });
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

impl RewritePath {
    /// Writes `inner` with the checksum a sender's offload left partial (`hdr`, from
    /// [`gso::partial_checksum`]) computed, for a TUN without virtio header: the kernel takes
    /// what it reads from such a TUN as checksummed, and the pod would drop the packet.
    fn complete(&mut self, w: &Worker<'_>, src: Ipv4Addr, inner: &[u8], hdr: &VirtioNetHdr) {
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
    fn deliver(&mut self, w: &Worker<'_>, src: Ipv4Addr, inner: &[u8]) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rx_batch_bounds_bulk_bytes_and_reads_small_datagrams_in_full_batches() {
        // One socket: a full batch, whatever the size of its messages.
        assert_eq!(rx_batch(1, GRO_BUFFER_BYTES), MAX_BATCH);
        // Nothing read yet, or a flood of small datagrams: a full batch.
        assert_eq!(rx_batch(8, 0), MAX_BATCH);
        assert_eq!(rx_batch(8, 120), MAX_BATCH);
        assert_eq!(rx_batch(8, 1500), MAX_BATCH);
        // GRO-merged bulk: two 64 KiB messages, about 128 KiB a turn.
        assert_eq!(rx_batch(8, GRO_BUFFER_BYTES), 2);
        assert_eq!(rx_batch(8, 16 * 1024), 8);
        assert!(rx_batch(8, 16 * 1024) * 16 * 1024 <= RX_BUDGET_BYTES);
        // Never less than one.
        assert_eq!(rx_batch(8, usize::MAX), 1);
    }
}

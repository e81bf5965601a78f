//! The worker loop: both directions of a worker's flows on one thread, each bounded per turn.

use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::time::{Duration, Instant};

use crate::sys::tun;
use crate::sys::{self, Readiness, MAX_BATCH};

use super::rx::RxPath;
use super::shared::Shared;
use super::tx::TxPath;
use super::worker::Worker;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::udp::GRO_BUFFER_BYTES;

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

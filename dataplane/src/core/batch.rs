//! Small packets gathered over one turn of the data path and sent together (one `sendmmsg`
//! per lane).
//!
//! A TUN read yields one packet, so without batching every TCP ACK, DNS query or ping is a
//! send syscall of its own, and on the underlay a datagram of its own. [`TxBatch`] keeps a
//! copy of each encapsulated packet (at most an MTU, cheap next to a syscall) and
//! [`TxBatch::trains`] hands them out as one batch in which consecutive datagrams of the same
//! size to the same peer form one UDP GSO train (`UDP_SEGMENT`): a run of ACKs of one flow
//! becomes one message and one skb through the underlay, which the peer's UDP GRO hands over
//! as one read. Each datagram carries the lane (outer source port, see
//! [`crate::sys::udp::UdpTunnelSocket::lanes`]) its flow sends from; a train never spans lanes.
//! Order is kept within every lane, so within every flow.

use std::net::SocketAddrV4;

use crate::sys::{Transmit, MAX_BATCH};

/// Most lanes a batch tells apart (see [`TxBatch::lanes`]).
pub const MAX_LANES: usize = 64;

/// One queued datagram: where it goes, from which lane, and where its bytes lie in the buffer.
#[derive(Clone, Copy, Debug)]
struct Pending {
    dst: SocketAddrV4,
    lane: usize,
    start: usize,
    end: usize,
}

/// Encapsulated datagrams waiting to go out together (buffers allocated once).
#[derive(Debug)]
pub struct TxBatch {
    buf: Box<[u8]>,
    used: usize,
    items: Vec<Pending>,
}

impl TxBatch {
    /// A batch of up to [`MAX_BATCH`] datagrams and `bytes` bytes in all.
    pub fn new(bytes: usize) -> TxBatch {
        TxBatch {
            buf: vec![0u8; bytes].into_boxed_slice(),
            used: 0,
            items: Vec::with_capacity(MAX_BATCH),
        }
    }

    /// Queues a copy of `datagram` for `dst`, to go from `lane` (below [`MAX_LANES`]).
    /// Returns false, queueing nothing, when the batch has no room left for it: send the batch
    /// ([`TxBatch::trains`] of every lane, then [`TxBatch::clear`]) and push again.
    pub fn push(&mut self, dst: SocketAddrV4, lane: usize, datagram: &[u8]) -> bool {
        debug_assert!(lane < MAX_LANES, "lane {lane}");
        let end = self.used + datagram.len();
        if self.items.len() == MAX_BATCH || end > self.buf.len() {
            return false;
        }
        self.buf[self.used..end].copy_from_slice(datagram);
        self.items.push(Pending {
            dst,
            lane,
            start: self.used,
            end,
        });
        self.used = end;
        true
    }

    /// Queues a datagram for `dst` that `fill` writes into the batch's buffer (up to `room`
    /// bytes) and returns the length of: no copy, for datagrams made on the way out (WireGuard
    /// encrypts into it). A length of 0 queues nothing. Returns `None`, calling nothing, when
    /// the batch has no `room` left (send it and try again), else the length.
    pub fn push_with(
        &mut self,
        dst: SocketAddrV4,
        lane: usize,
        room: usize,
        fill: impl FnOnce(&mut [u8]) -> usize,
    ) -> Option<usize> {
        debug_assert!(lane < MAX_LANES, "lane {lane}");
        if self.items.len() == MAX_BATCH || self.used + room > self.buf.len() {
            return None;
        }
        let n = fill(&mut self.buf[self.used..self.used + room]).min(room);
        if n > 0 {
            self.items.push(Pending {
                dst,
                lane,
                start: self.used,
                end: self.used + n,
            });
            self.used += n;
        }
        Some(n)
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Datagrams queued.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// The lanes that have datagrams queued, as a bit set (bit `i` for lane `i`).
    pub fn lanes(&self) -> u64 {
        self.items
            .iter()
            .fold(0, |set, p| set | 1 << (p.lane % MAX_LANES))
    }

    /// Fills `out` with the datagrams queued for `lane`, in order, and returns how many entries
    /// it used. Consecutive datagrams to the same peer become one entry with `segment_size`
    /// when all but the last have the same size and the last is no longer (the shape UDP GSO
    /// sends); everything else is an entry of its own.
    pub fn trains<'a>(&'a self, lane: usize, out: &mut [Transmit<'a>; MAX_BATCH]) -> usize {
        let mut n = 0;
        let mut i = 0;
        while i < self.items.len() {
            let first = self.items[i];
            if first.lane != lane {
                i += 1;
                continue;
            }
            let size = first.end - first.start;
            let mut last = i;
            while last + 1 < self.items.len() {
                let prev = self.items[last];
                let next = self.items[last + 1];
                let fits = next.dst == first.dst
                    && next.lane == lane
                    && prev.end - prev.start == size
                    && next.end - next.start <= size
                    && next.end > next.start;
                if !fits {
                    break;
                }
                last += 1;
            }
            let segment_size = match u16::try_from(size) {
                Ok(s) if last > i => Some(s),
                _ => {
                    last = i;
                    None
                }
            };
            out[n] = Transmit {
                dst: first.dst,
                data: &self.buf[first.start..self.items[last].end],
                segment_size,
            };
            n += 1;
            i = last + 1;
        }
        n
    }

    /// Empties the batch after it was sent.
    pub fn clear(&mut self) {
        self.items.clear();
        self.used = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    const EMPTY: Transmit<'static> = Transmit {
        dst: SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0),
        data: &[],
        segment_size: None,
    };

    fn peer(last: u8) -> SocketAddrV4 {
        SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, last), 4789)
    }

    /// The datagrams a transmit stands for, cut as the socket would cut a GSO train.
    fn datagrams<'a>(t: &Transmit<'a>) -> Vec<&'a [u8]> {
        match t.segment_size {
            Some(s) => t.data.chunks(usize::from(s)).collect(),
            None => vec![t.data],
        }
    }

    /// (last octet of the peer, datagram), as queued or as carried.
    type Datagrams = Vec<(u8, Vec<u8>)>;

    /// Queues every packet on lane 0.
    fn queue(batch: &mut TxBatch, packets: &[(u8, Vec<u8>)]) {
        for (p, d) in packets {
            assert!(batch.push(peer(*p), 0, d));
        }
    }

    /// What the trains of `lane` carry, and the segment size of each train.
    fn sent_on(batch: &TxBatch, lane: usize) -> (Datagrams, Vec<Option<u16>>) {
        let mut out = [EMPTY; MAX_BATCH];
        let n = batch.trains(lane, &mut out);
        let mut carried = Vec::new();
        for t in &out[..n] {
            for d in datagrams(t) {
                carried.push((t.dst.ip().octets()[3], d.to_vec()));
            }
        }
        (carried, out[..n].iter().map(|t| t.segment_size).collect())
    }

    fn sent(batch: &TxBatch) -> (Datagrams, Vec<Option<u16>>) {
        sent_on(batch, 0)
    }

    fn packet(tag: u8, len: usize) -> Vec<u8> {
        vec![tag; len]
    }

    #[test]
    fn equal_sizes_to_one_peer_become_one_train() {
        let mut b = TxBatch::new(64 * 1024);
        let packets: Vec<_> = (0..5).map(|i| (1, packet(i, 90))).collect();
        queue(&mut b, &packets);
        let (carried, sizes) = sent(&b);
        assert_eq!(carried, packets);
        assert_eq!(sizes, vec![Some(90)]);
    }

    #[test]
    fn a_shorter_datagram_ends_its_train_and_a_longer_one_starts_a_new_one() {
        let mut b = TxBatch::new(64 * 1024);
        let packets = vec![
            (1, packet(1, 100)),
            (1, packet(2, 100)),
            (1, packet(3, 60)), // the tail of the first train
            (1, packet(4, 100)),
            (1, packet(5, 120)), // longer: cannot join
            (1, packet(6, 120)),
        ];
        queue(&mut b, &packets);
        let (carried, sizes) = sent(&b);
        assert_eq!(carried, packets);
        assert_eq!(sizes, vec![Some(100), None, Some(120)]);
    }

    #[test]
    fn peers_are_never_mixed_in_one_train_and_order_is_kept() {
        let mut b = TxBatch::new(64 * 1024);
        let packets = vec![
            (1, packet(1, 80)),
            (2, packet(2, 80)),
            (1, packet(3, 80)),
            (1, packet(4, 80)),
            (2, packet(5, 80)),
        ];
        queue(&mut b, &packets);
        let (carried, sizes) = sent(&b);
        assert_eq!(carried, packets);
        assert_eq!(sizes, vec![None, None, Some(80), None]);
    }

    #[test]
    fn full_batch_refuses_until_cleared() {
        let mut b = TxBatch::new(1000);
        assert!(b.push(peer(1), 0, &packet(1, 600)));
        assert!(
            !b.push(peer(1), 0, &packet(2, 600)),
            "no room for the bytes"
        );
        assert_eq!(b.len(), 1);
        b.clear();
        assert!(b.is_empty());
        for i in 0..MAX_BATCH {
            assert!(b.push(peer(1), 0, &packet(i as u8, 10)));
        }
        assert!(
            !b.push(peer(1), 0, &packet(0, 10)),
            "no room for another item"
        );
        let (carried, sizes) = sent(&b);
        assert_eq!(carried.len(), MAX_BATCH);
        assert_eq!(sizes, vec![Some(10)]);
    }

    #[test]
    fn lanes_are_sent_apart_and_keep_their_order() {
        let mut b = TxBatch::new(64 * 1024);
        // Flow x on lane 3, flow y on lane 1, interleaved as read; all to one peer.
        let order = [(3, 1), (3, 2), (1, 3), (3, 4), (3, 5), (1, 6), (1, 7)];
        for &(lane, tag) in &order {
            assert!(b.push(peer(1), lane, &packet(tag, 70)));
        }
        assert_eq!(b.lanes(), 1 << 1 | 1 << 3);
        let (on3, sizes3) = sent_on(&b, 3);
        let (on1, sizes1) = sent_on(&b, 1);
        let tags = |d: &Datagrams| d.iter().map(|(_, p)| p[0]).collect::<Vec<_>>();
        assert_eq!(tags(&on3), vec![1, 2, 4, 5]);
        assert_eq!(tags(&on1), vec![3, 6, 7]);
        // Trains only over datagrams that lie side by side: 1-2 and 4-5, then 6-7.
        assert_eq!(sizes3, vec![Some(70), Some(70)]);
        assert_eq!(sizes1, vec![None, Some(70)]);
        assert_eq!(sent_on(&b, 0).0, vec![]);
    }

    proptest::proptest! {
        /// Whatever is queued, the trains carry exactly those datagrams, in order, to their
        /// peers, and every train has the shape UDP GSO accepts.
        #[test]
        fn trains_carry_every_datagram_in_order(
            packets in proptest::collection::vec((1u8..4, 1usize..200), 0..MAX_BATCH)
        ) {
            let mut b = TxBatch::new(MAX_BATCH * 200);
            let packets: Vec<_> = packets
                .iter()
                .enumerate()
                .map(|(i, &(p, len))| (p, packet(i as u8, len)))
                .collect();
            queue(&mut b, &packets);
            let mut out = [EMPTY; MAX_BATCH];
            let n = b.trains(0, &mut out);
            for t in &out[..n] {
                if let Some(s) = t.segment_size {
                    let s = usize::from(s);
                    proptest::prop_assert!(t.data.len() > s);
                    let d = datagrams(t);
                    proptest::prop_assert!(d[..d.len() - 1].iter().all(|x| x.len() == s));
                }
            }
            proptest::prop_assert_eq!(sent(&b).0, packets);
        }
    }
}

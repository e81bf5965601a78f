//! Why packets are dropped, and the lock-free counters the data path bumps.
//!
//! Every drop has a [`DropReason`] with a stable snake_case name used as the Prometheus label,
//! so renaming a variant never changes a metric. [`Counters`] (node-wide) and [`PeerCounters`]
//! (one per peer, shared across route-table rebuilds) are plain `AtomicU64`s updated with
//! relaxed ordering: the hot path never locks or allocates, and readers (`/status`,
//! `/metrics`) take a snapshot that is consistent per counter, not across counters.
//!
//! [`Counters::record_drop`] is the one call the forwarder makes per dropped packet: it counts
//! the drop node-wide and against the sending peer when there is one, and offers the packet to
//! the rate-limited [`DropWatch`] behind `podnet-agent drops --watch`.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use serde::Serialize;

use crate::core::dropwatch::{DropContext, DropWatch};
pub use crate::core::reason::DropReason;

/// A packet and byte counter pair, alone on its cache line so the TUN-reading thread (tx) and
/// the underlay-reading thread (rx) do not bounce one line between cores.
#[derive(Debug, Default)]
#[repr(align(64))]
pub struct Traffic {
    packets: AtomicU64,
    bytes: AtomicU64,
}

impl Traffic {
    /// Counts one packet of `bytes` bytes.
    #[inline]
    pub fn add(&self, bytes: usize) {
        self.add_many(1, bytes as u64);
    }

    /// Counts `packets` packets totalling `bytes` bytes (one update per batch or super-packet).
    #[inline]
    pub fn add_many(&self, packets: u64, bytes: u64) {
        self.packets.fetch_add(packets, Relaxed);
        self.bytes.fetch_add(bytes, Relaxed);
    }

    /// Current values.
    pub fn snapshot(&self) -> TrafficSnapshot {
        TrafficSnapshot {
            packets: self.packets.load(Relaxed),
            bytes: self.bytes.load(Relaxed),
        }
    }
}

/// Values read from a [`Traffic`] counter.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct TrafficSnapshot {
    pub packets: u64,
    pub bytes: u64,
}

impl TrafficSnapshot {
    fn add(&mut self, other: &TrafficSnapshot) {
        self.packets += other.packets;
        self.bytes += other.bytes;
    }
}

/// Node-wide counters. Bytes are inner (pod) IPv4 packet bytes, without tunnel overhead.
#[derive(Debug, Default)]
pub struct Counters {
    drops: [AtomicU64; DropReason::ALL.len()],
    /// Packets encapsulated for a peer.
    pub tx: Traffic,
    /// Packets decapsulated and handed to `tunl0`.
    pub rx: Traffic,
    /// ICMP errors written back into `tunl0`.
    pub icmp_sent: AtomicU64,
    /// ICMP errors not sent because of the rate limit (the packet is still dropped and counted
    /// under its reason).
    pub icmp_ratelimited: AtomicU64,
    /// Samples of recent drops: one ring for the node, shared by the workers' counters
    /// ([`Counters::sharing_watch`]), so `drops --watch` shows them in one sequence.
    pub watch: Arc<DropWatch>,
}

impl Counters {
    /// Fresh counters, all zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// Fresh counters for another data-path worker: all zero, with this one's drop samples.
    pub fn sharing_watch(&self) -> Self {
        Self {
            watch: Arc::clone(&self.watch),
            ..Self::default()
        }
    }

    /// Counts one dropped packet.
    #[inline]
    pub fn count_drop(&self, reason: DropReason) {
        self.drops[reason.index()].fetch_add(1, Relaxed);
    }

    /// Counts one dropped packet node-wide and against `peer` (the peer that sent it, when it
    /// came from one), and offers it to the drop sampler.
    #[inline]
    pub fn record_drop(
        &self,
        reason: DropReason,
        peer: Option<&PeerCounters>,
        ctx: &DropContext<'_>,
    ) {
        self.count_drop(reason);
        if let Some(p) = peer {
            p.count_drop(reason);
        }
        self.watch.offer(reason, ctx);
    }

    /// Packets dropped for `reason` so far.
    pub fn drops(&self, reason: DropReason) -> u64 {
        self.drops[reason.index()].load(Relaxed)
    }

    /// Every reason with its count, in [`DropReason::ALL`] order.
    pub fn drop_counts(&self) -> impl Iterator<Item = (DropReason, u64)> + '_ {
        DropReason::ALL.iter().map(|&r| (r, self.drops(r)))
    }

    /// Sum over all drop reasons.
    pub fn total_drops(&self) -> u64 {
        self.drop_counts().map(|(_, n)| n).sum()
    }

    /// ICMP errors sent so far.
    pub fn icmp_sent(&self) -> u64 {
        self.icmp_sent.load(Relaxed)
    }

    /// ICMP errors the rate limit held back so far.
    pub fn icmp_ratelimited(&self) -> u64 {
        self.icmp_ratelimited.load(Relaxed)
    }

    /// A serialisable copy for `/status`.
    pub fn snapshot(&self) -> CountersSnapshot {
        CountersSnapshot {
            tx: self.tx.snapshot(),
            rx: self.rx.snapshot(),
            icmp_sent: self.icmp_sent(),
            icmp_ratelimited: self.icmp_ratelimited(),
            drops: self.drop_counts().collect(),
        }
    }
}

/// Values read from [`Counters`]; `drops` lists every reason, zero or not.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CountersSnapshot {
    pub tx: TrafficSnapshot,
    pub rx: TrafficSnapshot,
    pub icmp_sent: u64,
    pub icmp_ratelimited: u64,
    #[serde(serialize_with = "drops_as_map")]
    pub drops: Vec<(DropReason, u64)>,
}

impl CountersSnapshot {
    /// Sum over all drop reasons.
    pub fn total_drops(&self) -> u64 {
        self.drops.iter().map(|(_, n)| n).sum()
    }

    /// The sum of the workers' counters: what the node as a whole carried and dropped.
    pub fn sum<'a>(parts: impl IntoIterator<Item = &'a CountersSnapshot>) -> CountersSnapshot {
        let mut total = CountersSnapshot {
            tx: TrafficSnapshot::default(),
            rx: TrafficSnapshot::default(),
            icmp_sent: 0,
            icmp_ratelimited: 0,
            drops: DropReason::ALL.iter().map(|r| (*r, 0)).collect(),
        };
        for p in parts {
            total.tx.add(&p.tx);
            total.rx.add(&p.rx);
            total.icmp_sent += p.icmp_sent;
            total.icmp_ratelimited += p.icmp_ratelimited;
            for ((_, sum), (_, n)) in total.drops.iter_mut().zip(&p.drops) {
                *sum += n;
            }
        }
        total
    }
}

fn drops_as_map<S: serde::Serializer>(
    drops: &[(DropReason, u64)],
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_map(drops.iter().map(|(r, n)| (r.name(), n)))
}

/// Traffic exchanged with one peer. Bytes are inner (pod) IPv4 packet bytes.
///
/// Held in an `Arc` by the route table; a rebuilt table hands the same `Arc` to the same peer
/// (same node name and underlay address), so counts survive table swaps.
#[derive(Debug, Default)]
pub struct PeerCounters {
    /// Packets encapsulated for this peer.
    pub tx: Traffic,
    /// Packets from this peer delivered to `tunl0`.
    pub rx: Traffic,
    /// Packets from this peer dropped, by reason (inbound checks after the sender is known:
    /// `malformed`, `not_ipv4`, `wrong_vni`, `not_local`, `spoofed`).
    drops: [AtomicU64; DropReason::ALL.len()],
}

impl PeerCounters {
    /// Counts one packet from this peer dropped for `reason`.
    #[inline]
    pub fn count_drop(&self, reason: DropReason) {
        self.drops[reason.index()].fetch_add(1, Relaxed);
    }

    /// A serialisable copy.
    pub fn snapshot(&self) -> PeerStats {
        PeerStats {
            tx: self.tx.snapshot(),
            rx: self.rx.snapshot(),
            drops: std::array::from_fn(|i| self.drops[i].load(Relaxed)),
        }
    }
}

/// Values read from [`PeerCounters`]; `drops` is indexed like [`DropReason::ALL`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PeerStats {
    pub tx: TrafficSnapshot,
    pub rx: TrafficSnapshot,
    #[serde(serialize_with = "peer_drops_as_map")]
    pub drops: [u64; DropReason::ALL.len()],
}

impl PeerStats {
    /// Every reason with its count for this peer, in [`DropReason::ALL`] order.
    pub fn drop_counts(&self) -> impl Iterator<Item = (DropReason, u64)> + '_ {
        DropReason::ALL.iter().map(|&r| (r, self.drops[r.index()]))
    }
}

fn peer_drops_as_map<S: serde::Serializer>(
    drops: &[u64; DropReason::ALL.len()],
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_map(DropReason::ALL.iter().map(|r| (r.name(), drops[r.index()])))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_lists_every_reason_in_index_order() {
        for (i, r) in DropReason::ALL.iter().enumerate() {
            assert_eq!(r.index(), i, "{r}");
        }
    }

    #[test]
    fn names_are_unique_snake_case() {
        let mut names: Vec<_> = DropReason::ALL.iter().map(|r| r.name()).collect();
        for n in &names {
            assert!(
                n.chars()
                    .all(|c| c.is_ascii_lowercase() || c == '_' || c.is_ascii_digit()),
                "{n}"
            );
        }
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), DropReason::ALL.len());
    }

    #[test]
    fn names_are_stable() {
        // Metric labels: changing one breaks dashboards and the testbed's assertions.
        assert_eq!(DropReason::NotIpv4.name(), "not_ipv4");
        assert_eq!(DropReason::UnknownPeer.to_string(), "unknown_peer");
        assert_eq!(DropReason::WrongVni.name(), "wrong_vni");
        assert_eq!(DropReason::Spoofed.name(), "spoofed");
    }

    #[test]
    fn drops_count_per_reason() {
        let c = Counters::new();
        c.count_drop(DropReason::Spoofed);
        c.count_drop(DropReason::Spoofed);
        c.count_drop(DropReason::NoRoute);
        assert_eq!(c.drops(DropReason::Spoofed), 2);
        assert_eq!(c.drops(DropReason::NoRoute), 1);
        assert_eq!(c.drops(DropReason::Malformed), 0);
        assert_eq!(c.total_drops(), 3);
    }

    #[test]
    fn traffic_counts_packets_and_bytes() {
        let c = Counters::new();
        c.tx.add(100);
        c.tx.add(1400);
        c.rx.add_many(44, 64_000);
        assert_eq!(
            c.tx.snapshot(),
            TrafficSnapshot {
                packets: 2,
                bytes: 1500
            }
        );
        assert_eq!(c.rx.snapshot().packets, 44);
    }

    #[test]
    fn snapshot_serialises_drops_by_name() {
        let c = Counters::new();
        c.count_drop(DropReason::WrongVni);
        c.icmp_sent.fetch_add(1, Relaxed);
        let json = serde_json::to_value(c.snapshot()).unwrap();
        assert_eq!(json["drops"]["wrong_vni"], 1);
        assert_eq!(json["drops"]["not_ipv4"], 0);
        assert_eq!(
            json["drops"].as_object().unwrap().len(),
            DropReason::ALL.len()
        );
        assert_eq!(json["icmp_sent"], 1);
        assert_eq!(json["tx"]["packets"], 0);
    }

    #[test]
    fn record_drop_counts_node_peer_and_samples() {
        let c = Counters::new();
        let p = PeerCounters::default();
        let from = std::net::Ipv4Addr::new(198, 18, 0, 2);
        c.record_drop(DropReason::Spoofed, Some(&p), &DropContext::rx(from, &[]));
        c.record_drop(DropReason::UnknownPeer, None, &DropContext::rx(from, &[]));
        assert_eq!(c.drops(DropReason::Spoofed), 1);
        assert_eq!(c.drops(DropReason::UnknownPeer), 1);
        let stats = p.snapshot();
        assert_eq!(stats.drops[DropReason::Spoofed.index()], 1);
        assert_eq!(stats.drop_counts().map(|(_, n)| n).sum::<u64>(), 1);
        let json = serde_json::to_value(stats).unwrap();
        assert_eq!(json["drops"]["spoofed"], 1);
        assert_eq!(json["drops"]["unknown_peer"], 0);
        let samples = c.watch.since(0);
        assert_eq!(samples.len(), 2);
        assert_eq!(samples[1].reason, DropReason::UnknownPeer);
        assert_eq!(samples[1].outer_src, Some(from));
    }

    #[test]
    fn workers_count_apart_and_sum_to_the_node_with_one_sample_ring() {
        let a = Counters::new();
        let b = a.sharing_watch();
        a.tx.add_many(3, 300);
        b.tx.add_many(4, 40);
        b.rx.add(1000);
        a.count_drop(DropReason::NoRoute);
        b.record_drop(
            DropReason::NoRoute,
            None,
            &DropContext::rx(std::net::Ipv4Addr::new(198, 18, 0, 2), &[]),
        );
        b.icmp_sent.fetch_add(2, Relaxed);
        assert_eq!(a.tx.snapshot().packets, 3, "each worker counts its own");
        let sum = CountersSnapshot::sum(&[a.snapshot(), b.snapshot()]);
        assert_eq!(
            sum.tx,
            TrafficSnapshot {
                packets: 7,
                bytes: 340
            }
        );
        assert_eq!(
            sum.rx,
            TrafficSnapshot {
                packets: 1,
                bytes: 1000
            }
        );
        assert_eq!(sum.icmp_sent, 2);
        let no_route = sum.drops.iter().find(|(r, _)| *r == DropReason::NoRoute);
        assert_eq!(no_route, Some(&(DropReason::NoRoute, 2)));
        assert_eq!(sum.drops.len(), DropReason::ALL.len());
        // b's sample is in the ring both hold.
        assert_eq!(a.watch.since(0).len(), 1);
    }

    #[test]
    fn counters_are_shared_across_threads() {
        let c = std::sync::Arc::new(PeerCounters::default());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let c = c.clone();
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        c.tx.add(10);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(
            c.snapshot().tx,
            TrafficSnapshot {
                packets: 4000,
                bytes: 40_000
            }
        );
    }
}

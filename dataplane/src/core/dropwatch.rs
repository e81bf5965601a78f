//! Samples of recent drops for `podnet-agent drops --watch`: a fixed ring filled from the drop
//! path, rate-limited per reason so a flood costs one atomic load per dropped packet.
//!
//! The ring is written without locks or allocation: a writer claims a sequence number, fills the
//! slot's words and stamps it (a per-slot seqlock made of atomics); a reader accepts a slot only
//! when its stamp is the sequence it expects before and after reading the words. Each reason has
//! a token bucket that the admin side refills on a coarse clock ([`DropWatch::tick`]), which is
//! also the time written into samples: the data path never reads the clock.

use std::net::Ipv4Addr;
use std::sync::atomic::{fence, AtomicU64, Ordering};

use serde::Serialize;

use crate::core::bucket::TokenBucket;
use crate::core::reason::DropReason;

/// Samples kept; older ones are overwritten.
pub const RING_LEN: usize = 256;
/// Samples a reason may take at once after a quiet spell.
pub const BURST: u32 = 20;
/// Samples a reason earns per second.
pub const RATE_PER_S: u32 = 20;

/// Which way the dropped packet was going.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Read from `tunl0`, on its way to a peer.
    Tx,
    /// Received on the underlay from a peer (or a stranger).
    Rx,
}

/// What the drop path knows about a dropped packet.
#[derive(Clone, Copy, Debug)]
pub struct DropContext<'a> {
    pub direction: Direction,
    /// Outer source address (inbound only).
    pub outer_src: Option<Ipv4Addr>,
    /// The inner IPv4 packet as far as it could be located (may be junk or empty).
    pub inner: &'a [u8],
}

impl<'a> DropContext<'a> {
    /// A packet read from `tunl0`.
    pub fn tx(inner: &'a [u8]) -> Self {
        Self {
            direction: Direction::Tx,
            outer_src: None,
            inner,
        }
    }

    /// A packet from the underlay sent by `outer_src`.
    pub fn rx(outer_src: Ipv4Addr, inner: &'a [u8]) -> Self {
        Self {
            direction: Direction::Rx,
            outer_src: Some(outer_src),
            inner,
        }
    }
}

/// One sampled drop, as `/drops` serves it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct DropSample {
    /// Position in the stream of samples (1, 2, ...); gaps mean samples overwritten unread.
    pub seq: u64,
    /// Unix time in milliseconds, to the resolution of the admin clock (100 ms).
    pub time_ms: u64,
    pub reason: DropReason,
    pub direction: Direction,
    pub outer_src: Option<Ipv4Addr>,
    pub inner_src: Option<Ipv4Addr>,
    pub inner_dst: Option<Ipv4Addr>,
    /// IP protocol of the inner packet, when it had an IPv4 header.
    pub protocol: Option<u8>,
    /// Length of what was dropped (inner bytes).
    pub len: u32,
}

#[derive(Debug, Default)]
struct Slot {
    /// `seq` of the sample held, 0 while empty or being written.
    stamp: AtomicU64,
    time_ms: AtomicU64,
    outer: AtomicU64,
    inner: AtomicU64,
    /// reason | direction << 8 | protocol << 16 | flags << 24 | len << 32.
    meta: AtomicU64,
}

const HAS_OUTER: u64 = 1;
const HAS_INNER: u64 = 2;

/// The ring of recent drop samples and the per-reason token buckets.
#[derive(Debug)]
pub struct DropWatch {
    slots: Box<[Slot]>,
    /// Last sequence number handed out.
    next: AtomicU64,
    /// Samples still allowed, per reason ([`RATE_PER_S`], [`BURST`]).
    tokens: [TokenBucket; DropReason::ALL.len()],
    /// The coarse clock of the last tick: the time stamped on samples.
    now_ms: AtomicU64,
}

impl Default for DropWatch {
    fn default() -> Self {
        Self::new()
    }
}

impl DropWatch {
    /// An empty ring with full buckets and the clock at 0.
    pub fn new() -> Self {
        Self {
            slots: (0..RING_LEN).map(|_| Slot::default()).collect(),
            next: AtomicU64::new(0),
            tokens: std::array::from_fn(|_| TokenBucket::new(RATE_PER_S, BURST)),
            now_ms: AtomicU64::new(0),
        }
    }

    /// Advances the coarse clock to `now_ms` and refills every bucket for the time passed.
    /// Called by the admin side every 100 ms; never by the data path.
    pub fn tick(&self, now_ms: u64) {
        self.now_ms.store(now_ms, Ordering::Relaxed);
        for t in &self.tokens {
            t.tick(now_ms);
        }
    }

    /// Records a sample of this drop if `reason` has a token left. The common case under a
    /// flood (no token) is a single relaxed load.
    #[inline]
    pub fn offer(&self, reason: DropReason, ctx: &DropContext<'_>) {
        if self.tokens[reason as usize].take() {
            self.write(reason, ctx);
        }
    }

    #[cold]
    fn write(&self, reason: DropReason, ctx: &DropContext<'_>) {
        let seq = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let slot = &self.slots[(seq as usize) % RING_LEN];
        let inner = ctx.inner;
        let header = match inner {
            [b, ..] if b >> 4 == 4 && inner.len() >= 20 => Some((
                u64::from(u32::from_be_bytes([
                    inner[12], inner[13], inner[14], inner[15],
                ])) << 32
                    | u64::from(u32::from_be_bytes([
                        inner[16], inner[17], inner[18], inner[19],
                    ])),
                inner[9],
            )),
            _ => None,
        };
        let mut flags = 0;
        if ctx.outer_src.is_some() {
            flags |= HAS_OUTER;
        }
        if header.is_some() {
            flags |= HAS_INNER;
        }
        let (addrs, protocol) = header.unwrap_or((0, 0));
        let direction = match ctx.direction {
            Direction::Tx => 0,
            Direction::Rx => 1,
        };
        let len = inner.len().min(u32::MAX as usize) as u64;
        let meta =
            reason as u64 | direction << 8 | u64::from(protocol) << 16 | flags << 24 | len << 32;
        slot.stamp.store(0, Ordering::Relaxed);
        fence(Ordering::Release);
        slot.time_ms
            .store(self.now_ms.load(Ordering::Relaxed), Ordering::Relaxed);
        slot.outer.store(
            u64::from(ctx.outer_src.map(u32::from).unwrap_or(0)),
            Ordering::Relaxed,
        );
        slot.inner.store(addrs, Ordering::Relaxed);
        slot.meta.store(meta, Ordering::Relaxed);
        slot.stamp.store(seq, Ordering::Release);
    }

    /// Samples recorded so far (the `seq` of the newest).
    pub fn sampled(&self) -> u64 {
        self.next.load(Ordering::Relaxed)
    }

    /// Samples with `seq > since`, oldest first, at most [`RING_LEN`]; samples overwritten or
    /// being written while we read are left out.
    pub fn since(&self, since: u64) -> Vec<DropSample> {
        let newest = self.sampled();
        let first = since.max(newest.saturating_sub(RING_LEN as u64)) + 1;
        (first..=newest).filter_map(|seq| self.read(seq)).collect()
    }

    fn read(&self, seq: u64) -> Option<DropSample> {
        let slot = &self.slots[(seq as usize) % RING_LEN];
        if slot.stamp.load(Ordering::Acquire) != seq {
            return None;
        }
        let time_ms = slot.time_ms.load(Ordering::Relaxed);
        let outer = slot.outer.load(Ordering::Relaxed);
        let inner = slot.inner.load(Ordering::Relaxed);
        let meta = slot.meta.load(Ordering::Relaxed);
        fence(Ordering::Acquire);
        if slot.stamp.load(Ordering::Relaxed) != seq {
            return None;
        }
        let reason = *DropReason::ALL.get((meta & 0xff) as usize)?;
        let flags = (meta >> 24) & 0xff;
        let has_inner = flags & HAS_INNER != 0;
        let addr = |v: u64| Ipv4Addr::from(v as u32);
        Some(DropSample {
            seq,
            time_ms,
            reason,
            direction: if (meta >> 8) & 0xff == 0 {
                Direction::Tx
            } else {
                Direction::Rx
            },
            outer_src: (flags & HAS_OUTER != 0).then(|| addr(outer)),
            inner_src: has_inner.then(|| addr(inner >> 32)),
            inner_dst: has_inner.then(|| addr(inner)),
            protocol: has_inner.then_some(((meta >> 16) & 0xff) as u8),
            len: (meta >> 32) as u32,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// UDP 10.244.1.2 -> 10.244.9.3 header (checksum not needed by the sampler).
    const INNER: [u8; 20] = [
        0x45, 0, 0, 20, 0, 1, 0x40, 0, 64, 17, 0, 0, 10, 244, 1, 2, 10, 244, 9, 3,
    ];

    #[test]
    fn records_addresses_reason_and_time() {
        let w = DropWatch::new();
        w.tick(1_000);
        w.offer(DropReason::NoRoute, &DropContext::tx(&INNER));
        w.offer(
            DropReason::Spoofed,
            &DropContext::rx(Ipv4Addr::new(198, 18, 0, 2), &INNER),
        );
        let s = w.since(0);
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].seq, 1);
        assert_eq!(s[0].reason, DropReason::NoRoute);
        assert_eq!(s[0].direction, Direction::Tx);
        assert_eq!(s[0].outer_src, None);
        assert_eq!(s[0].inner_src, Some(Ipv4Addr::new(10, 244, 1, 2)));
        assert_eq!(s[0].inner_dst, Some(Ipv4Addr::new(10, 244, 9, 3)));
        assert_eq!(s[0].protocol, Some(17));
        assert_eq!(s[0].len, 20);
        assert_eq!(s[0].time_ms, 1_000);
        assert_eq!(s[1].reason, DropReason::Spoofed);
        assert_eq!(s[1].direction, Direction::Rx);
        assert_eq!(s[1].outer_src, Some(Ipv4Addr::new(198, 18, 0, 2)));
        assert_eq!(w.since(1).len(), 1);
        assert!(w.since(2).is_empty());
    }

    #[test]
    fn junk_has_no_inner_addresses() {
        let w = DropWatch::new();
        w.offer(DropReason::NotIpv4, &DropContext::tx(&[0x60, 0, 0]));
        let s = w.since(0);
        assert_eq!(s[0].inner_src, None);
        assert_eq!(s[0].protocol, None);
        assert_eq!(s[0].len, 3);
    }

    #[test]
    fn a_flood_is_limited_to_the_burst_then_the_rate() {
        let w = DropWatch::new();
        w.tick(10_000);
        for _ in 0..10_000 {
            w.offer(DropReason::Malformed, &DropContext::tx(&INNER));
        }
        assert_eq!(w.sampled(), u64::from(BURST));
        // Another reason has its own bucket.
        w.offer(DropReason::WrongVni, &DropContext::tx(&INNER));
        assert_eq!(w.sampled(), u64::from(BURST) + 1);
        // 100 ms earn RATE_PER_S / 10 samples.
        w.tick(10_100);
        for _ in 0..10_000 {
            w.offer(DropReason::Malformed, &DropContext::tx(&INNER));
        }
        assert_eq!(
            w.sampled(),
            u64::from(BURST) + 1 + u64::from(RATE_PER_S / 10)
        );
        // A long quiet spell refills at most to the burst.
        w.tick(1_000_000);
        for _ in 0..10_000 {
            w.offer(DropReason::Malformed, &DropContext::tx(&INNER));
        }
        assert_eq!(
            w.sampled(),
            2 * u64::from(BURST) + 1 + u64::from(RATE_PER_S / 10)
        );
    }

    #[test]
    fn the_ring_keeps_the_newest() {
        let w = DropWatch::new();
        let mut now = 1;
        w.tick(now);
        for _ in 0..(RING_LEN * 2) {
            for r in DropReason::ALL {
                w.offer(r, &DropContext::tx(&INNER));
            }
            now += 1000;
            w.tick(now);
        }
        let total = w.sampled();
        assert!(total > RING_LEN as u64);
        let s = w.since(0);
        assert_eq!(s.len(), RING_LEN);
        assert_eq!(s.last().unwrap().seq, total);
        assert_eq!(s[0].seq, total - RING_LEN as u64 + 1);
    }

    #[test]
    fn concurrent_writers_and_a_reader_never_see_torn_samples() {
        let w = std::sync::Arc::new(DropWatch::new());
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writers: Vec<_> = [DropReason::NoRoute, DropReason::Spoofed]
            .into_iter()
            .map(|reason| {
                let (w, stop) = (w.clone(), stop.clone());
                std::thread::spawn(move || {
                    // Each writer drops packets of its own length.
                    let mut packet = [0u8; 24];
                    packet[..20].copy_from_slice(&INNER);
                    let len = if reason == DropReason::NoRoute {
                        20
                    } else {
                        24
                    };
                    let mut now = 1;
                    while !stop.load(Ordering::Relaxed) {
                        now += 1000;
                        w.tick(now);
                        w.offer(reason, &DropContext::tx(&packet[..len]));
                    }
                })
            })
            .collect();
        let mut seen = 0;
        while seen < 2000 {
            for s in w.since(0) {
                // A torn read would mix fields of different samples.
                let len = match s.reason {
                    DropReason::NoRoute => 20,
                    DropReason::Spoofed => 24,
                    other => panic!("torn sample: {other}"),
                };
                assert_eq!(s.len, len, "torn sample {s:?}");
                assert_eq!(s.inner_dst, Some(Ipv4Addr::new(10, 244, 9, 3)));
                seen += 1;
            }
        }
        stop.store(true, Ordering::Relaxed);
        for t in writers {
            t.join().unwrap();
        }
    }
}

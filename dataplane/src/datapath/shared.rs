//! What the data-path workers share: the forwarders, the route table, the TUN queues, the
//! underlay sockets and the stop signal.

use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use crate::core::drops::CountersSnapshot;
use crate::core::forward::Forwarder;
use crate::core::table::RouteTable;
use crate::sys::tun::Tun;
use crate::sys::Stop;
use crate::wireguard::Wireguard;

use super::underlay::Underlay;

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
    /// How long [`run`](super::run) keeps polling after its last packet before it sleeps (`--busy-poll`).
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

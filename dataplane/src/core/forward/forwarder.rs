//! The [`Forwarder`]: one node's forwarding core, shared by its data-path threads, with what
//! its outbound and inbound halves share (the ICMP error budget, IPv4 validation).

use std::sync::atomic::{AtomicU16, Ordering::Relaxed};
use std::sync::Arc;

use podnet_proto::icmp;
use podnet_proto::ipv4::{self, Ipv4Packet};

use super::config::NodeConfig;
use crate::core::bucket::TokenBucket;
use crate::core::drops::{Counters, DropReason};

/// The forwarding core of one node. Shared by the data-path threads (`&self` everywhere).
#[derive(Debug)]
pub struct Forwarder {
    pub(super) config: NodeConfig,
    pub(super) counters: Arc<Counters>,
    /// IPv4 identification for outer IP-in-IP headers (RFC 6864: unique per source,
    /// destination and protocol while a datagram may be fragmented; a wrapping counter is enough).
    /// Shared by the workers' forwarders ([`Forwarder::for_worker`]).
    pub(super) ident: Arc<AtomicU16>,
    /// ICMP errors still allowed ([`ICMP_RATE`], [`ICMP_BURST`]); refilled by
    /// [`Forwarder::tick`]. One bucket for the node, whichever worker sends the error.
    pub(super) icmp_limit: Arc<TokenBucket>,
}

/// ICMP errors per second the agent writes back at most, and the burst it allows: the
/// kernel's defaults for its own ICMP errors (`net.ipv4.icmp_msgs_per_sec`, `icmp_msgs_burst`),
/// so a pod that floods an unowned address gets a few errors, not one per packet.
pub const ICMP_RATE: u32 = 1000;

/// See [`ICMP_RATE`].
pub const ICMP_BURST: u32 = 50;

impl Forwarder {
    /// A forwarder for `config`, counting into `counters`.
    pub fn new(config: NodeConfig, counters: Arc<Counters>) -> Self {
        Self {
            config,
            counters,
            ident: Arc::new(AtomicU16::new(0)),
            icmp_limit: Arc::new(TokenBucket::new(ICMP_RATE, ICMP_BURST)),
        }
    }

    /// The forwarder of another data-path worker: the same node, IP-in-IP identifications,
    /// ICMP rate limit and drop samples, and counters of its own (no cache line shared per
    /// packet; `/status` sums them).
    pub fn for_worker(&self) -> Self {
        Self {
            config: self.config.clone(),
            counters: Arc::new(self.counters.sharing_watch()),
            ident: Arc::clone(&self.ident),
            icmp_limit: Arc::clone(&self.icmp_limit),
        }
    }

    /// Tells the forwarder the time (ms on the caller's monotonic clock), which refills the
    /// ICMP rate limit. The data path calls it every turn; the core never reads a clock.
    pub fn tick(&self, now_ms: u64) {
        self.icmp_limit.tick(now_ms);
    }

    /// This node's configuration.
    pub fn config(&self) -> &NodeConfig {
        &self.config
    }

    /// The node-wide counters.
    pub fn counters(&self) -> &Arc<Counters> {
        &self.counters
    }

    /// Builds the ICMP destination-unreachable `code` for `original` into `scratch`, from
    /// `icmp_source`; `None` when ICMP forbids answering (an ICMP error, a non-first fragment,
    /// a broadcast source), `original` is not a valid packet, or the rate limit
    /// ([`ICMP_RATE`], [`ICMP_BURST`]) holds it back (counted as `icmp_ratelimited`). Counts
    /// `icmp_sent` on success.
    pub fn icmp_error<'a>(
        &self,
        original: &[u8],
        code: u8,
        next_hop_mtu: u16,
        scratch: &'a mut [u8],
    ) -> Option<&'a [u8]> {
        let n = icmp::dest_unreachable(
            original,
            code,
            next_hop_mtu,
            self.config.icmp_source,
            scratch,
        )
        .ok()??;
        if !self.icmp_limit.take() {
            self.counters.icmp_ratelimited.fetch_add(1, Relaxed);
            return None;
        }
        self.counters.icmp_sent.fetch_add(1, Relaxed);
        Some(&scratch[..n])
    }
}

/// Validates an IPv4 packet: another version is `not_ipv4`, anything else wrong `malformed`.
pub(super) fn parse_ipv4(bytes: &[u8]) -> Result<Ipv4Packet<&[u8]>, DropReason> {
    match bytes.first() {
        Some(b) if b >> 4 != 4 => return Err(DropReason::NotIpv4),
        _ => {}
    }
    let ip = Ipv4Packet::new_checked(bytes).map_err(|_| DropReason::Malformed)?;
    if !ip.verify_checksum() {
        return Err(DropReason::Malformed);
    }
    debug_assert!(ip.header_len() >= ipv4::HEADER_LEN);
    Ok(ip)
}

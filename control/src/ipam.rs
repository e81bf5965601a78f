//! Carves the cluster CIDR into equal per-node pod CIDRs.
//!
//! Block 0 (10.244.0.0/24 with the defaults) is never handed out: it is kept for the overlay's
//! own addresses, so the first node gets 10.244.1.0/24. Which blocks are taken is the caller's
//! business (the registry knows its nodes); this module only does the arithmetic.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

/// The longest node prefix accepted: a /30 still leaves the network address for the TUN device,
/// a gateway and one pod.
pub const MAX_NODE_PREFIX: u8 = 30;

/// Why a cluster CIDR / node prefix pair is unusable.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IpamError {
    #[error("cluster CIDR {given} is not a network address; did you mean {suggested}?")]
    NotNetwork { given: Ipv4Net, suggested: Ipv4Net },
    #[error(
        "node prefix /{prefix} does not fit cluster CIDR {cluster}: it must be longer than \
         /{len} by at least one bit (the first block is reserved) and at most /{MAX_NODE_PREFIX}",
        len = cluster.prefix_len()
    )]
    BadPrefix { cluster: Ipv4Net, prefix: u8 },
}

/// Arithmetic over the node blocks of one cluster CIDR.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipam {
    cluster: Ipv4Net,
    prefix: u8,
}

impl Ipam {
    pub fn new(cluster: Ipv4Net, prefix: u8) -> Result<Ipam, IpamError> {
        if cluster.trunc() != cluster {
            return Err(IpamError::NotNetwork {
                given: cluster,
                suggested: cluster.trunc(),
            });
        }
        if prefix <= cluster.prefix_len() || prefix > MAX_NODE_PREFIX {
            return Err(IpamError::BadPrefix { cluster, prefix });
        }
        Ok(Ipam { cluster, prefix })
    }

    pub fn cluster(&self) -> Ipv4Net {
        self.cluster
    }

    pub fn node_prefix(&self) -> u8 {
        self.prefix
    }

    /// How many blocks the cluster CIDR holds, the reserved first one included.
    fn blocks(&self) -> u64 {
        1u64 << (self.prefix - self.cluster.prefix_len())
    }

    /// How many nodes can hold a pod CIDR at once.
    pub fn capacity(&self) -> u64 {
        self.blocks() - 1
    }

    /// The pod CIDR of block `index` (1-based: block 0 is reserved).
    pub fn block(&self, index: u32) -> Ipv4Net {
        let base = u32::from(self.cluster.network());
        let addr = base + (index << (32 - u32::from(self.prefix)));
        // Cannot fail: prefix <= 30 was checked in `new`.
        Ipv4Net::new(Ipv4Addr::from(addr), self.prefix).expect("prefix checked in Ipam::new")
    }

    /// The block index of `net`, if it is one of the blocks this IPAM hands out.
    pub fn index_of(&self, net: Ipv4Net) -> Option<u32> {
        if net.prefix_len() != self.prefix || net.trunc() != net || !self.cluster.contains(&net) {
            return None;
        }
        let offset = u32::from(net.network()) - u32::from(self.cluster.network());
        let index = offset >> (32 - u32::from(self.prefix));
        (index != 0).then_some(index)
    }

    /// The first block not in `taken` at or after `start`, wrapping around: replicas that
    /// allocate at once from different starting points rarely pick the same block.
    pub fn free_from<V>(&self, taken: &BTreeMap<u32, V>, start: u32) -> Option<u32> {
        let start = u64::from(start).clamp(1, self.blocks() - 1);
        let mut candidate = start;
        for &index in taken.range(start as u32..).map(|(i, _)| i) {
            if u64::from(index) > candidate {
                break;
            }
            candidate = u64::from(index) + 1;
        }
        if candidate < self.blocks() {
            return Some(candidate as u32);
        }
        self.first_free(taken).filter(|&i| u64::from(i) < start)
    }

    /// The lowest block not in `taken`, so allocation is deterministic and compact.
    pub fn first_free<V>(&self, taken: &BTreeMap<u32, V>) -> Option<u32> {
        // Blocks are 1..blocks. Taken blocks 1..=N with no gap (a cluster that only grew) are
        // told by their count and the last one, without a walk.
        let last = taken.last_key_value().map_or(0, |(&i, _)| u64::from(i));
        let from_one = taken.first_key_value().is_some_and(|(&i, _)| i == 1);
        if from_one && taken.len() as u64 == last {
            return (last + 1 < self.blocks()).then_some(last as u32 + 1);
        }
        // Otherwise walk the sorted taken set for the first gap.
        let mut candidate: u64 = 1;
        for &index in taken.range(1..).map(|(i, _)| i) {
            if u64::from(index) > candidate {
                break;
            }
            candidate = u64::from(index) + 1;
        }
        (candidate < self.blocks()).then_some(candidate as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set<const N: usize>(blocks: [u32; N]) -> BTreeMap<u32, ()> {
        blocks.into_iter().map(|i| (i, ())).collect()
    }

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    #[test]
    fn free_from_wraps_and_skips_taken_blocks() {
        let ipam = Ipam::new(net("10.244.0.0/16"), 24).unwrap();
        let taken = set([1, 2, 200, 201, 255]);
        assert_eq!(ipam.free_from(&taken, 200), Some(202));
        assert_eq!(
            ipam.free_from(&taken, 255),
            Some(3),
            "wraps past the last block"
        );
        assert_eq!(ipam.free_from(&taken, 0), Some(3), "block 0 is reserved");
        let full: BTreeMap<u32, ()> = (1..=255).map(|i| (i, ())).collect();
        assert_eq!(ipam.free_from(&full, 17), None);
    }

    #[test]
    fn default_layout_skips_the_first_block() {
        let ipam = Ipam::new(net("10.244.0.0/16"), 24).unwrap();
        assert_eq!(ipam.capacity(), 255);
        assert_eq!(ipam.block(1), net("10.244.1.0/24"));
        assert_eq!(ipam.block(255), net("10.244.255.0/24"));
        assert_eq!(ipam.first_free(&BTreeMap::<u32, ()>::new()), Some(1));
        assert_eq!(ipam.index_of(net("10.244.7.0/24")), Some(7));
        assert_eq!(ipam.index_of(net("10.244.0.0/24")), None, "reserved block");
        assert_eq!(ipam.index_of(net("10.245.7.0/24")), None, "outside");
        assert_eq!(ipam.index_of(net("10.244.7.0/25")), None, "wrong prefix");
    }

    #[test]
    fn first_free_fills_gaps_then_runs_out() {
        let ipam = Ipam::new(net("10.244.0.0/22"), 24).unwrap();
        assert_eq!(ipam.capacity(), 3);
        assert_eq!(
            ipam.first_free(&set([1, 2])),
            Some(3),
            "dense: the next one"
        );
        let mut taken = set([1, 3]);
        assert_eq!(ipam.first_free(&taken), Some(2));
        taken.insert(2, ());
        assert_eq!(ipam.first_free(&taken), None);
        taken.remove(&1);
        assert_eq!(ipam.first_free(&taken), Some(1));
    }

    #[test]
    fn odd_prefixes() {
        let ipam = Ipam::new(net("10.244.0.0/16"), 26).unwrap();
        assert_eq!(ipam.capacity(), 1023);
        assert_eq!(ipam.block(5), net("10.244.1.64/26"));
        assert_eq!(ipam.index_of(net("10.244.1.64/26")), Some(5));
        let tiny = Ipam::new(net("10.244.0.0/29"), 30).unwrap();
        assert_eq!(tiny.capacity(), 1);
        assert_eq!(tiny.block(1), net("10.244.0.4/30"));
    }

    #[test]
    fn bad_configurations_are_explained() {
        assert_eq!(
            Ipam::new(net("10.244.1.0/16"), 24),
            Err(IpamError::NotNetwork {
                given: net("10.244.1.0/16"),
                suggested: net("10.244.0.0/16")
            })
        );
        assert!(Ipam::new(net("10.244.0.0/16"), 16).is_err());
        assert!(Ipam::new(net("10.244.0.0/16"), 31).is_err());
        let msg = Ipam::new(net("10.244.0.0/24"), 24).unwrap_err().to_string();
        assert!(msg.contains("/24"), "{msg}");
    }
}

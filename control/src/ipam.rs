//! Carves the cluster CIDR into equal per-node pod CIDRs.
//!
//! Block 0 (10.244.0.0/24 with the defaults) is never handed out: it is kept for the overlay's
//! own addresses, so the first node gets 10.244.1.0/24. Which blocks are taken is the caller's
//! business (the registry knows its nodes); this module only does the arithmetic.
//!
//! A dual-stack layout (`--cluster-cidr-v6`) cuts the IPv6 cluster CIDR the same way, and a
//! node's IPv6 block is the one with its IPv4 block's index: allocating one allocates both, so
//! the IPv6 blocks are as stable and as unique as the IPv4 ones on every store, with nothing
//! more to record. The IPv6 layout must hold at least as many blocks as the IPv4 one.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};

/// The longest node prefix accepted: a /30 still leaves the network address for the TUN device,
/// a gateway and one pod.
pub const MAX_NODE_PREFIX: u8 = 30;

/// The longest IPv6 node prefix accepted: a /120 leaves 255 pod addresses.
pub const MAX_NODE_PREFIX_V6: u8 = 120;

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
    #[error("IPv6 cluster CIDR {given} is not a network address; did you mean {suggested}?")]
    NotNetworkV6 { given: Ipv6Net, suggested: Ipv6Net },
    #[error(
        "IPv6 node prefix /{prefix} does not fit IPv6 cluster CIDR {cluster}: it must be longer \
         than /{len} by at least one bit and at most /{MAX_NODE_PREFIX_V6}",
        len = cluster.prefix_len()
    )]
    BadPrefixV6 { cluster: Ipv6Net, prefix: u8 },
    #[error(
        "IPv6 cluster CIDR {cluster} with /{prefix} per node holds fewer node blocks than the \
         IPv4 layout ({v4_blocks}); every node's IPv6 block has its IPv4 block's index, so use a \
         shorter --cluster-cidr-v6 or a longer --node-prefix-v6"
    )]
    V6TooSmall {
        cluster: Ipv6Net,
        prefix: u8,
        v4_blocks: u64,
    },
}

/// The IPv6 half of a dual-stack layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Ipam6 {
    cluster: Ipv6Net,
    prefix: u8,
}

/// Arithmetic over the node blocks of one cluster CIDR.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipam {
    cluster: Ipv4Net,
    prefix: u8,
    v6: Option<Ipam6>,
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
        Ok(Ipam {
            cluster,
            prefix,
            v6: None,
        })
    }

    /// The layout a store recorded: IPv4, and IPv6 when both of its values are there.
    pub fn recorded(
        cluster: Ipv4Net,
        prefix: u8,
        cluster_v6: Option<Ipv6Net>,
        prefix_v6: Option<u8>,
    ) -> Result<Ipam, IpamError> {
        let ipam = Ipam::new(cluster, prefix)?;
        match cluster_v6.zip(prefix_v6) {
            Some((cidr, prefix)) => ipam.with_v6(cidr, prefix),
            None => Ok(ipam),
        }
    }

    /// The same layout, dual-stack: node block `i` also gets block `i` of `cluster` cut into
    /// `/prefix` blocks.
    pub fn with_v6(self, cluster: Ipv6Net, prefix: u8) -> Result<Ipam, IpamError> {
        if cluster.trunc() != cluster {
            return Err(IpamError::NotNetworkV6 {
                given: cluster,
                suggested: cluster.trunc(),
            });
        }
        if prefix <= cluster.prefix_len() || prefix > MAX_NODE_PREFIX_V6 {
            return Err(IpamError::BadPrefixV6 { cluster, prefix });
        }
        // Every IPv4 block index must name an IPv6 block: compare the bits each layout gives
        // the index.
        if prefix - cluster.prefix_len() < self.prefix - self.cluster.prefix_len() {
            return Err(IpamError::V6TooSmall {
                cluster,
                prefix,
                v4_blocks: self.blocks(),
            });
        }
        Ok(Ipam {
            v6: Some(Ipam6 { cluster, prefix }),
            ..self
        })
    }

    /// The IPv6 cluster CIDR and node prefix of a dual-stack layout.
    pub fn v6(&self) -> Option<(Ipv6Net, u8)> {
        self.v6.map(|v| (v.cluster, v.prefix))
    }

    /// The IPv6 pod CIDR that goes with block `index`, on a dual-stack layout.
    pub fn block_v6(&self, index: u32) -> Option<Ipv6Net> {
        let v6 = self.v6?;
        let base = u128::from(v6.cluster.network());
        let addr = base + (u128::from(index) << (128 - u32::from(v6.prefix)));
        // Cannot fail: the prefix was checked in `with_v6`.
        Some(Ipv6Net::new(Ipv6Addr::from(addr), v6.prefix).expect("prefix checked in with_v6"))
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

    fn net6(s: &str) -> Ipv6Net {
        s.parse().unwrap()
    }

    #[test]
    fn the_v6_block_has_the_v4_blocks_index() {
        let v4 = Ipam::new(net("10.244.0.0/16"), 24).unwrap();
        assert_eq!(v4.block_v6(1), None, "single-stack");
        let ipam = v4.with_v6(net6("fd00:10:244::/56"), 64).unwrap();
        assert_eq!(ipam.v6(), Some((net6("fd00:10:244::/56"), 64)));
        assert_eq!(ipam.block_v6(1), Some(net6("fd00:10:244:1::/64")));
        assert_eq!(ipam.block_v6(255), Some(net6("fd00:10:244:ff::/64")));
        assert_eq!(
            ipam.capacity(),
            255,
            "the IPv4 layout bounds the node count"
        );
        // More IPv6 blocks than IPv4 ones is fine; odd prefixes cut as for IPv4.
        let wide = Ipam::new(net("10.244.0.0/22"), 24).unwrap();
        let wide = wide.with_v6(net6("fd00:10:244::/48"), 80).unwrap();
        assert_eq!(wide.block_v6(3), Some(net6("fd00:10:244:0:3::/80")));
    }

    #[test]
    fn bad_v6_layouts_are_explained() {
        let v4 = Ipam::new(net("10.244.0.0/16"), 24).unwrap();
        assert_eq!(
            v4.with_v6(net6("fd00:10:244:1::/56"), 64),
            Err(IpamError::NotNetworkV6 {
                given: net6("fd00:10:244:1::/56"),
                suggested: net6("fd00:10:244::/56")
            })
        );
        assert!(v4.with_v6(net6("fd00::/56"), 56).is_err());
        assert!(v4.with_v6(net6("fd00::/56"), 121).is_err());
        // 2^7 IPv6 blocks for 2^8 IPv4 ones.
        let msg = v4
            .with_v6(net6("fd00:10:244::/57"), 64)
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("fewer node blocks than the IPv4 layout (256)"),
            "{msg}"
        );
    }
}

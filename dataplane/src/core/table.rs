//! The peer table: which node holds which pod CIDR, and where to reach it on the underlay.
//!
//! A [`RouteTable`] is immutable once built. The agent builds a whole new one from the control
//! plane's node list on every change and swaps it in (`arc_swap::ArcSwap<RouteTable>`), so the
//! data path reads a consistent table without ever waiting. Building is one sort plus a few hash
//! inserts per peer, no pairwise overlap check; [`RouteTable::rebuild`] carries each surviving
//! peer's [`PeerCounters`] over so counts survive swaps.
//!
//! Peers are addressed by their index in [`RouteTable::peers`], valid for that table only.

use std::net::Ipv4Addr;
use std::sync::Arc;

use ipnet::Ipv4Net;
use podnet_proto::api::WgKey;
use podnet_proto::ethernet::MacAddr;
use serde::{Deserialize, Serialize};

use crate::core::drops::PeerCounters;
use crate::core::lpm::{Lpm, U32Map};

/// The encapsulation a peer receives, as it advertises it (its node record, or the static
/// peer's flag): what this node must send it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PeerEncap {
    Ipip,
    Vxlan,
    /// WireGuard, with the peer's public key.
    Wireguard(WgKey),
    /// One this agent does not speak (a newer peer's, or `wireguard` without a key, or
    /// `none`): packets to the peer get ICMP host unreachable and the drop reason
    /// `peer_encap`.
    #[serde(untagged)]
    Unsupported(String),
}

impl PeerEncap {
    /// What a peer advertising `encap` (with `key`, a WireGuard node's public key) receives.
    pub fn of(encap: podnet_proto::api::Encap, key: Option<WgKey>) -> PeerEncap {
        use podnet_proto::api::Encap;
        match (encap, key) {
            (Encap::Ipip, _) => PeerEncap::Ipip,
            (Encap::Vxlan, _) => PeerEncap::Vxlan,
            (Encap::Wireguard, Some(k)) => PeerEncap::Wireguard(k),
            (Encap::Wireguard, None) => PeerEncap::Unsupported("wireguard (no key)".into()),
            (other, _) => PeerEncap::Unsupported(other.name().to_string()),
        }
    }

    /// The name on the command line and in the control API.
    pub fn name(&self) -> &str {
        match self {
            PeerEncap::Ipip => "ipip",
            PeerEncap::Vxlan => "vxlan",
            PeerEncap::Wireguard(_) => "wireguard",
            PeerEncap::Unsupported(name) => name,
        }
    }

    /// The peer's WireGuard public key.
    pub fn wireguard_key(&self) -> Option<&WgKey> {
        match self {
            PeerEncap::Wireguard(k) => Some(k),
            _ => None,
        }
    }
}

/// A node reachable over the underlay.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Peer {
    /// Node name, as registered with the control service.
    pub node: String,
    /// The node's underlay address: outer destination for packets to it, and the outer source
    /// its packets must carry.
    pub underlay_ip: Ipv4Addr,
    /// The node's VTEP MAC (inner Ethernet destination for VXLAN).
    pub vtep_mac: MacAddr,
    /// The pod CIDR the node serves.
    pub pod_cidr: Ipv4Net,
    /// What it receives.
    pub encap: PeerEncap,
}

/// Why a peer list cannot become a table. Each variant names both conflicting peers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TableError {
    #[error(
        "pod CIDR {first_cidr} of node {first} overlaps pod CIDR {second_cidr} of node {second}"
    )]
    OverlappingPodCidr {
        first: String,
        first_cidr: Ipv4Net,
        second: String,
        second_cidr: Ipv4Net,
    },
    #[error("nodes {first} and {second} both claim underlay address {underlay_ip}")]
    DuplicateUnderlayIp {
        underlay_ip: Ipv4Addr,
        first: String,
        second: String,
    },
    #[error("node {node} is listed twice (pod CIDRs {first_cidr} and {second_cidr})")]
    DuplicateNode {
        node: String,
        first_cidr: Ipv4Net,
        second_cidr: Ipv4Net,
    },
}

/// Pod CIDR -> peer (longest-prefix match) and underlay address -> peer, at one revision.
#[derive(Debug, Default)]
pub struct RouteTable {
    revision: u64,
    /// Sorted by pod CIDR (network address, then prefix length).
    peers: Vec<Peer>,
    /// `counters[i]` belongs to `peers[i]`.
    counters: Vec<Arc<PeerCounters>>,
    by_cidr: Lpm<u32>,
    by_underlay: U32Map<u32>,
}

impl RouteTable {
    /// A table without peers, at revision 0.
    pub fn empty() -> Self {
        Self::default()
    }

    /// Builds a table from `peers`, with fresh counters.
    ///
    /// Pod CIDRs are normalised (host bits cleared). Fails if two pod CIDRs overlap, two peers
    /// share an underlay address or a node name appears twice.
    pub fn build(revision: u64, peers: Vec<Peer>) -> Result<Self, TableError> {
        Self::build_with(revision, peers, |_| None)
    }

    /// Like [`RouteTable::build`], but a peer that is also in `self` (same node name and
    /// underlay address) keeps its counters.
    pub fn rebuild(&self, revision: u64, peers: Vec<Peer>) -> Result<Self, TableError> {
        Self::build_with(revision, peers, |peer| {
            let i = self.by_underlay(peer.underlay_ip)?;
            (self.peers[i].node == peer.node).then(|| self.counters[i].clone())
        })
    }

    fn build_with(
        revision: u64,
        mut peers: Vec<Peer>,
        previous: impl Fn(&Peer) -> Option<Arc<PeerCounters>>,
    ) -> Result<Self, TableError> {
        for p in &mut peers {
            p.pod_cidr = p.pod_cidr.trunc();
        }
        peers.sort_unstable_by_key(|p| (p.pod_cidr.network(), p.pod_cidr.prefix_len()));
        check_overlaps(&peers)?;

        let mut by_cidr = Lpm::new();
        let mut by_underlay = U32Map::default();
        by_underlay.reserve(peers.len());
        let mut by_node = std::collections::HashMap::with_capacity(peers.len());
        for (i, p) in peers.iter().enumerate() {
            let index = u32::try_from(i).expect("fewer than 2^32 peers");
            if let Some(j) = by_node.insert(p.node.as_str(), i) {
                return Err(TableError::DuplicateNode {
                    node: p.node.clone(),
                    first_cidr: peers[j].pod_cidr,
                    second_cidr: p.pod_cidr,
                });
            }
            if let Some(j) = by_underlay.insert(u32::from(p.underlay_ip), index) {
                return Err(TableError::DuplicateUnderlayIp {
                    underlay_ip: p.underlay_ip,
                    first: peers[j as usize].node.clone(),
                    second: p.node.clone(),
                });
            }
            by_cidr.insert(p.pod_cidr, index);
        }
        drop(by_node);
        let counters = peers
            .iter()
            .map(|p| previous(p).unwrap_or_default())
            .collect();
        Ok(Self {
            revision,
            peers,
            counters,
            by_cidr,
            by_underlay,
        })
    }

    /// The control-plane revision this table was built from.
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// All peers, sorted by pod CIDR.
    pub fn peers(&self) -> &[Peer] {
        &self.peers
    }

    /// Number of peers.
    pub fn len(&self) -> usize {
        self.peers.len()
    }

    /// True when the table has no peer.
    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }

    /// The peer at `index`. Panics if `index` is not from this table.
    pub fn peer(&self, index: usize) -> &Peer {
        &self.peers[index]
    }

    /// The counters of the peer at `index`. Panics if `index` is not from this table.
    pub fn counters(&self, index: usize) -> &Arc<PeerCounters> {
        &self.counters[index]
    }

    /// Index of the peer whose pod CIDR contains `dst` (longest match).
    #[inline]
    pub fn lookup(&self, dst: Ipv4Addr) -> Option<usize> {
        self.by_cidr.lookup(dst).map(|&i| i as usize)
    }

    /// Index of the peer with underlay address `ip`.
    #[inline]
    pub fn by_underlay(&self, ip: Ipv4Addr) -> Option<usize> {
        self.by_underlay.get(&u32::from(ip)).map(|&i| i as usize)
    }

    /// Every peer with its counters, sorted by pod CIDR.
    pub fn iter(&self) -> impl Iterator<Item = (&Peer, &PeerCounters)> + '_ {
        self.peers.iter().zip(self.counters.iter().map(|c| &**c))
    }
}

/// `peers` sorted by (network, prefix length). CIDR blocks either nest or are disjoint, so a
/// block overlaps an earlier one exactly when it starts before the furthest end seen so far.
fn check_overlaps(peers: &[Peer]) -> Result<(), TableError> {
    let mut furthest: Option<(u32, usize)> = None;
    for (i, p) in peers.iter().enumerate() {
        let start = u32::from(p.pod_cidr.network());
        let end = u32::from(p.pod_cidr.broadcast());
        if let Some((prev_end, j)) = furthest {
            if start <= prev_end {
                let q = &peers[j];
                return Err(TableError::OverlappingPodCidr {
                    first: q.node.clone(),
                    first_cidr: q.pod_cidr,
                    second: p.node.clone(),
                    second_cidr: p.pod_cidr,
                });
            }
        }
        if furthest.is_none_or(|(prev_end, _)| end > prev_end) {
            furthest = Some((end, i));
        }
    }
    Ok(())
}

/// Node `n` of the test fixtures: underlay 198.18.0.n, pod CIDR 10.244.n.0/24, the DESIGN VTEP MAC.
#[cfg(test)]
pub(crate) fn test_peer(node: &str, n: u8) -> Peer {
    let underlay_ip = Ipv4Addr::new(198, 18, 0, n);
    Peer {
        node: node.into(),
        underlay_ip,
        vtep_mac: MacAddr::vtep_for(underlay_ip),
        pod_cidr: Ipv4Net::new(Ipv4Addr::new(10, 244, n, 0), 24).unwrap(),
        encap: PeerEncap::Vxlan,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(node: &str, underlay: &str, cidr: &str) -> Peer {
        let underlay_ip: Ipv4Addr = underlay.parse().unwrap();
        Peer {
            node: node.into(),
            underlay_ip,
            vtep_mac: MacAddr::vtep_for(underlay_ip),
            pod_cidr: cidr.parse().unwrap(),
            encap: PeerEncap::Vxlan,
        }
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn three() -> Vec<Peer> {
        vec![
            peer("c", "198.18.0.3", "10.244.3.0/24"),
            peer("a", "198.18.0.1", "10.244.1.0/24"),
            peer("b", "198.18.0.2", "10.244.2.0/24"),
        ]
    }

    #[test]
    fn lookups_by_pod_address_and_underlay() {
        let t = RouteTable::build(7, three()).unwrap();
        assert_eq!(t.revision(), 7);
        assert_eq!(t.len(), 3);
        let names: Vec<_> = t.peers().iter().map(|p| p.node.as_str()).collect();
        assert_eq!(names, ["a", "b", "c"], "sorted by pod CIDR");
        let i = t.lookup(ip("10.244.2.9")).unwrap();
        assert_eq!(t.peer(i).node, "b");
        assert_eq!(t.peer(i).vtep_mac.to_string(), "02:00:c6:12:00:02");
        assert_eq!(
            t.by_underlay(ip("198.18.0.3")).map(|i| &*t.peer(i).node),
            Some("c")
        );
        assert_eq!(t.lookup(ip("10.244.4.1")), None);
        assert_eq!(t.by_underlay(ip("198.18.0.9")), None);
    }

    #[test]
    fn empty_table_routes_nothing() {
        let t = RouteTable::empty();
        assert!(t.is_empty());
        assert_eq!(t.revision(), 0);
        assert_eq!(t.lookup(ip("10.244.1.1")), None);
        assert_eq!(t.by_underlay(ip("198.18.0.1")), None);
    }

    #[test]
    fn host_bits_are_cleared() {
        let t = RouteTable::build(1, vec![peer("a", "198.18.0.1", "10.244.1.1/24")]).unwrap();
        assert_eq!(
            t.peer(0).pod_cidr,
            "10.244.1.0/24".parse::<Ipv4Net>().unwrap()
        );
        assert_eq!(t.lookup(ip("10.244.1.200")), Some(0));
    }

    #[test]
    fn overlapping_cidrs_name_both_nodes() {
        let mut peers = three();
        peers.push(peer("wide", "198.18.0.9", "10.244.0.0/22"));
        let err = RouteTable::build(1, peers).unwrap_err();
        assert_eq!(
            err,
            TableError::OverlappingPodCidr {
                first: "wide".into(),
                first_cidr: "10.244.0.0/22".parse().unwrap(),
                second: "a".into(),
                second_cidr: "10.244.1.0/24".parse().unwrap(),
            }
        );
        assert_eq!(
            err.to_string(),
            "pod CIDR 10.244.0.0/22 of node wide overlaps pod CIDR 10.244.1.0/24 of node a"
        );
    }

    #[test]
    fn identical_cidrs_overlap() {
        let peers = vec![
            peer("a", "198.18.0.1", "10.244.1.0/24"),
            peer("b", "198.18.0.2", "10.244.1.128/24"),
        ];
        let err = RouteTable::build(1, peers).unwrap_err().to_string();
        assert!(err.contains("node a") && err.contains("node b"), "{err}");
    }

    #[test]
    fn nested_overlap_after_a_long_block_is_found() {
        // The /16 ends after the /24 that follows it; the /26 must be compared with the /16.
        let peers = vec![
            peer("big", "198.18.0.1", "10.0.0.0/16"),
            peer("mid", "198.18.0.2", "10.1.0.0/24"),
            peer("small", "198.18.0.3", "10.0.200.0/26"),
        ];
        match RouteTable::build(1, peers).unwrap_err() {
            TableError::OverlappingPodCidr { first, second, .. } => {
                assert_eq!((first.as_str(), second.as_str()), ("big", "small"));
            }
            other => panic!("unexpected {other}"),
        }
    }

    #[test]
    fn adjacent_cidrs_do_not_overlap() {
        let peers = vec![
            peer("a", "198.18.0.1", "10.244.0.0/25"),
            peer("b", "198.18.0.2", "10.244.0.128/25"),
            peer("c", "198.18.0.3", "10.244.1.0/24"),
            peer("d", "198.18.0.4", "255.255.255.255/32"),
        ];
        assert_eq!(RouteTable::build(1, peers).unwrap().len(), 4);
    }

    #[test]
    fn duplicate_underlay_names_both_nodes() {
        let peers = vec![
            peer("a", "198.18.0.1", "10.244.1.0/24"),
            peer("b", "198.18.0.1", "10.244.2.0/24"),
        ];
        assert_eq!(
            RouteTable::build(1, peers).unwrap_err().to_string(),
            "nodes a and b both claim underlay address 198.18.0.1"
        );
    }

    #[test]
    fn duplicate_node_is_refused() {
        let peers = vec![
            peer("a", "198.18.0.1", "10.244.1.0/24"),
            peer("a", "198.18.0.2", "10.244.2.0/24"),
        ];
        assert!(matches!(
            RouteTable::build(1, peers),
            Err(TableError::DuplicateNode { node, .. }) if node == "a"
        ));
    }

    #[test]
    fn rebuild_keeps_counters_of_unchanged_peers() {
        let t1 = RouteTable::build(1, three()).unwrap();
        let a = t1.by_underlay(ip("198.18.0.1")).unwrap();
        let b = t1.by_underlay(ip("198.18.0.2")).unwrap();
        t1.counters(a).tx.add(100);
        t1.counters(b).rx.add(50);

        // b moved to another underlay address, c left, d joined.
        let t2 = t1
            .rebuild(
                2,
                vec![
                    peer("a", "198.18.0.1", "10.244.1.0/24"),
                    peer("b", "198.18.0.20", "10.244.2.0/24"),
                    peer("d", "198.18.0.4", "10.244.4.0/24"),
                ],
            )
            .unwrap();
        let a2 = t2.by_underlay(ip("198.18.0.1")).unwrap();
        assert!(Arc::ptr_eq(t1.counters(a), t2.counters(a2)));
        assert_eq!(t2.counters(a2).snapshot().tx.bytes, 100);
        let b2 = t2.by_underlay(ip("198.18.0.20")).unwrap();
        assert_eq!(
            t2.counters(b2).snapshot().rx.packets,
            0,
            "new address, new counters"
        );
        let d = t2.by_underlay(ip("198.18.0.4")).unwrap();
        assert_eq!(t2.counters(d).snapshot().tx.packets, 0);
        assert_eq!(t2.lookup(ip("10.244.3.1")), None);
        // The old table is untouched: readers holding it keep a consistent view.
        assert_eq!(
            t1.lookup(ip("10.244.3.1")).map(|i| &*t1.peer(i).node),
            Some("c")
        );
    }

    #[test]
    fn large_tables_build_and_check_quickly() {
        // 60k /24s out of 10.0.0.0/8: the overlap check is a sort and a sweep, not pairwise.
        let peers: Vec<_> = (0..60_000u32)
            .map(|i| {
                let underlay = Ipv4Addr::from(0xc612_0000 + i);
                Peer {
                    node: format!("n{i}"),
                    underlay_ip: underlay,
                    vtep_mac: MacAddr::vtep_for(underlay),
                    pod_cidr: Ipv4Net::new(Ipv4Addr::from(0x0a00_0000 + (i << 8)), 24).unwrap(),
                    encap: PeerEncap::Vxlan,
                }
            })
            .collect();
        let t = RouteTable::build(1, peers).unwrap();
        let i = t
            .lookup(Ipv4Addr::from(0x0a00_0000 + (59_999 << 8) + 7))
            .unwrap();
        assert_eq!(t.peer(i).node, "n59999");
    }

    #[test]
    fn peer_serialises_with_string_fields() {
        let json = serde_json::to_value(peer("a", "198.18.0.1", "10.244.1.0/24")).unwrap();
        assert_eq!(json["underlay_ip"], "198.18.0.1");
        assert_eq!(json["pod_cidr"], "10.244.1.0/24");
        assert_eq!(json["vtep_mac"], "02:00:c6:12:00:01");
    }
}

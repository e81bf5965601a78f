//! Which peers the kernel reaches with a plain route on the underlay, and which go through the
//! tunnel: `--encap none` (direct routing, flannel's host-gw) and `--cross-subnet` (Calico's
//! CrossSubnet: direct on the underlay subnet, the tunnel across it).
//!
//! A direct route (`peer pod CIDR via peer underlay IP dev <underlay dev>`) is more specific
//! than the cluster route into `tunl0`, so the kernel forwards those packets itself and none
//! passes through the userspace data path. The routes are host state the agent owns
//! ([`crate::agent::host`]): installed, reconciled and removed like the rest.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde::Serialize;

use crate::core::table::{Peer, PeerEncap, RouteTable};

/// Route protocol number marking the agent's direct routes (`ip route` shows `proto 222`), so
/// a restarted agent recognises the routes a crashed one left and nothing else.
pub const ROUTE_PROTO: u8 = 222;

/// How this node reaches its peers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// `--encap vxlan|ipip`: every peer through the tunnel.
    Tunnel,
    /// `--cross-subnet`: peers on the underlay subnet by direct routes, the others through the
    /// tunnel.
    CrossSubnet,
    /// `--encap none`: peers on the underlay subnet by direct routes; the others cannot be
    /// reached (no tunnel) and are refused.
    Direct,
}

/// How one peer is reached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerPath {
    /// A kernel route via its underlay address.
    Direct,
    /// The tunnel (the encapsulation it receives).
    Tunnel,
    /// Not at all, and why.
    Refused(String),
}

impl PeerPath {
    /// `direct`, `tunnel` or `refused`, as `/status` and `/routes` show it.
    pub fn name(&self) -> &'static str {
        match self {
            PeerPath::Direct => "direct",
            PeerPath::Tunnel => "tunnel",
            PeerPath::Refused(_) => "refused",
        }
    }
}

/// This node's routing choice and the subnet of its underlay device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Routing {
    pub mode: Mode,
    /// The underlay device's subnet: peers inside it are on-link.
    pub underlay_net: Ipv4Net,
}

impl Routing {
    /// How `peer` is reached. A peer that receives plain packets (`none`) is routed directly
    /// whatever this node's mode, when it is on-link: that is all it can take.
    pub fn path(&self, peer: &Peer) -> PeerPath {
        let on_link = self.underlay_net.contains(&peer.underlay_ip);
        let plain_peer = matches!(&peer.encap, PeerEncap::Unsupported(e) if e == "none");
        match (self.mode, on_link) {
            (_, true) if plain_peer => PeerPath::Direct,
            (Mode::Direct | Mode::CrossSubnet, true) => PeerPath::Direct,
            (Mode::Direct, false) => PeerPath::Refused(format!(
                "{} is not on the underlay subnet {}: --encap none reaches only peers on it; \
                 across subnets run every node with --encap vxlan|ipip --cross-subnet",
                peer.underlay_ip, self.underlay_net
            )),
            (_, false) if plain_peer => PeerPath::Refused(format!(
                "it routes without a tunnel (--encap none) and {} is not on the underlay \
                 subnet {}",
                peer.underlay_ip, self.underlay_net
            )),
            (_, _) => PeerPath::Tunnel,
        }
    }

    /// The direct routes `table` asks for: pod CIDR -> underlay IP.
    pub fn direct_routes(&self, table: &RouteTable) -> BTreeMap<Ipv4Net, Ipv4Addr> {
        table
            .peers()
            .iter()
            .filter(|p| self.path(p) == PeerPath::Direct)
            .map(|p| (p.pod_cidr, p.underlay_ip))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::table::test_peer;

    fn peer(n: u8, subnet: u8, encap: PeerEncap) -> Peer {
        Peer {
            underlay_ip: Ipv4Addr::new(198, 18, subnet, n),
            encap,
            ..test_peer(&format!("h{n}"), n)
        }
    }

    fn routing(mode: Mode) -> Routing {
        Routing {
            mode,
            underlay_net: "198.18.0.0/24".parse().unwrap(),
        }
    }

    #[test]
    fn each_mode_picks_the_path_per_peer() {
        let near = peer(2, 0, PeerEncap::Vxlan);
        let far = peer(3, 1, PeerEncap::Vxlan);
        let t = routing(Mode::Tunnel);
        assert_eq!(
            (t.path(&near), t.path(&far)),
            (PeerPath::Tunnel, PeerPath::Tunnel)
        );
        let c = routing(Mode::CrossSubnet);
        assert_eq!(
            (c.path(&near), c.path(&far)),
            (PeerPath::Direct, PeerPath::Tunnel)
        );
        let d = routing(Mode::Direct);
        assert_eq!(d.path(&near), PeerPath::Direct);
        match d.path(&far) {
            PeerPath::Refused(why) => assert!(
                why.contains("198.18.1.3 is not on the underlay subnet 198.18.0.0/24")
                    && why.contains("--cross-subnet"),
                "{why}"
            ),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_plain_routing_peer_is_direct_when_on_link_and_refused_otherwise() {
        let none = PeerEncap::Unsupported("none".into());
        let t = routing(Mode::Tunnel);
        assert_eq!(t.path(&peer(2, 0, none.clone())), PeerPath::Direct);
        assert!(matches!(t.path(&peer(3, 1, none)), PeerPath::Refused(_)));
        // Another unknown encapsulation is left to the tunnel (which answers peer_encap).
        let wg = PeerEncap::Unsupported("wireguard".into());
        assert_eq!(t.path(&peer(2, 0, wg)), PeerPath::Tunnel);
    }

    #[test]
    fn direct_routes_list_the_direct_peers_only() {
        let peers = vec![
            peer(2, 0, PeerEncap::Vxlan),
            Peer {
                pod_cidr: "10.244.3.0/24".parse().unwrap(),
                ..peer(3, 1, PeerEncap::Vxlan)
            },
        ];
        let table = RouteTable::build(1, peers).unwrap();
        let routes = routing(Mode::CrossSubnet).direct_routes(&table);
        assert_eq!(
            routes.into_iter().collect::<Vec<_>>(),
            [(
                "10.244.2.0/24".parse().unwrap(),
                Ipv4Addr::new(198, 18, 0, 2)
            )]
        );
        assert!(routing(Mode::Tunnel).direct_routes(&table).is_empty());
    }
}

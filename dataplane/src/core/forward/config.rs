//! What the forwarder knows about its node: the encapsulation it receives, its addresses
//! and CIDRs, and the MTU it can send to peers of each encapsulation.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use podnet_proto::api::Encap;
use podnet_proto::ethernet::MacAddr;
use podnet_proto::vxlan::Vni;
use podnet_proto::{ipip, vxlan, wireguard};

use crate::core::table::PeerEncap;

/// What the forwarder needs to know about this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeConfig {
    /// This node's name.
    pub node: String,
    /// This node's underlay address: the outer source of what we send.
    pub underlay_ip: Ipv4Addr,
    /// This node's VTEP MAC (inner Ethernet source for VXLAN).
    pub vtep_mac: MacAddr,
    /// This node's pod CIDR: inbound inner destinations must be inside it.
    pub pod_cidr: Ipv4Net,
    /// The whole pod network: outbound destinations outside it get ICMP net unreachable.
    pub cluster_cidr: Ipv4Net,
    /// This node's encapsulation: what it receives, and advertises to its peers.
    pub encap: Encap,
    /// The cluster's VXLAN network identifier (`--vni`): in what this node sends to VXLAN
    /// peers, and what it expects in what it receives when its own encapsulation is VXLAN.
    pub vni: Vni,
    /// Overlay MTU (the `tunl0` MTU): the largest inner packet we encapsulate.
    pub mtu: u16,
    /// What this node can send to peers of each encapsulation (see [`SendPaths`]).
    pub send: SendPaths,
    /// Source address of the ICMP errors we write into `tunl0`. The kernel drops packets that
    /// arrive with one of its own addresses as source ("martian source") unless the input
    /// device has `accept_local=1`, so pick a non-local address or set that sysctl on `tunl0`.
    pub icmp_source: Ipv4Addr,
}

/// Per encapsulation this node sends to peers with: the largest inner packet it carries (the
/// `tunl0` MTU, capped by the underlay MTU less that encapsulation's overhead), or why this node
/// cannot send it (its socket could not be opened). Peers are sent what they receive, so one
/// node may send both; the MTU is per peer, and a packet over it gets ICMP
/// fragmentation-needed carrying it (docs/design.md).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SendPaths {
    pub ipip: Result<u16, String>,
    pub vxlan: Result<u16, String>,
    pub wireguard: Result<u16, String>,
}

impl SendPaths {
    /// Both encapsulations, for a `tunl0` of `mtu` on an underlay of `underlay_mtu`.
    pub fn all(mtu: u16, underlay_mtu: u32) -> SendPaths {
        let cap = |overhead: usize| {
            let fits = (underlay_mtu as usize).saturating_sub(overhead);
            Ok(u16::try_from(fits).unwrap_or(u16::MAX).min(mtu))
        };
        SendPaths {
            ipip: cap(ipip::OVERHEAD),
            vxlan: cap(vxlan::OVERHEAD),
            wireguard: cap(wireguard::OVERHEAD),
        }
    }
}

impl NodeConfig {
    /// The largest inner packet to a peer that receives `encap`, or why this node cannot send
    /// it any.
    pub fn mtu_to(&self, encap: &PeerEncap) -> Result<u16, &str> {
        let path = match encap {
            PeerEncap::Ipip => &self.send.ipip,
            PeerEncap::Vxlan => &self.send.vxlan,
            PeerEncap::Wireguard(_) => &self.send.wireguard,
            PeerEncap::Unsupported(_) => {
                return Err("this agent does not speak that encapsulation")
            }
        };
        path.as_ref().copied().map_err(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::forward::outbound::HEADROOM;

    #[test]
    fn the_headroom_fits_every_prefix_and_each_path_leaves_its_overhead() {
        const { assert!(HEADROOM >= ipip::OVERHEAD && HEADROOM >= vxlan::ENCAP_LEN) };
        let paths = SendPaths::all(1500, 1500);
        assert_eq!(paths.ipip, Ok(1480));
        assert_eq!(paths.vxlan, Ok(1450));
        assert_eq!(paths.wireguard, Ok(1440));
        assert_eq!(
            SendPaths::all(1400, 1500).vxlan,
            Ok(1400),
            "capped by the tunl0 MTU"
        );
    }
}

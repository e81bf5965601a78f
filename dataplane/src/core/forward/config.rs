//! What the forwarder knows about its node: the encapsulation it receives, its addresses
//! and CIDRs, and the MTU it can send to peers of each encapsulation.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use podnet_proto::ethernet::MacAddr;
use podnet_proto::ipip;
use podnet_proto::vxlan::{self, Vni};

use crate::core::table::PeerEncap;

/// How packets travel between nodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encap {
    /// IPv4-in-IPv4 (protocol 4) over a raw socket.
    Ipip,
    /// VXLAN on UDP port 4789 with this VNI.
    Vxlan { vni: Vni },
    /// No tunnel (`--encap none`): peers route plain packets to this node's pod CIDR, and it
    /// reaches only peers on its underlay subnet, by direct routes ([`crate::core::routing`]).
    None,
    /// WireGuard transport messages on UDP [`WIREGUARD_PORT`]. The forwarder routes and
    /// checks the inner packets; the data path encrypts and decrypts them
    /// (the `wireguard` module).
    Wireguard,
}

/// The UDP port WireGuard nodes receive on (the protocol's customary port, DESIGN.md).
pub const WIREGUARD_PORT: u16 = 51820;

/// What WireGuard adds on an IPv4 underlay: outer IPv4 (20) and UDP (8) headers, the
/// transport message header (16) and the authentication tag (16). boringtun does not pad.
pub const WIREGUARD_OVERHEAD: usize = 20 + 8 + 16 + 16;

impl Encap {
    /// Bytes the encapsulation adds on the underlay (outer headers included): what the overlay
    /// MTU must leave free below the underlay MTU.
    pub const fn overhead(self) -> usize {
        match self {
            Encap::Ipip => ipip::OVERHEAD,
            Encap::Vxlan { .. } => vxlan::OVERHEAD,
            Encap::Wireguard => WIREGUARD_OVERHEAD,
            Encap::None => 0,
        }
    }

    /// `ipip` or `vxlan`, as on the command line and in the control API.
    pub const fn name(self) -> &'static str {
        self.advertised().name()
    }

    /// What this node advertises in its node record.
    pub const fn advertised(self) -> podnet_proto::api::Encap {
        match self {
            Encap::Ipip => podnet_proto::api::Encap::Ipip,
            Encap::Vxlan { .. } => podnet_proto::api::Encap::Vxlan,
            Encap::Wireguard => podnet_proto::api::Encap::Wireguard,
            Encap::None => podnet_proto::api::Encap::None,
        }
    }

    /// As a peer of the same encapsulation sees this node (without a WireGuard key).
    pub fn as_peer(self) -> PeerEncap {
        PeerEncap::of(self.advertised(), None)
    }
}

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
    /// This node's encapsulation (and VNI): what it receives, and advertises to its peers.
    pub encap: Encap,
    /// VNI of VXLAN packets sent to VXLAN peers: this node's own when it receives VXLAN, the
    /// cluster's `--vni` otherwise.
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
            wireguard: cap(WIREGUARD_OVERHEAD),
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
    use crate::core::forward::fixtures::vxlan1;
    use crate::core::forward::outbound::HEADROOM;

    #[test]
    fn encap_overheads() {
        assert_eq!(Encap::Ipip.overhead(), 20);
        assert_eq!(vxlan1().overhead(), 50);
        assert_eq!(vxlan1().name(), "vxlan");
        const { assert!(HEADROOM >= ipip::OVERHEAD) };
    }
}

//! The underlay sockets a node receives on and sends from, per encapsulation, and the lane
//! (outer source port, or the IP-in-IP socket) each send takes.

use std::io;
use std::net::SocketAddrV4;
use std::os::fd::{AsFd, BorrowedFd};

use crate::core::table::PeerEncap;
use crate::sys::raw::IpipSocket;
use crate::sys::udp::UdpTunnelSocket;
use crate::sys::{RecvMeta, Transmit};

/// The underlay sockets. This node receives its own encapsulation only, on that
/// encapsulation's socket(s); peers are sent what they receive, so the other encapsulation has
/// a send-only socket (`None` when it could not be opened).
#[derive(Debug)]
pub struct Underlay {
    own: Own,
    other_vxlan: Option<UdpTunnelSocket>,
    other_ipip: Option<IpipSocket>,
}

/// The sockets this node receives on (and sends to peers of its own kind from).
#[derive(Debug)]
enum Own {
    Vxlan(UdpTunnelSocket),
    /// One per worker ([`IpipSocket::bind_share`]); the first also sends.
    Ipip(Vec<IpipSocket>),
    /// `--encap none`: nothing arrives through a tunnel, and nothing is sent through one.
    None,
    /// `--encap wireguard`: UDP 51820 (a `SO_REUSEPORT` group like VXLAN's); this node sends
    /// only to WireGuard peers, from the same port, as standard WireGuard peers expect.
    Wireguard(UdpTunnelSocket),
}

/// The lane of IP-in-IP sends in a [`TxBatch`](crate::core::batch::TxBatch) (VXLAN lanes are its outer source ports,
/// numbered from 0; there are far fewer of them).
const IPIP_LANE: usize = crate::core::batch::MAX_LANES - 1;

impl Underlay {
    /// A VXLAN node's sockets; `ipip` sends to IP-in-IP peers.
    pub fn vxlan(own: UdpTunnelSocket, ipip: Option<IpipSocket>) -> Underlay {
        Underlay {
            own: Own::Vxlan(own),
            other_vxlan: None,
            other_ipip: ipip,
        }
    }

    /// An IP-in-IP node's sockets (one receive socket per worker, at least one); `vxlan`
    /// sends to VXLAN peers.
    pub fn ipip(own: Vec<IpipSocket>, vxlan: Option<UdpTunnelSocket>) -> Underlay {
        assert!(!own.is_empty(), "an IP-in-IP node needs its socket");
        Underlay {
            own: Own::Ipip(own),
            other_vxlan: vxlan,
            other_ipip: None,
        }
    }

    /// A WireGuard node's socket(s).
    pub fn wireguard(own: UdpTunnelSocket) -> Underlay {
        Underlay {
            own: Own::Wireguard(own),
            other_vxlan: None,
            other_ipip: None,
        }
    }

    /// A `--encap none` node: no tunnel sockets at all.
    pub fn none() -> Underlay {
        Underlay {
            own: Own::None,
            other_vxlan: None,
            other_ipip: None,
        }
    }

    /// The socket VXLAN goes out from (this node's own, or its send-only one), or a
    /// WireGuard node's UDP socket.
    pub fn vxlan_socket(&self) -> Option<&UdpTunnelSocket> {
        match &self.own {
            Own::Vxlan(s) | Own::Wireguard(s) => Some(s),
            Own::Ipip(_) | Own::None => self.other_vxlan.as_ref(),
        }
    }

    /// The socket IP-in-IP goes out from.
    pub(super) fn ipip_socket(&self) -> Option<&IpipSocket> {
        match &self.own {
            Own::Ipip(s) => s.first(),
            Own::Vxlan(_) | Own::None | Own::Wireguard(_) => self.other_ipip.as_ref(),
        }
    }

    /// Datagrams the kernel dropped at the receive sockets because they were full: lost before
    /// the data path saw them, so no drop reason of ours counts them.
    pub fn receive_drops(&self) -> u64 {
        match &self.own {
            Own::Vxlan(s) | Own::Wireguard(s) => s.receive_drops(),
            Own::Ipip(s) => s.iter().map(IpipSocket::receive_drops).sum(),
            Own::None => 0,
        }
    }

    /// Sends `items` from `lane` ([`Underlay::lane_for`]); returns how many the kernel refused
    /// (all of them when the encapsulation has no socket, which routing rules out).
    pub(super) fn send_batch(&self, lane: usize, items: &[Transmit<'_>]) -> usize {
        let sent = match lane {
            IPIP_LANE => self.ipip_socket().map(|s| s.send_batch(items)),
            _ => self.vxlan_socket().map(|s| s.send_batch(lane, items)),
        };
        sent.map_or(items.len(), |s| s.failed)
    }

    /// Sends a train of packets to `dst`, each a header slice and a payload slice, every one
    /// but the last `stride` bytes long (VXLAN: from `lane`, as UDP GSO where it can); returns
    /// how many messages the kernel refused.
    pub(super) fn send_segments(
        &self,
        lane: usize,
        dst: SocketAddrV4,
        parts: &[[&[u8]; 2]],
        stride: usize,
    ) -> usize {
        let sent = match lane {
            IPIP_LANE => self.ipip_socket().map(|s| s.send_segments(dst, parts)),
            _ => self
                .vxlan_socket()
                .map(|s| s.send_segments(lane, dst, parts, stride as u16)),
        };
        sent.map_or(parts.len(), |s| s.failed)
    }

    /// The lane a flow with inner flow hash `hash` to a peer receiving `encap` sends from:
    /// VXLAN's outer source port by flow, or the IP-in-IP socket.
    pub(super) fn lane_for(&self, encap: &PeerEncap, hash: u32) -> usize {
        match (encap, self.vxlan_socket()) {
            (PeerEncap::Vxlan, Some(s)) if s.lanes() > 1 => s.lane(hash),
            (PeerEncap::Vxlan | PeerEncap::Wireguard(_), _) => 0,
            _ => IPIP_LANE,
        }
    }

    /// Receives what receive socket `i` holds (up to the buffers given), without waiting.
    pub(super) fn try_recv_batch<B: AsMut<[u8]>>(
        &self,
        i: usize,
        bufs: &mut [B],
        meta: &mut [RecvMeta],
    ) -> io::Result<usize> {
        match &self.own {
            Own::Vxlan(s) | Own::Wireguard(s) => s.try_recv_batch(i, bufs, meta),
            Own::Ipip(s) => s[i].try_recv_batch(bufs, meta),
            Own::None => Ok(0),
        }
    }

    /// Receive sockets: VXLAN may have several (one `SO_REUSEPORT` group, where the kernel
    /// keeps each outer 4-tuple, and so each inner flow, on one socket); IP-in-IP one per
    /// worker (each with a filter for its share); `--encap none` none.
    pub fn receiver_count(&self) -> usize {
        match &self.own {
            Own::Vxlan(s) | Own::Wireguard(s) => s.receiver_count(),
            Own::Ipip(s) => s.len(),
            Own::None => 0,
        }
    }

    /// The descriptors of the receive sockets, for the loop's epoll set.
    pub(super) fn receivers(&self) -> Vec<BorrowedFd<'_>> {
        match &self.own {
            Own::Vxlan(s) | Own::Wireguard(s) => {
                (0..s.receiver_count()).map(|i| s.receiver(i)).collect()
            }
            Own::Ipip(s) => s.iter().map(AsFd::as_fd).collect(),
            Own::None => Vec::new(),
        }
    }
}

//! The drop reasons: one enum with a stable snake_case name per reason, used as the Prometheus
//! label, so renaming a variant never changes a metric. Its own module so that both the
//! counters ([`crate::core::drops`]) and the drop sampler ([`crate::core::dropwatch`]) can use it without
//! importing each other.

use std::fmt;

use serde::Serialize;

/// Why the forwarder dropped a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DropReason {
    /// Not an IPv4 packet (IPv6, empty, junk) read from `tunl0` or found inside a tunnel.
    NotIpv4,
    /// IPv4 or encapsulation headers that do not parse: bad lengths, checksum, flags, outer
    /// fragment.
    Malformed,
    /// Outbound destination is this node's own pod CIDR (served by the pod bridge, never by
    /// `tunl0`), or the table routes it back to this node's underlay address: forwarding would
    /// loop.
    OwnCidr,
    /// Outbound destination outside the cluster CIDR (answered with ICMP net unreachable).
    OutsideCluster,
    /// Outbound destination inside the cluster CIDR but no node holds it (answered with ICMP
    /// host unreachable).
    NoRoute,
    /// Outbound packet larger than the overlay MTU. With DF set it is answered with ICMP
    /// fragmentation needed; without DF it is dropped silently, as userspace never fragments.
    TooBig,
    /// Inbound tunnel packet whose outer source is not a current peer.
    UnknownPeer,
    /// Inbound VXLAN packet with another VNI than this node's.
    WrongVni,
    /// Inbound inner destination outside this node's pod CIDR.
    NotLocal,
    /// Inbound inner source outside the sending peer's pod CIDR (anti-spoofing).
    Spoofed,
    /// Outbound to a peer whose encapsulation this node cannot send (one it does not speak,
    /// or whose socket could not be opened): answered with ICMP host unreachable.
    PeerEncap,
    /// WireGuard: a message whose MAC or authentication tag does not verify (tampered
    /// ciphertext, a handshake not meant for this node's key).
    WgBadMac,
    /// WireGuard: a transport message whose counter was already received or is too old
    /// (replayed), or a handshake initiation with a replayed timestamp.
    WgReplay,
    /// WireGuard: a message for a session index this node does not hold (an expired session,
    /// or a sender that never completed a handshake).
    WgUnknownIndex,
    /// WireGuard: a handshake from a peer's address made with another key than the one the
    /// node table (or `--static-peer`) gives for that peer.
    WgWrongKey,
    /// WireGuard: a handshake answered with a cookie reply instead of a response, because the
    /// node is under a handshake load (the protocol's DoS defence).
    WgCookie,
}

impl DropReason {
    /// Every reason, in declaration order (the order metrics are listed in).
    pub const ALL: [DropReason; 16] = [
        DropReason::NotIpv4,
        DropReason::Malformed,
        DropReason::OwnCidr,
        DropReason::OutsideCluster,
        DropReason::NoRoute,
        DropReason::TooBig,
        DropReason::UnknownPeer,
        DropReason::WrongVni,
        DropReason::NotLocal,
        DropReason::Spoofed,
        DropReason::PeerEncap,
        DropReason::WgBadMac,
        DropReason::WgReplay,
        DropReason::WgUnknownIndex,
        DropReason::WgWrongKey,
        DropReason::WgCookie,
    ];

    /// Stable snake_case name, used as the `reason` metric label and in `/status`.
    pub const fn name(self) -> &'static str {
        match self {
            DropReason::NotIpv4 => "not_ipv4",
            DropReason::Malformed => "malformed",
            DropReason::OwnCidr => "own_cidr",
            DropReason::OutsideCluster => "outside_cluster",
            DropReason::NoRoute => "no_route",
            DropReason::TooBig => "too_big",
            DropReason::UnknownPeer => "unknown_peer",
            DropReason::WrongVni => "wrong_vni",
            DropReason::NotLocal => "not_local",
            DropReason::Spoofed => "spoofed",
            DropReason::PeerEncap => "peer_encap",
            DropReason::WgBadMac => "wg_bad_mac",
            DropReason::WgReplay => "wg_replay",
            DropReason::WgUnknownIndex => "wg_unknown_index",
            DropReason::WgWrongKey => "wg_wrong_key",
            DropReason::WgCookie => "wg_cookie",
        }
    }

    /// Position in [`DropReason::ALL`].
    pub(crate) const fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for DropReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl Serialize for DropReason {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

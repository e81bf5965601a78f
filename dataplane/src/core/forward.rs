//! Forwarding decisions: pod packet -> tunnel packet (outbound), tunnel packet -> pod packet
//! (inbound), as pure functions over caller-owned buffers.
//!
//! The [`Forwarder`] never touches a socket, a device or the clock; the OS shells hand it bytes
//! and act on the result ([`Outbound::Send`]: put these bytes on the underlay to that peer,
//! [`Outbound::Reply`] / [`Inbound::Deliver`]: write these bytes into `tunl0`, `Drop`: count
//! and forget). Results borrow the caller's buffers; nothing is allocated per packet. Every drop
//! is counted in [`Counters`] and per-peer traffic in the table's [`PeerCounters`](crate::core::drops::PeerCounters).
//!
//! TTL: the kernel already decremented the TTL when it routed the packet into `tunl0` (and the
//! receiving kernel decrements it again when it routes from its `tunl0` to the pod), so the
//! tunnel is one hop like any link and the forwarder leaves the inner TTL alone. A packet the
//! kernel would expire never reaches `tunl0`: the kernel sends the ICMP time-exceeded itself.
//!
//! Fragments: userspace never fragments. `tunl0` has the overlay MTU, so the kernel fragments
//! (or answers DF packets with fragmentation-needed) before we see them; an oversized packet
//! here means the MTU changed under the kernel's feet, and we answer DF packets with ICMP
//! fragmentation-needed carrying the overlay MTU and drop the others as `too_big`.
//! Inner fragments are forwarded like any packet (their header carries the addresses).

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU16, Ordering::Relaxed};
use std::sync::Arc;

use ipnet::Ipv4Net;
use podnet_proto::ethernet::MacAddr;
use podnet_proto::gso::{self, HeaderPlan};
use podnet_proto::icmp;
use podnet_proto::ipv4::{self, Ipv4Packet};
use podnet_proto::virtio::VirtioNetHdr;
use podnet_proto::vxlan::{self, Vni};
use podnet_proto::{ipip, WireError};

use crate::core::bucket::TokenBucket;
use crate::core::drops::{Counters, DropReason};
use crate::core::dropwatch::DropContext;
use crate::core::table::{Peer, PeerEncap, RouteTable};

/// Bytes the caller must reserve in front of an outbound packet: room for the largest
/// prefix we write (VXLAN header + inner Ethernet; IP-in-IP needs 20).
pub const HEADROOM: usize = vxlan::ENCAP_LEN;

/// Minimum size of the scratch buffer for ICMP replies.
pub const SCRATCH_LEN: usize = icmp::MAX_ERROR_LEN;

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

/// The routing decision for one outbound packet, without encapsulation (see
/// [`Forwarder::classify`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// Send to the peer at this index of the table.
    Peer(usize),
    /// No node serves the destination: drop with `reason` and answer with ICMP destination
    /// unreachable `code`.
    Unreachable { reason: DropReason, code: u8 },
    /// Drop silently.
    Drop(DropReason),
}

/// Result of [`Forwarder::outbound_super`].
#[derive(Debug)]
pub enum SuperOutbound<'a> {
    /// Send the super-packet as `plan.segs.count` packets to the peer at `index`: packet `i` is
    /// `headers[i * plan.header_len..(i + 1) * plan.header_len]` (encapsulation, IPv4 and TCP
    /// headers) followed by `packet[plan.piece(i)]`, the payload where it was read. Counted.
    Send {
        index: usize,
        plan: HeaderPlan,
        headers: &'a [u8],
    },
    /// Write this ICMP error into `tunl0`; the super-packet is dropped (and counted).
    Reply(&'a [u8]),
    /// Dropped (counted); `offload` when the segmenter refused the virtio header.
    Drop { reason: DropReason, offload: bool },
}

/// A super-packet whose segments would be larger than the chosen peer's MTU
/// ([`Forwarder::classify_super`]): answer with fragmentation needed carrying `mtu` when it has
/// DF, else drop it (`too_big`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TooBig {
    pub mtu: u16,
}

/// Result of [`Forwarder::outbound`].
#[derive(Debug, PartialEq, Eq)]
pub enum Outbound<'a> {
    /// Send `bytes` to the peer at underlay address `peer` (at `index` in the table the packet
    /// was routed with), in the encapsulation it receives: for IP-in-IP the full outer IPv4
    /// packet (for an `IP_HDRINCL` raw socket), for VXLAN the UDP payload (for port 4789).
    Send {
        peer: Ipv4Addr,
        index: usize,
        bytes: &'a [u8],
    },
    /// Write this ICMP error into `tunl0`; the original packet is dropped (and counted).
    Reply(&'a [u8]),
    /// Drop the packet (already counted).
    Drop(DropReason),
}

/// Result of [`Forwarder::inbound_ipip`] and [`Forwarder::inbound_vxlan`].
#[derive(Debug, PartialEq, Eq)]
pub enum Inbound<'a> {
    /// Write this inner IPv4 packet into `tunl0`.
    Deliver(&'a [u8]),
    /// Drop the packet (already counted).
    Drop(DropReason),
}

/// Delivered traffic not yet added to the shared counters. The receive path tallies a whole
/// batch here ([`Forwarder::inbound_vxlan_tallied`]) and adds it with one update per counter
/// ([`commit`](Self::commit)) instead of four atomic additions per packet.
#[derive(Debug, Default)]
pub struct RxTally {
    /// The sending peer of what is tallied (its index in the table of this batch).
    peer: Option<usize>,
    packets: u64,
    bytes: u64,
}

impl RxTally {
    fn add(&mut self, fwd: &Forwarder, table: &RouteTable, peer: usize, bytes: usize) {
        if self.peer != Some(peer) {
            self.commit(fwd, table);
            self.peer = Some(peer);
        }
        self.packets += 1;
        self.bytes += bytes as u64;
    }

    /// Adds what is tallied to the node's and the peer's counters and starts over. `table`
    /// must be the one the packets were tallied with.
    pub fn commit(&mut self, fwd: &Forwarder, table: &RouteTable) {
        if let Some(peer) = self.peer.take() {
            fwd.counters.rx.add_many(self.packets, self.bytes);
            table.counters(peer).rx.add_many(self.packets, self.bytes);
        }
        self.packets = 0;
        self.bytes = 0;
    }
}

/// The forwarding core of one node. Shared by the data-path threads (`&self` everywhere).
#[derive(Debug)]
pub struct Forwarder {
    config: NodeConfig,
    counters: Arc<Counters>,
    /// IPv4 identification for outer IP-in-IP headers (RFC 6864: unique per source,
    /// destination and protocol while a datagram may be fragmented; a wrapping counter is enough).
    /// Shared by the workers' forwarders ([`Forwarder::for_worker`]).
    ident: Arc<AtomicU16>,
    /// ICMP errors still allowed ([`ICMP_RATE`], [`ICMP_BURST`]); refilled by
    /// [`Forwarder::tick`]. One bucket for the node, whichever worker sends the error.
    icmp_limit: Arc<TokenBucket>,
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

    /// Decides where an outbound pod packet goes, counting nothing: the routing step of
    /// [`outbound`](Self::outbound) on its own, for the offload path that segments a
    /// super-packet after the decision (and then counts itself).
    ///
    /// Checks, in order: IPv4 (`not_ipv4`), header valid with a good checksum (`malformed`),
    /// destination not in this node's pod CIDR (`own_cidr`), inside the cluster CIDR (else
    /// unreachable, `outside_cluster`), a peer holds it (else unreachable, `no_route`), and that
    /// peer is not this node (`own_cidr`). The MTU is not checked here.
    pub fn classify(&self, table: &RouteTable, packet: &[u8]) -> Route {
        match parse_ipv4(packet) {
            Ok(ip) => self.route(table, ip.dst()),
            Err(reason) => Route::Drop(reason),
        }
    }

    /// [`classify`](Self::classify) for a TSO super-packet (`packet` behind virtio header
    /// `hdr`), which the caller cuts into segments of `hdr.gso_size` payload bytes: also checks
    /// that those segments fit the chosen peer's MTU, which is below the `tunl0` MTU when the
    /// peer receives an encapsulation with more overhead than this node's ([`TooBig`]).
    pub fn classify_super(
        &self,
        table: &RouteTable,
        hdr: &VirtioNetHdr,
        packet: &[u8],
    ) -> Result<Route, TooBig> {
        let route = self.classify(table, packet);
        let Route::Peer(i) = route else {
            return Ok(route);
        };
        let Ok(mtu) = self.config.mtu_to(&table.peer(i).encap) else {
            return Ok(route);
        };
        // IPv4 and TCP header lengths of the first segment; classify() parsed the IPv4
        // header, and the segmenter refuses what else does not parse, so a short packet is
        // left to it.
        let ip_len = usize::from(packet[0] & 0x0f) * 4;
        let Some(doff) = packet.get(ip_len + 12) else {
            return Ok(route);
        };
        let segment = ip_len + usize::from(doff >> 4) * 4 + usize::from(hdr.gso_size);
        if segment > usize::from(mtu) {
            return Err(TooBig { mtu });
        }
        Ok(route)
    }

    /// Handles one TSO super-packet read from `tunl0` (`packet` behind virtio header `hdr`):
    /// routes it once ([`classify_super`](Self::classify_super)), then writes every segment's
    /// headers behind the peer's encapsulation into `headers` (IP-in-IP: each segment's own
    /// outer header), for a zero-copy send of header and payload slices. Refusals are answered
    /// into `scratch` like [`outbound`](Self::outbound)'s. `headers` must hold
    /// [`gso::segment_headers`]' output for the largest super-packet (see `SEGMENT_BUF` in the
    /// data path).
    pub fn outbound_super<'a>(
        &self,
        table: &RouteTable,
        hdr: &VirtioNetHdr,
        packet: &[u8],
        headers: &'a mut [u8],
        scratch: &'a mut [u8],
    ) -> SuperOutbound<'a> {
        let index = match self.route_super(table, hdr, packet, scratch) {
            Ok(i) => i,
            Err(refused) => return refused,
        };
        let peer = table.peer(index);
        if peer.encap.wireguard_key().is_some() {
            // The WireGuard path segments and encrypts itself (route_super, then
            // the wireguard module); a WireGuard peer never gets a bare segment.
            self.drop_outbound(DropReason::PeerEncap, packet);
            return SuperOutbound::Drop {
                reason: DropReason::PeerEncap,
                offload: false,
            };
        }
        let prefix = self.vxlan_prefix(peer);
        // IP-in-IP: segments behind a blank outer header, filled in per segment below.
        let blank = [0u8; ipip::OVERHEAD];
        let head: &[u8] = prefix.as_ref().map_or(&blank, |p| p);
        let plan = match gso::segment_headers(hdr, packet, head, headers) {
            Ok(plan) => plan,
            Err(_) => {
                self.drop_outbound(DropReason::Malformed, packet);
                return SuperOutbound::Drop {
                    reason: DropReason::Malformed,
                    offload: true,
                };
            }
        };
        let headers = &mut headers[..plan.segs.count * plan.header_len];
        if prefix.is_none()
            && self
                .ipip_outer_headers(peer, packet, &plan, headers)
                .is_err()
        {
            self.drop_outbound(DropReason::Malformed, packet);
            return SuperOutbound::Drop {
                reason: DropReason::Malformed,
                offload: false,
            };
        }
        // Counted once per super-packet: inner bytes, encapsulation excluded.
        let segs = &plan.segs;
        let inner_bytes = (segs.total_len() - segs.count * segs.prefix_len) as u64;
        self.count_tx(table, index, segs.count as u64, inner_bytes);
        SuperOutbound::Send {
            index,
            plan,
            headers,
        }
    }

    /// The routing step of [`outbound_super`](Self::outbound_super): the peer's index, or the
    /// refusal (counted, answered into `scratch` where ICMP allows).
    pub fn route_super<'a>(
        &self,
        table: &RouteTable,
        hdr: &VirtioNetHdr,
        packet: &[u8],
        scratch: &'a mut [u8],
    ) -> Result<usize, SuperOutbound<'a>> {
        let refused = match self.classify_super(table, hdr, packet) {
            Ok(Route::Peer(i)) => Ok(i),
            Ok(Route::Unreachable { reason, code }) => {
                Err(self.reject_outbound(packet, reason, code, 0, scratch))
            }
            Ok(Route::Drop(reason)) => Err(self.drop_outbound(reason, packet)),
            Err(TooBig { mtu }) => Err(self.too_big(packet, mtu, scratch)),
        };
        match refused {
            Ok(i) => Ok(i),
            Err(Outbound::Reply(b)) => Err(SuperOutbound::Reply(b)),
            Err(Outbound::Drop(reason)) => Err(SuperOutbound::Drop {
                reason,
                offload: false,
            }),
            // None of the three refusers sends; were one to, nothing goes out.
            Err(Outbound::Send { .. }) => Err(SuperOutbound::Drop {
                reason: DropReason::Malformed,
                offload: false,
            }),
        }
    }

    /// Counts `packets` inner packets of `bytes` bytes in all sent to the peer at `index`.
    pub fn count_tx(&self, table: &RouteTable, index: usize, packets: u64, bytes: u64) {
        self.counters.tx.add_many(packets, bytes);
        table.counters(index).tx.add_many(packets, bytes);
    }

    /// Routing for a valid packet to `dst`.
    #[inline]
    fn route(&self, table: &RouteTable, dst: Ipv4Addr) -> Route {
        route(&self.config, table, dst)
    }

    /// Handles one packet read from `tunl0`, sitting at `buf[start..start + len]` with at least
    /// [`HEADROOM`] bytes in front of it. On [`Outbound::Send`] the encapsulation has been
    /// written into that headroom. ICMP errors are built into `scratch`.
    ///
    /// # Panics
    ///
    /// If `start < HEADROOM`, `start + len > buf.len()` or `scratch.len() < SCRATCH_LEN`:
    /// caller bugs, never caused by packet contents.
    pub fn outbound<'a>(
        &self,
        table: &RouteTable,
        buf: &'a mut [u8],
        start: usize,
        len: usize,
        scratch: &'a mut [u8],
    ) -> Outbound<'a> {
        assert!(
            start >= HEADROOM,
            "outbound needs {HEADROOM} bytes of headroom"
        );
        assert!(
            scratch.len() >= SCRATCH_LEN,
            "ICMP scratch buffer too small"
        );
        let ip = match parse_ipv4(&buf[start..start + len]) {
            Ok(ip) => ip,
            Err(reason) => return self.drop_outbound(reason, &buf[start..start + len]),
        };
        let packet = ip.packet();
        let index = match self.route(table, ip.dst()) {
            Route::Peer(i) => i,
            Route::Unreachable { reason, code } => {
                return self.reject_outbound(packet, reason, code, 0, scratch);
            }
            Route::Drop(reason) => return self.drop_outbound(reason, packet),
        };
        let total_len = packet.len();
        let peer = table.peer(index);
        // route() only picks peers this node can send to.
        let mtu = self.config.mtu_to(&peer.encap).unwrap_or(self.config.mtu);
        if total_len > usize::from(mtu) {
            return self.too_big(packet, mtu, scratch);
        }
        let end = start + total_len;
        let new_start = match self.encapsulate(peer, buf, start, total_len) {
            Ok(s) => s,
            Err(_) => return self.drop_outbound(DropReason::Malformed, &buf[start..end]),
        };
        self.counters.tx.add(total_len);
        table.counters(index).tx.add(total_len);
        Outbound::Send {
            peer: peer.underlay_ip,
            index,
            bytes: &buf[new_start..end],
        }
    }

    /// Refuses valid `packet`, larger than `mtu` on its way to a peer. RFC 1191: with DF set
    /// it gets fragmentation needed carrying `mtu`. Without DF the kernel fragments to the
    /// tunl0 MTU before we see the packet, and a peer of another encapsulation may take less
    /// (per-peer MTU); userspace does not fragment, so it is dropped. Counted as `too_big`.
    pub fn too_big<'a>(&self, packet: &[u8], mtu: u16, scratch: &'a mut [u8]) -> Outbound<'a> {
        let df = packet.get(6).is_some_and(|f| f & 0x40 != 0);
        if df {
            self.reject_outbound(
                packet,
                DropReason::TooBig,
                icmp::code::FRAG_NEEDED,
                mtu,
                scratch,
            )
        } else {
            self.drop_outbound(DropReason::TooBig, packet)
        }
    }

    /// Writes this node's encapsulation for `peer` in front of the inner packet at
    /// `buf[start..start + len]`; returns where the encapsulated bytes now start. Needs
    /// `start >= HEADROOM`.
    pub fn encapsulate(
        &self,
        peer: &Peer,
        buf: &mut [u8],
        start: usize,
        len: usize,
    ) -> Result<usize, WireError> {
        match &peer.encap {
            PeerEncap::Ipip => {
                let ident = self.ident.fetch_add(1, Relaxed);
                ipip::encapsulate(
                    buf,
                    start,
                    len,
                    self.config.underlay_ip,
                    peer.underlay_ip,
                    ident,
                )
            }
            PeerEncap::Vxlan => Ok(vxlan::encapsulate(
                buf,
                start,
                self.config.vni,
                self.config.vtep_mac,
                peer.vtep_mac,
            )),
            // WireGuard encrypts the packet where it lies (the data path's wireguard module).
            PeerEncap::Wireguard(_) => Ok(start),
            // route() answers packets for such a peer (peer_encap) before they get here; if
            // one ever did, it is dropped (the caller counts it malformed), never sent bare.
            PeerEncap::Unsupported(_) => Err(WireError::Truncated {
                layer: podnet_proto::error::Layer::Ipv4,
                required: 0,
                len: 0,
            }),
        }
    }

    /// Writes the IP-in-IP outer headers of a super-packet that
    /// [`podnet_proto::gso::segment_headers`] cut behind a blank [`ipip::OVERHEAD`]-byte
    /// prefix: `headers` holds `plan`'s header slots, and the first 20 bytes of slot `i` become
    /// the outer header of segment `i` (its own length, consecutive identifications, TOS and
    /// DF of the super-packet `packet`), as [`Forwarder::encapsulate`] would write it in front
    /// of that segment.
    pub fn ipip_outer_headers(
        &self,
        peer: &Peer,
        packet: &[u8],
        plan: &HeaderPlan,
        headers: &mut [u8],
    ) -> Result<(), WireError> {
        let inner = Ipv4Packet::new_checked(packet)?;
        let count = plan.segs.count;
        let first = self.ident.fetch_add(count as u16, Relaxed);
        let slots = headers.chunks_exact_mut(plan.header_len).take(count);
        for (i, slot) in slots.enumerate() {
            let inner_len = plan.header_len - ipip::OVERHEAD + plan.piece(i).len();
            let ident = first.wrapping_add(i as u16);
            let (src, dst) = (self.config.underlay_ip, peer.underlay_ip);
            ipip::outer_header(&inner, inner_len, src, dst, ident)?.emit(slot);
        }
        Ok(())
    }

    /// The 22-byte VXLAN + inner Ethernet prefix for packets to `peer` (for segmenters that
    /// repeat it in front of every segment); `None` for IP-in-IP, whose outer header depends on
    /// each packet.
    pub fn vxlan_prefix(&self, peer: &Peer) -> Option<[u8; vxlan::ENCAP_LEN]> {
        match peer.encap {
            PeerEncap::Vxlan => {
                let mut out = [0; vxlan::ENCAP_LEN];
                vxlan::write_header(
                    &mut out,
                    self.config.vni,
                    self.config.vtep_mac,
                    peer.vtep_mac,
                );
                Some(out)
            }
            PeerEncap::Ipip | PeerEncap::Wireguard(_) | PeerEncap::Unsupported(_) => None,
        }
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

    /// Handles one IP-in-IP packet as the raw socket delivers it (outer header included).
    ///
    /// Checks, in order: outer source is a current peer (`unknown_peer`), outer header and
    /// decapsulation (`malformed`), then the inner checks of [`inbound_vxlan`](Self::inbound_vxlan).
    pub fn inbound_ipip<'a>(&self, table: &RouteTable, outer: &'a [u8]) -> Inbound<'a> {
        self.counted_at_once(table, |tally| {
            self.inbound_ipip_tallied(table, outer, tally)
        })
    }

    /// [`inbound_ipip`](Self::inbound_ipip) for a receive batch: a delivered packet is counted
    /// in `tally`, which the caller commits once per batch. Drops are counted at once.
    pub fn inbound_ipip_tallied<'a>(
        &self,
        table: &RouteTable,
        outer: &'a [u8],
        tally: &mut RxTally,
    ) -> Inbound<'a> {
        // The source is read before the outer header is validated so that packets from
        // strangers are counted as such, whatever their shape.
        let Some(src) = outer.get(12..16) else {
            let ctx = DropContext {
                outer_src: None,
                ..DropContext::rx(Ipv4Addr::UNSPECIFIED, outer)
            };
            return self.deliver_drop(DropReason::Malformed, table, None, ctx);
        };
        let src = Ipv4Addr::new(src[0], src[1], src[2], src[3]);
        // For the drop sampler only: where the inner packet would start.
        let ctx = DropContext::rx(src, outer.get(ipv4::HEADER_LEN..).unwrap_or_default());
        let Some(index) = table.by_underlay(src) else {
            return self.deliver_drop(DropReason::UnknownPeer, table, None, ctx);
        };
        let inner = match ipip::decapsulate(outer) {
            Ok((_, inner)) => inner,
            Err(_) => return self.deliver_drop(DropReason::Malformed, table, Some(index), ctx),
        };
        self.inner(table, index, inner, tally)
    }

    /// Handles one VXLAN UDP payload received from `outer_src`.
    ///
    /// Checks, in order: `outer_src` is a current peer (`unknown_peer`), VXLAN header and inner
    /// Ethernet (`malformed`; a non-IPv4 EtherType is `not_ipv4`), VNI (`wrong_vni`), inner
    /// IPv4 valid (`not_ipv4` / `malformed`), inner destination in this node's pod CIDR
    /// (`not_local`), inner source in the sending peer's pod CIDR (`spoofed`). The inner
    /// Ethernet addresses are not checked: a kernel VXLAN peer may use its device MAC as source.
    pub fn inbound_vxlan<'a>(
        &self,
        table: &RouteTable,
        outer_src: Ipv4Addr,
        udp_payload: &'a [u8],
    ) -> Inbound<'a> {
        self.counted_at_once(table, |tally| {
            self.inbound_vxlan_tallied(table, outer_src, udp_payload, tally)
        })
    }

    /// Runs one tallied receive decision and commits its tally right away: the per-packet
    /// entry points.
    fn counted_at_once<'a>(
        &self,
        table: &RouteTable,
        decide: impl FnOnce(&mut RxTally) -> Inbound<'a>,
    ) -> Inbound<'a> {
        let mut tally = RxTally::default();
        let verdict = decide(&mut tally);
        tally.commit(self, table);
        verdict
    }

    /// [`inbound_vxlan`](Self::inbound_vxlan) for a receive batch: a delivered packet is
    /// counted in `tally`, which the caller commits once per batch. Drops are counted at once.
    pub fn inbound_vxlan_tallied<'a>(
        &self,
        table: &RouteTable,
        outer_src: Ipv4Addr,
        udp_payload: &'a [u8],
        tally: &mut RxTally,
    ) -> Inbound<'a> {
        // For the drop sampler only: where the inner packet would start.
        let ctx = DropContext::rx(
            outer_src,
            udp_payload.get(vxlan::ENCAP_LEN..).unwrap_or_default(),
        );
        let Some(index) = table.by_underlay(outer_src) else {
            return self.deliver_drop(DropReason::UnknownPeer, table, None, ctx);
        };
        let frame = match vxlan::decapsulate(udp_payload) {
            Ok(f) => f,
            Err(WireError::BadEtherType(_)) => {
                return self.deliver_drop(DropReason::NotIpv4, table, Some(index), ctx)
            }
            Err(_) => return self.deliver_drop(DropReason::Malformed, table, Some(index), ctx),
        };
        let expected = match self.config.encap {
            Encap::Vxlan { vni } => vni,
            Encap::Ipip | Encap::None | Encap::Wireguard => Vni::default(),
        };
        if frame.vni != expected {
            return self.deliver_drop(DropReason::WrongVni, table, Some(index), ctx);
        }
        self.inner(table, index, frame.inner, tally)
    }

    /// The checks of an inner packet that WireGuard decrypted from the peer at `index` (the
    /// session the message belonged to): those of [`inbound_vxlan`](Self::inbound_vxlan) after
    /// the VNI. The sending peer's pod CIDR is its allowed IPs: `spoofed` is WireGuard's
    /// cryptokey routing check.
    pub fn inbound_decrypted_tallied<'a>(
        &self,
        table: &RouteTable,
        index: usize,
        inner: &'a [u8],
        tally: &mut RxTally,
    ) -> Inbound<'a> {
        self.inner(table, index, inner, tally)
    }

    /// Counts an inbound message from `src` dropped for `reason` before it yielded an inner
    /// packet (a WireGuard message that failed its checks), against the peer at `peer` when
    /// it came from one.
    pub fn drop_inbound(
        &self,
        reason: DropReason,
        table: &RouteTable,
        peer: Option<usize>,
        src: Ipv4Addr,
        bytes: &[u8],
    ) {
        self.deliver_drop(reason, table, peer, DropContext::rx(src, bytes));
    }

    /// Inner-packet checks shared by every encapsulation; `index` is the sending peer.
    fn inner<'a>(
        &self,
        table: &RouteTable,
        index: usize,
        inner: &'a [u8],
        tally: &mut RxTally,
    ) -> Inbound<'a> {
        let ctx = DropContext::rx(table.peer(index).underlay_ip, inner);
        let ip = match parse_ipv4(inner) {
            Ok(ip) => ip,
            Err(reason) => return self.deliver_drop(reason, table, Some(index), ctx),
        };
        if !self.config.pod_cidr.contains(&ip.dst()) {
            return self.deliver_drop(DropReason::NotLocal, table, Some(index), ctx);
        }
        if !table.peer(index).pod_cidr.contains(&ip.src()) {
            return self.deliver_drop(DropReason::Spoofed, table, Some(index), ctx);
        }
        // Trailing bytes after the IPv4 total length (link padding) are not delivered.
        let packet = &inner[..ip.total_len()];
        tally.add(self, table, index, packet.len());
        Inbound::Deliver(packet)
    }

    /// Drops an outbound `packet` for `reason` (counted and sampled for `drops --watch`) and
    /// builds the ICMP destination-unreachable `code` for it into `scratch`: what the offload
    /// path does for a super-packet that [`classify`](Self::classify) rejected.
    pub fn reject_outbound<'a>(
        &self,
        packet: &[u8],
        reason: DropReason,
        code: u8,
        mtu: u16,
        scratch: &'a mut [u8],
    ) -> Outbound<'a> {
        self.counters
            .record_drop(reason, None, &DropContext::tx(packet));
        match self.icmp_error(packet, code, mtu, scratch) {
            Some(reply) => Outbound::Reply(reply),
            None => Outbound::Drop(reason),
        }
    }

    /// Drops an outbound `packet` for `reason`, counted and sampled like every other drop.
    pub fn drop_outbound<'a>(&self, reason: DropReason, packet: &[u8]) -> Outbound<'a> {
        self.counters
            .record_drop(reason, None, &DropContext::tx(packet));
        Outbound::Drop(reason)
    }

    /// Counts an inbound drop, against the sending peer at `peer` when it is known.
    fn deliver_drop<'a>(
        &self,
        reason: DropReason,
        table: &RouteTable,
        peer: Option<usize>,
        ctx: DropContext<'_>,
    ) -> Inbound<'a> {
        let peer = peer.map(|i| &**table.counters(i));
        self.counters.record_drop(reason, peer, &ctx);
        Inbound::Drop(reason)
    }
}

/// The routing rules for a valid packet to `dst` from `config`'s node, in the order
/// [`Forwarder::classify`] documents; shared with `podnet-agent why`.
#[inline]
pub fn route(config: &NodeConfig, table: &RouteTable, dst: Ipv4Addr) -> Route {
    if config.pod_cidr.contains(&dst) {
        return Route::Drop(DropReason::OwnCidr);
    }
    if !config.cluster_cidr.contains(&dst) {
        return Route::Unreachable {
            reason: DropReason::OutsideCluster,
            code: icmp::code::NET_UNREACHABLE,
        };
    }
    match table.lookup(dst) {
        None => Route::Unreachable {
            reason: DropReason::NoRoute,
            code: icmp::code::HOST_UNREACHABLE,
        },
        Some(i) if table.peer(i).underlay_ip == config.underlay_ip => {
            Route::Drop(DropReason::OwnCidr)
        }
        Some(i) if config.mtu_to(&table.peer(i).encap).is_err() => Route::Unreachable {
            reason: DropReason::PeerEncap,
            code: icmp::code::HOST_UNREACHABLE,
        },
        Some(i) => Route::Peer(i),
    }
}

/// Validates an IPv4 packet: another version is `not_ipv4`, anything else wrong `malformed`.
fn parse_ipv4(bytes: &[u8]) -> Result<Ipv4Packet<&[u8]>, DropReason> {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// UDP 10.244.1.2:12345 -> 10.244.2.3:53, DF, TTL 64, payload "hi" (30 bytes).
    const INNER: [u8; 30] = [
        0x45, 0x00, 0x00, 0x1e, 0x00, 0x01, 0x40, 0x00, 0x40, 0x11, 0x21, 0xe2, // IPv4
        0x0a, 0xf4, 0x01, 0x02, 0x0a, 0xf4, 0x02, 0x03, //
        0x30, 0x39, 0x00, 0x35, 0x00, 0x0a, 0x00, 0x00, // UDP, no checksum
        b'h', b'i',
    ];

    /// Outer IPv4 for [`INNER`] from 198.18.0.1 to 198.18.0.2: protocol 4, TTL 64, DF copied,
    /// identification 0 (the first packet of a forwarder).
    const IPIP_OUTER: [u8; 20] = [
        0x45, 0x00, 0x00, 0x32, 0x00, 0x00, 0x40, 0x00, 0x40, 0x04, 0xae, 0xa0, //
        0xc6, 0x12, 0x00, 0x01, 0xc6, 0x12, 0x00, 0x02,
    ];

    /// VXLAN (I flag, VNI 1) + Ethernet 02:00:c6:12:00:02 <- 02:00:c6:12:00:01, IPv4.
    const VXLAN_PREFIX: [u8; 22] = [
        0x08, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01, 0x00, //
        0x02, 0x00, 0xc6, 0x12, 0x00, 0x02, 0x02, 0x00, 0xc6, 0x12, 0x00, 0x01, 0x08, 0x00,
    ];

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    use crate::core::table::test_peer as peer;

    fn table() -> RouteTable {
        table_of(vxlan1())
    }

    /// Nodes a, b, c (1-3), all receiving `encap`.
    fn table_of(encap: Encap) -> RouteTable {
        let peers = [peer("a", 1), peer("b", 2), peer("c", 3)]
            .map(|p| Peer {
                encap: encap.as_peer(),
                ..p
            })
            .to_vec();
        RouteTable::build(1, peers).unwrap()
    }

    /// Node `n` of `encap`, and a table of nodes that all receive `encap`.
    fn pair(n: u8, encap: Encap) -> (Forwarder, RouteTable) {
        (node(n, encap), table_of(encap))
    }

    fn node(n: u8, encap: Encap) -> Forwarder {
        let underlay_ip = Ipv4Addr::new(198, 18, 0, n);
        let config = NodeConfig {
            node: format!("n{n}"),
            underlay_ip,
            vtep_mac: MacAddr::vtep_for(underlay_ip),
            pod_cidr: Ipv4Net::new(Ipv4Addr::new(10, 244, n, 0), 24).unwrap(),
            cluster_cidr: "10.244.0.0/16".parse().unwrap(),
            encap,
            vni: match encap {
                Encap::Vxlan { vni } => vni,
                Encap::Ipip | Encap::None | Encap::Wireguard => Vni::default(),
            },
            mtu: 1450,
            send: SendPaths::all(1450, 1500),
            icmp_source: Ipv4Addr::new(10, 244, 0, 254),
        };
        Forwarder::new(config, Arc::new(Counters::new()))
    }

    fn vxlan1() -> Encap {
        Encap::Vxlan {
            vni: Vni::default(),
        }
    }

    /// `packet` placed after `HEADROOM` bytes of headroom.
    fn with_headroom(packet: &[u8]) -> Vec<u8> {
        let mut buf = vec![0xee; HEADROOM];
        buf.extend_from_slice(packet);
        buf
    }

    /// Re-computes the IPv4 header checksum after a test edits a header field.
    fn fix_checksum(packet: &mut [u8]) {
        packet[10..12].fill(0);
        let c = podnet_proto::checksum::checksum(&packet[..20]);
        packet[10..12].copy_from_slice(&c.to_be_bytes());
    }

    fn out(fwd: &Forwarder, table: &RouteTable, packet: &[u8]) -> (Vec<u8>, Option<Ipv4Addr>) {
        let mut buf = with_headroom(packet);
        let mut scratch = [0; SCRATCH_LEN];
        match fwd.outbound(table, &mut buf, HEADROOM, packet.len(), &mut scratch) {
            Outbound::Send { peer, bytes, .. } => (bytes.to_vec(), Some(peer)),
            Outbound::Reply(r) => (r.to_vec(), None),
            Outbound::Drop(r) => panic!("dropped: {r}"),
        }
    }

    fn out_drop(fwd: &Forwarder, table: &RouteTable, packet: &[u8]) -> DropReason {
        let mut buf = with_headroom(packet);
        let mut scratch = [0; SCRATCH_LEN];
        match fwd.outbound(table, &mut buf, HEADROOM, packet.len(), &mut scratch) {
            Outbound::Drop(r) => r,
            other => panic!("not dropped: {other:?}"),
        }
    }

    #[test]
    fn fixture_is_valid() {
        let ip = Ipv4Packet::new_checked(&INNER[..]).unwrap();
        assert!(ip.verify_checksum());
        assert_eq!(podnet_proto::checksum::checksum(&IPIP_OUTER), 0);
    }

    #[test]
    fn outbound_vxlan_prepends_header_and_inner_ethernet() {
        let (fwd, t) = pair(1, vxlan1());
        let (bytes, peer) = out(&fwd, &t, &INNER);
        assert_eq!(peer, Some(ip("198.18.0.2")));
        assert_eq!(bytes[..22], VXLAN_PREFIX);
        assert_eq!(bytes[22..], INNER);
        assert_eq!(fwd.vxlan_prefix(t.peer(1)), Some(VXLAN_PREFIX));
    }

    #[test]
    fn outbound_ipip_writes_outer_header_with_fresh_ident() {
        let (fwd, t) = pair(1, Encap::Ipip);
        let (bytes, peer) = out(&fwd, &t, &INNER);
        assert_eq!(peer, Some(ip("198.18.0.2")));
        assert_eq!(bytes[..20], IPIP_OUTER);
        assert_eq!(bytes[20..], INNER);
        let (second, _) = out(&fwd, &t, &INNER);
        assert_eq!(second[4..6], [0, 1], "identification advances per packet");
        assert_eq!(fwd.vxlan_prefix(t.peer(1)), None);
    }

    #[test]
    fn ipip_outer_headers_match_encapsulating_each_segment() {
        use podnet_proto::gso;
        use podnet_proto::virtio::{VirtioNetHdr, F_NEEDS_CSUM, GSO_TCPV4};
        let data: Vec<u8> = (0..5000u32).map(|i| (i * 7 + i / 251) as u8).collect();
        let mut packet = Vec::new();
        etherparse::PacketBuilder::ipv4([10, 244, 1, 2], [10, 244, 2, 3], 64)
            .tcp(40000, 5201, 7, 502)
            .write(&mut packet, &data)
            .unwrap();
        packet[1] = 0xb8; // DSCP EF: the outer header copies it, as it does DF
        packet[6] = 0x40;
        fix_checksum(&mut packet);
        let hdr = VirtioNetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV4,
            hdr_len: 40,
            gso_size: 1400,
            csum_start: 20,
            csum_offset: 16,
        };
        let t = table_of(Encap::Ipip);
        let peer = t.peer(1);
        // What the copying path sends: the segments in one buffer, each encapsulated in place.
        let copying = node(1, Encap::Ipip);
        let mut segbuf = vec![0u8; 16_384];
        let segs = gso::segment(&hdr, &packet, ipip::OVERHEAD, &mut segbuf, |_, _| {}).unwrap();
        let mut expected = Vec::new();
        for r in segs.iter() {
            let len = r.len() - ipip::OVERHEAD;
            copying
                .encapsulate(peer, &mut segbuf[r.clone()], ipip::OVERHEAD, len)
                .unwrap();
            expected.push(segbuf[r].to_vec());
        }
        // The zero-copy path: header slots, the payload left in the super-packet.
        let fwd = node(1, Encap::Ipip);
        let mut headers = vec![0u8; 4096];
        let plan = gso::segment_headers(&hdr, &packet, &[0; ipip::OVERHEAD], &mut headers).unwrap();
        fwd.ipip_outer_headers(peer, &packet, &plan, &mut headers)
            .unwrap();
        let hl = plan.header_len;
        let got: Vec<Vec<u8>> = (0..plan.segs.count)
            .map(|i| [&headers[i * hl..(i + 1) * hl], &packet[plan.piece(i)]].concat())
            .collect();
        assert_eq!(got.len(), 4, "5000 bytes at MSS 1400");
        assert_eq!(got, expected);
        for (i, g) in got.iter().enumerate() {
            let outer = etherparse::Ipv4HeaderSlice::from_slice(g).unwrap();
            assert_eq!(usize::from(outer.total_len()), g.len());
            assert_eq!(
                outer.header_checksum(),
                outer.to_header().calc_header_checksum()
            );
            assert_eq!(outer.identification(), i as u16);
            assert_eq!(
                (outer.dcp().value(), outer.dont_fragment()),
                (0xb8 >> 2, true)
            );
            assert_eq!(outer.protocol(), etherparse::IpNumber::IPV4);
        }
        // The identifications were taken from the forwarder's counter: the next packet follows.
        let (next, _) = out(&fwd, &t, &INNER);
        assert_eq!(next[4..6], [0, 4]);
    }

    #[test]
    fn outbound_counts_inner_bytes_per_peer() {
        let (fwd, t) = pair(1, Encap::Ipip);
        out(&fwd, &t, &INNER);
        out(&fwd, &t, &INNER);
        let b = t.by_underlay(ip("198.18.0.2")).unwrap();
        assert_eq!(t.counters(b).snapshot().tx.packets, 2);
        assert_eq!(t.counters(b).snapshot().tx.bytes, 60);
        assert_eq!(fwd.counters().tx.snapshot().bytes, 60);
        assert_eq!(fwd.counters().total_drops(), 0);
    }

    #[test]
    fn outbound_ignores_trailing_bytes_after_total_len() {
        let (fwd, t) = pair(1, vxlan1());
        let mut padded = INNER.to_vec();
        padded.extend_from_slice(&[0; 10]);
        let (bytes, _) = out(&fwd, &t, &padded);
        assert_eq!(bytes[22..], INNER);
    }

    #[test]
    fn outbound_leaves_ttl_alone() {
        let (fwd, t) = pair(1, vxlan1());
        let mut p = INNER;
        p[8] = 1;
        fix_checksum(&mut p);
        let (bytes, _) = out(&fwd, &t, &p);
        assert_eq!(bytes[22..], p);
    }

    #[test]
    fn classify_reasons() {
        let (fwd, t) = pair(1, vxlan1());
        assert_eq!(fwd.classify(&t, &INNER), Route::Peer(1));
        let mut v6 = INNER;
        v6[0] = 0x60;
        assert_eq!(fwd.classify(&t, &v6), Route::Drop(DropReason::NotIpv4));
        assert_eq!(
            fwd.classify(&t, &INNER[..19]),
            Route::Drop(DropReason::Malformed)
        );
        assert_eq!(fwd.classify(&t, &[]), Route::Drop(DropReason::Malformed));
        let mut bad_sum = INNER;
        bad_sum[11] ^= 1;
        assert_eq!(
            fwd.classify(&t, &bad_sum),
            Route::Drop(DropReason::Malformed)
        );
        let to = |dst: [u8; 4]| {
            let mut p = INNER;
            p[16..20].copy_from_slice(&dst);
            fix_checksum(&mut p);
            fwd.classify(&t, &p)
        };
        assert_eq!(to([10, 244, 1, 9]), Route::Drop(DropReason::OwnCidr));
        assert_eq!(to([10, 244, 3, 9]), Route::Peer(2));
        assert_eq!(
            to([10, 244, 9, 9]),
            Route::Unreachable {
                reason: DropReason::NoRoute,
                code: icmp::code::HOST_UNREACHABLE
            }
        );
        assert_eq!(
            to([192, 0, 2, 1]),
            Route::Unreachable {
                reason: DropReason::OutsideCluster,
                code: icmp::code::NET_UNREACHABLE
            }
        );
        assert_eq!(fwd.counters().total_drops(), 0, "classify counts nothing");
    }

    #[test]
    fn route_back_to_own_underlay_is_a_loop() {
        // The table still maps 10.244.9.0/24 to this node (its CIDR changed under it).
        let mut me = peer("me", 1);
        me.pod_cidr = "10.244.9.0/24".parse().unwrap();
        let t = RouteTable::build(2, vec![me, peer("b", 2)]).unwrap();
        let fwd = node(1, Encap::Ipip);
        let mut p = INNER;
        p[16..20].copy_from_slice(&[10, 244, 9, 1]);
        fix_checksum(&mut p);
        assert_eq!(out_drop(&fwd, &t, &p), DropReason::OwnCidr);
        assert_eq!(fwd.counters().drops(DropReason::OwnCidr), 1);
    }

    #[test]
    fn no_route_answers_host_unreachable_quoting_the_packet() {
        let (fwd, t) = pair(1, vxlan1());
        let mut p = INNER;
        p[16..20].copy_from_slice(&[10, 244, 77, 1]);
        fix_checksum(&mut p);
        let (reply, peer) = out(&fwd, &t, &p);
        assert_eq!(peer, None);
        let r = Ipv4Packet::new_checked(&reply[..]).unwrap();
        assert!(r.verify_checksum());
        assert_eq!(r.protocol(), ipv4::protocol::ICMP);
        assert_eq!(r.src(), ip("10.244.0.254"));
        assert_eq!(r.dst(), ip("10.244.1.2"));
        let icmp = r.payload();
        assert_eq!(icmp[..2], [3, icmp::code::HOST_UNREACHABLE]);
        assert_eq!(podnet_proto::checksum::checksum(icmp), 0);
        assert_eq!(icmp[8..], p, "the whole short original is quoted");
        assert_eq!(fwd.counters().drops(DropReason::NoRoute), 1);
        assert_eq!(fwd.counters().icmp_sent(), 1);
    }

    #[test]
    fn outside_cluster_answers_net_unreachable() {
        let (fwd, t) = pair(1, Encap::Ipip);
        let mut p = INNER;
        p[16..20].copy_from_slice(&[192, 0, 2, 1]);
        fix_checksum(&mut p);
        let (reply, _) = out(&fwd, &t, &p);
        assert_eq!(reply[20..22], [3, icmp::code::NET_UNREACHABLE]);
        assert_eq!(fwd.counters().drops(DropReason::OutsideCluster), 1);
    }

    #[test]
    fn icmp_errors_are_rate_limited_like_the_kernels() {
        // Through the forwarder: a flood to an unowned address gets one burst of errors; every
        // packet is still dropped and counted under its reason. (The bucket's own arithmetic
        // is tested in bucket.rs.)
        let (fwd, t) = pair(1, Encap::Ipip);
        fwd.tick(1_000);
        let mut p = INNER;
        p[16..20].copy_from_slice(&[10, 244, 77, 1]);
        fix_checksum(&mut p);
        let mut buf = [0u8; 2048];
        let mut scratch = [0u8; SCRATCH_LEN];
        let mut flood = |n: usize| {
            (0..n)
                .filter(|_| {
                    buf[HEADROOM..HEADROOM + p.len()].copy_from_slice(&p);
                    matches!(
                        fwd.outbound(&t, &mut buf, HEADROOM, p.len(), &mut scratch),
                        Outbound::Reply(_)
                    )
                })
                .count()
        };
        assert_eq!(flood(200), 50, "one burst");
        // 10 ms later, 10 more (1000/s); 5 s later, never more than the burst.
        fwd.tick(1_010);
        assert_eq!(flood(100), 10);
        fwd.tick(6_010);
        assert_eq!(flood(100), 50);
        let c = fwd.counters();
        assert_eq!(c.drops(DropReason::NoRoute), 400);
        assert_eq!(c.icmp_sent(), 110);
        assert_eq!(c.icmp_ratelimited(), 290);
    }

    #[test]
    fn workers_count_apart_but_share_one_icmp_rate_limit() {
        // Two workers' forwarders: each counts its own drops, and a flood spread over both
        // gets one burst of ICMP errors between them, the node's limit, not one each.
        let (fwd, t) = pair(1, Encap::Ipip);
        let other = fwd.for_worker();
        fwd.tick(1_000);
        other.tick(1_000);
        let mut p = INNER;
        p[16..20].copy_from_slice(&[10, 244, 77, 1]);
        fix_checksum(&mut p);
        let mut buf = [0u8; 2048];
        let mut scratch = [0u8; SCRATCH_LEN];
        let mut replies = 0;
        for i in 0..200 {
            let f = if i % 2 == 0 { &fwd } else { &other };
            buf[HEADROOM..HEADROOM + p.len()].copy_from_slice(&p);
            if let Outbound::Reply(_) = f.outbound(&t, &mut buf, HEADROOM, p.len(), &mut scratch) {
                replies += 1;
            }
        }
        assert_eq!(replies, 50, "one burst for the node");
        for f in [&fwd, &other] {
            let c = f.counters();
            assert_eq!(c.drops(DropReason::NoRoute), 100);
            assert_eq!(c.icmp_sent() + c.icmp_ratelimited(), 100);
        }
        assert_eq!(
            fwd.counters().icmp_sent() + other.counters().icmp_sent(),
            50
        );
    }

    #[test]
    fn icmp_errors_are_never_answered() {
        let (fwd, t) = pair(1, Encap::Ipip);
        // An ICMP destination-unreachable to an unknown node: counted, not answered.
        let mut p = INNER;
        p[9] = ipv4::protocol::ICMP;
        p[16..20].copy_from_slice(&[10, 244, 77, 1]);
        p[20..22].copy_from_slice(&[3, 1]);
        fix_checksum(&mut p);
        assert_eq!(out_drop(&fwd, &t, &p), DropReason::NoRoute);
        assert_eq!(fwd.counters().icmp_sent(), 0);
        assert_eq!(
            fwd.counters().icmp_ratelimited(),
            0,
            "not an error held back"
        );
    }

    /// [`INNER`] grown to `len` bytes with the DF flag as given.
    fn big(len: usize, dont_frag: bool) -> Vec<u8> {
        let mut p = INNER.to_vec();
        p.resize(len, 0x55);
        p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        p[6] = if dont_frag { 0x40 } else { 0 };
        fix_checksum(&mut p);
        p
    }

    #[test]
    fn mtu_sized_packet_passes() {
        let (fwd, t) = pair(1, vxlan1());
        let (bytes, peer) = out(&fwd, &t, &big(1450, true));
        assert!(peer.is_some());
        assert_eq!(bytes.len(), 1450 + 22);
    }

    #[test]
    fn too_big_with_df_answers_frag_needed_with_overlay_mtu() {
        let (fwd, t) = pair(1, vxlan1());
        let p = big(1451, true);
        let (reply, peer) = out(&fwd, &t, &p);
        assert_eq!(peer, None);
        assert_eq!(reply[20..22], [3, icmp::code::FRAG_NEEDED]);
        assert_eq!(reply[26..28], 1450u16.to_be_bytes(), "next-hop MTU");
        assert_eq!(reply[28..48], p[..20], "quotes the original header");
        assert!(reply.len() <= icmp::MAX_ERROR_LEN);
        assert_eq!(fwd.counters().drops(DropReason::TooBig), 1);
    }

    /// Node 1 on IP-in-IP with a 1480-byte tunl0 over a 1500-byte underlay, VNI 7 for what it
    /// sends in VXLAN; its peers: a (1) IP-in-IP, b (2) VXLAN, c (3) an encapsulation it does
    /// not speak.
    fn mixed() -> (Forwarder, RouteTable) {
        let mut config = node(1, Encap::Ipip).config().clone();
        config.mtu = 1480;
        config.vni = Vni::new(7).unwrap();
        config.send = SendPaths::all(1480, 1500);
        let encaps = [
            PeerEncap::Ipip,
            PeerEncap::Vxlan,
            PeerEncap::Unsupported("wireguard".into()),
        ];
        let peers = [peer("a", 1), peer("b", 2), peer("c", 3)]
            .into_iter()
            .zip(encaps)
            .map(|(p, encap)| Peer { encap, ..p })
            .collect();
        let fwd = Forwarder::new(config, Arc::new(Counters::new()));
        (fwd, RouteTable::build(1, peers).unwrap())
    }

    /// [`INNER`] sent to node `n`'s pod CIDR, DF set, `len` bytes.
    fn to_node(n: u8, len: usize) -> Vec<u8> {
        let mut p = big(len, true);
        p[18] = n;
        fix_checksum(&mut p);
        p
    }

    #[test]
    fn each_peer_is_sent_the_encapsulation_it_receives() {
        let (fwd, t) = mixed();
        // A VXLAN peer gets VXLAN with the configured VNI...
        let (bytes, to) = out(&fwd, &t, &to_node(2, 100));
        assert_eq!(to, Some(ip("198.18.0.2")));
        let frame = vxlan::decapsulate(&bytes).unwrap();
        assert_eq!(frame.vni, Vni::new(7).unwrap());
        assert_eq!(frame.inner, &to_node(2, 100)[..]);
        // ...and an IP-in-IP peer IP-in-IP (node 1 is this node, so use another).
        let mut d = peer("d", 5);
        d.encap = PeerEncap::Ipip;
        let t = RouteTable::build(2, vec![t.peer(1).clone(), d]).unwrap();
        let (bytes, to) = out(&fwd, &t, &to_node(5, 100));
        assert_eq!(to, Some(ip("198.18.0.5")));
        let outer = Ipv4Packet::new_checked(&bytes[..]).unwrap();
        assert_eq!(outer.protocol(), ipv4::protocol::IPIP);
        assert_eq!(outer.payload(), &to_node(5, 100)[..]);
    }

    #[test]
    fn the_mtu_is_per_peer_and_too_big_quotes_the_peers() {
        let (fwd, t) = mixed();
        // 1480 fits tunl0 but not VXLAN on a 1500-byte underlay: frag-needed carrying 1450.
        let (reply, peer) = out(&fwd, &t, &to_node(2, 1451));
        assert_eq!(peer, None);
        assert_eq!(reply[20..22], [3, icmp::code::FRAG_NEEDED]);
        assert_eq!(reply[26..28], 1450u16.to_be_bytes());
        let (bytes, _) = out(&fwd, &t, &to_node(2, 1450));
        assert_eq!(bytes.len(), 1450 + vxlan::ENCAP_LEN);
        assert_eq!(fwd.config().mtu_to(&PeerEncap::Ipip), Ok(1480));
        // A super-packet whose segments (20 + 20 + 1440 = 1480) exceed the VXLAN peer's MTU.
        let mut sp = to_node(2, 3000);
        sp[9] = ipv4::protocol::TCP;
        sp[20 + 12] = 5 << 4;
        fix_checksum(&mut sp);
        let hdr = |gso_size| VirtioNetHdr {
            gso_size,
            ..VirtioNetHdr::NONE
        };
        assert_eq!(
            fwd.classify_super(&t, &hdr(1440), &sp),
            Err(TooBig { mtu: 1450 })
        );
        assert_eq!(fwd.classify_super(&t, &hdr(1410), &sp), Ok(Route::Peer(1)));
        // Its reply is the same as a small packet's.
        let mut scratch = [0; SCRATCH_LEN];
        match fwd.too_big(&sp, 1450, &mut scratch) {
            Outbound::Reply(r) => assert_eq!(r[26..28], 1450u16.to_be_bytes()),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_peer_this_node_cannot_send_to_is_unreachable_not_silence() {
        let (fwd, t) = mixed();
        let (reply, peer) = out(&fwd, &t, &to_node(3, 100));
        assert_eq!(peer, None);
        assert_eq!(reply[20..22], [3, icmp::code::HOST_UNREACHABLE]);
        assert_eq!(fwd.counters().drops(DropReason::PeerEncap), 1);
        assert_eq!(fwd.counters().tx.snapshot().packets, 0);
        // So is a peer whose encapsulation's send socket could not be opened.
        let mut config = fwd.config().clone();
        config.send.vxlan = Err("cannot open the VXLAN send sockets: denied".into());
        let fwd = Forwarder::new(config, Arc::new(Counters::new()));
        let (reply, _) = out(&fwd, &t, &to_node(2, 100));
        assert_eq!(reply[20..22], [3, icmp::code::HOST_UNREACHABLE]);
        assert_eq!(fwd.counters().drops(DropReason::PeerEncap), 1);
        assert_eq!(
            fwd.config().mtu_to(&PeerEncap::Vxlan),
            Err("cannot open the VXLAN send sockets: denied")
        );
    }

    #[test]
    fn too_big_without_df_is_dropped_not_fragmented() {
        let (fwd, t) = pair(1, Encap::Ipip);
        assert_eq!(out_drop(&fwd, &t, &big(1500, false)), DropReason::TooBig);
        assert_eq!(fwd.counters().icmp_sent(), 0);
        assert_eq!(fwd.counters().tx.snapshot().packets, 0);
    }

    #[test]
    #[should_panic(expected = "headroom")]
    fn missing_headroom_is_a_caller_bug() {
        let (fwd, t) = pair(1, vxlan1());
        let mut buf = INNER;
        let mut scratch = [0; SCRATCH_LEN];
        let _ = fwd.outbound(&t, &mut buf, 0, INNER.len(), &mut scratch);
    }

    /// Node 2 receiving [`INNER`] (10.244.1.2 -> 10.244.2.3) from node 1.
    fn ipip_from_1(inner: &[u8]) -> Vec<u8> {
        let mut outer = IPIP_OUTER.to_vec();
        outer[2..4].copy_from_slice(&((20 + inner.len()) as u16).to_be_bytes());
        fix_checksum(&mut outer);
        outer.extend_from_slice(inner);
        outer
    }

    #[test]
    fn inbound_ipip_delivers_inner_packet() {
        let (fwd, t) = pair(2, Encap::Ipip);
        let mut outer = IPIP_OUTER.to_vec();
        outer.extend_from_slice(&INNER);
        assert_eq!(fwd.inbound_ipip(&t, &outer), Inbound::Deliver(&INNER[..]));
        let a = t.by_underlay(ip("198.18.0.1")).unwrap();
        assert_eq!(t.counters(a).snapshot().rx.bytes, 30);
        assert_eq!(fwd.counters().rx.snapshot().packets, 1);
    }

    #[test]
    fn a_batch_is_counted_once_at_commit_and_drops_at_once() {
        let (fwd, t) = pair(2, vxlan1());
        let mut payload = VXLAN_PREFIX.to_vec();
        payload.extend_from_slice(&INNER);
        let (from_a, stranger) = (ip("198.18.0.1"), ip("198.18.0.99"));
        let a = t.by_underlay(from_a).unwrap();
        let mut tally = RxTally::default();
        for _ in 0..3 {
            let verdict = fwd.inbound_vxlan_tallied(&t, from_a, &payload, &mut tally);
            assert_eq!(verdict, Inbound::Deliver(&INNER[..]));
        }
        let verdict = fwd.inbound_vxlan_tallied(&t, stranger, &payload, &mut tally);
        assert_eq!(verdict, Inbound::Drop(DropReason::UnknownPeer));
        assert_eq!(
            fwd.counters().rx.snapshot().packets,
            0,
            "tallied, not yet counted"
        );
        assert_eq!(fwd.counters().drops(DropReason::UnknownPeer), 1);
        tally.commit(&fwd, &t);
        let (node_rx, peer_rx) = (fwd.counters().rx.snapshot(), t.counters(a).snapshot().rx);
        assert_eq!((node_rx.packets, node_rx.bytes), (3, 90));
        assert_eq!((peer_rx.packets, peer_rx.bytes), (3, 90));
        tally.commit(&fwd, &t);
        assert_eq!(
            fwd.counters().rx.snapshot().packets,
            3,
            "a commit empties the tally"
        );
    }

    #[test]
    fn inbound_ipip_checks_in_order() {
        let (fwd, t) = pair(2, Encap::Ipip);
        let drop = |outer: &[u8]| match fwd.inbound_ipip(&t, outer) {
            Inbound::Drop(r) => r,
            Inbound::Deliver(_) => panic!("delivered"),
        };
        assert_eq!(drop(&IPIP_OUTER[..10]), DropReason::Malformed);
        let mut stranger = ipip_from_1(&INNER);
        stranger[12..16].copy_from_slice(&[198, 18, 0, 99]);
        fix_checksum(&mut stranger);
        assert_eq!(drop(&stranger), DropReason::UnknownPeer);
        // A stranger's garbage is unknown_peer, not malformed.
        stranger[0] = 0;
        assert_eq!(drop(&stranger), DropReason::UnknownPeer);
        let mut bad_outer = ipip_from_1(&INNER);
        bad_outer[11] ^= 0xff;
        assert_eq!(drop(&bad_outer), DropReason::Malformed);
        assert_eq!(drop(&ipip_from_1(&INNER[..25])), DropReason::Malformed);

        let mut v6 = INNER;
        v6[0] = 0x60;
        assert_eq!(drop(&ipip_from_1(&v6)), DropReason::NotIpv4);
        let mut bad_inner = INNER;
        bad_inner[11] ^= 1;
        assert_eq!(drop(&ipip_from_1(&bad_inner)), DropReason::Malformed);

        let with = |src: [u8; 4], dst: [u8; 4]| {
            let mut p = INNER;
            p[12..16].copy_from_slice(&src);
            p[16..20].copy_from_slice(&dst);
            fix_checksum(&mut p);
            ipip_from_1(&p)
        };
        assert_eq!(
            drop(&with([10, 244, 1, 2], [10, 244, 3, 3])),
            DropReason::NotLocal
        );
        assert_eq!(
            drop(&with([10, 244, 3, 2], [10, 244, 2, 3])),
            DropReason::Spoofed
        );
        // NotLocal is checked before Spoofed.
        assert_eq!(
            drop(&with([10, 244, 3, 2], [10, 244, 3, 3])),
            DropReason::NotLocal
        );
        let c = fwd.counters();
        assert_eq!(c.drops(DropReason::Malformed), 4);
        assert_eq!(c.drops(DropReason::UnknownPeer), 2);
        assert_eq!(c.drops(DropReason::NotLocal), 2);
        assert_eq!(c.drops(DropReason::Spoofed), 1);
        assert_eq!(c.rx.snapshot().packets, 0);
    }

    #[test]
    fn inbound_vxlan_delivers_and_checks_vni() {
        let (fwd, t) = pair(2, vxlan1());
        let mut payload = VXLAN_PREFIX.to_vec();
        payload.extend_from_slice(&INNER);
        let from1 = ip("198.18.0.1");
        assert_eq!(
            fwd.inbound_vxlan(&t, from1, &payload),
            Inbound::Deliver(&INNER[..])
        );
        assert_eq!(
            fwd.inbound_vxlan(&t, ip("198.18.0.99"), &payload),
            Inbound::Drop(DropReason::UnknownPeer)
        );
        let mut other_vni = payload.clone();
        other_vni[6] = 2;
        assert_eq!(
            fwd.inbound_vxlan(&t, from1, &other_vni),
            Inbound::Drop(DropReason::WrongVni)
        );
        let mut no_i_flag = payload.clone();
        no_i_flag[0] = 0;
        assert_eq!(
            fwd.inbound_vxlan(&t, from1, &no_i_flag),
            Inbound::Drop(DropReason::Malformed)
        );
        let mut ipv6_frame = payload.clone();
        ipv6_frame[20..22].copy_from_slice(&[0x86, 0xdd]);
        assert_eq!(
            fwd.inbound_vxlan(&t, from1, &ipv6_frame),
            Inbound::Drop(DropReason::NotIpv4)
        );
        assert_eq!(
            fwd.inbound_vxlan(&t, from1, &payload[..30]),
            Inbound::Drop(DropReason::Malformed)
        );
        // The spoofing check uses the peer the packet came from, not the inner source's owner.
        assert_eq!(
            fwd.inbound_vxlan(&t, ip("198.18.0.3"), &payload),
            Inbound::Drop(DropReason::Spoofed)
        );
    }

    #[test]
    fn nonzero_vni_is_honoured() {
        let vni = Vni::new(0x00ab_cdef).unwrap();
        let (a, b, t) = (
            node(1, Encap::Vxlan { vni }),
            node(2, Encap::Vxlan { vni }),
            table(),
        );
        let (bytes, _) = out(&a, &t, &INNER);
        assert_eq!(bytes[4..7], [0xab, 0xcd, 0xef]);
        assert_eq!(
            b.inbound_vxlan(&t, ip("198.18.0.1"), &bytes),
            Inbound::Deliver(&INNER[..])
        );
        let default = node(2, vxlan1());
        assert_eq!(
            default.inbound_vxlan(&t, ip("198.18.0.1"), &bytes),
            Inbound::Drop(DropReason::WrongVni)
        );
    }

    #[test]
    fn encap_overheads() {
        assert_eq!(Encap::Ipip.overhead(), 20);
        assert_eq!(vxlan1().overhead(), 50);
        assert_eq!(vxlan1().name(), "vxlan");
        const { assert!(HEADROOM >= ipip::OVERHEAD) };
    }
}

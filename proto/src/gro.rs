//! Coalescing of received TCP/IPv4 segments into super-packets for one TUN write (receive
//! offload in userspace, the counterpart of [`gso`](crate::gso)).
//!
//! After decapsulation the inner packets of one receive batch are pushed into a [`Coalescer`].
//! Consecutive segments of one TCP flow are merged into a single packet of up to 64 KiB that
//! is written to the TUN with a [`VirtioNetHdr`] of type `GSO_TCPV4`, so the kernel handles
//! one skb instead of ~44. Only segments the kernel's own GRO would merge are merged
//! (`inet_gro_receive`, `inet_gro_flush`, `tcp_gro_receive` in `net/ipv4/`):
//!
//! - same addresses and ports; IPv4 without options, not a fragment, same TOS, TTL and DF;
//!   IP IDs counting up by one per segment (or all equal when DF is set);
//! - identical TCP header length and option bytes (timestamps included), the same ACK number,
//!   the same flags except CWR/FIN/PSH; a segment with CWR is never appended;
//! - sequence numbers contiguous; every segment the size of the first except a shorter last;
//! - at most 65535 bytes in total;
//! - valid IPv4 header and TCP checksums on every segment (a bad one is passed through alone
//!   so the kernel drops and counts it).
//!
//! A flow's super-packet is finished as soon as a segment is shorter than the first or
//! carries PSH, FIN, URG, RST or SYN (it is appended first if it qualifies), and at [`flush`]
//! at the end of every batch: nothing is held across batches, so no timer is needed.
//! Everything else (non-TCP, pure ACKs, SYNs, malformed packets) is passed through unchanged
//! behind an all-zero virtio header. Packets of one flow keep their order.
//!
//! [`flush`]: Coalescer::flush

use crate::checksum;
use crate::gso::{tcp, TcpIpv4};
use crate::ipv4::{self, Ipv4Packet};
use crate::virtio::{self, VirtioNetHdr, F_NEEDS_CSUM, GSO_ECN, GSO_TCPV4, TCP_CSUM_OFFSET};

/// Largest packet the coalescer builds (the IPv4 total length limit).
pub const MAX_PACKET: usize = u16::MAX as usize;
/// Flows held at once by [`Coalescer::new`].
pub const DEFAULT_FLOWS: usize = 8;
/// Size of one output: virtio header plus the largest packet.
pub const MAX_OUTPUT: usize = virtio::HEADER_LEN + MAX_PACKET;

/// TCP flags that end a super-packet (after the segment carrying them).
const FLUSH_FLAGS: u8 = tcp::URG | tcp::PSH | tcp::RST | tcp::SYN | tcp::FIN;
/// TCP flags that may differ between merged segments.
const MAY_DIFFER: u8 = tcp::CWR | tcp::FIN | tcp::PSH;
/// The IPv4 flags/fragment field may hold only DF for coalescing (`inet_gro_receive`).
const IP_DF: u16 = 0x4000;

/// Addresses and ports of a TCP/IPv4 flow, as the 12 bytes they occupy in the headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct FlowKey([u8; 12]);

impl FlowKey {
    fn of(p: &TcpIpv4<'_>) -> FlowKey {
        let mut k = [0u8; 12];
        k[..8].copy_from_slice(&p.packet[12..20]);
        k[8..].copy_from_slice(&p.packet[p.ip_len..p.ip_len + 4]);
        FlowKey(k)
    }
}

/// One flow being coalesced: the first segment's headers and all payloads so far, in place
/// behind room for the virtio header.
struct Flow {
    key: FlowKey,
    /// `[virtio header][IPv4 header][TCP header][payload ...]`, `MAX_OUTPUT` bytes.
    buf: Box<[u8]>,
    /// Bytes of IPv4 packet held (from `buf[virtio::HEADER_LEN]`); 0 when the slot is free.
    len: usize,
    /// TCP header length of the first segment.
    tcp_len: usize,
    /// Payload length of the first segment: every later one but the last must match it.
    mss: usize,
    /// Segments merged.
    count: u16,
    /// Sequence number the next segment must carry.
    next_seq: u32,
    /// IP IDs are all equal (allowed with DF), decided at the second segment.
    fixed_id: bool,
    /// FIN/PSH of merged segments, ORed into the header when finished.
    extra_flags: u8,
    /// When the flow started, for evicting the oldest when the table is full.
    started: u64,
}

impl Flow {
    fn held(&self) -> &[u8] {
        &self.buf[virtio::HEADER_LEN..virtio::HEADER_LEN + self.len]
    }
}

/// Merges TCP segments of a receive batch into super-packets; see the module docs.
///
/// Holds a fixed table of flows with one 64 KiB buffer each (allocated once in the
/// constructor) and a scratch buffer for pass-through packets; no allocation per packet.
/// Every output goes to the `emit` callback as one contiguous `[virtio header][IPv4 packet]`,
/// ready for a single `write` to a TUN opened with `IFF_VNET_HDR`.
pub struct Coalescer {
    flows: Box<[Flow]>,
    scratch: Box<[u8]>,
    clock: u64,
}

impl Default for Coalescer {
    fn default() -> Self {
        Coalescer::new()
    }
}

impl Coalescer {
    /// A coalescer holding up to [`DEFAULT_FLOWS`] flows at once.
    pub fn new() -> Coalescer {
        Coalescer::with_flows(DEFAULT_FLOWS)
    }

    /// A coalescer holding up to `flows` flows at once (at least one). When a new flow arrives
    /// and all are taken, the oldest is finished and emitted.
    pub fn with_flows(flows: usize) -> Coalescer {
        let flows = (0..flows.max(1))
            .map(|_| Flow {
                key: FlowKey::default(),
                buf: vec![0u8; MAX_OUTPUT].into_boxed_slice(),
                len: 0,
                tcp_len: 0,
                mss: 0,
                count: 0,
                next_seq: 0,
                fixed_id: false,
                extra_flags: 0,
                started: 0,
            })
            .collect();
        Coalescer {
            flows,
            scratch: vec![0u8; MAX_OUTPUT].into_boxed_slice(),
            clock: 0,
        }
    }

    /// Flows currently held (emitted at the latest by [`flush`](Self::flush)).
    pub fn held(&self) -> usize {
        self.flows.iter().filter(|f| f.len != 0).count()
    }

    /// Takes one received inner IPv4 packet (bytes after the trailing link padding are
    /// dropped). Calls `emit` for every output that became ready, possibly none.
    pub fn push(&mut self, packet: &[u8], mut emit: impl FnMut(&[u8])) {
        let Ok(pkt) = TcpIpv4::parse(packet) else {
            // Non-TCP or malformed: the kernel gets it as it is and decides.
            let bytes = Ipv4Packet::new_checked(packet).map_or(packet, |ip| &packet[..ip.total_len()]);
            self.pass_through(bytes, &mut emit);
            return;
        };
        let key = FlowKey::of(&pkt);
        let slot = self.flows.iter().position(|f| f.len != 0 && f.key == key);
        let eligible = pkt.ip_len == ipv4::HEADER_LEN
            && frag_field(pkt.packet) & !IP_DF == 0
            && checksum::checksum(&pkt.packet[..pkt.ip_len]) == 0
            && pkt.tcp_checksum_ok();
        if !eligible {
            if let Some(i) = slot {
                self.finish(i, &mut emit);
            }
            self.pass_through(pkt.packet, &mut emit);
            return;
        }
        let flags = pkt.tcp()[tcp::FLAGS];
        if let Some(i) = slot {
            if self.flows[i].try_append(&pkt) {
                let f = &self.flows[i];
                if pkt.payload().len() < f.mss || flags & FLUSH_FLAGS != 0 {
                    self.finish(i, &mut emit);
                }
                return;
            }
            self.finish(i, &mut emit);
        }
        // A new flow starts only with a segment that could be followed by more.
        if pkt.payload().is_empty() || flags & FLUSH_FLAGS != 0 {
            self.pass_through(pkt.packet, &mut emit);
            return;
        }
        let i = match self.flows.iter().position(|f| f.len == 0) {
            Some(i) => i,
            None => {
                let oldest = (0..self.flows.len())
                    .min_by_key(|&i| self.flows[i].started)
                    .unwrap_or(0);
                self.finish(oldest, &mut emit);
                oldest
            }
        };
        self.clock += 1;
        self.flows[i].start(key, &pkt, self.clock);
    }

    /// Emits every held flow. Call at the end of each receive batch.
    pub fn flush(&mut self, mut emit: impl FnMut(&[u8])) {
        // Oldest first, so flows come out in the order they started.
        while let Some(i) = (0..self.flows.len())
            .filter(|&i| self.flows[i].len != 0)
            .min_by_key(|&i| self.flows[i].started)
        {
            self.finish(i, &mut emit);
        }
    }

    fn pass_through(&mut self, packet: &[u8], emit: &mut impl FnMut(&[u8])) {
        let len = virtio::HEADER_LEN + packet.len();
        // Callers hand in packets of at most 64 KiB; anything longer cannot be an IPv4
        // packet and is cut to what the kernel would accept anyway.
        let len = len.min(self.scratch.len());
        self.scratch[..virtio::HEADER_LEN].copy_from_slice(&VirtioNetHdr::NONE.to_bytes());
        self.scratch[virtio::HEADER_LEN..len].copy_from_slice(&packet[..len - virtio::HEADER_LEN]);
        emit(&self.scratch[..len]);
    }

    /// Emits flow `i` and frees its slot.
    fn finish(&mut self, i: usize, emit: &mut impl FnMut(&[u8])) {
        let f = &mut self.flows[i];
        let out_len = virtio::HEADER_LEN + f.len;
        let hdr = if f.count <= 1 {
            // A lone segment goes out exactly as it came.
            VirtioNetHdr::NONE
        } else {
            f.seal()
        };
        f.buf[..virtio::HEADER_LEN].copy_from_slice(&hdr.to_bytes());
        f.len = 0;
        emit(&f.buf[..out_len]);
    }
}

/// The IPv4 flags + fragment offset field.
fn frag_field(packet: &[u8]) -> u16 {
    u16::from_be_bytes([packet[6], packet[7]])
}

impl Flow {
    fn start(&mut self, key: FlowKey, pkt: &TcpIpv4<'_>, now: u64) {
        let n = pkt.packet.len();
        self.buf[virtio::HEADER_LEN..virtio::HEADER_LEN + n].copy_from_slice(pkt.packet);
        self.key = key;
        self.len = n;
        self.tcp_len = pkt.tcp_len;
        self.mss = pkt.payload().len();
        self.count = 1;
        self.next_seq = seq_of(pkt.tcp()).wrapping_add(self.mss as u32);
        self.fixed_id = false;
        self.extra_flags = 0;
        self.started = now;
    }

    /// Appends `pkt`'s payload if the kernel's GRO rules allow it; returns whether it did.
    fn try_append(&mut self, pkt: &TcpIpv4<'_>) -> bool {
        let head = self.held();
        let (ip, ip2) = (pkt.packet, head);
        // IPv4: TOS, TTL and DF equal (inet_gro_flush); options were ruled out by the caller.
        if ip[1] != ip2[1] || ip[8] != ip2[8] || frag_field(ip) != frag_field(ip2) {
            return false;
        }
        let id = u16::from_be_bytes([ip[4], ip[5]]);
        let id2 = u16::from_be_bytes([ip2[4], ip2[5]]);
        let id_offset = id.wrapping_sub(id2);
        let dont_frag = frag_field(ip) & IP_DF != 0;
        let fixed_id = self.fixed_id || (self.count == 1 && dont_frag && id_offset == 0);
        let want = if fixed_id { 0 } else { self.count };
        if id_offset != want {
            return false;
        }

        // TCP (tcp_gro_receive): header with options byte for byte except seq, flags, window,
        // checksum and urgent pointer; ACK number equal.
        let th = pkt.tcp();
        let th2 = &head[ipv4::HEADER_LEN..ipv4::HEADER_LEN + self.tcp_len];
        let flags = th[tcp::FLAGS];
        let flags2 = th2[tcp::FLAGS];
        if th.len() != th2.len()
            || th[tcp::ACK..tcp::ACK + 4] != th2[tcp::ACK..tcp::ACK + 4]
            || th[tcp::HEADER_LEN..] != th2[tcp::HEADER_LEN..]
            || flags & tcp::CWR != 0
            || (flags ^ flags2) & !MAY_DIFFER != 0
        {
            return false;
        }
        let len = pkt.payload().len();
        if len == 0 || len > self.mss || seq_of(th) != self.next_seq {
            return false;
        }
        if self.len + len > MAX_PACKET {
            return false;
        }

        let at = virtio::HEADER_LEN + self.len;
        self.buf[at..at + len].copy_from_slice(pkt.payload());
        self.len += len;
        self.count += 1;
        self.next_seq = self.next_seq.wrapping_add(len as u32);
        self.fixed_id = fixed_id;
        self.extra_flags |= flags & (tcp::FIN | tcp::PSH);
        true
    }

    /// Rewrites the first segment's headers for the whole super-packet and returns the virtio
    /// header for it: IPv4 total length and checksum, FIN/PSH of the merged segments, and the
    /// TCP checksum field seeded with the pseudo-header sum for `F_NEEDS_CSUM` (what the kernel
    /// expects for CHECKSUM_PARTIAL: `~tcp_v4_check(len, saddr, daddr, 0)`).
    fn seal(&mut self) -> VirtioNetHdr {
        let h = virtio::HEADER_LEN;
        let ip_len = ipv4::HEADER_LEN;
        let total = self.len as u16; // at most MAX_PACKET by construction
        let b = &mut self.buf[h..h + self.len];
        b[2..4].copy_from_slice(&total.to_be_bytes());
        b[10..12].fill(0);
        let ip_sum = checksum::checksum(&b[..ip_len]);
        b[10..12].copy_from_slice(&ip_sum.to_be_bytes());

        let src = std::net::Ipv4Addr::new(b[12], b[13], b[14], b[15]);
        let dst = std::net::Ipv4Addr::new(b[16], b[17], b[18], b[19]);
        b[ip_len + tcp::FLAGS] |= self.extra_flags;
        let cwr = b[ip_len + tcp::FLAGS] & tcp::CWR != 0;
        let seed = checksum::fold(checksum::pseudo_header(
            src,
            dst,
            ipv4::protocol::TCP,
            total - ip_len as u16,
        ));
        let c = ip_len + tcp::CHECKSUM;
        b[c..c + 2].copy_from_slice(&seed.to_be_bytes());

        VirtioNetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: if cwr { GSO_TCPV4 | GSO_ECN } else { GSO_TCPV4 },
            hdr_len: (ip_len + self.tcp_len) as u16,
            gso_size: self.mss as u16,
            csum_start: ip_len as u16,
            csum_offset: TCP_CSUM_OFFSET,
        }
    }
}

fn seq_of(th: &[u8]) -> u32 {
    u32::from_be_bytes([
        th[tcp::SEQ],
        th[tcp::SEQ + 1],
        th[tcp::SEQ + 2],
        th[tcp::SEQ + 3],
    ])
}

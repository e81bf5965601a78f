//! Coalescing of received TCP/IPv4 segments into super-packets for one TUN write (receive
//! offload in userspace, the counterpart of [`gso`]).
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
//!   so the kernel drops and counts it). A checksum the sender's offload left partial (the
//!   field holds the pseudo-header sum, [`gso::partial_checksum`]) counts as valid, as the
//!   kernel trusts `CHECKSUM_PARTIAL` across veth: the merged packet's checksum is completed
//!   by the kernel, and a partial one passed through alone is handed over with
//!   `F_NEEDS_CSUM`.
//!
//! A flow's super-packet is finished as soon as a segment is shorter than the first or
//! carries PSH, FIN, URG, RST or SYN (it is appended first if it qualifies), and at [`flush`]
//! at the end of every batch: nothing is held across batches, so no timer is needed.
//! Everything else (non-TCP, pure ACKs, SYNs, malformed packets) is passed through unchanged
//! behind an all-zero virtio header (`F_NEEDS_CSUM` for a partial checksum). Packets of one
//! flow keep their order.
//!
//! Payloads are not copied: the coalescer keeps the first segment's headers and, for every
//! segment, where its payload lies in the caller's receive buffers ([`Span`]). An output is a
//! list of slices (header, then payloads) for one vectored write (`writev`) to the TUN. The
//! caller passes the same, unchanged buffers to every call until [`flush`].
//!
//! [`flush`]: Coalescer::flush

use std::io::IoSlice;

use crate::checksum;
use crate::error::{Layer, WireError};
use crate::gso::{self, tcp, TcpIpv4};
use crate::ipv4::{self, Ipv4Packet};
use crate::virtio::{
    self, OffloadError, VirtioNetHdr, F_NEEDS_CSUM, GSO_ECN, GSO_NONE, GSO_TCPV4, TCP_CSUM_OFFSET,
};

/// Largest packet the coalescer builds (the IPv4 total length limit).
pub const MAX_PACKET: usize = u16::MAX as usize;
/// Flows held at once by [`Coalescer::new`].
pub const DEFAULT_FLOWS: usize = 8;
/// Segments merged into one super-packet at most, so an output is at most this many payload
/// slices behind its header. 64 KiB of segments of the smallest IPv4 MSS (536) fit.
pub const MAX_SEGMENTS: usize = 128;
/// Slices in one output at most: the header and [`MAX_SEGMENTS`] payloads.
pub const MAX_SLICES: usize = 1 + MAX_SEGMENTS;
/// IPv4 (no options, which coalescing rules out) and the longest TCP header.
const MAX_HEADERS: usize = ipv4::HEADER_LEN + 60;

/// Bytes `start..end` of the caller's buffer number `buf`: where a pushed packet lies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Span {
    pub buf: usize,
    pub start: usize,
    pub end: usize,
}

impl Span {
    /// All of buffer `buf`, `len` bytes long.
    pub fn whole(buf: usize, len: usize) -> Span {
        Span {
            buf,
            start: 0,
            end: len,
        }
    }

    fn len(&self) -> usize {
        self.end - self.start
    }

    /// The first `len` bytes from `skip` on.
    fn sub(&self, skip: usize, len: usize) -> Span {
        Span {
            buf: self.buf,
            start: self.start + skip,
            end: self.start + skip + len,
        }
    }

    /// The bytes in `bufs`; empty if the caller changed its buffers in between.
    fn resolve<'b, B: AsRef<[u8]>>(&self, bufs: &'b [B]) -> &'b [u8] {
        bufs.get(self.buf)
            .and_then(|b| b.as_ref().get(self.start..self.end))
            .unwrap_or_default()
    }
}

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

/// One flow being coalesced: the first segment's headers (behind room for the virtio header)
/// and where every payload so far lies.
struct Flow {
    key: FlowKey,
    /// `[virtio header][IPv4 header][TCP header]` of the first segment.
    head: [u8; virtio::HEADER_LEN + MAX_HEADERS],
    /// The payloads, in order; `count` of them are used.
    payloads: [Span; MAX_SEGMENTS],
    /// Bytes of IPv4 packet held (headers and payloads); 0 when the slot is free.
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
    /// Bytes of `head` in use: the virtio header and the first segment's IPv4 and TCP headers.
    fn head_len(&self) -> usize {
        virtio::HEADER_LEN + ipv4::HEADER_LEN + self.tcp_len
    }

    /// The first segment's IPv4 and TCP headers.
    fn headers(&self) -> &[u8] {
        &self.head[virtio::HEADER_LEN..self.head_len()]
    }
}

/// Merges TCP segments of a receive batch into super-packets; see the module docs.
///
/// Holds a fixed table of flows (allocated once in the constructor); no allocation per packet.
/// Every output goes to the `emit` callback as the slices of `[virtio header][IPv4 packet]`,
/// ready for a single `writev` to a TUN opened with `IFF_VNET_HDR`.
pub struct Coalescer {
    flows: Box<[Flow]>,
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
                head: [0; virtio::HEADER_LEN + MAX_HEADERS],
                payloads: [Span::default(); MAX_SEGMENTS],
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
        Coalescer { flows, clock: 0 }
    }

    /// Flows currently held (emitted at the latest by [`flush`](Self::flush)).
    pub fn held(&self) -> usize {
        self.flows.iter().filter(|f| f.len != 0).count()
    }

    /// Takes one received inner IPv4 packet, `at` in `bufs` (bytes after the trailing link
    /// padding are dropped). Calls `emit` for every output that became ready: none (the
    /// segment is held), one, or two (a held flow finished first, then this packet passed
    /// through). Held segments stay in `bufs`: pass the same buffers until [`flush`].
    ///
    /// [`flush`]: Self::flush
    pub fn push<B: AsRef<[u8]>>(
        &mut self,
        bufs: &[B],
        at: Span,
        mut emit: impl FnMut(&[IoSlice<'_>]),
    ) {
        let packet = at.resolve(bufs);
        let Ok(pkt) = TcpIpv4::parse(packet) else {
            // Non-TCP or malformed: the kernel gets it as it is and decides.
            let len = Ipv4Packet::new_checked(packet).map_or(packet.len(), |ip| ip.total_len());
            self.pass_through(bufs, at.sub(0, len), &mut emit);
            return;
        };
        let at = at.sub(0, pkt.packet.len());
        let key = FlowKey::of(&pkt);
        let slot = self.flows.iter().position(|f| f.len != 0 && f.key == key);
        let eligible = pkt.ip_len == ipv4::HEADER_LEN
            && frag_field(pkt.packet) & !IP_DF == 0
            && checksum::checksum(&pkt.packet[..pkt.ip_len]) == 0
            && (gso::partial_checksum(pkt.packet).is_some() || pkt.tcp_checksum_ok());
        if !eligible {
            if let Some(i) = slot {
                self.finish(i, bufs, &mut emit);
            }
            self.pass_through(bufs, at, &mut emit);
            return;
        }
        let flags = pkt.tcp()[tcp::FLAGS];
        let payload = at.sub(pkt.headers_len(), pkt.payload().len());
        if let Some(i) = slot {
            if self.flows[i].try_append(&pkt, payload) {
                let f = &self.flows[i];
                if payload.len() < f.mss || flags & FLUSH_FLAGS != 0 || f.count_full() {
                    self.finish(i, bufs, &mut emit);
                }
                return;
            }
            self.finish(i, bufs, &mut emit);
        }
        // A new flow starts only with a segment that could be followed by more.
        if payload.len() == 0 || flags & FLUSH_FLAGS != 0 {
            self.pass_through(bufs, at, &mut emit);
            return;
        }
        let i = match self.flows.iter().position(|f| f.len == 0) {
            Some(i) => i,
            None => {
                let oldest = (0..self.flows.len())
                    .min_by_key(|&i| self.flows[i].started)
                    .unwrap_or(0);
                self.finish(oldest, bufs, &mut emit);
                oldest
            }
        };
        self.clock += 1;
        self.flows[i].start(key, &pkt, payload, self.clock);
    }

    /// Emits every held flow. Call at the end of each receive batch, with the buffers the
    /// held segments were pushed from.
    pub fn flush<B: AsRef<[u8]>>(&mut self, bufs: &[B], mut emit: impl FnMut(&[IoSlice<'_>])) {
        // Oldest first, so flows come out in the order they started.
        while let Some(i) = (0..self.flows.len())
            .filter(|&i| self.flows[i].len != 0)
            .min_by_key(|&i| self.flows[i].started)
        {
            self.finish(i, bufs, &mut emit);
        }
    }

    fn pass_through<B: AsRef<[u8]>>(
        &mut self,
        bufs: &[B],
        packet: Span,
        emit: &mut impl FnMut(&[IoSlice<'_>]),
    ) {
        let packet = packet.resolve(bufs);
        let hdr = handed_over(packet).to_bytes();
        emit(&[IoSlice::new(&hdr), IoSlice::new(packet)]);
    }

    /// Emits flow `i` and frees its slot.
    fn finish<B: AsRef<[u8]>>(
        &mut self,
        i: usize,
        bufs: &[B],
        emit: &mut impl FnMut(&[IoSlice<'_>]),
    ) {
        let f = &mut self.flows[i];
        let hdr = if f.count <= 1 {
            // A lone segment goes out exactly as it came.
            handed_over(&f.head[virtio::HEADER_LEN..f.head_len()])
        } else {
            f.seal()
        };
        f.head[..virtio::HEADER_LEN].copy_from_slice(&hdr.to_bytes());
        f.len = 0;
        let f = &self.flows[i];
        let mut out = [IoSlice::new(&[]); MAX_SLICES];
        let n = 1 + usize::from(f.count);
        out[0] = IoSlice::new(&f.head[..f.head_len()]);
        for (slot, payload) in out[1..n].iter_mut().zip(&f.payloads) {
            *slot = IoSlice::new(payload.resolve(bufs));
        }
        emit(&out[..n]);
    }
}

/// The virtio header for writing `packet` (its headers at least) to the TUN on its own: a
/// checksum a sender's offload left partial is handed to the kernel to complete
/// ([`gso::partial_checksum`]), anything else goes as it is.
fn handed_over(packet: &[u8]) -> VirtioNetHdr {
    gso::partial_checksum(packet).unwrap_or(VirtioNetHdr::NONE)
}

/// Prepares a TCP/IPv4 packet that arrived already merged for one GSO write to the TUN.
///
/// A host's own GRO (a NIC, or a veth with GRO on) merges consecutive IP-in-IP TCP segments
/// before the raw socket sees them, so the receive path can get an inner packet of up to
/// 64 KiB, longer than `mtu` allows on any wire. The kernel leaves its TCP checksum field
/// seeded with the pseudo-header sum (`tcp4_gro_complete`) after verifying every merged
/// segment. Written as it is the packet would be dropped (too big to forward), so it goes out
/// as a TSO super-packet instead: `gso_size` is the largest payload a `mtu`-sized packet with
/// these headers carries, and the kernel recomputes each segment's checksum from the seed.
///
/// Accepts the packet if its TCP checksum field holds exactly that seed (the kernel merged
/// it) or if the whole checksum verifies (a jumbo packet from a peer); anything else is a
/// corrupted packet and is refused. On success the checksum field holds the seed.
pub fn offload_merged(packet: &mut [u8], mtu: u16) -> Result<VirtioNetHdr, OffloadError> {
    let pkt = TcpIpv4::parse(packet)?;
    let (ip_len, tcp_len, total) = (pkt.ip_len, pkt.tcp_len, pkt.packet.len());
    if checksum::checksum(&pkt.packet[..ip_len]) != 0 {
        return Err(WireError::BadChecksum(Layer::Ipv4).into());
    }
    let c = ip_len + tcp::CHECKSUM;
    let stored = u16::from_be_bytes([pkt.packet[c], pkt.packet[c + 1]]);
    if stored != tcp_seed(pkt.packet, ip_len, total) && !pkt.tcp_checksum_ok() {
        return Err(WireError::BadChecksum(Layer::Tcp).into());
    }
    let mss = usize::from(mtu)
        .checked_sub(ip_len + tcp_len)
        .filter(|&m| m > 0)
        .ok_or(OffloadError::ZeroGsoSize)?;
    Ok(gso_write(packet, ip_len, tcp_len, total, mss))
}

/// The pseudo-header sum (folded, not complemented) that the checksum field of a TCP/IPv4
/// packet of `total` bytes starting with the headers `b` (`ip_len`-byte IPv4 header) holds
/// when the kernel is to complete the checksum (`VIRTIO_NET_HDR_F_NEEDS_CSUM`, TSO).
fn tcp_seed(b: &[u8], ip_len: usize, total: usize) -> u16 {
    let src = std::net::Ipv4Addr::new(b[12], b[13], b[14], b[15]);
    let dst = std::net::Ipv4Addr::new(b[16], b[17], b[18], b[19]);
    // total <= u16::MAX: it is the IPv4 total length.
    let len = (total - ip_len) as u16;
    checksum::fold(checksum::pseudo_header(src, dst, ipv4::protocol::TCP, len))
}

/// Seeds the TCP checksum field in the headers `b` of a TCP/IPv4 packet of `total` bytes with
/// [`tcp_seed`] and returns the virtio header for writing it to the TUN as one packet that the
/// kernel cuts into `mss`-byte segments (no GSO when it is not longer than one).
fn gso_write(
    b: &mut [u8],
    ip_len: usize,
    tcp_len: usize,
    total: usize,
    mss: usize,
) -> VirtioNetHdr {
    let seed = tcp_seed(b, ip_len, total);
    let c = ip_len + tcp::CHECKSUM;
    b[c..c + 2].copy_from_slice(&seed.to_be_bytes());
    let segments = total - ip_len - tcp_len > mss;
    let cwr = b[ip_len + tcp::FLAGS] & tcp::CWR != 0;
    VirtioNetHdr {
        flags: F_NEEDS_CSUM,
        gso_type: match (segments, cwr) {
            (false, _) => GSO_NONE,
            (true, false) => GSO_TCPV4,
            (true, true) => GSO_TCPV4 | GSO_ECN,
        },
        hdr_len: (ip_len + tcp_len) as u16,
        gso_size: if segments { mss as u16 } else { 0 },
        csum_start: ip_len as u16,
        csum_offset: TCP_CSUM_OFFSET,
    }
}

/// The IPv4 flags + fragment offset field.
fn frag_field(packet: &[u8]) -> u16 {
    u16::from_be_bytes([packet[6], packet[7]])
}

impl Flow {
    /// Starts the flow with `pkt`, whose payload lies at `payload` (never empty).
    fn start(&mut self, key: FlowKey, pkt: &TcpIpv4<'_>, payload: Span, now: u64) {
        let n = pkt.headers_len();
        self.head[virtio::HEADER_LEN..virtio::HEADER_LEN + n].copy_from_slice(&pkt.packet[..n]);
        self.payloads[0] = payload;
        self.key = key;
        self.len = pkt.packet.len();
        self.tcp_len = pkt.tcp_len;
        self.mss = payload.len();
        self.count = 1;
        self.next_seq = seq_of(pkt.tcp()).wrapping_add(self.mss as u32);
        self.fixed_id = false;
        self.extra_flags = 0;
        self.started = now;
    }

    /// True when no further segment fits the flow's list of payloads.
    fn count_full(&self) -> bool {
        usize::from(self.count) == MAX_SEGMENTS
    }

    /// Appends `pkt`'s payload (lying at `payload`) if the kernel's GRO rules allow it;
    /// returns whether it did.
    fn try_append(&mut self, pkt: &TcpIpv4<'_>, payload: Span) -> bool {
        let head = self.headers();
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
        let len = payload.len();
        if len == 0 || len > self.mss || seq_of(th) != self.next_seq {
            return false;
        }
        if self.len + len > MAX_PACKET || self.count_full() {
            return false;
        }

        self.payloads[usize::from(self.count)] = payload;
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
        let end = self.head_len();
        let b = &mut self.head[h..end];
        b[2..4].copy_from_slice(&total.to_be_bytes());
        b[10..12].fill(0);
        let ip_sum = checksum::checksum(&b[..ip_len]);
        b[10..12].copy_from_slice(&ip_sum.to_be_bytes());

        b[ip_len + tcp::FLAGS] |= self.extra_flags;
        gso_write(b, ip_len, self.tcp_len, self.len, self.mss)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gso::tests::{arb_spec, assert_checksums_ok, build, build_super, Spec};
    use crate::gso::{segment, Segments};
    use crate::virtio::HEADER_LEN;
    use proptest::prelude::*;

    /// Inputs of one flow not yet matched to an output.
    type Queue<'a> = std::collections::VecDeque<&'a Vec<u8>>;

    /// Everything the coalescer emitted: (virtio header, packet).
    fn run(c: &mut Coalescer, packets: &[Vec<u8>]) -> Vec<(VirtioNetHdr, Vec<u8>)> {
        let mut out = Vec::new();
        push_all(c, packets, &mut out);
        c.flush(packets, |b| out.push(split(b)));
        assert_eq!(c.held(), 0);
        out
    }

    /// Pushes every packet (each its own buffer), collecting what comes out before a flush.
    fn push_all(c: &mut Coalescer, packets: &[Vec<u8>], out: &mut Vec<(VirtioNetHdr, Vec<u8>)>) {
        for (i, p) in packets.iter().enumerate() {
            c.push(packets, Span::whole(i, p.len()), |b| out.push(split(b)));
        }
    }

    /// One output, gathered: (virtio header, packet).
    fn split(slices: &[IoSlice<'_>]) -> (VirtioNetHdr, Vec<u8>) {
        let b: Vec<u8> = slices.iter().flat_map(|s| s.iter().copied()).collect();
        (VirtioNetHdr::parse(&b).unwrap(), b[HEADER_LEN..].to_vec())
    }

    /// Segment `i` of a flow of `mss`-byte segments described by `base` (seq, ID advanced).
    fn seg(base: &Spec, mss: usize, i: usize) -> Spec {
        Spec {
            seq: base.seq.wrapping_add((i * mss) as u32),
            ident: base.ident.wrapping_add(i as u16),
            payload: (0..mss).map(|b| (b + i) as u8).collect(),
            ..base.clone()
        }
    }

    fn segs(base: &Spec, mss: usize, n: usize) -> Vec<Spec> {
        (0..n).map(|i| seg(base, mss, i)).collect()
    }

    fn built(specs: &[Spec]) -> Vec<Vec<u8>> {
        specs.iter().map(build).collect()
    }

    /// The packet the kernel's GRO would build from `specs`: the first segment's headers,
    /// all payloads, FIN/PSH of all, checksum field seeded.
    fn merged(specs: &[Spec]) -> (VirtioNetHdr, Vec<u8>) {
        let mut s = specs[0].clone();
        s.payload = specs.iter().flat_map(|s| s.payload.clone()).collect();
        s.flags |= specs
            .iter()
            .fold(0, |f, s| f | (s.flags & (tcp::FIN | tcp::PSH)));
        build_super(&s, specs[0].payload.len() as u16)
    }

    fn unchanged(p: &[u8]) -> (VirtioNetHdr, Vec<u8>) {
        (VirtioNetHdr::NONE, p.to_vec())
    }

    #[test]
    fn a_kernel_merged_packet_becomes_one_gso_write() {
        let specs = segs(&Spec::default(), 1000, 5);
        let (want, mut packet) = merged(&specs);
        let original = packet.clone();
        let hdr = offload_merged(&mut packet, 1052).unwrap();
        assert_eq!(hdr, want, "gso_size from the MTU: 1052 - 20 - 32");
        assert_eq!(packet, original, "the kernel's seed is kept");
        // Cut back into wire segments, every one carries a valid checksum.
        let mut out = vec![0u8; 4 * packet.len()];
        let s = segment(&hdr, &packet, 0, &mut out, |_, _| {}).unwrap();
        assert_eq!(s.count, 5);
        for r in s.iter() {
            assert_checksums_ok(&out[r]);
        }
        // A smaller MTU only means smaller segments.
        let hdr = offload_merged(&mut packet.clone(), 552).unwrap();
        assert_eq!(hdr.gso_size, 500);
    }

    #[test]
    fn a_jumbo_packet_with_a_full_checksum_is_accepted_and_reseeded() {
        let spec = Spec {
            payload: (0..3000).map(|b| b as u8).collect(),
            ..Spec::default()
        };
        let mut packet = build(&spec);
        assert_checksums_ok(&packet);
        let hdr = offload_merged(&mut packet, 1500).unwrap();
        assert_eq!((hdr.gso_type, hdr.gso_size), (GSO_TCPV4, 1448));
        crate::gso::complete_checksum(&hdr, &mut packet).unwrap();
        assert_checksums_ok(&packet);
    }

    #[test]
    fn merged_packets_that_do_not_verify_are_refused() {
        let specs = segs(&Spec::default(), 1000, 3);
        let (_, good) = merged(&specs);
        // Neither the seed nor a valid checksum in the TCP checksum field.
        let mut p = good.clone();
        p[20 + tcp::CHECKSUM] ^= 0x5a;
        assert_eq!(
            offload_merged(&mut p, 1052),
            Err(WireError::BadChecksum(Layer::Tcp).into())
        );
        // A broken IPv4 header checksum.
        let mut p = good.clone();
        p[8] ^= 1;
        assert_eq!(
            offload_merged(&mut p, 1052),
            Err(WireError::BadChecksum(Layer::Ipv4).into())
        );
        // Not TCP, and an MTU that leaves no room for payload.
        let mut p = good.clone();
        p[9] = 17;
        assert!(offload_merged(&mut p, 1052).is_err());
        let mut p = good.clone();
        assert_eq!(offload_merged(&mut p, 52), Err(OffloadError::ZeroGsoSize));
        // One that fits the MTU needs no segmentation, only the checksum completed.
        let mut p = good;
        let hdr = offload_merged(&mut p, 9000).unwrap();
        assert_eq!(
            (hdr.gso_type, hdr.gso_size, hdr.flags),
            (GSO_NONE, 0, F_NEEDS_CSUM)
        );
    }

    #[test]
    fn merges_consecutive_segments() {
        let specs = segs(&Spec::default(), 1000, 5);
        let out = run(&mut Coalescer::new(), &built(&specs));
        let (hdr, packet) = merged(&specs);
        assert_eq!(out, vec![(hdr, packet.clone())]);
        assert_eq!(
            hdr,
            VirtioNetHdr {
                flags: F_NEEDS_CSUM,
                gso_type: GSO_TCPV4,
                hdr_len: 52,
                gso_size: 1000,
                csum_start: 20,
                csum_offset: 16,
            }
        );
        assert_eq!(packet.len(), 52 + 5000);
        assert_eq!(packet[2..4], (5052u16).to_be_bytes());
        assert_eq!(checksum::checksum(&packet[..20]), 0, "IPv4 header checksum");
        // Completing the seeded checksum gives what etherparse computes for the whole packet.
        let mut done = packet.clone();
        crate::gso::complete_checksum(&hdr, &mut done).unwrap();
        assert_checksums_ok(&done);
    }

    #[test]
    fn psh_and_short_segments_end_the_packet_at_once() {
        let mut specs = segs(&Spec::default(), 1000, 3);
        specs[2].flags |= tcp::PSH;
        let mut c = Coalescer::new();
        let mut out = Vec::new();
        push_all(&mut c, &built(&specs), &mut out);
        assert_eq!(out, vec![merged(&specs)], "emitted before flush");
        assert_eq!(merged(&specs).1[20 + tcp::FLAGS], tcp::ACK_FLAG | tcp::PSH);

        let mut specs = segs(&Spec::default(), 1000, 4);
        specs[2].payload.truncate(10);
        specs[3].seq = specs[2].seq.wrapping_add(10);
        let p = built(&specs);
        let mut out = Vec::new();
        push_all(&mut c, &p[..3], &mut out);
        assert_eq!(out, vec![merged(&specs[..3])], "a short segment ends it");
        let out = run(&mut c, &p[3..]);
        assert_eq!(out, vec![unchanged(&p[3])]);
    }

    #[test]
    fn fin_is_merged_last_and_cwr_only_first() {
        let mut specs = segs(&Spec::default(), 500, 3);
        specs[0].flags |= tcp::CWR;
        specs[2].flags |= tcp::FIN;
        let out = run(&mut Coalescer::new(), &built(&specs));
        let (hdr, packet) = merged(&specs);
        assert_eq!(hdr.gso_type, GSO_TCPV4 | GSO_ECN);
        assert_eq!(packet[20 + tcp::FLAGS], tcp::ACK_FLAG | tcp::CWR | tcp::FIN);
        assert_eq!(out, vec![(hdr, packet)]);

        // CWR on a later segment: not appended, it starts the next packet.
        let mut specs = segs(&Spec::default(), 500, 3);
        specs[1].flags |= tcp::CWR;
        let out = run(&mut Coalescer::new(), &built(&specs));
        assert_eq!(out, vec![unchanged(&build(&specs[0])), merged(&specs[1..])]);
    }

    /// Segments 0 and 2 of a flow with segment 1 changed by `edit` (checksums recomputed):
    /// none of the three may be merged with its neighbour.
    fn assert_refused(edit: impl Fn(&mut Spec)) {
        let mut specs = segs(&Spec::default(), 1000, 3);
        edit(&mut specs[1]);
        let p = built(&specs);
        let out = run(&mut Coalescer::new(), &p);
        let want: Vec<_> = p.iter().map(|q| unchanged(q)).collect();
        assert_eq!(out, want);
    }

    #[test]
    fn refuses_what_the_kernel_refuses() {
        assert_refused(|s| s.seq = s.seq.wrapping_add(1)); // gap
        assert_refused(|s| s.ack += 1);
        assert_refused(|s| s.flags |= tcp::ECE);
        assert_refused(|s| s.flags |= tcp::URG);
        assert_refused(|s| s.ttl -= 1);
        assert_refused(|s| s.tos = 0x02);
        assert_refused(|s| s.df = false);
        assert_refused(|s| s.ident = s.ident.wrapping_add(5));
        assert_refused(|s| s.options[4] ^= 1); // TSval differs
        assert_refused(|s| s.options.truncate(8)); // option length differs
        assert_refused(|s| s.payload.push(0)); // longer than the first
    }

    #[test]
    fn syn_rst_and_pure_acks_pass_through() {
        for flags in [tcp::SYN, tcp::RST | tcp::ACK_FLAG, tcp::ACK_FLAG] {
            let s = Spec {
                flags,
                payload: if flags == tcp::ACK_FLAG {
                    vec![]
                } else {
                    vec![1; 10]
                },
                ..Spec::default()
            };
            let p = build(&s);
            assert_eq!(
                run(&mut Coalescer::new(), &[p.clone(), p.clone()]),
                vec![unchanged(&p), unchanged(&p)]
            );
        }
    }

    #[test]
    fn window_changes_do_not_prevent_merging() {
        let mut specs = segs(&Spec::default(), 100, 3);
        specs[2].window += 7;
        let out = run(&mut Coalescer::new(), &built(&specs));
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].0.gso_type, GSO_TCPV4);
    }

    #[test]
    fn bad_checksums_pass_alone_and_keep_order() {
        let specs = segs(&Spec::default(), 1000, 3);
        let mut p = built(&specs);
        p[1][100] ^= 0xff; // payload byte: TCP checksum fails
        let out = run(&mut Coalescer::new(), &p);
        assert_eq!(out, p.iter().map(|q| unchanged(q)).collect::<Vec<_>>());

        let mut p = built(&specs);
        p[1][8] ^= 1; // TTL: IPv4 header checksum fails
        let out = run(&mut Coalescer::new(), &p);
        assert_eq!(out, p.iter().map(|q| unchanged(q)).collect::<Vec<_>>());
    }

    /// `p` (a TCP/IPv4 packet) as a sender with checksum offload sends it: the checksum field
    /// holds only the pseudo-header sum.
    fn partial(p: &[u8]) -> Vec<u8> {
        let mut q = p.to_vec();
        let seed = tcp_seed(&q, 20, q.len());
        q[20 + tcp::CHECKSUM..20 + tcp::CHECKSUM + 2].copy_from_slice(&seed.to_be_bytes());
        q
    }

    /// The header of a packet that goes out alone and unchanged: all zero, or `F_NEEDS_CSUM`
    /// when its checksum field holds its pseudo-header sum, which is how a partial checksum
    /// reads (a full one does too, once in 65536: the kernel's completion then writes the
    /// same value, see `a_full_checksum_that_reads_as_partial_goes_out_as_it_came`).
    fn lone_header(p: &[u8]) -> VirtioNetHdr {
        if p.len() >= 40 && p[9] == crate::ipv4::protocol::TCP && p == partial(p).as_slice() {
            crate::gso::partial_checksum(p).expect("a TCP packet with a seeded field")
        } else {
            VirtioNetHdr::NONE
        }
    }

    #[test]
    fn a_full_checksum_that_reads_as_partial_goes_out_as_it_came() {
        // A valid packet whose full checksum equals its pseudo-header sum (found by trying
        // the last two payload bytes): the coalescer cannot tell it from a partial one.
        let lone = (0..=u16::MAX)
            .map(|x| {
                build(&Spec {
                    payload: vec![1, 2, 3, (x >> 8) as u8, x as u8],
                    ..Spec::default()
                })
            })
            .find(|p| *p == partial(p))
            .expect("some payload's checksum equals its seed");
        assert_checksums_ok(&lone);
        let out = run(&mut Coalescer::new(), std::slice::from_ref(&lone));
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].0.flags, F_NEEDS_CSUM);
        assert_eq!(out[0].1, lone, "the bytes as they came");
        assert_eq!(
            completed(out[0].clone()),
            lone,
            "the kernel completes the same value"
        );
    }

    /// What the kernel does with an `F_NEEDS_CSUM` write: completes the checksum.
    fn completed((hdr, mut p): (VirtioNetHdr, Vec<u8>)) -> Vec<u8> {
        assert_eq!(hdr.flags, F_NEEDS_CSUM, "{hdr:?}");
        crate::gso::complete_checksum(&hdr, &mut p).unwrap();
        p
    }

    #[test]
    fn partial_checksums_from_a_senders_offload_are_merged_like_valid_ones() {
        // A bulk flow from a kernel VXLAN host: every segment partial.
        let specs = segs(&Spec::default(), 1000, 4);
        let p: Vec<Vec<u8>> = built(&specs).iter().map(|q| partial(q)).collect();
        let out = run(&mut Coalescer::new(), &p);
        assert_eq!(out, vec![merged(&specs)]);

        // Alone (a pure ACK, a lone segment), each is handed to the kernel to complete, and
        // completing gives exactly the packet with its real checksum.
        let ack = build(&Spec {
            payload: vec![],
            ..Spec::default()
        });
        let lone = build(&specs[0]);
        let out = run(&mut Coalescer::new(), &[partial(&ack), partial(&lone)]);
        assert_eq!(out.len(), 2);
        assert_eq!(completed(out[0].clone()), ack);
        assert_eq!(completed(out[1].clone()), lone);
        assert_eq!(out[1].0.csum_start, 20);

        // Partial and valid segments of one flow merge together.
        let mut mixed = built(&specs);
        mixed[1] = partial(&mixed[1]);
        assert_eq!(run(&mut Coalescer::new(), &mixed), vec![merged(&specs)]);
    }

    #[test]
    fn a_wrong_checksum_that_is_not_partial_still_passes_alone_unchanged() {
        let specs = segs(&Spec::default(), 1000, 3);
        let mut p: Vec<Vec<u8>> = built(&specs).iter().map(|q| partial(q)).collect();
        // One off the pseudo-header sum: corrupt, not partial.
        p[1][20 + tcp::CHECKSUM + 1] ^= 1;
        let out = run(&mut Coalescer::new(), &p);
        assert_eq!(out.len(), 3);
        assert_eq!(out[1], unchanged(&p[1]));
        assert_eq!(completed(out[0].clone()), build(&specs[0]));
        assert_eq!(completed(out[2].clone()), build(&specs[2]));
    }

    #[test]
    fn fixed_ip_id_only_with_df() {
        let mut specs = segs(&Spec::default(), 100, 4);
        for s in &mut specs {
            s.ident = 0;
        }
        let out = run(&mut Coalescer::new(), &built(&specs));
        assert_eq!(out, vec![merged(&specs)]);

        for s in &mut specs {
            s.df = false;
        }
        let p = built(&specs);
        let out = run(&mut Coalescer::new(), &p);
        assert_eq!(out, p.iter().map(|q| unchanged(q)).collect::<Vec<_>>());
    }

    #[test]
    fn interleaved_flows_are_coalesced_separately() {
        let a = segs(&Spec::default(), 700, 3);
        let b = segs(
            &Spec {
                sport: 40001,
                seq: 5,
                ..Spec::default()
            },
            700,
            3,
        );
        let c = segs(
            &Spec {
                dst: [10, 244, 3, 3],
                ..Spec::default()
            },
            700,
            2,
        );
        let order = [&a[0], &b[0], &c[0], &a[1], &b[1], &c[1], &a[2], &b[2]];
        let p: Vec<_> = order.iter().map(|s| build(s)).collect();
        let out = run(&mut Coalescer::new(), &p);
        assert_eq!(out, vec![merged(&a), merged(&b), merged(&c)]);
    }

    #[test]
    fn full_table_evicts_the_oldest_flow() {
        let flow = |port| {
            segs(
                &Spec {
                    sport: port,
                    ..Spec::default()
                },
                300,
                2,
            )
        };
        let (a, b, c) = (flow(1), flow(2), flow(3));
        let mut co = Coalescer::with_flows(2);
        let p = built(&[
            a[0].clone(),
            b[0].clone(),
            c[0].clone(),
            b[1].clone(),
            c[1].clone(),
        ]);
        let mut out = Vec::new();
        push_all(&mut co, &p[..3], &mut out);
        assert_eq!(out, vec![unchanged(&p[0])], "a evicted when c arrives");
        assert_eq!(co.held(), 2);
        // One batch, one set of buffers: b[1] and c[1] join the held b[0] and c[0].
        let mut out = Vec::new();
        for i in 3..5 {
            co.push(&p, Span::whole(i, p[i].len()), |o| out.push(split(o)));
        }
        co.flush(&p, |o| out.push(split(o)));
        assert_eq!(out, vec![merged(&b), merged(&c)]);
    }

    #[test]
    fn a_super_packet_holds_at_most_max_segments() {
        // 200 segments of 100 bytes: 20 KiB, well below 64 KiB, but more slices than one
        // output carries.
        let specs = segs(&Spec::default(), 100, 200);
        let out = run(&mut Coalescer::new(), &built(&specs));
        assert_eq!(
            out,
            vec![
                merged(&specs[..MAX_SEGMENTS]),
                merged(&specs[MAX_SEGMENTS..])
            ]
        );
    }

    #[test]
    fn stops_below_64k() {
        // 50 segments of 1400 bytes = 70000 bytes: cut where the next would pass 65535.
        let specs = segs(&Spec::default(), 1400, 50);
        let out = run(&mut Coalescer::new(), &built(&specs));
        let fit = (MAX_PACKET - 52) / 1400; // 46 segments
        assert_eq!(out, vec![merged(&specs[..fit]), merged(&specs[fit..])]);
        assert!(out[0].1.len() <= MAX_PACKET);
    }

    #[test]
    fn non_tcp_and_junk_pass_through_unchanged() {
        let mut udp = build(&Spec::default());
        udp[9] = 17;
        let mut padded = build(&Spec {
            flags: tcp::ACK_FLAG,
            payload: vec![],
            ..Spec::default()
        });
        let want_padded = padded.clone();
        padded.extend_from_slice(&[0; 6]); // Ethernet minimum-frame padding
        let out = run(
            &mut Coalescer::new(),
            &[udp.clone(), padded, vec![0x45, 1, 2]],
        );
        assert_eq!(
            out,
            vec![
                unchanged(&udp),
                unchanged(&want_padded),
                unchanged(&[0x45, 1, 2])
            ]
        );
    }

    #[test]
    fn every_truncation_passes_through() {
        let specs = segs(&Spec::default(), 100, 2);
        let p = built(&specs);
        let mut c = Coalescer::new();
        for len in 0..p[1].len() {
            // A cut packet is not IPv4 any more, so it cannot be matched to the held flow:
            // it goes out at once, the held segment at the flush.
            let out = run(&mut c, &[p[0].clone(), p[1][..len].to_vec()]);
            assert_eq!(
                out,
                vec![unchanged(&p[1][..len]), unchanged(&p[0])],
                "length {len}"
            );
        }
    }

    /// Kernel-style segmentation (gso) followed by coalescing gives back the super-packet.
    fn roundtrip(s: &Spec, mss: u16, prefix_len: usize) -> Result<(), TestCaseError> {
        let (hdr, original) = build_super(s, mss);
        let plan = crate::gso::plan(&hdr, &original, prefix_len).unwrap();
        let mut wire = vec![0u8; plan.total_len()];
        let segments: Segments =
            segment(&hdr, &original, prefix_len, &mut wire, |_, _| {}).unwrap();
        let mut c = Coalescer::new();
        let mut out = Vec::new();
        let bufs = [&wire[..]];
        for r in segments.iter() {
            let at = Span {
                buf: 0,
                start: r.start + prefix_len,
                end: r.end,
            };
            c.push(&bufs, at, |b| out.push(split(b)));
        }
        c.flush(&bufs, |b| out.push(split(b)));
        if segments.count == 1 {
            // One segment goes out as it is: the full checksum instead of the seed (behind
            // F_NEEDS_CSUM in the one case in 65536 where that checksum reads as partial).
            prop_assert_eq!(out.len(), 1);
            prop_assert_eq!(out[0].0, lone_header(&out[0].1));
            assert_checksums_ok(&out[0].1);
            prop_assert_eq!(&out[0].1[..36], &original[..36]);
            prop_assert_eq!(&out[0].1[38..], &original[38..]);
        } else {
            prop_assert_eq!(out.len(), 1, "one write for {} segments", segments.count);
            prop_assert_eq!(out[0].0, hdr);
            prop_assert_eq!(&out[0].1, &original);
        }
        Ok(())
    }

    #[test]
    fn roundtrip_full_size() {
        let s = Spec {
            payload: (0..65_483u32).map(|i| (i * 7) as u8).collect(),
            ..Spec::default()
        };
        roundtrip(&s, 1398, 22).unwrap();
    }

    proptest! {
        #[test]
        fn segment_then_coalesce_is_identity(
            s in arb_spec(65_535 - 80),
            mss in 536..=9000u16,
            prefix_len in 0..=40usize,
        ) {
            // Only packets the kernel would coalesce in one piece: payload whole segments but
            // maybe the last, no IP options (the arb never makes them).
            roundtrip(&s, mss, prefix_len)?;
        }

        /// Mixed traffic of three flows with random disturbances. Whatever the coalescer does,
        /// every output is either an input unchanged (zero header) or a super-packet that the
        /// kernel's GSO would cut back into exactly a run of consecutive inputs of one flow,
        /// and per flow the outputs cover the inputs in order.
        #[test]
        fn outputs_resegment_to_the_inputs(
            steps in prop::collection::vec((0..3usize, 0..24u8, any::<u16>()), 1..60),
            mss in 1..=300usize,
        ) {
            let mut next_seq = [1000u32, 50_000, 7];
            let mut next_id = [1u16, 500, 9000];
            let mut ack = [5u32; 3];
            let mut ttl = [64u8; 3];
            let mut inputs: Vec<Vec<u8>> = Vec::new();
            for &(f, kind, param) in &steps {
                let mut s = Spec {
                    sport: 1000 + f as u16,
                    seq: next_seq[f],
                    ident: next_id[f],
                    ack: ack[f],
                    ttl: ttl[f],
                    payload: (0..mss).map(|i| (i as u16 ^ param) as u8).collect(),
                    ..Spec::default()
                };
                let mut corrupt = false;
                match kind {
                    0 => s.payload.truncate(1 + usize::from(param) % mss),
                    1 => s.flags |= [tcp::PSH, tcp::FIN, tcp::CWR, tcp::ECE, tcp::URG, tcp::SYN, tcp::RST][usize::from(param) % 7],
                    2 => s.seq = s.seq.wrapping_add(1 + u32::from(param)),
                    3 => { ack[f] += 1; s.ack = ack[f]; }
                    4 => { ttl[f] -= 1; s.ttl = ttl[f]; }
                    5 => corrupt = true,
                    6 => s.payload.clear(),
                    7 => s.ident = s.ident.wrapping_add(2 + param % 1000),
                    _ => {}
                }
                next_seq[f] = s.seq.wrapping_add(s.payload.len() as u32);
                next_id[f] = s.ident.wrapping_add(1);
                let mut p = build(&s);
                if corrupt {
                    // A byte that breaks a checksum but keeps the packet recognisable as TCP
                    // of this flow (a packet that is not cannot be ordered against its flow).
                    let spots: Vec<usize> = [1, 4, 5, 8, 10, 11].into_iter().chain(33..p.len()).collect();
                    p[spots[usize::from(param) % spots.len()]] ^= 0x10;
                }
                inputs.push(p);
            }

            let out = run(&mut Coalescer::with_flows(2), &inputs);
            let flow_of = |p: &[u8]| p.get(20..22).map(|b| b.to_vec());
            let mut queues: Vec<(Option<Vec<u8>>, Queue<'_>)> = Vec::new();
            for p in &inputs {
                let k = flow_of(p);
                match queues.iter_mut().find(|(q, _)| *q == k) {
                    Some((_, q)) => q.push_back(p),
                    None => queues.push((k, [p].into())),
                }
            }
            let mut scratch = vec![0u8; 200_000];
            for (hdr, p) in &out {
                let k = flow_of(p);
                let q = &mut queues.iter_mut().find(|(q, _)| *q == k).expect("output of a known flow").1;
                if hdr.gso_type == GSO_NONE {
                    prop_assert_eq!(*hdr, lone_header(p));
                    prop_assert_eq!(Some(p), q.pop_front());
                    continue;
                }
                let segs = segment(hdr, p, 0, &mut scratch, |_, _| {}).unwrap();
                prop_assert!(segs.count >= 2);
                for r in segs.iter() {
                    prop_assert_eq!(Some(&scratch[r].to_vec()), q.pop_front());
                }
            }
            prop_assert!(queues.iter().all(|(_, q)| q.is_empty()), "every input came out");
        }

        #[test]
        fn never_panics_and_preserves_bytes(
            packets in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..120), 0..20),
        ) {
            let out = run(&mut Coalescer::with_flows(2), &packets);
            // Junk is (almost surely) never merged: every input comes out once, in order.
            let total_in: usize = packets.iter().map(Vec::len).sum();
            let total_out: usize = out.iter().map(|(_, p)| p.len()).sum();
            prop_assert!(total_out <= total_in);
        }
    }
}

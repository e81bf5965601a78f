//! Segmentation of TSO super-packets in userspace (what the kernel's `tcp_gso_segment` and
//! `inet_gso_segment` do for a NIC without TSO).
//!
//! A TUN device with `IFF_VNET_HDR` and TSO enabled hands out TCP/IPv4 packets of up to 64 KiB
//! with a [`VirtioNetHdr`] saying "cut me into `gso_size` pieces". [`segment`] cuts one into
//! wire-sized segments, each with its own IPv4 header (total length, IP ID incremented per
//! segment, header checksum) and TCP header (sequence number advanced, CWR only on the first
//! segment, FIN and PSH only on the last, full checksum), all written into one caller-owned
//! buffer. Every segment is preceded by a fixed-size prefix region for the encapsulation
//! (VXLAN + Ethernet, or an outer IPv4 header) and placed at a fixed stride, so a VXLAN sender
//! can pass the whole buffer to one `sendmsg` with `UDP_SEGMENT` = stride, and an IP-in-IP
//! sender can hand the segments to `sendmmsg`.

use core::ops::Range;
use std::net::Ipv4Addr;

use crate::checksum;
use crate::error::{Layer, WireError};
use crate::ipv4::{self, Ipv4Packet};
use crate::virtio::{
    OffloadError, VirtioNetHdr, F_NEEDS_CSUM, GSO_NONE, GSO_TCPV4, TCP_CSUM_OFFSET,
};

/// TCP header layout (RFC 9293 section 3.1), as far as segmentation and coalescing need it.
pub mod tcp {
    /// Header length without options.
    pub const HEADER_LEN: usize = 20;
    /// Byte offset of the sequence number.
    pub const SEQ: usize = 4;
    /// Byte offset of the acknowledgment number.
    pub const ACK: usize = 8;
    /// Byte offset of the data offset (upper nibble, in 32-bit words).
    pub const DATA_OFFSET: usize = 12;
    /// Byte offset of the flags byte.
    pub const FLAGS: usize = 13;
    /// Byte offset of the checksum.
    pub const CHECKSUM: usize = 16;

    /// No more data from sender.
    pub const FIN: u8 = 0x01;
    /// Synchronize sequence numbers.
    pub const SYN: u8 = 0x02;
    /// Reset the connection.
    pub const RST: u8 = 0x04;
    /// Push function.
    pub const PSH: u8 = 0x08;
    /// Acknowledgment field is significant.
    pub const ACK_FLAG: u8 = 0x10;
    /// Urgent pointer field is significant.
    pub const URG: u8 = 0x20;
    /// ECN echo (RFC 3168).
    pub const ECE: u8 = 0x40;
    /// Congestion window reduced (RFC 3168).
    pub const CWR: u8 = 0x80;
}

/// Offset of the IP ID within the IPv4 header.
const IP_ID: usize = 4;
/// Offset of the IPv4 total length.
const IP_TOTAL_LEN: usize = 2;
/// Offset of the IPv4 header checksum.
const IP_CHECKSUM: usize = 10;

/// A TCP/IPv4 packet whose IPv4 and TCP header lengths have been checked against the buffer.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TcpIpv4<'a> {
    /// The packet up to the IPv4 total length (link padding cut off).
    pub packet: &'a [u8],
    /// IPv4 header length, options included.
    pub ip_len: usize,
    /// TCP header length, options included.
    pub tcp_len: usize,
}

impl<'a> TcpIpv4<'a> {
    /// Checks IPv4 (version, lengths, protocol TCP, not a fragment) and the TCP data offset.
    /// Checksums are not verified.
    pub(crate) fn parse(buf: &'a [u8]) -> Result<Self, OffloadError> {
        let ip = Ipv4Packet::new_checked(buf)?;
        if ip.protocol() != ipv4::protocol::TCP {
            return Err(WireError::WrongProtocol(ip.protocol()).into());
        }
        if ip.is_fragment() {
            return Err(WireError::Fragmented.into());
        }
        let ip_len = ip.header_len();
        let l4 = ip.payload();
        if l4.len() < tcp::HEADER_LEN {
            return Err(truncated_tcp(tcp::HEADER_LEN, l4.len()));
        }
        let offset = l4[tcp::DATA_OFFSET] >> 4;
        if offset < 5 {
            return Err(OffloadError::BadTcpHeaderLen(offset));
        }
        let tcp_len = usize::from(offset) * 4;
        if l4.len() < tcp_len {
            return Err(truncated_tcp(tcp_len, l4.len()));
        }
        Ok(TcpIpv4 {
            packet: &buf[..ip.total_len()],
            ip_len,
            tcp_len,
        })
    }

    pub(crate) fn src(&self) -> Ipv4Addr {
        let b = &self.packet[12..16];
        Ipv4Addr::new(b[0], b[1], b[2], b[3])
    }

    pub(crate) fn dst(&self) -> Ipv4Addr {
        let b = &self.packet[16..20];
        Ipv4Addr::new(b[0], b[1], b[2], b[3])
    }

    /// Header bytes, IPv4 and TCP.
    pub(crate) fn headers_len(&self) -> usize {
        self.ip_len + self.tcp_len
    }

    /// The TCP header.
    pub(crate) fn tcp(&self) -> &'a [u8] {
        &self.packet[self.ip_len..self.headers_len()]
    }

    /// The TCP payload.
    pub(crate) fn payload(&self) -> &'a [u8] {
        &self.packet[self.headers_len()..]
    }

    /// True if the TCP checksum over pseudo header, header and payload verifies.
    pub(crate) fn tcp_checksum_ok(&self) -> bool {
        let segment = &self.packet[self.ip_len..];
        tcp_sum(self.src(), self.dst(), segment, 0) == 0
    }
}

fn truncated_tcp(required: usize, len: usize) -> OffloadError {
    WireError::Truncated {
        layer: Layer::Tcp,
        required,
        len,
    }
    .into()
}

/// `finish` of the pseudo header plus `segment` (TCP header and payload) plus `extra`.
fn tcp_sum(src: Ipv4Addr, dst: Ipv4Addr, segment: &[u8], extra: u64) -> u16 {
    // A segment inside a valid IPv4 packet is shorter than 64 KiB, so the cast is exact.
    let len = segment.len() as u16;
    let acc = checksum::pseudo_header(src, dst, ipv4::protocol::TCP, len) + extra;
    checksum::finish(checksum::partial(segment, acc))
}

/// Where [`segment`] put the segments in the output buffer.
///
/// Segment `i` starts at `i * stride`; it is `stride` bytes long except the last, which is
/// `last_len` bytes. Each starts with `prefix_len` prefix bytes followed by the IPv4 packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segments {
    /// Number of segments (at least 1).
    pub count: usize,
    /// Distance between segment starts: prefix + IPv4 header + TCP header + `gso_size`.
    /// For VXLAN this is the `UDP_SEGMENT` size.
    pub stride: usize,
    /// Length of the last segment, prefix included (equal to `stride` if the payload divides
    /// evenly, shorter otherwise).
    pub last_len: usize,
    /// Prefix bytes at the start of each segment.
    pub prefix_len: usize,
}

impl Segments {
    /// Bytes used in the output buffer.
    pub fn total_len(&self) -> usize {
        (self.count - 1) * self.stride + self.last_len
    }

    /// Byte range of segment `i` (prefix included), or `None` past the end.
    pub fn range(&self, i: usize) -> Option<Range<usize>> {
        if i >= self.count {
            return None;
        }
        let start = i * self.stride;
        let len = if i + 1 == self.count {
            self.last_len
        } else {
            self.stride
        };
        Some(start..start + len)
    }

    /// Byte ranges of all segments, prefix included, in order.
    pub fn iter(&self) -> impl Iterator<Item = Range<usize>> + '_ {
        (0..self.count).filter_map(|i| self.range(i))
    }

    /// Groups the segments into byte ranges of whole segments, each at most `max_bytes` long
    /// and at most `max_segments` segments, for one `UDP_SEGMENT` send each (the kernel caps a
    /// GSO datagram at 64 KiB of UDP payload and `UDP_MAX_SEGMENTS` segments). Every range
    /// holds at least one segment even if a single segment exceeds `max_bytes`.
    ///
    /// For a VXLAN socket: `chunks(`[`UDP_GSO_MAX_PAYLOAD`]`, 64)`. A full 64 KiB super-packet
    /// cut for VXLAN needs about 69 KB (every segment repeats 74 bytes of headers), so it
    /// takes two sends.
    pub fn chunks(
        &self,
        max_bytes: usize,
        max_segments: usize,
    ) -> impl Iterator<Item = Range<usize>> {
        let per = (max_bytes / self.stride.max(1)).clamp(1, max_segments.max(1));
        let this = *self;
        (0..this.count).step_by(per).map(move |first| {
            let last = (first + per).min(this.count) - 1;
            first * this.stride..last * this.stride + this.range(last).map_or(0, |r| r.len())
        })
    }
}

/// Largest UDP payload one `UDP_SEGMENT` send may carry over IPv4: 65535 - 20 - 8
/// (`__ip_append_data` refuses more with `EMSGSIZE`).
pub const UDP_GSO_MAX_PAYLOAD: usize = 65_507;

/// A super-packet checked for segmentation.
struct Plan<'a> {
    pkt: TcpIpv4<'a>,
    mss: usize,
    segs: Segments,
}

fn plan_inner<'a>(
    hdr: &VirtioNetHdr,
    packet: &'a [u8],
    prefix_len: usize,
) -> Result<Plan<'a>, OffloadError> {
    let kind = hdr.gso_kind();
    if kind != GSO_NONE && kind != GSO_TCPV4 {
        return Err(OffloadError::UnsupportedGso(hdr.gso_type));
    }
    let pkt = TcpIpv4::parse(packet)?;
    let payload = pkt.payload().len();
    let mss = if kind == GSO_NONE {
        payload.max(1)
    } else if hdr.gso_size == 0 {
        return Err(OffloadError::ZeroGsoSize);
    } else {
        usize::from(hdr.gso_size)
    };
    let count = payload.div_ceil(mss).max(1);
    let headers = prefix_len.saturating_add(pkt.headers_len());
    let stride = headers.saturating_add(mss);
    let last_len = headers + (payload - (count - 1) * mss);
    Ok(Plan {
        pkt,
        mss,
        segs: Segments {
            count,
            stride,
            last_len,
            prefix_len,
        },
    })
}

/// Checks a super-packet and returns where [`segment`] would put its segments, without
/// writing anything; `total_len()` is the output buffer size needed.
pub fn plan(
    hdr: &VirtioNetHdr,
    packet: &[u8],
    prefix_len: usize,
) -> Result<Segments, OffloadError> {
    plan_inner(hdr, packet, prefix_len).map(|p| p.segs)
}

/// Cuts the TCP/IPv4 super-packet `packet` (the bytes after the virtio header `hdr`) into
/// segments of `hdr.gso_size` payload bytes, written into `out` as described by the returned
/// [`Segments`].
///
/// Each segment is `prefix_len` bytes of prefix followed by a complete IPv4 packet with valid
/// IPv4 and TCP checksums. After writing a segment, `fill_prefix(prefix, inner)` is called with
/// its prefix region and the finished inner packet, so the caller can write the encapsulation
/// (a VXLAN + Ethernet template, or an outer IPv4 header whose length depends on the inner
/// packet). Bytes of `out` beyond `total_len()` are untouched.
///
/// IP IDs count up from the super-packet's ID and sequence numbers advance by the payload
/// carried, as the kernel's software GSO does. A `GSO_NONE` packet yields one segment with
/// its TCP checksum completed. The TCP checksum is always computed in full, so the value in
/// the super-packet's checksum field (the `F_NEEDS_CSUM` seed) does not matter.
///
/// Errors: unsupported GSO type, zero `gso_size`, anything but an unfragmented TCP/IPv4
/// packet with consistent lengths, or `out` shorter than needed. Never panics on input bytes.
pub fn segment<F>(
    hdr: &VirtioNetHdr,
    packet: &[u8],
    prefix_len: usize,
    out: &mut [u8],
    mut fill_prefix: F,
) -> Result<Segments, OffloadError>
where
    F: FnMut(&mut [u8], &[u8]),
{
    let Plan { pkt, mss, segs } = plan_inner(hdr, packet, prefix_len)?;
    let required = (segs.count - 1)
        .checked_mul(segs.stride)
        .and_then(|n| n.checked_add(segs.last_len))
        .unwrap_or(usize::MAX);
    if out.len() < required {
        return Err(OffloadError::OutputTooSmall {
            required,
            len: out.len(),
        });
    }

    let cut = Cut::new(&pkt, mss, segs.count);
    let payload = pkt.payload();
    for (i, range) in segs.iter().enumerate() {
        let piece = cut.piece(payload, i);
        let (prefix, inner) = out[range].split_at_mut(prefix_len);
        let (headers, body) = inner.split_at_mut(pkt.headers_len());
        body.copy_from_slice(piece);
        cut.write_headers(i, piece, headers);
        fill_prefix(prefix, inner);
    }
    Ok(segs)
}

/// The per-segment header rewrite shared by [`segment`] and [`segment_headers`]: what the
/// kernel's software GSO changes from one segment to the next.
///
/// The headers' checksums are kept incrementally: the template's words that never change are
/// summed once per super-packet (`ip_base`, `tcp_base`), so a segment adds only the words it
/// changes (length, ID, sequence number, flags) and its payload.
struct Cut<'a> {
    /// The super-packet's IPv4 and TCP headers, the template of every segment's headers.
    headers: &'a [u8],
    ip_len: usize,
    mss: usize,
    count: usize,
    ident: u16,
    seq: u32,
    flags: u8,
    /// Sum of the IPv4 header without total length, ID and checksum.
    ip_base: u64,
    /// Sum of the TCP header without sequence number, the data offset + flags word and
    /// checksum, plus the pseudo header without its length.
    tcp_base: u64,
}

impl<'a> Cut<'a> {
    fn new(pkt: &TcpIpv4<'a>, mss: usize, count: usize) -> Cut<'a> {
        let headers = &pkt.packet[..pkt.headers_len()];
        let (ip_len, th) = (pkt.ip_len, pkt.ip_len);
        // The template with every per-segment field zeroed (IPv4 and TCP headers are at most
        // 60 bytes each).
        let mut fixed = [0u8; 120];
        let fixed = &mut fixed[..headers.len()];
        fixed.copy_from_slice(headers);
        let per_segment = [
            IP_TOTAL_LEN,
            IP_ID,
            IP_CHECKSUM,
            th + tcp::SEQ,
            th + tcp::SEQ + 2,
            th + tcp::FLAGS - 1,
            th + tcp::CHECKSUM,
        ];
        for at in per_segment {
            fixed[at..at + 2].fill(0);
        }
        // The pseudo header's length is per segment; 0 here adds nothing.
        let pseudo = checksum::pseudo_header(pkt.src(), pkt.dst(), ipv4::protocol::TCP, 0);
        let ip_base = checksum::partial(&fixed[..ip_len], 0);
        let tcp_base = checksum::partial(&fixed[ip_len..], pseudo);
        Cut {
            headers,
            ip_len,
            mss,
            count,
            ident: u16::from_be_bytes([headers[IP_ID], headers[IP_ID + 1]]),
            seq: u32::from_be_bytes(read4(headers, th + tcp::SEQ)),
            flags: headers[th + tcp::FLAGS],
            ip_base,
            tcp_base,
        }
    }

    /// Segment `i`'s payload within the super-packet's payload.
    fn piece<'p>(&self, payload: &'p [u8], i: usize) -> &'p [u8] {
        let start = i * self.mss;
        &payload[start..(start + self.mss).min(payload.len())]
    }

    /// Writes segment `i`'s IPv4 and TCP headers into `out` (exactly the headers' length):
    /// total length, IP ID + i, header checksum, sequence number advanced by the payload
    /// before it, CWR on the first segment only, FIN/PSH on the last only, and the full TCP
    /// checksum over these headers and `piece`.
    fn write_headers(&self, i: usize, piece: &[u8], out: &mut [u8]) {
        let th = self.ip_len;
        out.copy_from_slice(self.headers);
        // Shorter than the super-packet, so it fits u16.
        let total = (out.len() + piece.len()) as u16;
        // `i` < 65536 segments: at least one payload byte each in a < 64 KiB packet.
        let id = self.ident.wrapping_add(i as u16);
        let ip_sum = checksum::finish(self.ip_base + u64::from(total) + u64::from(id));
        out[IP_TOTAL_LEN..IP_TOTAL_LEN + 2].copy_from_slice(&total.to_be_bytes());
        out[IP_ID..IP_ID + 2].copy_from_slice(&id.to_be_bytes());
        out[IP_CHECKSUM..IP_CHECKSUM + 2].copy_from_slice(&ip_sum.to_be_bytes());

        let seq = self.seq.wrapping_add((i * self.mss) as u32);
        let mut f = self.flags;
        if i > 0 {
            f &= !tcp::CWR;
        }
        if i + 1 < self.count {
            f &= !(tcp::FIN | tcp::PSH);
        }
        out[th + tcp::SEQ..th + tcp::SEQ + 4].copy_from_slice(&seq.to_be_bytes());
        out[th + tcp::FLAGS] = f;
        let l4_len = out.len() - th + piece.len();
        // The words this segment changes: length (pseudo header), sequence number and the
        // data offset + flags word. The TCP header is a multiple of 4 bytes, so the
        // payload's sum composes with the header's.
        let changed = l4_len as u64
            + u64::from(seq >> 16)
            + u64::from(seq & 0xffff)
            + u64::from(u16::from_be_bytes([out[th + tcp::FLAGS - 1], f]));
        let sum = checksum::finish(checksum::partial(piece, self.tcp_base + changed));
        out[th + tcp::CHECKSUM..th + tcp::CHECKSUM + 2].copy_from_slice(&sum.to_be_bytes());
    }
}

/// Where [`segment_headers`] put what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderPlan {
    /// The segments as [`segment`] would lay them out.
    pub segs: Segments,
    /// Bytes of headers per segment in the output: prefix + IPv4 + TCP.
    pub header_len: usize,
    /// Payload bytes per segment (the last may carry fewer).
    pub mss: usize,
    /// The TCP payload inside the super-packet.
    pub payload: Range<usize>,
}

/// The zero-copy form of [`segment`]: writes, for each segment, `prefix` followed by that
/// segment's IPv4 and TCP headers into `out` (segment `i` at `i * header_len`), exactly as
/// [`segment`] writes them in front of the segment's payload. The payload is only read (for
/// the checksum), never copied, so a sender can hand the kernel header and payload slices
/// (`sendmsg` with an iovec per segment) instead of a copied train.
pub fn segment_headers(
    hdr: &VirtioNetHdr,
    packet: &[u8],
    prefix: &[u8],
    out: &mut [u8],
) -> Result<HeaderPlan, OffloadError> {
    let Plan { pkt, mss, segs } = plan_inner(hdr, packet, prefix.len())?;
    let header_len = prefix.len() + pkt.headers_len();
    let required = segs.count * header_len;
    if out.len() < required {
        return Err(OffloadError::OutputTooSmall {
            required,
            len: out.len(),
        });
    }
    let cut = Cut::new(&pkt, mss, segs.count);
    let payload = pkt.payload();
    for (i, o) in out[..required].chunks_exact_mut(header_len).enumerate() {
        let (p, headers) = o.split_at_mut(prefix.len());
        p.copy_from_slice(prefix);
        cut.write_headers(i, cut.piece(payload, i), headers);
    }
    Ok(HeaderPlan {
        segs,
        header_len,
        mss,
        payload: pkt.headers_len()..pkt.packet.len(),
    })
}

impl HeaderPlan {
    /// Where segment `i`'s payload lies in the super-packet (empty past the last segment).
    pub fn piece(&self, i: usize) -> Range<usize> {
        let start = (self.payload.start + i * self.mss).min(self.payload.end);
        start..(start + self.mss).min(self.payload.end)
    }
}

fn read4(b: &[u8], at: usize) -> [u8; 4] {
    [b[at], b[at + 1], b[at + 2], b[at + 3]]
}

/// Completes a `F_NEEDS_CSUM` checksum in place: sums `packet[csum_start..]` (the field at
/// `csum_start + csum_offset` holds the pseudo-header seed) and stores the result there.
/// Does nothing if the flag is clear. `packet` must end where the packet ends.
pub fn complete_checksum(hdr: &VirtioNetHdr, packet: &mut [u8]) -> Result<(), OffloadError> {
    if !hdr.needs_csum() {
        return Ok(());
    }
    let start = usize::from(hdr.csum_start);
    let field = start + usize::from(hdr.csum_offset);
    if field + 2 > packet.len() {
        return Err(OffloadError::BadCsumOffset {
            start: hdr.csum_start,
            offset: hdr.csum_offset,
            len: packet.len(),
        });
    }
    // Like the kernel's skb_checksum_help: a computed 0 goes out as 0xffff (RFC 768 needs that
    // for UDP, and the two are the same value in ones' complement for TCP).
    let sum = match checksum::checksum(&packet[start..]) {
        0 => 0xffff,
        s => s,
    };
    packet[field..field + 2].copy_from_slice(&sum.to_be_bytes());
    Ok(())
}

/// Offset of the UDP checksum field within the UDP header (the `csum_offset` for UDP).
const UDP_CSUM_OFFSET: u16 = 6;

/// Recognises a TCP or UDP over IPv4 packet whose checksum a sender's checksum offload left
/// partial, and returns the virtio header that hands it to the kernel to complete.
///
/// A Linux sender with checksum offload (the kernel's vxlan device with its default
/// `tx-checksum-ip-generic`, or a virtio-net guest) puts only the pseudo-header sum in the
/// checksum field (`CHECKSUM_PARTIAL`) and leaves the rest to the next hop that computes
/// checksums. Across veth or virtio that state travels with the packet; through our UDP or
/// raw socket it is lost, and the receiving pod's kernel would drop the packet as corrupt.
///
/// The packet counts as partial when the field holds exactly the pseudo-header sum of its
/// addresses, protocol and length (`~tcp_v4_check(len, saddr, daddr, 0)`). A full checksum
/// that happens to hold that value (one in 65536) is harmless: completing it from the field
/// gives the same value, because the field already sums to the pseudo header. Any other wrong
/// checksum is left alone, for the receiver to drop and count. Only the headers are read:
/// `packet` may be cut after the transport checksum field, and its IPv4 total length is taken
/// from the header. Fragments never qualify (the kernel completes checksums before it
/// fragments).
pub fn partial_checksum(packet: &[u8]) -> Option<VirtioNetHdr> {
    let (&ver_ihl, rest) = packet.split_first()?;
    let ip_len = usize::from(ver_ihl & 0x0f) * 4;
    if ver_ihl >> 4 != 4 || ip_len < ipv4::HEADER_LEN || rest.len() < ipv4::HEADER_LEN - 1 {
        return None;
    }
    let field = |r: Range<usize>| u16::from_be_bytes([packet[r.start], packet[r.start + 1]]);
    // Not a fragment: the flags' MF bit and the offset are zero (DF may be set).
    if field(ipv4::field::FLAGS_FRAG) & 0x3fff != 0 {
        return None;
    }
    let (protocol, offset) = match packet[ipv4::field::PROTOCOL] {
        ipv4::protocol::TCP => (ipv4::protocol::TCP, TCP_CSUM_OFFSET),
        ipv4::protocol::UDP => (ipv4::protocol::UDP, UDP_CSUM_OFFSET),
        _ => return None,
    };
    let total = usize::from(field(ipv4::field::TOTAL_LEN));
    let at = ip_len + usize::from(offset);
    if at + 2 > total || at + 2 > packet.len() {
        return None;
    }
    let ip = |r: Range<usize>| {
        Ipv4Addr::new(
            packet[r.start],
            packet[r.start + 1],
            packet[r.start + 2],
            packet[r.start + 3],
        )
    };
    let len = (total - ip_len) as u16; // total is a u16 field
    let seed = checksum::fold(checksum::pseudo_header(
        ip(ipv4::field::SRC),
        ip(ipv4::field::DST),
        protocol,
        len,
    ));
    (field(at..at + 2) == seed).then_some(VirtioNetHdr {
        flags: F_NEEDS_CSUM,
        gso_type: GSO_NONE,
        hdr_len: (at + 2) as u16,
        gso_size: 0,
        csum_start: ip_len as u16,
        csum_offset: offset,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::ipv4::Ipv4Repr;
    use crate::virtio::{F_NEEDS_CSUM, GSO_ECN, GSO_TCPV6, GSO_UDP, GSO_UDP_L4};
    use etherparse::{IpDscp, IpEcn, IpNumber, Ipv4Header, Ipv4Slice, TcpHeader, TcpSlice};
    use proptest::prelude::*;

    /// Everything that varies in a test TCP/IPv4 packet.
    #[derive(Debug, Clone)]
    pub(crate) struct Spec {
        pub src: [u8; 4],
        pub dst: [u8; 4],
        pub sport: u16,
        pub dport: u16,
        pub seq: u32,
        pub ack: u32,
        pub flags: u8,
        pub window: u16,
        /// TCP options, a multiple of 4 bytes, at most 40.
        pub options: Vec<u8>,
        pub ident: u16,
        pub ttl: u8,
        pub tos: u8,
        pub df: bool,
        pub payload: Vec<u8>,
    }

    impl Default for Spec {
        fn default() -> Self {
            Spec {
                src: [10, 244, 1, 2],
                dst: [10, 244, 2, 3],
                sport: 40000,
                dport: 5201,
                seq: 1_000_000,
                ack: 77,
                flags: tcp::ACK_FLAG,
                window: 502,
                // NOP NOP timestamps(TSval 0x01020304, TSecr 0x05060708), as Linux sends.
                options: vec![1, 1, 8, 10, 1, 2, 3, 4, 5, 6, 7, 8],
                ident: 0x1234,
                ttl: 64,
                tos: 0,
                df: true,
                payload: (0..100u8).collect(),
            }
        }
    }

    /// Builds the packet with etherparse (the independent oracle), checksums valid.
    pub(crate) fn build(s: &Spec) -> Vec<u8> {
        let mut th = TcpHeader::new(s.sport, s.dport, s.seq, s.window);
        th.acknowledgment_number = s.ack;
        th.fin = s.flags & tcp::FIN != 0;
        th.syn = s.flags & tcp::SYN != 0;
        th.rst = s.flags & tcp::RST != 0;
        th.psh = s.flags & tcp::PSH != 0;
        th.ack = s.flags & tcp::ACK_FLAG != 0;
        th.urg = s.flags & tcp::URG != 0;
        th.ece = s.flags & tcp::ECE != 0;
        th.cwr = s.flags & tcp::CWR != 0;
        th.set_options_raw(&s.options).unwrap();
        th.checksum = th.calc_checksum_ipv4_raw(s.src, s.dst, &s.payload).unwrap();
        let l4_len = (th.header_len() + s.payload.len()) as u16;
        let mut ip = Ipv4Header::new(l4_len, s.ttl, IpNumber::TCP, s.src, s.dst).unwrap();
        ip.identification = s.ident;
        ip.dont_fragment = s.df;
        ip.dscp = IpDscp::try_new(s.tos >> 2).unwrap();
        ip.ecn = IpEcn::try_new(s.tos & 3).unwrap();
        ip.header_checksum = ip.calc_header_checksum();
        let mut v = Vec::new();
        ip.write(&mut v).unwrap();
        th.write(&mut v).unwrap();
        v.extend_from_slice(&s.payload);
        v
    }

    /// Builds the packet as a TUN TSO read delivers it: the TCP checksum field holds the
    /// folded pseudo-header sum (CHECKSUM_PARTIAL), and the matching virtio header.
    pub(crate) fn build_super(s: &Spec, mss: u16) -> (VirtioNetHdr, Vec<u8>) {
        let mut p = build(s);
        let l4 = (p.len() - 20) as u16;
        let seed = checksum::fold(checksum::pseudo_header(
            s.src.into(),
            s.dst.into(),
            ipv4::protocol::TCP,
            l4,
        ));
        p[20 + tcp::CHECKSUM..20 + tcp::CHECKSUM + 2].copy_from_slice(&seed.to_be_bytes());
        let hdr = VirtioNetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: if s.flags & tcp::CWR != 0 {
                GSO_TCPV4 | GSO_ECN
            } else {
                GSO_TCPV4
            },
            hdr_len: (20 + 20 + s.options.len()) as u16,
            gso_size: mss,
            csum_start: 20,
            csum_offset: 16,
        };
        (hdr, p)
    }

    /// Checks IPv4 and TCP checksums with etherparse.
    pub(crate) fn assert_checksums_ok(packet: &[u8]) {
        let ip = Ipv4Slice::from_slice(packet).expect("etherparse parses the IPv4 packet");
        let h = ip.header();
        assert_eq!(
            h.header_checksum(),
            h.to_header().calc_header_checksum(),
            "IPv4 checksum"
        );
        let t = TcpSlice::from_slice(ip.payload().payload).expect("etherparse parses TCP");
        assert_eq!(
            t.checksum(),
            t.calc_checksum_ipv4(h.source(), h.destination()).unwrap(),
            "TCP checksum"
        );
    }

    /// The expected segment `i` of `s` cut at `mss`, built independently.
    fn expected_segment(s: &Spec, mss: usize, i: usize, count: usize) -> Vec<u8> {
        let mut e = s.clone();
        let start = i * mss;
        e.payload = s.payload[start..(start + mss).min(s.payload.len())].to_vec();
        e.seq = s.seq.wrapping_add(start as u32);
        e.ident = s.ident.wrapping_add(i as u16);
        if i > 0 {
            e.flags &= !tcp::CWR;
        }
        if i + 1 < count {
            e.flags &= !(tcp::FIN | tcp::PSH);
        }
        build(&e)
    }

    #[test]
    fn builder_agrees_with_our_parser() {
        let p = build(&Spec::default());
        let t = TcpIpv4::parse(&p).unwrap();
        assert_eq!((t.ip_len, t.tcp_len, t.payload().len()), (20, 32, 100));
        assert!(t.tcp_checksum_ok());
        assert_checksums_ok(&p);
    }

    #[test]
    fn three_segments_with_wrapping_seq_and_id() {
        let s = Spec {
            seq: 0xffff_fffa,
            ident: 0xfffe,
            flags: tcp::ACK_FLAG | tcp::PSH | tcp::FIN | tcp::CWR | tcp::ECE,
            payload: (1..=10u8).collect(),
            ..Spec::default()
        };
        let (hdr, p) = build_super(&s, 4);
        let mut out = [0x55u8; 400];
        let segs = segment(&hdr, &p, 3, &mut out, |prefix, inner| {
            prefix.copy_from_slice(&[(inner.len() >> 8) as u8, inner.len() as u8, 0xaa]);
        })
        .unwrap();
        let stride = 3 + 20 + 32 + 4;
        assert_eq!(
            segs,
            Segments {
                count: 3,
                stride,
                last_len: stride - 2,
                prefix_len: 3
            }
        );
        assert_eq!(segs.total_len(), 3 * stride - 2);
        for i in 0..3 {
            let r = segs.range(i).unwrap();
            let want = expected_segment(&s, 4, i, 3);
            assert_eq!(&out[r.start + 3..r.end], &want[..], "segment {i}");
            assert_eq!(out[r.start..r.start + 3], [0, want.len() as u8, 0xaa]);
            assert_checksums_ok(&want);
        }
        // Spot-check the fields the kernel rules are about, on the bytes we wrote.
        let seg = |i: usize| &out[segs.range(i).unwrap()][3..];
        assert_eq!(seg(0)[4..6], [0xff, 0xfe]);
        assert_eq!(seg(2)[4..6], [0x00, 0x00], "IP ID wraps");
        assert_eq!(seg(2)[20 + 4..20 + 8], [0, 0, 0, 2], "seq wraps");
        assert_eq!(seg(0)[20 + 13], tcp::ACK_FLAG | tcp::CWR | tcp::ECE);
        assert_eq!(seg(1)[20 + 13], tcp::ACK_FLAG | tcp::ECE);
        assert_eq!(
            seg(2)[20 + 13],
            tcp::ACK_FLAG | tcp::ECE | tcp::PSH | tcp::FIN
        );
        assert!(
            out[segs.total_len()..].iter().all(|&b| b == 0x55),
            "rest untouched"
        );
        assert_eq!(segs.range(3), None);
        assert_eq!(segs.iter().count(), 3);
    }

    #[test]
    fn vxlan_prefix_from_a_template() {
        use crate::ethernet::MacAddr;
        use crate::vxlan::{self, Vni, ENCAP_LEN};
        let s = Spec {
            payload: vec![3; 5000],
            ..Spec::default()
        };
        let (hdr, p) = build_super(&s, 1398);
        let mut template = [0u8; ENCAP_LEN];
        let (a, b) = (
            MacAddr([2, 0, 198, 18, 0, 1]),
            MacAddr([2, 0, 198, 18, 0, 2]),
        );
        vxlan::write_header(&mut template, Vni::new(42).unwrap(), a, b);
        let mut out = vec![0u8; 6000];
        let segs = segment(&hdr, &p, ENCAP_LEN, &mut out, |prefix, _| {
            prefix.copy_from_slice(&template)
        })
        .unwrap();
        assert_eq!((segs.count, segs.stride), (4, ENCAP_LEN + 52 + 1398));
        for (i, r) in segs.iter().enumerate() {
            let d = vxlan::decapsulate(&out[r]).unwrap();
            assert_eq!((d.vni.get(), d.src_mac, d.dst_mac), (42, a, b));
            assert_eq!(d.inner, &expected_segment(&s, 1398, i, 4)[..]);
        }
    }

    #[test]
    fn ipip_prefix_per_segment() {
        use crate::ipip;
        let s = Spec {
            payload: vec![4; 3000],
            tos: 0x02, // ECT(0), copied to the outer header
            ..Spec::default()
        };
        let (hdr, p) = build_super(&s, 1000);
        let (outer_src, outer_dst) = ([198, 18, 0, 1].into(), [198, 18, 0, 2].into());
        let mut next_id = 500u16;
        let mut out = vec![0u8; 4000];
        let segs = segment(&hdr, &p, ipip::OVERHEAD, &mut out, |prefix, inner| {
            let ip = Ipv4Packet::new_checked(inner).unwrap();
            Ipv4Repr {
                src: outer_src,
                dst: outer_dst,
                protocol: ipv4::protocol::IPIP,
                ttl: 64,
                tos: ip.tos(),
                ident: next_id,
                dont_frag: ip.dont_frag(),
                payload_len: inner.len(),
            }
            .emit(prefix);
            next_id += 1;
        })
        .unwrap();
        assert_eq!(segs.count, 3);
        for (i, r) in segs.iter().enumerate() {
            let outer = &out[r];
            let (src, inner) = ipip::decapsulate(outer).unwrap();
            assert_eq!(src, outer_src);
            assert_eq!(inner, &expected_segment(&s, 1000, i, 3)[..]);
            assert_eq!(outer[1], 0x02);
            assert_eq!(outer[4..6], (500 + i as u16).to_be_bytes());
        }
    }

    #[test]
    fn ip_options_are_copied_into_every_segment() {
        let s = Spec {
            payload: vec![7; 30],
            ..Spec::default()
        };
        let (hdr, mut p) = build_super(&s, 10);
        // Insert 4 bytes of IPv4 options (NOP NOP NOP EOL) and fix IHL, length, checksum.
        p.splice(20..20, [1, 1, 1, 0]);
        p[0] = 0x46;
        let total = p.len() as u16;
        p[2..4].copy_from_slice(&total.to_be_bytes());
        let mut out = vec![0u8; 1000];
        let segs = segment(&hdr, &p, 0, &mut out, |_, _| {}).unwrap();
        assert_eq!(segs.count, 3);
        for r in segs.iter() {
            let seg = &out[r];
            assert_eq!(seg[0], 0x46);
            assert_eq!(seg[20..24], [1, 1, 1, 0]);
            assert_eq!(
                checksum::checksum(&seg[..24]),
                0,
                "header checksum covers options"
            );
            let t = TcpIpv4::parse(seg).unwrap();
            assert!(t.tcp_checksum_ok());
            assert_eq!(t.payload(), &[7; 10][..]);
        }
    }

    #[test]
    fn payload_that_divides_evenly() {
        let s = Spec {
            payload: vec![9; 3000],
            ..Spec::default()
        };
        let (hdr, p) = build_super(&s, 1000);
        let mut out = vec![0u8; 4000];
        let segs = segment(&hdr, &p, 22, &mut out, |_, _| {}).unwrap();
        assert_eq!(segs.count, 3);
        assert_eq!(segs.last_len, segs.stride);
        assert_eq!(segs.stride, 22 + 52 + 1000);
    }

    #[test]
    fn gso_none_is_one_segment_with_completed_checksum() {
        let s = Spec::default();
        let (mut hdr, mut p) = build_super(&s, 0);
        hdr.gso_type = GSO_NONE;
        let mut out = vec![0u8; 500];
        let segs = segment(&hdr, &p, 0, &mut out, |_, _| {}).unwrap();
        assert_eq!(segs.count, 1);
        assert_eq!(&out[segs.range(0).unwrap()], &build(&s)[..]);

        complete_checksum(&hdr, &mut p).unwrap();
        assert_eq!(p, build(&s), "in-place completion gives the full checksum");
        let before = p.clone();
        complete_checksum(&VirtioNetHdr::NONE, &mut p).unwrap();
        assert_eq!(p, before, "no NEEDS_CSUM, nothing to do");
    }

    #[test]
    fn header_only_super_packet() {
        let s = Spec {
            payload: vec![],
            ..Spec::default()
        };
        let (hdr, p) = build_super(&s, 1448);
        let mut out = vec![0u8; 100];
        let segs = segment(&hdr, &p, 0, &mut out, |_, _| {}).unwrap();
        assert_eq!((segs.count, segs.last_len), (1, 52));
        assert_eq!(&out[..52], &build(&s)[..]);
    }

    #[test]
    fn complete_checksum_rejects_offsets_outside() {
        let mut p = vec![0u8; 40];
        let hdr = |start, offset| VirtioNetHdr {
            flags: F_NEEDS_CSUM,
            csum_start: start,
            csum_offset: offset,
            ..VirtioNetHdr::NONE
        };
        assert_eq!(
            complete_checksum(&hdr(20, 19), &mut p),
            Err(OffloadError::BadCsumOffset {
                start: 20,
                offset: 19,
                len: 40
            })
        );
        assert!(complete_checksum(&hdr(40, 0), &mut p).is_err());
        assert!(complete_checksum(&hdr(u16::MAX, u16::MAX), &mut p).is_err());
        assert!(complete_checksum(&hdr(20, 18), &mut p).is_ok());
        // Zero data sums to 0, which goes out as 0xffff.
        assert_eq!(p[38..40], [0xff, 0xff]);
    }

    #[test]
    fn rejects_what_it_cannot_segment() {
        let s = Spec::default();
        let (hdr, p) = build_super(&s, 10);
        let mut out = vec![0u8; 10_000];
        let seg = |h: &VirtioNetHdr, p: &[u8], out: &mut [u8]| segment(h, p, 0, out, |_, _| {});
        for t in [GSO_UDP, GSO_TCPV6, GSO_UDP_L4, 0x7f] {
            let h = VirtioNetHdr { gso_type: t, ..hdr };
            assert_eq!(seg(&h, &p, &mut out), Err(OffloadError::UnsupportedGso(t)));
        }
        let h = VirtioNetHdr { gso_size: 0, ..hdr };
        assert_eq!(seg(&h, &p, &mut out), Err(OffloadError::ZeroGsoSize));

        let mut udp = p.clone();
        udp[9] = 17;
        assert_eq!(
            seg(&hdr, &udp, &mut out),
            Err(WireError::WrongProtocol(17).into())
        );
        let mut frag = p.clone();
        frag[6] = 0x20; // MF
        assert_eq!(
            seg(&hdr, &frag, &mut out),
            Err(WireError::Fragmented.into())
        );
        let mut short_doff = p.clone();
        short_doff[20 + 12] = 0x40;
        assert_eq!(
            seg(&hdr, &short_doff, &mut out),
            Err(OffloadError::BadTcpHeaderLen(4))
        );
        let mut v6 = p.clone();
        v6[0] = 0x60;
        assert_eq!(
            seg(&hdr, &v6, &mut out),
            Err(WireError::BadVersion(6).into())
        );

        // 100 bytes at MSS 10: 10 segments of 52 + 10 bytes.
        let need = 10 * 62;
        assert_eq!(plan(&hdr, &p, 0).unwrap().total_len(), need);
        assert_eq!(
            seg(&hdr, &p, &mut out[..need - 1]),
            Err(OffloadError::OutputTooSmall {
                required: need,
                len: need - 1
            })
        );
        assert!(seg(&hdr, &p, &mut out[..need]).is_ok());
    }

    #[test]
    fn every_truncation_is_rejected() {
        let (hdr, p) = build_super(&Spec::default(), 10);
        let mut out = vec![0u8; 10_000];
        for len in 0..p.len() {
            let r = segment(&hdr, &p[..len], 0, &mut out, |_, _| panic!("no segment"));
            assert!(r.is_err(), "length {len} accepted");
        }
        // Also when the IPv4 total length itself is cut into the TCP header.
        for l4 in 0..32 {
            let mut q = p[..20 + l4].to_vec();
            q[2..4].copy_from_slice(&((20 + l4) as u16).to_be_bytes());
            let r = segment(&hdr, &q, 0, &mut out, |_, _| {});
            let required = if l4 < 20 { 20 } else { 32 };
            assert_eq!(
                r,
                Err(WireError::Truncated {
                    layer: Layer::Tcp,
                    required,
                    len: l4
                }
                .into())
            );
        }
    }

    #[test]
    fn chunks_group_whole_segments() {
        let segs = Segments {
            count: 10,
            stride: 100,
            last_len: 50,
            prefix_len: 22,
        };
        let c: Vec<_> = segs.chunks(350, 64).collect();
        assert_eq!(c, vec![0..300, 300..600, 600..900, 900..950]);
        let c: Vec<_> = segs.chunks(65_000, 4).collect();
        assert_eq!(c, vec![0..400, 400..800, 800..950]);
        let c: Vec<_> = segs.chunks(10, 64).collect();
        assert_eq!(
            c.len(),
            10,
            "a segment larger than the cap still goes alone"
        );
        assert_eq!(c[9], 900..950);
    }

    prop_compose! {
        pub(crate) fn arb_spec(max_payload: usize)(
            src in any::<[u8; 4]>(),
            dst in any::<[u8; 4]>(),
            sport in any::<u16>(),
            dport in any::<u16>(),
            seq in any::<u32>(),
            ack in any::<u32>(),
            extra in prop::sample::select(vec![0, tcp::PSH, tcp::FIN | tcp::PSH, tcp::CWR, tcp::ECE, tcp::CWR | tcp::ECE | tcp::PSH]),
            window in any::<u16>(),
            words in 0..=10usize,
            opt_byte in any::<u8>(),
            ident in any::<u16>(),
            ttl in 1..=255u8,
            tos in any::<u8>(),
            df in any::<bool>(),
            payload in prop::collection::vec(any::<u8>(), 0..=max_payload),
        ) -> Spec {
            // NOPs then a recognisable tail byte: valid option bytes of any word count.
            let mut options = vec![1u8; words * 4];
            if let Some(last) = options.last_mut() { *last = opt_byte | 1; }
            if opt_byte == 0 { options.fill(1); }
            Spec { src, dst, sport, dport, seq, ack, flags: tcp::ACK_FLAG | extra, window, options, ident, ttl, tos, df, payload }
        }
    }

    proptest! {
        #[test]
        fn segments_are_correct_packets(
            s in arb_spec(65_535 - 80),
            mss in 1..=9000u16,
            prefix_len in 0..=40usize,
        ) {
            let payload_len = s.payload.len();
            prop_assume!(payload_len.div_ceil(usize::from(mss)) <= 2000);
            let (hdr, p) = build_super(&s, mss);
            let mut out = vec![0u8; plan(&hdr, &p, prefix_len).unwrap().total_len()];
            let mut seen = 0usize;
            let segs = segment(&hdr, &p, prefix_len, &mut out, |prefix, inner| {
                assert_eq!(prefix.len(), prefix_len);
                prefix.fill(0xa5);
                assert_eq!(inner.len(), TcpIpv4::parse(inner).unwrap().packet.len());
                seen += 1;
            }).unwrap();
            prop_assert_eq!(seen, segs.count);
            prop_assert_eq!(segs.count, payload_len.div_ceil(usize::from(mss)).max(1));
            let mut data = Vec::new();
            for (i, r) in segs.iter().enumerate() {
                let seg = &out[r];
                prop_assert!(seg[..prefix_len].iter().all(|&b| b == 0xa5));
                let inner = &seg[prefix_len..];
                assert_checksums_ok(inner);
                let want = expected_segment(&s, usize::from(mss), i, segs.count);
                prop_assert_eq!(inner, &want[..]);
                data.extend_from_slice(TcpIpv4::parse(inner).unwrap().payload());
            }
            prop_assert_eq!(data, s.payload);
        }

        #[test]
        fn never_panics_on_junk(
            bytes in prop::collection::vec(any::<u8>(), 0..200),
            gso_type in any::<u8>(),
            gso_size in any::<u16>(),
            flags in any::<u8>(),
            csum_start in any::<u16>(),
            csum_offset in any::<u16>(),
        ) {
            let hdr = VirtioNetHdr { flags, gso_type, hdr_len: 0, gso_size, csum_start, csum_offset };
            let mut out = vec![0u8; 4096];
            let _ = segment(&hdr, &bytes, 14, &mut out, |_, _| {});
            let mut b = bytes.clone();
            let _ = complete_checksum(&hdr, &mut b);
        }
    }
}

/// `segment_headers` against `segment`: the same bytes, once as header + payload slices.
#[cfg(test)]
mod header_tests {
    use super::*;
    use crate::virtio::F_NEEDS_CSUM;

    /// Room for any train of one 64 KiB super-packet.
    const OUT: usize = 4 * 65_545;

    /// An IPv4 + TCP super-packet with `ip_opts` bytes of IP options, a 32-byte TCP header
    /// and `payload` bytes of patterned data.
    fn super_packet(ip_opts: usize, payload: usize, flags: u8) -> Vec<u8> {
        let ip_len = 20 + ip_opts;
        let total = ip_len + 32 + payload;
        let mut p = vec![0u8; total];
        p[0] = 0x40 | (ip_len / 4) as u8;
        p[1] = 0x02; // ECT(0)
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p[4..6].copy_from_slice(&0xfff0u16.to_be_bytes()); // wraps during the train
        p[6] = 0x40; // DF
        p[8] = 64;
        p[9] = ipv4::protocol::TCP;
        p[12..16].copy_from_slice(&[10, 244, 1, 2]);
        p[16..20].copy_from_slice(&[10, 244, 2, 2]);
        for b in &mut p[20..ip_len] {
            *b = 1; // NOP options
        }
        let t = ip_len;
        p[t..t + 2].copy_from_slice(&40000u16.to_be_bytes());
        p[t + 2..t + 4].copy_from_slice(&5201u16.to_be_bytes());
        p[t + 4..t + 8].copy_from_slice(&0xffff_f000u32.to_be_bytes()); // wraps too
        p[t + 8..t + 12].copy_from_slice(&77u32.to_be_bytes());
        p[t + 12] = 8 << 4;
        p[t + 13] = flags;
        p[t + 14..t + 16].copy_from_slice(&502u16.to_be_bytes());
        p[t + 20..t + 32].copy_from_slice(&[1, 1, 8, 10, 1, 2, 3, 4, 5, 6, 7, 8]);
        for (i, b) in p[t + 32..].iter_mut().enumerate() {
            *b = (i * 7 + i / 251) as u8;
        }
        p
    }

    fn tso(mss: u16, ip_len: usize) -> VirtioNetHdr {
        VirtioNetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV4,
            hdr_len: (ip_len + 32) as u16,
            gso_size: mss,
            csum_start: ip_len as u16,
            csum_offset: 16,
        }
    }

    #[test]
    fn header_and_payload_slices_equal_gso_segment() {
        let prefix: [u8; 22] = std::array::from_fn(|i| 0xa0 + i as u8);
        let cases = [
            (0, 65_483, 1398, tcp::ACK_FLAG | tcp::PSH),
            (0, 1398 * 10, 1398, tcp::ACK_FLAG | tcp::FIN | tcp::CWR),
            (8, 5000, 1000, tcp::ACK_FLAG | tcp::PSH | tcp::CWR),
            (0, 1, 1398, tcp::ACK_FLAG),
            (4, 3001, 3, tcp::ACK_FLAG),
        ];
        for (ip_opts, payload, mss, flags) in cases {
            let packet = super_packet(ip_opts, payload, flags);
            let hdr = tso(mss, 20 + ip_opts);
            let mut want = vec![0u8; OUT];
            let segs = segment(&hdr, &packet, prefix.len(), &mut want, |p, _| {
                p.copy_from_slice(&prefix)
            })
            .unwrap();
            let mut headers = vec![0u8; OUT];
            let plan = segment_headers(&hdr, &packet, &prefix, &mut headers).unwrap();
            assert_eq!(plan.segs, segs);
            let mut got = Vec::new();
            for i in 0..plan.segs.count {
                got.extend_from_slice(&headers[i * plan.header_len..(i + 1) * plan.header_len]);
                got.extend_from_slice(&packet[plan.piece(i)]);
            }
            assert!(plan.piece(plan.segs.count).is_empty());
            assert_eq!(
                got,
                &want[..segs.total_len()],
                "ip_opts={ip_opts} payload={payload} mss={mss}"
            );
        }
    }

    #[test]
    fn segment_headers_refuses_what_gso_segment_refuses() {
        let packet = super_packet(0, 3000, tcp::ACK_FLAG);
        let mut out = vec![0u8; OUT];
        let zero = tso(0, 20);
        assert!(matches!(
            segment_headers(&zero, &packet, &[0; 22], &mut out),
            Err(OffloadError::ZeroGsoSize)
        ));
        assert!(segment_headers(&tso(1000, 20), &packet[..30], &[0; 22], &mut out).is_err());
        let mut small = [0u8; 100];
        assert!(matches!(
            segment_headers(&tso(1000, 20), &packet, &[0; 22], &mut small),
            Err(OffloadError::OutputTooSmall { .. })
        ));
    }
}

/// [`partial_checksum`]: what a sender's checksum offload leaves is recognised, completed to
/// the real checksum, and nothing else is taken for it.
#[cfg(test)]
mod partial_tests {
    use super::tests::{arb_spec, assert_checksums_ok, build, Spec};
    use super::*;
    use etherparse::PacketBuilder;
    use proptest::prelude::*;

    /// `packet` with the transport checksum at `offset` replaced by the pseudo-header sum, as a
    /// sender with checksum offload puts it on the wire.
    fn made_partial(packet: &[u8], protocol: u8, offset: usize) -> Vec<u8> {
        let mut p = packet.to_vec();
        let ip = Ipv4Packet::new_checked(&p[..]).unwrap();
        let seed = checksum::fold(checksum::pseudo_header(
            ip.src(),
            ip.dst(),
            protocol,
            (ip.total_len() - ip.header_len()) as u16,
        ));
        let at = ip.header_len() + offset;
        p[at..at + 2].copy_from_slice(&seed.to_be_bytes());
        p
    }

    fn udp(payload: &[u8]) -> Vec<u8> {
        let b = PacketBuilder::ipv4([10, 244, 1, 2], [10, 244, 2, 2], 64).udp(5353, 53);
        let mut p = Vec::new();
        b.write(&mut p, payload).unwrap();
        p
    }

    /// Checks the UDP checksum of a whole IPv4 packet with etherparse.
    fn udp_checksum_ok(p: &[u8]) -> bool {
        let ip = etherparse::Ipv4Slice::from_slice(p).unwrap();
        let udp = etherparse::UdpSlice::from_slice(ip.payload().payload).unwrap();
        let want = udp
            .to_header()
            .calc_checksum_ipv4_raw(
                ip.header().source(),
                ip.header().destination(),
                udp.payload(),
            )
            .unwrap();
        udp.checksum() == want
    }

    #[test]
    fn a_partial_tcp_checksum_is_handed_over_and_completes_to_the_real_one() {
        let full = build(&Spec::default());
        let mut p = made_partial(&full, ipv4::protocol::TCP, tcp::CHECKSUM);
        let hdr = partial_checksum(&p).expect("partial");
        assert_eq!(
            (hdr.flags, hdr.gso_type, hdr.csum_start, hdr.csum_offset),
            (F_NEEDS_CSUM, GSO_NONE, 20, TCP_CSUM_OFFSET)
        );
        // The headers alone say the same (the coalescer keeps only those).
        assert_eq!(partial_checksum(&p[..40]), Some(hdr));
        complete_checksum(&hdr, &mut p).unwrap();
        assert_eq!(p, full);
        assert_checksums_ok(&p);
        // A full checksum is not partial.
        assert_eq!(partial_checksum(&full), None);
    }

    #[test]
    fn a_partial_udp_checksum_is_handed_over_and_completes_to_the_real_one() {
        let full = udp(b"a query of some length");
        assert!(udp_checksum_ok(&full));
        let mut p = made_partial(&full, ipv4::protocol::UDP, 6);
        let hdr = partial_checksum(&p).expect("partial");
        assert_eq!((hdr.csum_start, hdr.csum_offset), (20, UDP_CSUM_OFFSET));
        complete_checksum(&hdr, &mut p).unwrap();
        assert!(udp_checksum_ok(&p), "{p:02x?}");
        assert_eq!(partial_checksum(&full), None);
        // UDP without a checksum (0) is never partial: a pseudo-header sum is never 0.
        let mut none = full.clone();
        none[26..28].fill(0);
        assert_eq!(partial_checksum(&none), None);
    }

    #[test]
    fn fragments_other_protocols_and_short_packets_are_not_partial() {
        let p = made_partial(&build(&Spec::default()), ipv4::protocol::TCP, tcp::CHECKSUM);
        // More fragments, or an offset: the kernel completed the checksum before fragmenting.
        for frag in [0x20u8, 0x00] {
            let mut f = p.clone();
            f[6] = frag;
            f[7] = if frag == 0 { 1 } else { 0 };
            assert_eq!(partial_checksum(&f), None, "{frag:#x}");
        }
        // DF alone is fine.
        let mut df = p.clone();
        df[6] = 0x40;
        assert!(partial_checksum(&df).is_some());
        // ICMP, IPv6, a bad IHL.
        let mut icmp = p.clone();
        icmp[9] = ipv4::protocol::ICMP;
        assert_eq!(partial_checksum(&icmp), None);
        let mut v6 = p.clone();
        v6[0] = 0x65;
        assert_eq!(partial_checksum(&v6), None);
        let mut ihl = p.clone();
        ihl[0] = 0x44;
        assert_eq!(partial_checksum(&ihl), None);
        // A total length that ends before the checksum field.
        let mut short = p.clone();
        short[2..4].copy_from_slice(&30u16.to_be_bytes());
        assert_eq!(partial_checksum(&short), None);
        // Every cut before the end of the checksum field: no answer, and no panic.
        for cut in 0..20 + tcp::CHECKSUM + 2 {
            assert_eq!(partial_checksum(&p[..cut]), None, "cut at {cut}");
        }
    }

    proptest! {
        /// A random value in the checksum field is taken for a partial checksum exactly when
        /// it equals the pseudo-header sum.
        #[test]
        fn only_the_pseudo_header_sum_is_partial(
            s in arb_spec(1500),
            stored in any::<u16>(),
            tcp_packet in any::<bool>(),
        ) {
            let (mut p, protocol, offset) = if tcp_packet {
                (build(&s), ipv4::protocol::TCP, tcp::CHECKSUM)
            } else {
                (udp(&s.payload), ipv4::protocol::UDP, 6)
            };
            let seed = {
                let partial = made_partial(&p, protocol, offset);
                let at = Ipv4Packet::new_checked(&partial[..]).unwrap().header_len() + offset;
                u16::from_be_bytes([partial[at], partial[at + 1]])
            };
            let at = Ipv4Packet::new_checked(&p[..]).unwrap().header_len() + offset;
            p[at..at + 2].copy_from_slice(&stored.to_be_bytes());
            prop_assert_eq!(partial_checksum(&p).is_some(), stored == seed);
            // With the seed in the field, completing always gives a checksum that verifies.
            p[at..at + 2].copy_from_slice(&seed.to_be_bytes());
            let hdr = partial_checksum(&p).unwrap();
            complete_checksum(&hdr, &mut p).unwrap();
            if tcp_packet {
                assert_checksums_ok(&p);
            } else {
                prop_assert!(udp_checksum_ok(&p));
            }
        }

        #[test]
        fn never_panics_on_junk(bytes in prop::collection::vec(any::<u8>(), 0..80)) {
            let _ = partial_checksum(&bytes);
        }
    }
}

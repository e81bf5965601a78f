//! Batched datagram I/O shared by the UDP and raw sockets: `recvmmsg` into caller buffers and
//! `sendmmsg` from caller slices, with the UDP GRO/GSO control messages.
//!
//! All per-call scratch (message headers, iovecs, addresses, control buffers) lives in fixed
//! arrays on the stack, so a batch costs no heap allocation.

use std::io;
use std::mem;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};

#[cfg(test)]
use super::wait::{wait_readable, Stop};

/// Most datagrams moved by one `recv_batch` or `sendmmsg` call; larger requests are cut.
pub const MAX_BATCH: usize = 64;

/// `SOL_UDP` option and control-message type carrying the GSO segment size on send.
pub(crate) const UDP_SEGMENT: libc::c_int = 103;
/// `SOL_UDP` option enabling GRO delivery, and the control message carrying its segment size.
pub(crate) const UDP_GRO: libc::c_int = 104;

/// Most segments in one UDP GSO send (`UDP_MAX_SEGMENTS`: 64 on older kernels, 128 since
/// Linux 6.x; we stay at the lower bound). Longer trains are cut into several GSO messages.
pub const MAX_GSO_SEGMENTS: usize = 64;
/// Largest UDP payload in one IPv4 datagram, GSO or not (65535 - 20 - 8).
pub const MAX_UDP_PAYLOAD: usize = 65507;

/// Control buffer per message: room for one `int` cmsg (CMSG_SPACE(4) = 24 on 64-bit Linux),
/// as u64 words so the buffer has cmsghdr alignment.
type CmsgBuf = [u64; 4];

/// What one received datagram was.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecvMeta {
    /// Sender address (port 0 for raw IP sockets).
    pub src: SocketAddrV4,
    /// Bytes written into the matching buffer.
    pub len: usize,
    /// Size of each datagram when the kernel coalesced several (UDP GRO): the buffer holds
    /// `len / segment_size` datagrams of that size and possibly one shorter tail. Equals `len`
    /// for a single datagram.
    pub segment_size: usize,
    /// The datagram was larger than its buffer and was cut (`MSG_TRUNC`): drop it.
    pub truncated: bool,
}

impl Default for RecvMeta {
    fn default() -> Self {
        RecvMeta {
            src: SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0),
            len: 0,
            segment_size: 0,
            truncated: false,
        }
    }
}

/// One datagram, or one GSO train of equal-size datagrams, to send.
#[derive(Clone, Copy, Debug)]
pub struct Transmit<'a> {
    /// Destination (the port is ignored by raw IP sockets).
    pub dst: SocketAddrV4,
    /// Bytes to send: one datagram payload, or with `segment_size` several concatenated ones.
    pub data: &'a [u8],
    /// `Some(n)`: `data` is a run of `n`-byte datagrams (the last may be shorter), of any
    /// length. Sent as UDP GSO (`UDP_SEGMENT`) messages of up to [`MAX_GSO_SEGMENTS`] segments
    /// and [`MAX_UDP_PAYLOAD`] bytes when GSO is on, else split into separate datagrams.
    pub segment_size: Option<u16>,
}

/// Outcome of a `send_batch`: how many items went out and how many were dropped.
#[derive(Debug, Default)]
pub struct BatchSent {
    /// Items (not datagrams) handed to the kernel in full.
    pub sent: usize,
    /// Items the kernel refused (e.g. `EMSGSIZE`, `ENETUNREACH`); they were skipped.
    pub failed: usize,
    /// The error of the last refused item.
    pub last_error: Option<io::Error>,
}

/// Receives up to `min(bufs.len(), meta.len(), MAX_BATCH)` datagrams.
///
/// Blocks until at least one datagram is there; returns `Ok(0)` once `stop` is raised.
#[cfg(test)] // The data path reads without blocking; tests wait with this.
pub(crate) fn recv_batch<B: AsMut<[u8]>>(
    fd: RawFd,
    bufs: &mut [B],
    meta: &mut [RecvMeta],
    stop: &Stop,
) -> io::Result<usize> {
    loop {
        let n = try_recv_batch(fd, bufs, meta)?;
        if n > 0 || !wait_readable(fd, stop)? {
            return Ok(n);
        }
    }
}

/// Receives up to `min(bufs.len(), meta.len(), MAX_BATCH)` datagrams without blocking: `Ok(0)`
/// when nothing is queued.
pub(crate) fn try_recv_batch<B: AsMut<[u8]>>(
    fd: RawFd,
    bufs: &mut [B],
    meta: &mut [RecvMeta],
) -> io::Result<usize> {
    let n = bufs.len().min(meta.len()).min(MAX_BATCH);
    if n == 0 {
        return Ok(0);
    }
    // SAFETY: all-zero is a valid value for these plain C structs (null pointers, zero lengths).
    let mut hdrs: [libc::mmsghdr; MAX_BATCH] = unsafe { mem::zeroed() };
    // SAFETY: as above.
    let mut iovs: [libc::iovec; MAX_BATCH] = unsafe { mem::zeroed() };
    // SAFETY: as above.
    let mut addrs: [libc::sockaddr_in; MAX_BATCH] = unsafe { mem::zeroed() };
    let mut cmsgs: [CmsgBuf; MAX_BATCH] = [[0; 4]; MAX_BATCH];
    loop {
        for i in 0..n {
            let buf = bufs[i].as_mut();
            iovs[i] = libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            };
            let h = &mut hdrs[i].msg_hdr;
            h.msg_name = (&mut addrs[i] as *mut libc::sockaddr_in).cast();
            h.msg_namelen = mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            h.msg_iov = &mut iovs[i];
            h.msg_iovlen = 1;
            h.msg_control = cmsgs[i].as_mut_ptr().cast();
            h.msg_controllen = mem::size_of::<CmsgBuf>() as _;
            h.msg_flags = 0;
            hdrs[i].msg_len = 0;
        }
        // SAFETY: hdrs[..n] point at iovecs, addresses and control buffers that live until the
        // call returns; each iovec covers exactly one caller buffer, borrowed mutably here.
        let rc = unsafe {
            libc::recvmmsg(
                fd,
                hdrs.as_mut_ptr(),
                n as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if rc < 0 {
            let err = io::Error::last_os_error();
            match err.kind() {
                io::ErrorKind::WouldBlock => return Ok(0),
                io::ErrorKind::Interrupted => continue,
                _ => return Err(err),
            }
        }
        let got = rc as usize;
        for i in 0..got {
            let h = &hdrs[i].msg_hdr;
            let len = hdrs[i].msg_len as usize;
            let a = &addrs[i];
            meta[i] = RecvMeta {
                src: SocketAddrV4::new(
                    Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                    u16::from_be(a.sin_port),
                ),
                len,
                segment_size: gro_segment_size(h).unwrap_or(len),
                truncated: h.msg_flags & libc::MSG_TRUNC != 0,
            };
        }
        return Ok(got);
    }
}

/// The UDP_GRO segment size the kernel attached to a received message, if any.
fn gro_segment_size(h: &libc::msghdr) -> Option<usize> {
    // SAFETY: h was filled in by recvmmsg; msg_control/msg_controllen describe our live control
    // buffer and the kernel-written length, which is what the CMSG_* walkers expect.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(h) };
    while !cmsg.is_null() {
        // SAFETY: CMSG_FIRSTHDR/CMSG_NXTHDR return either null or a pointer to a complete
        // header inside the control buffer.
        let c = unsafe { &*cmsg };
        if c.cmsg_level == libc::SOL_UDP && c.cmsg_type == UDP_GRO {
            // SAFETY: a UDP_GRO cmsg carries one int right after the header; the data pointer
            // may be unaligned in principle, hence read_unaligned.
            let size =
                unsafe { std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::c_int>()) };
            return usize::try_from(size).ok().filter(|&s| s > 0);
        }
        // SAFETY: h and cmsg are as described above.
        cmsg = unsafe { libc::CMSG_NXTHDR(h, cmsg) };
    }
    None
}

/// Sends `items`, batching `MAX_BATCH` datagrams per `sendmmsg`. Blocks while the socket
/// buffer is full. GSO trains are sent as few messages as the kernel limits allow
/// ([`MAX_GSO_SEGMENTS`], [`MAX_UDP_PAYLOAD`]) while `gso` is true; if the kernel
/// answers a GSO message with `EIO` (egress device cannot checksum it) `gso` is switched off
/// and that train and all later ones are split into plain datagrams instead.
pub(crate) fn send_batch(fd: RawFd, items: &[Transmit<'_>], gso: &AtomicBool) -> BatchSent {
    let mut out = BatchSent::default();
    // Cursor: next item, and byte offset inside it when a train is being split.
    let (mut item, mut offset) = (0usize, 0usize);
    // SAFETY: all-zero is a valid value for these plain C structs.
    let mut hdrs: [libc::mmsghdr; MAX_BATCH] = unsafe { mem::zeroed() };
    // SAFETY: as above.
    let mut iovs: [libc::iovec; MAX_BATCH] = unsafe { mem::zeroed() };
    // SAFETY: as above.
    let mut addrs: [libc::sockaddr_in; MAX_BATCH] = unsafe { mem::zeroed() };
    let mut cmsgs: [CmsgBuf; MAX_BATCH] = [[0; 4]; MAX_BATCH];
    // For each message: the cursor after it, and whether it finishes its item.
    let mut after = [(0usize, 0usize, false); MAX_BATCH];
    while item < items.len() {
        let gso_on = gso.load(Ordering::Relaxed);
        let (mut bi, mut boff) = (item, offset);
        let mut n = 0;
        while n < MAX_BATCH && bi < items.len() {
            let it = &items[bi];
            let train = it
                .segment_size
                .map(usize::from)
                .filter(|&s| s > 0 && s < it.data.len());
            let (chunk, gso_size) = match train {
                Some(s) => {
                    // One message carries one datagram without GSO, else as many segments as
                    // the kernel takes in one GSO send (count and 16-bit IPv4 length limits).
                    let per_msg = if gso_on {
                        s * MAX_GSO_SEGMENTS.min(MAX_UDP_PAYLOAD / s).max(1)
                    } else {
                        s
                    };
                    let end = (boff + per_msg).min(it.data.len());
                    let chunk = &it.data[boff..end];
                    (chunk, (gso_on && chunk.len() > s).then_some(s as u16))
                }
                None => (it.data, None),
            };
            iovs[n] = libc::iovec {
                iov_base: chunk.as_ptr() as *mut libc::c_void,
                iov_len: chunk.len(),
            };
            addrs[n] = sockaddr(it.dst);
            let h = &mut hdrs[n].msg_hdr;
            h.msg_name = (&mut addrs[n] as *mut libc::sockaddr_in).cast();
            h.msg_namelen = mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            h.msg_iov = &mut iovs[n];
            h.msg_iovlen = 1;
            h.msg_flags = 0;
            match gso_size {
                Some(size) => {
                    h.msg_control = cmsgs[n].as_mut_ptr().cast();
                    // SAFETY: CMSG_SPACE is a pure size computation.
                    h.msg_controllen =
                        unsafe { libc::CMSG_SPACE(mem::size_of::<u16>() as u32) } as _;
                    // SAFETY: the control buffer (32 bytes, 8-aligned) holds CMSG_SPACE(2) = 24
                    // bytes; FIRSTHDR therefore returns a valid header pointer into it.
                    unsafe {
                        let c = libc::CMSG_FIRSTHDR(h);
                        (*c).cmsg_level = libc::SOL_UDP;
                        (*c).cmsg_type = UDP_SEGMENT;
                        (*c).cmsg_len = libc::CMSG_LEN(mem::size_of::<u16>() as u32) as _;
                        std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<u16>(), size);
                    }
                }
                None => {
                    h.msg_control = std::ptr::null_mut();
                    h.msg_controllen = 0;
                }
            }
            boff += chunk.len();
            let done = boff >= it.data.len();
            if done {
                bi += 1;
                boff = 0;
            }
            after[n] = (bi, boff, done);
            n += 1;
        }
        // SAFETY: hdrs[..n] point at iovecs over caller slices borrowed for this call and at
        // address/control buffers on our stack, all alive until sendmmsg returns.
        let rc = unsafe { libc::sendmmsg(fd, hdrs.as_mut_ptr(), n as libc::c_uint, 0) };
        if rc > 0 {
            let k = rc as usize;
            out.sent += after[..k].iter().filter(|a| a.2).count();
            (item, offset) = (after[k - 1].0, after[k - 1].1);
            continue;
        }
        let err = io::Error::last_os_error();
        if err.kind() == io::ErrorKind::Interrupted {
            continue;
        }
        let first_was_gso = !hdrs[0].msg_hdr.msg_control.is_null();
        if first_was_gso && err.raw_os_error() == Some(libc::EIO) {
            // The route's device cannot take UDP GSO: fall back to split sends for good.
            gso.store(false, Ordering::Relaxed);
            continue;
        }
        out.failed += 1;
        out.last_error = Some(err);
        (item, offset) = (item + 1, 0);
    }
    out
}

/// Most segments one `send_segments` call takes (its iovec array lives on the stack).
pub const MAX_SEGMENTS: usize = 256;

/// Sends a train of datagrams to `dst`, datagram `i` being `segments[i][0]` followed by
/// `segments[i][1]` (a header built apart and a payload left where it was read, so the payload
/// is never copied in userspace). Every datagram but the last is `segment_size` bytes long.
///
/// With `gso` on, consecutive datagrams go out as UDP GSO messages of up to
/// [`MAX_GSO_SEGMENTS`] segments and [`MAX_UDP_PAYLOAD`] bytes; without it, or after the
/// kernel answered a GSO message with `EIO` (which turns `gso` off), one datagram per message.
/// At most [`MAX_SEGMENTS`] datagrams; more are refused as one failed item. `sent`/`failed`
/// count messages.
pub(crate) fn send_segments(
    fd: RawFd,
    dst: SocketAddrV4,
    segments: &[[&[u8]; 2]],
    segment_size: u16,
    gso: &AtomicBool,
) -> BatchSent {
    let mut out = BatchSent::default();
    if segments.len() > MAX_SEGMENTS || segment_size == 0 {
        out.failed = 1;
        out.last_error = Some(io::Error::from(io::ErrorKind::InvalidInput));
        return out;
    }
    let size = usize::from(segment_size);
    // SAFETY: all-zero is a valid value for these plain C structs.
    let mut iovs: [libc::iovec; 2 * MAX_SEGMENTS] = unsafe { mem::zeroed() };
    for (pair, seg) in iovs.chunks_exact_mut(2).zip(segments) {
        for (iov, part) in pair.iter_mut().zip(seg) {
            *iov = libc::iovec {
                iov_base: part.as_ptr() as *mut libc::c_void,
                iov_len: part.len(),
            };
        }
    }
    let mut addr = sockaddr(dst);
    let mut cmsg: CmsgBuf = [0; 4];
    let mut next = 0;
    while next < segments.len() {
        let gso_on = gso.load(Ordering::Relaxed);
        let per_msg = if gso_on {
            MAX_GSO_SEGMENTS.min(MAX_UDP_PAYLOAD / size).max(1)
        } else {
            1
        };
        // SAFETY: all-zero is a valid value for these plain C structs.
        let mut hdrs: [libc::mmsghdr; MAX_BATCH] = unsafe { mem::zeroed() };
        let mut n = 0;
        let mut first = next;
        while n < MAX_BATCH && first < segments.len() {
            let count = per_msg.min(segments.len() - first);
            let h = &mut hdrs[n].msg_hdr;
            h.msg_name = (&mut addr as *mut libc::sockaddr_in).cast();
            h.msg_namelen = mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            h.msg_iov = &mut iovs[2 * first];
            h.msg_iovlen = 2 * count;
            if count > 1 {
                // Every message uses the same segment size, so all share one control buffer.
                h.msg_control = cmsg.as_mut_ptr().cast();
                // SAFETY: CMSG_SPACE is a pure size computation.
                h.msg_controllen = unsafe { libc::CMSG_SPACE(mem::size_of::<u16>() as u32) } as _;
                // SAFETY: the control buffer (32 bytes, 8-aligned) holds CMSG_SPACE(2) = 24
                // bytes; FIRSTHDR therefore returns a valid header pointer into it.
                unsafe {
                    let c = libc::CMSG_FIRSTHDR(h);
                    (*c).cmsg_level = libc::SOL_UDP;
                    (*c).cmsg_type = UDP_SEGMENT;
                    (*c).cmsg_len = libc::CMSG_LEN(mem::size_of::<u16>() as u32) as _;
                    std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<u16>(), segment_size);
                }
            }
            first += count;
            n += 1;
        }
        // SAFETY: hdrs[..n] point at iovecs over the caller's slices (borrowed for this call),
        // at `addr` and at `cmsg`, all alive until sendmmsg returns; each msg_iov range lies
        // inside `iovs`.
        let rc = unsafe { libc::sendmmsg(fd, hdrs.as_mut_ptr(), n as libc::c_uint, 0) };
        if rc > 0 {
            let k = rc as usize;
            out.sent += k;
            next += hdrs[..k]
                .iter()
                .map(|h| h.msg_hdr.msg_iovlen / 2)
                .sum::<usize>();
            continue;
        }
        let err = io::Error::last_os_error();
        if err.kind() == io::ErrorKind::Interrupted {
            continue;
        }
        if !hdrs[0].msg_hdr.msg_control.is_null() && err.raw_os_error() == Some(libc::EIO) {
            // The route's device cannot take UDP GSO: fall back to one datagram per message.
            gso.store(false, Ordering::Relaxed);
            continue;
        }
        // Skip the message the kernel refused.
        out.failed += 1;
        out.last_error = Some(err);
        next += hdrs[0].msg_hdr.msg_iovlen / 2;
    }
    out
}

fn sockaddr(addr: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: addr.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*addr.ip()).to_be(),
        },
        sin_zero: [0; 8],
    }
}

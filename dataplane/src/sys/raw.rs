//! The IP-in-IP underlay socket: `AF_INET`/`SOCK_RAW`/`IPPROTO_IPIP` with `IP_HDRINCL`.
//!
//! Receive yields whole outer IPv4 packets (outer header included, as a raw socket delivers
//! them) for `proto::ipip::decapsulate`; send takes whole outer packets as built by
//! `proto::ipip::encapsulate`. With `IP_HDRINCL` the kernel still fills in the total length and
//! the header checksum, and picks an IP ID when ours is 0 (raw(7)). Bound to the underlay IP so
//! only tunnel packets addressed to this node arrive. There is no GSO for raw sockets, so the
//! data path batches with `sendmmsg`/`recvmmsg` instead.
//!
//! Note: a kernel that runs the `ipip` module still hands every protocol-4 packet to raw sockets
//! as well (raw delivery comes before the protocol handler), so the agent needs no tunnel device.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::sync::atomic::AtomicBool;

use socket2::{Domain, Protocol, SockFilter, Socket, Type};

use super::mmsg;
use super::mmsg::{BatchSent, RecvMeta, Transmit};
use super::sockopt::{grow_buffers, setsockopt_int, socket_drops};
#[cfg(test)]
use super::wait::Stop;

/// IP protocol number of IP-in-IP (RFC 2003).
pub const IPPROTO_IPIP: i32 = 4;

/// Why the socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum RawError {
    #[error("cannot open the IP-in-IP raw socket: {0}{hint}", hint = perm_hint(.0))]
    Create(#[source] io::Error),
    #[error("cannot set IP_HDRINCL on the IP-in-IP raw socket: {0}")]
    HdrIncl(#[source] io::Error),
    #[error("cannot attach the packet filter that shares IP-in-IP between data-path workers: {0} (run with --workers 1)")]
    Filter(#[source] io::Error),
    #[error("cannot bind the IP-in-IP raw socket to {addr}: {source} (is {addr} on a device in this network namespace?)")]
    Bind {
        addr: Ipv4Addr,
        #[source]
        source: io::Error,
    },
}

fn perm_hint(e: &io::Error) -> &'static str {
    if e.kind() == io::ErrorKind::PermissionDenied {
        " (needs CAP_NET_RAW: run as root or `setcap cap_net_admin,cap_net_raw+ep`)"
    } else {
        ""
    }
}

/// The IP-in-IP raw socket; share it between a receive and a send thread (`&self` methods).
#[derive(Debug)]
pub struct IpipSocket {
    sock: Socket,
    local: Ipv4Addr,
    buffers: (usize, usize),
    // Raw sockets have no GSO; mmsg::send_batch takes the flag, permanently off here.
    no_gso: AtomicBool,
}

impl IpipSocket {
    /// Opens the socket bound to `local` with buffers of about `buffer_bytes`.
    pub fn bind(local: Ipv4Addr, buffer_bytes: usize) -> Result<IpipSocket, RawError> {
        IpipSocket::open(IPPROTO_IPIP, local, buffer_bytes)
    }

    /// One of `workers` receive sockets, which together get each IP-in-IP packet once: every
    /// raw socket of a protocol is handed a copy of every packet, so each carries a classic BPF
    /// filter (`share_filter`) that keeps the packets whose inner address pair hashes to
    /// `worker`. A flow's packets all go to one worker, in order.
    pub fn bind_share(
        local: Ipv4Addr,
        buffer_bytes: usize,
        worker: usize,
        workers: usize,
    ) -> Result<IpipSocket, RawError> {
        let sock = IpipSocket::open(IPPROTO_IPIP, local, buffer_bytes)?;
        if workers > 1 {
            sock.sock
                .attach_filter(&share_filter(worker, workers))
                .map_err(RawError::Filter)?;
        }
        Ok(sock)
    }

    /// A socket that only sends IP-in-IP (for a node that receives another encapsulation and
    /// has IP-in-IP peers): `IPPROTO_RAW`, which the kernel never hands received packets, so
    /// IP-in-IP arriving at this host is not copied to it.
    pub fn send_only(local: Ipv4Addr, buffer_bytes: usize) -> Result<IpipSocket, RawError> {
        IpipSocket::open(libc::IPPROTO_RAW, local, buffer_bytes)
    }

    fn open(protocol: i32, local: Ipv4Addr, buffer_bytes: usize) -> Result<IpipSocket, RawError> {
        let sock = Socket::new(
            Domain::IPV4,
            Type::RAW.cloexec(),
            Some(Protocol::from(protocol)),
        )
        .map_err(RawError::Create)?;
        setsockopt_int(sock.as_raw_fd(), libc::IPPROTO_IP, libc::IP_HDRINCL, 1)
            .map_err(RawError::HdrIncl)?;
        let buffers = grow_buffers(sock.as_raw_fd(), buffer_bytes);
        sock.bind(&SocketAddr::V4(SocketAddrV4::new(local, 0)).into())
            .map_err(|source| RawError::Bind {
                addr: local,
                source,
            })?;
        Ok(IpipSocket {
            sock,
            local,
            buffers,
            no_gso: AtomicBool::new(false),
        })
    }

    /// The bound underlay address.
    pub fn local_ip(&self) -> Ipv4Addr {
        self.local
    }

    /// Receive and send buffer sizes the kernel granted (as it reports them, i.e. doubled).
    pub fn buffer_sizes(&self) -> (usize, usize) {
        self.buffers
    }

    /// Packets the kernel dropped at this socket because it was full (0 if it cannot be read).
    pub fn receive_drops(&self) -> u64 {
        socket_drops(self.sock.as_fd()).unwrap_or(0)
    }

    /// Receives a batch of outer IPv4 packets; `meta[i].src` has the outer source (port 0)
    /// and `segment_size == len`. Size buffers for the underlay MTU (or 64 KiB if the underlay
    /// NIC may GRO-merge IP-in-IP TCP, which real NICs do and veth without NAPI does not).
    /// Blocks until one arrives; `Ok(0)` once `stop` is raised.
    #[cfg(test)] // The data path reads without blocking; tests wait with this.
    pub fn recv_batch<B: AsMut<[u8]>>(
        &self,
        bufs: &mut [B],
        meta: &mut [RecvMeta],
        stop: &Stop,
    ) -> io::Result<usize> {
        mmsg::recv_batch(self.sock.as_raw_fd(), bufs, meta, stop)
    }

    /// Like `recv_batch`, but returns `Ok(0)` at once when nothing is queued (for a loop that
    /// serves several descriptors and waits on all of them with a [`super::Watch`]).
    pub fn try_recv_batch<B: AsMut<[u8]>>(
        &self,
        bufs: &mut [B],
        meta: &mut [RecvMeta],
    ) -> io::Result<usize> {
        mmsg::try_recv_batch(self.sock.as_raw_fd(), bufs, meta)
    }

    /// Sends whole outer packets; `Transmit::dst` names the peer (port ignored) and
    /// `segment_size` must be `None`. Packets larger than the route MTU fail with `EMSGSIZE`.
    pub fn send_batch(&self, items: &[Transmit<'_>]) -> BatchSent {
        mmsg::send_batch(self.sock.as_raw_fd(), items, &self.no_gso)
    }

    /// Sends whole outer packets to `dst` (port ignored), packet `i` being `packets[i][0]`
    /// followed by `packets[i][1]` (headers built apart and a payload left where it was read),
    /// one `sendmmsg` message each. At most [`mmsg::MAX_SEGMENTS`] packets.
    pub fn send_segments(&self, dst: SocketAddrV4, packets: &[[&[u8]; 2]]) -> BatchSent {
        // Without GSO the segment size only has to be non-zero: every packet is a message.
        mmsg::send_segments(self.sock.as_raw_fd(), dst, packets, 1, &self.no_gso)
    }
}

/// The classic BPF program of [`IpipSocket::bind_share`]: accepts a packet (the filter sees it
/// from the outer IPv4 header on) when the hash of its inner flow, modulo `workers`, is
/// `worker`. The hash is the XOR of the inner addresses and, for TCP and UDP, of the ports,
/// folded to 16 bits, so it is the same in both directions and a flow's packets stay on one
/// worker. A packet too short to hold an inner header goes to worker 0, whose forwarder counts
/// it as malformed: exactly one socket gets every packet.
fn share_filter(worker: usize, workers: usize) -> Vec<SockFilter> {
    use libc::{
        BPF_ADD, BPF_ALU, BPF_AND, BPF_B, BPF_IND, BPF_JEQ, BPF_JGE, BPF_JMP, BPF_K, BPF_LD,
        BPF_LDX, BPF_LEN, BPF_LSH, BPF_MEM, BPF_MISC, BPF_MOD, BPF_MSH, BPF_RET, BPF_RSH, BPF_ST,
        BPF_STX, BPF_SUB, BPF_TAX, BPF_W, BPF_X, BPF_XOR,
    };
    let op = |code: u32, k: u32| SockFilter::new(code as u16, 0, 0, k);
    // Jumps count instructions after the next one.
    let jump = |code: u32, k: u32, jt: u8, jf: u8| SockFilter::new(code as u16, jt, jf, k);
    let (accept, refuse) = (u32::MAX, 0);
    let short = if worker == 0 { accept } else { refuse };
    // Scratch memory: M[0] the hash so far, M[1] the outer header length.
    vec![
        /* 0 */
        op(BPF_LDX | BPF_B | BPF_MSH, 0), // X = outer header length (checked by IP)
        /* 1 */ op(BPF_STX, 1),
        /* 2 */ op(BPF_LD | BPF_W | BPF_LEN, 0),
        /* 3 */ op(BPF_ALU | BPF_SUB | BPF_K, 20),
        /* 4 */ jump(BPF_JMP | BPF_JGE | BPF_X, 0, 1, 0), // room for an inner header?
        /* 5 */ op(BPF_RET | BPF_K, short),
        /* 6 */ op(BPF_LD | BPF_W | BPF_IND, 12), // inner source
        /* 7 */ op(BPF_ST, 0),
        /* 8 */ op(BPF_LD | BPF_W | BPF_IND, 16), // inner destination
        /* 9 */ op(BPF_LDX | BPF_W | BPF_MEM, 0),
        /* 10 */ op(BPF_ALU | BPF_XOR | BPF_X, 0),
        /* 11 */ op(BPF_ST, 0),
        /* 12 */ op(BPF_LDX | BPF_W | BPF_MEM, 1),
        /* 13 */ op(BPF_LD | BPF_B | BPF_IND, 9), // inner protocol
        /* 14 */ jump(BPF_JMP | BPF_JEQ | BPF_K, libc::IPPROTO_TCP as u32, 1, 0),
        /* 15 */
        jump(BPF_JMP | BPF_JEQ | BPF_K, libc::IPPROTO_UDP as u32, 0, 12), // to 28
        /* 16 */ op(BPF_LD | BPF_B | BPF_IND, 0), // inner version and header length
        /* 17 */ op(BPF_ALU | BPF_AND | BPF_K, 0xf),
        /* 18 */ op(BPF_ALU | BPF_LSH | BPF_K, 2),
        /* 19 */ op(BPF_ALU | BPF_ADD | BPF_X, 0),
        /* 20 */ op(BPF_MISC | BPF_TAX, 0), // X = where the inner ports are
        /* 21 */ op(BPF_LD | BPF_W | BPF_LEN, 0),
        /* 22 */ op(BPF_ALU | BPF_SUB | BPF_K, 4),
        /* 23 */ jump(BPF_JMP | BPF_JGE | BPF_X, 0, 0, 4), // no ports: to 28
        /* 24 */ op(BPF_LD | BPF_W | BPF_IND, 0), // source and destination port
        /* 25 */ op(BPF_LDX | BPF_W | BPF_MEM, 0),
        /* 26 */ op(BPF_ALU | BPF_XOR | BPF_X, 0),
        /* 27 */ op(BPF_ST, 0),
        /* 28 */
        op(BPF_LD | BPF_MEM, 0), // fold to 16 bits: the halves swap with direction
        /* 29 */ op(BPF_ALU | BPF_RSH | BPF_K, 16),
        /* 30 */ op(BPF_LDX | BPF_W | BPF_MEM, 0),
        /* 31 */ op(BPF_ALU | BPF_XOR | BPF_X, 0),
        /* 32 */ op(BPF_ALU | BPF_AND | BPF_K, 0xffff),
        /* 33 */ op(BPF_ST, 0),
        /* 34 */
        op(BPF_ALU | BPF_RSH | BPF_K, 8), // and mix the high byte into the low one
        /* 35 */ op(BPF_LDX | BPF_W | BPF_MEM, 0),
        /* 36 */ op(BPF_ALU | BPF_XOR | BPF_X, 0),
        /* 37 */ op(BPF_ALU | BPF_MOD | BPF_K, workers as u32),
        /* 38 */ jump(BPF_JMP | BPF_JEQ | BPF_K, worker as u32, 0, 1),
        /* 39 */ op(BPF_RET | BPF_K, accept),
        /* 40 */ op(BPF_RET | BPF_K, refuse),
    ]
}

impl AsRawFd for IpipSocket {
    fn as_raw_fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }
}

impl AsFd for IpipSocket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::testns::{assert_read_or_dropped, create, enter, in_netns, run};
    use etherparse::{Ipv4HeaderSlice, PacketBuilder};

    /// Outer IPv4 (protocol 4) around an inner UDP packet, built by etherparse.
    fn outer_packet(src: Ipv4Addr, dst: Ipv4Addr, inner_payload: &[u8]) -> Vec<u8> {
        let mut inner = Vec::new();
        PacketBuilder::ipv4([10, 244, 1, 2], [10, 244, 2, 2], 64)
            .udp(1000, 2000)
            .write(&mut inner, inner_payload)
            .unwrap();
        outer_around(src, dst, &inner)
    }

    fn outer_around(src: Ipv4Addr, dst: Ipv4Addr, inner: &[u8]) -> Vec<u8> {
        let mut outer = etherparse::Ipv4Header::new(
            inner.len() as u16,
            64,
            etherparse::IpNumber::IPV4,
            src.octets(),
            dst.octets(),
        )
        .unwrap();
        outer.header_checksum = outer.calc_header_checksum();
        let mut pkt = outer.to_bytes().to_vec();
        pkt.extend_from_slice(inner);
        pkt
    }

    #[test]
    fn worker_sockets_share_the_packets_each_once_by_inner_address_pair() {
        in_netns("raw-share", || {
            run("ip link set lo up");
            let lo = Ipv4Addr::LOCALHOST;
            let shares: Vec<IpipSocket> = (0..2)
                .map(|w| IpipSocket::bind_share(lo, 1 << 20, w, 2).unwrap())
                .collect();
            let sender = IpipSocket::send_only(lo, 1 << 20).unwrap();
            let send = |pkt: &[u8]| {
                let item = Transmit {
                    dst: SocketAddrV4::new(lo, 0),
                    data: pkt,
                    segment_size: None,
                };
                assert_eq!(sender.send_batch(&[item]).sent, 1);
            };
            // 32 flows, each one way and back: UDP and TCP between one pair of pods (only the
            // ports tell them apart), and ICMP between pairs of pods. Then a packet too short
            // for an inner header.
            let mut flows = Vec::new();
            for i in 0..32u16 {
                let (a, b) = ([10, 244, 1, 2], [10, 244, 2, 40]);
                let (a, b) = match i % 3 {
                    2 => ([10, 244, 1, 2 + i as u8], [10, 244, 2, 40 + 2 * i as u8]),
                    _ => (a, b),
                };
                let (pa, pb) = (40000 + 7 * i, 5201);
                for ((src, sp), (dst, dp)) in [((a, pa), (b, pb)), ((b, pb), (a, pa))] {
                    let builder = PacketBuilder::ipv4(src, dst, 64);
                    let mut inner = Vec::new();
                    match i % 3 {
                        0 => builder.udp(sp, dp).write(&mut inner, &[1; 16]),
                        1 => builder.tcp(sp, dp, 1, 1000).write(&mut inner, &[2; 16]),
                        _ => builder
                            .icmpv4_echo_request(1, i)
                            .write(&mut inner, &[3; 16]),
                    }
                    .unwrap();
                    send(&outer_around(lo, lo, &inner));
                    flows.push(inner[12..24].to_vec());
                }
            }
            send(&outer_around(lo, lo, &[0x45, 0, 0, 20, 0, 0]));
            let mut bufs = vec![vec![0u8; 2048]; 64];
            let mut meta = [RecvMeta::default(); 64];
            let mut got: Vec<Vec<Vec<u8>>> = vec![Vec::new(); 2];
            let mut short = vec![0; 2];
            for (w, sock) in shares.iter().enumerate() {
                let n = sock.try_recv_batch(&mut bufs, &mut meta).unwrap();
                for (b, m) in bufs.iter().zip(&meta).take(n) {
                    let p = &b[..m.len];
                    if p.len() < 40 {
                        short[w] += 1;
                        continue;
                    }
                    // Inner addresses and ports (or ICMP header).
                    got[w].push(p[32..44].to_vec());
                }
            }
            assert_eq!(short, [1, 0], "a short packet goes to worker 0 only");
            assert_eq!(got[0].len() + got[1].len(), flows.len(), "each packet once");
            for kind in 0..3 {
                // UDP and TCP flows between the same two pods spread by their ports.
                let on = |w: usize| {
                    flows
                        .iter()
                        .enumerate()
                        .filter(|(i, f)| (i / 2) % 3 == kind && got[w].contains(f))
                        .count()
                };
                assert!(
                    on(0) > 0 && on(1) > 0,
                    "kind {kind}: {} and {}",
                    on(0),
                    on(1)
                );
            }
            for pair in flows.chunks(2) {
                let w = usize::from(!got[0].contains(&pair[0]));
                assert!(
                    got[w].contains(&pair[1]),
                    "{pair:?} on one worker both ways"
                );
            }
        });
    }

    #[test]
    fn packets_a_full_receive_buffer_refused_are_counted() {
        in_netns("raw-overflow", || {
            run("ip link set lo up");
            let lo = Ipv4Addr::LOCALHOST;
            let sock = IpipSocket::bind(lo, 4096).unwrap();
            assert_eq!(sock.receive_drops(), 0);
            // The socket receives what it sends to its own address; loopback delivers (or
            // drops) each packet before the send returns.
            let pkt = outer_packet(lo, lo, &[7; 1000]);
            const SENT: usize = 64;
            for _ in 0..SENT {
                let item = Transmit {
                    dst: SocketAddrV4::new(lo, 0),
                    data: &pkt,
                    segment_size: None,
                };
                assert_eq!(sock.send_batch(&[item]).sent, 1);
            }
            let mut bufs = vec![vec![0u8; 2048]; 8];
            let mut meta = [RecvMeta::default(); 8];
            assert_read_or_dropped(
                SENT,
                || sock.try_recv_batch(&mut bufs, &mut meta).unwrap(),
                || sock.receive_drops(),
            );
        });
    }

    #[test]
    fn ipip_packets_cross_a_veth_pair_between_namespaces() {
        in_netns("raw-a", || {
            // Peer namespace B, joined by a veth pair; B's socket runs on its own thread.
            let b = create("raw-b");
            let a_ip: Ipv4Addr = "198.18.0.1".parse().unwrap();
            let b_ip: Ipv4Addr = "198.18.0.2".parse().unwrap();
            run(&format!(
                "ip link add pnv0 type veth peer name pnv1 netns {}",
                b.name
            ));
            run("ip addr add 198.18.0.1/24 dev pnv0 && ip link set pnv0 up && ip link set lo up");
            let bname = b.name.clone();
            let (ready_tx, ready_rx) = std::sync::mpsc::channel();
            let receiver = std::thread::spawn(move || {
                enter(&bname);
                run("ip addr add 198.18.0.2/24 dev pnv1 && ip link set pnv1 up");
                let sock = IpipSocket::bind(b_ip, 1 << 20).unwrap();
                ready_tx.send(()).unwrap();
                let stop = Stop::new().unwrap();
                let mut bufs = vec![vec![0u8; 2048]; 8];
                let mut meta = [RecvMeta::default(); 8];
                let mut got = Vec::new();
                while got.len() < 10 {
                    let n = sock.recv_batch(&mut bufs, &mut meta, &stop).unwrap();
                    for i in 0..n {
                        got.push((meta[i], bufs[i][..meta[i].len].to_vec()));
                    }
                }
                got
            });
            ready_rx.recv().unwrap();
            let sock = IpipSocket::bind(a_ip, 1 << 20).unwrap();
            let pkts: Vec<Vec<u8>> = (0..5u8)
                .map(|i| outer_packet(a_ip, b_ip, &[i; 32]))
                .collect();
            let items: Vec<Transmit<'_>> = pkts
                .iter()
                .map(|p| Transmit {
                    dst: SocketAddrV4::new(b_ip, 0),
                    data: p,
                    segment_size: None,
                })
                .collect();
            let sent = sock.send_batch(&items);
            assert_eq!((sent.sent, sent.failed), (5, 0), "{:?}", sent.last_error);
            // The same packets again, each as a header slice and a payload slice.
            let parts: Vec<[&[u8]; 2]> = pkts.iter().map(|p| [&p[..48], &p[48..]]).collect();
            let sent = sock.send_segments(SocketAddrV4::new(b_ip, 0), &parts);
            assert_eq!((sent.sent, sent.failed), (5, 0), "{:?}", sent.last_error);
            let got = receiver.join().unwrap();
            assert_eq!(got.len(), 10);
            for (i, (meta, bytes)) in got.iter().enumerate() {
                let i = i % 5;
                assert_eq!(*meta.src.ip(), a_ip);
                let outer = Ipv4HeaderSlice::from_slice(bytes).unwrap();
                assert_eq!(outer.protocol(), etherparse::IpNumber::IPV4);
                assert_eq!(outer.source_addr(), a_ip);
                assert_eq!(outer.destination_addr(), b_ip);
                // The inner packet arrives intact after the 20-byte outer header.
                assert_eq!(&bytes[20..], &pkts[i][20..]);
            }
            // Oversized outer packets are refused per item, not for the whole batch.
            let big = outer_packet(a_ip, b_ip, &[0; 1600]);
            let sent = sock.send_batch(&[Transmit {
                dst: SocketAddrV4::new(b_ip, 0),
                data: &big,
                segment_size: None,
            }]);
            assert_eq!((sent.sent, sent.failed), (0, 1));
            assert_eq!(
                sent.last_error.unwrap().raw_os_error(),
                Some(libc::EMSGSIZE)
            );
            drop(b);
        });
    }
}

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

use socket2::{Domain, Protocol, Socket, Type};

use super::mmsg;
#[cfg(test)]
use super::Stop;
use super::{grow_buffers, setsockopt_int, socket_drops, BatchSent, RecvMeta, Transmit};

/// IP protocol number of IP-in-IP (RFC 2003).
pub const IPPROTO_IPIP: i32 = 4;

/// Why the socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum RawError {
    #[error("cannot open the IP-in-IP raw socket: {0}{hint}", hint = perm_hint(.0))]
    Create(#[source] io::Error),
    #[error("cannot set IP_HDRINCL on the IP-in-IP raw socket: {0}")]
    HdrIncl(#[source] io::Error),
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
        pkt.extend_from_slice(&inner);
        pkt
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

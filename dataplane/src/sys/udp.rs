//! The UDP tunnel sockets: VXLAN's bound to `underlay_ip:4789`, batched with
//! `recvmmsg`/`sendmmsg`, with UDP GSO on send and UDP GRO on receive when the kernel has them.
//!
//! Sends go out from a small pool of sockets bound to `underlay_ip` and ephemeral ports, one
//! per *lane*; the data path picks the lane by a hash of the inner flow, so each flow keeps one
//! outer source port and different flows spread over several (RFC 7348 section 5): underlay
//! ECMP and the receiver's NIC (RSS) can then spread them. All of them arrive at port 4789.
//!
//! A `--encap wireguard` node uses the same socket type on `underlay_ip:51820`, with one lane
//! (the socket itself), as WireGuard peers expect messages from the port they send to.
//!
//! Offloads are probed at bind time and reported by [`UdpTunnelSocket::gro`] and
//! [`UdpTunnelSocket::gso`]; without them the same calls still work one datagram per message.
//!
//! Path MTU discovery is set to `IP_PMTUDISC_DONT`: outer packets leave with DF clear, like the
//! kernel's own VXLAN device by default (`df unset`). The overlay MTU already keeps every outer
//! packet within the underlay device MTU, so nothing is fragmented in normal operation; a smaller
//! MTU further along the underlay path then degrades to fragmentation instead of a black hole
//! (an ICMP frag-needed from the underlay could not be relayed to the pod's TCP anyway).

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};

use socket2::{Domain, Protocol, Socket, Type};

use super::mmsg::{self, UDP_GRO, UDP_SEGMENT};
use super::mmsg::{BatchSent, RecvMeta, Transmit};
pub use super::mmsg::{MAX_GSO_SEGMENTS, MAX_UDP_PAYLOAD};
use super::sockopt::{grow_buffers, setsockopt_int, socket_drops};
#[cfg(test)]
use super::wait::Stop;

/// Default socket buffer size asked for (receive and send each).
pub const DEFAULT_BUFFER_BYTES: usize = 8 << 20;
/// Receive buffers must be this large to take a whole GRO-coalesced message.
pub const GRO_BUFFER_BYTES: usize = 65535;

/// How to open the socket.
#[derive(Clone, Debug)]
pub struct UdpConfig {
    /// Local address, normally `underlay_ip:4789`.
    pub bind: SocketAddrV4,
    /// Receive and send buffer size to ask for.
    pub buffer_bytes: usize,
    /// Try to enable UDP GRO on receive.
    pub gro: bool,
    /// Try to use UDP GSO (`UDP_SEGMENT`) on send.
    pub gso: bool,
    /// Sockets to send from, each with its own ephemeral source port (lanes). 0 or 1: send
    /// from the bound socket itself, so every packet leaves from `bind`'s port.
    pub source_ports: usize,
    /// Sockets bound to `bind` as one `SO_REUSEPORT` group (receive queues): the kernel puts
    /// each sender flow (address and source port) on one of them. 0 or 1: one plain socket.
    pub receivers: usize,
}

impl UdpConfig {
    /// Offloads on, default buffers, bound to `ip:port`.
    pub fn new(ip: Ipv4Addr, port: u16) -> UdpConfig {
        UdpConfig {
            bind: SocketAddrV4::new(ip, port),
            buffer_bytes: DEFAULT_BUFFER_BYTES,
            gro: true,
            gso: true,
            source_ports: 1,
            receivers: 1,
        }
    }
}

/// Lanes (outer source ports) the agent sends VXLAN from by default: enough buckets for ECMP
/// and RSS to spread a node's flows, few enough sockets to not matter.
pub const DEFAULT_SOURCE_PORTS: usize = 16;

/// Why the socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum UdpError {
    #[error("cannot create the UDP socket: {0}")]
    Create(#[source] io::Error),
    #[error("cannot bind the UDP socket to {addr}: {source} (is the underlay IP on a device here, and is another process using port {} (a VXLAN device on 4789, a WireGuard device on 51820)?)", addr.port())]
    Bind {
        addr: SocketAddrV4,
        #[source]
        source: io::Error,
    },
    #[error("cannot bind a VXLAN send socket to an ephemeral port on {ip}: {source} (the agent sends from {lanes} ports the kernel picks, one per flow lane; are the ports of net.ipv4.ip_local_port_range in this namespace used up?)")]
    BindLane {
        ip: Ipv4Addr,
        lanes: usize,
        #[source]
        source: io::Error,
    },
    #[error("cannot set {option} on the UDP socket bound to {addr}: {source}")]
    Option {
        option: &'static str,
        addr: SocketAddrV4,
        #[source]
        source: io::Error,
    },
}

/// The UDP sockets of a tunnel over UDP: VXLAN's on port 4789, or WireGuard's on 51820. Share
/// it between a receive thread and a send thread by reference or `Arc`: every method takes
/// `&self`.
#[derive(Debug)]
pub struct UdpTunnelSocket {
    sock: Socket,
    /// The other receive sockets of `sock`'s `SO_REUSEPORT` group (empty with one).
    receivers: Vec<Socket>,
    /// Send sockets, one per lane; empty when sending from `sock`.
    senders: Vec<Socket>,
    source_ports: Vec<u16>,
    local: SocketAddrV4,
    gro: bool,
    gso: AtomicBool,
    buffers: (usize, usize),
}

impl UdpTunnelSocket {
    /// Creates, tunes and binds the socket, probing GRO and GSO.
    pub fn bind(cfg: &UdpConfig) -> Result<UdpTunnelSocket, UdpError> {
        let group = cfg.receivers > 1;
        if group && cfg.bind.port() != 0 {
            // SO_REUSEPORT would let us join a group someone else holds (another agent on this
            // address) and split its traffic. A plain bind first fails as before if the
            // address is taken; it is released at once and the group takes its place.
            std::net::UdpSocket::bind(cfg.bind).map_err(|source| UdpError::Bind {
                addr: cfg.bind,
                source,
            })?;
        }
        let (sock, local, buffers) = open(cfg.bind, cfg.buffer_bytes, group)?;
        let fd = sock.as_raw_fd();
        // UDP_GRO: Linux >= 5.0. Refused means the kernel will hand us single datagrams.
        let gro = cfg.gro && setsockopt_int(fd, libc::SOL_UDP, UDP_GRO, 1).is_ok();
        let mut receivers = Vec::new();
        for _ in 1..cfg.receivers.max(1) {
            let (r, _, _) = open(local, cfg.buffer_bytes, true)?;
            if gro {
                setsockopt_int(r.as_raw_fd(), libc::SOL_UDP, UDP_GRO, 1).map_err(|source| {
                    UdpError::Option {
                        option: "UDP_GRO",
                        addr: local,
                        source,
                    }
                })?;
            }
            receivers.push(r);
        }
        // UDP_SEGMENT: Linux >= 4.18; reading the option tells whether the kernel knows it.
        let gso = cfg.gso && super::sockopt::getsockopt_int(fd, libc::SOL_UDP, UDP_SEGMENT).is_ok();
        let (mut senders, mut source_ports) = (Vec::new(), Vec::new());
        if cfg.source_ports > 1 {
            let any_port = SocketAddrV4::new(*cfg.bind.ip(), 0);
            for _ in 0..cfg.source_ports {
                let (s, addr, _) =
                    open(any_port, cfg.buffer_bytes, false).map_err(|e| match e {
                        UdpError::Bind { addr, source } => UdpError::BindLane {
                            ip: *addr.ip(),
                            lanes: cfg.source_ports,
                            source,
                        },
                        other => other,
                    })?;
                // Nothing is ever read from a send socket: keep what arrives there small.
                let _ = setsockopt_int(s.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVBUF, 4096);
                senders.push(s);
                source_ports.push(addr.port());
            }
        } else {
            source_ports.push(local.port());
        }
        Ok(UdpTunnelSocket {
            sock,
            receivers,
            senders,
            source_ports,
            local,
            gro,
            gso: AtomicBool::new(gso),
            buffers,
        })
    }

    /// The bound address (with the real port if 0 was asked for).
    pub fn local_addr(&self) -> SocketAddrV4 {
        self.local
    }

    /// Whether received messages may be GRO-coalesced (see [`RecvMeta::segment_size`]).
    pub fn gro(&self) -> bool {
        self.gro
    }

    /// Whether GSO trains go out as one message. Can turn false at run time if the kernel
    /// refuses a GSO send (`EIO`); sends then fall back to plain datagrams by themselves.
    pub fn gso(&self) -> bool {
        self.gso.load(Ordering::Relaxed)
    }

    /// The outer source port of each lane, in lane order.
    pub fn source_ports(&self) -> &[u16] {
        &self.source_ports
    }

    /// How many lanes (outer source ports) there are to send from.
    pub fn lanes(&self) -> usize {
        self.source_ports.len()
    }

    /// The lane a flow with hash `flow_hash` sends from (see `podnet_proto::ipv4::flow_hash`).
    pub fn lane(&self, flow_hash: u32) -> usize {
        flow_hash as usize % self.lanes()
    }

    /// The socket that sends for `lane` (any lane number; it wraps).
    fn sender(&self, lane: usize) -> RawFd {
        match self.senders.len() {
            0 => self.sock.as_raw_fd(),
            n => self.senders[lane % n].as_raw_fd(),
        }
    }

    /// Receive and send buffer sizes the kernel granted (as it reports them, i.e. doubled).
    pub fn buffer_sizes(&self) -> (usize, usize) {
        self.buffers
    }

    /// Receives a batch into `bufs` (use [`GRO_BUFFER_BYTES`]-sized buffers when GRO is on),
    /// describing datagram `i` in `meta[i]`. Blocks until at least one arrives; returns the
    /// count, or `Ok(0)` once `stop` is raised.
    #[cfg(test)] // The data path reads without blocking; tests wait with this.
    pub fn recv_batch<B: AsMut<[u8]>>(
        &self,
        bufs: &mut [B],
        meta: &mut [RecvMeta],
        stop: &Stop,
    ) -> io::Result<usize> {
        mmsg::recv_batch(self.sock.as_raw_fd(), bufs, meta, stop)
    }

    /// Like `recv_batch`, on receive socket `i` of the group ([`UdpConfig::receivers`]; 0 is
    /// the socket `recv_batch` reads), and returning `Ok(0)` at once when nothing is queued
    /// (for a loop that serves several descriptors and waits on all of them with a
    /// [`super::Watch`]).
    pub fn try_recv_batch<B: AsMut<[u8]>>(
        &self,
        i: usize,
        bufs: &mut [B],
        meta: &mut [RecvMeta],
    ) -> io::Result<usize> {
        mmsg::try_recv_batch(self.receiver(i).as_raw_fd(), bufs, meta)
    }

    /// Datagrams the kernel dropped at the receive sockets because they were full (summed over
    /// the group; a socket whose count cannot be read adds nothing).
    pub fn receive_drops(&self) -> u64 {
        (0..self.receiver_count())
            .filter_map(|i| socket_drops(self.receiver(i)).ok())
            .sum()
    }

    /// How many receive sockets there are (see [`UdpConfig::receivers`]).
    pub fn receiver_count(&self) -> usize {
        1 + self.receivers.len()
    }

    /// Receive socket `i`, to wait on (0 is the one [`AsFd`] gives too).
    pub fn receiver(&self, i: usize) -> BorrowedFd<'_> {
        match i {
            0 => self.sock.as_fd(),
            _ => self.receivers[i - 1].as_fd(),
        }
    }

    /// Sends every item (blocking while the socket buffer is full); see [`Transmit`]. Long GSO
    /// trains are cut into as many GSO messages as needed. `segment_size` plus 28 bytes of
    /// IPv4/UDP header must fit the route MTU, or the kernel refuses that item (`EMSGSIZE`,
    /// counted in [`BatchSent::failed`]). Sent from `lane`'s source port.
    pub fn send_batch(&self, lane: usize, items: &[Transmit<'_>]) -> BatchSent {
        mmsg::send_batch(self.sender(lane), items, &self.gso)
    }

    /// Sends a train of `segment_size`-byte datagrams (the last may be shorter) to `dst`,
    /// each given as a header and a payload slice, without copying them into one buffer:
    /// UDP GSO messages within kernel limits while [`UdpTunnelSocket::gso`] holds, else one
    /// datagram per message. At most [`mmsg::MAX_SEGMENTS`] datagrams. Sent from `lane`'s
    /// source port.
    pub fn send_segments(
        &self,
        lane: usize,
        dst: SocketAddrV4,
        segments: &[[&[u8]; 2]],
        segment_size: u16,
    ) -> BatchSent {
        mmsg::send_segments(self.sender(lane), dst, segments, segment_size, &self.gso)
    }
}

/// A UDP socket with DF clear and large buffers, bound to `addr` (in an `SO_REUSEPORT` group
/// when `reuse_port`): the socket, the address it got (with the real port when 0 was asked
/// for) and the buffer sizes granted.
fn open(
    addr: SocketAddrV4,
    buffer_bytes: usize,
    reuse_port: bool,
) -> Result<(Socket, SocketAddrV4, (usize, usize)), UdpError> {
    let sock = Socket::new(Domain::IPV4, Type::DGRAM.cloexec(), Some(Protocol::UDP))
        .map_err(UdpError::Create)?;
    let fd = sock.as_raw_fd();
    setsockopt_int(
        fd,
        libc::IPPROTO_IP,
        libc::IP_MTU_DISCOVER,
        libc::IP_PMTUDISC_DONT,
    )
    .map_err(|source| UdpError::Option {
        option: "IP_MTU_DISCOVER",
        addr,
        source,
    })?;
    let buffers = grow_buffers(fd, buffer_bytes);
    if reuse_port {
        sock.set_reuse_port(true)
            .map_err(|source| UdpError::Option {
                option: "SO_REUSEPORT",
                addr,
                source,
            })?;
    }
    sock.bind(&SocketAddr::V4(addr).into())
        .map_err(|source| UdpError::Bind { addr, source })?;
    let local = sock
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket_ipv4())
        .unwrap_or(addr);
    Ok((sock, local, buffers))
}

impl AsRawFd for UdpTunnelSocket {
    fn as_raw_fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }
}

impl AsFd for UdpTunnelSocket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::mmsg::MAX_BATCH;
    use crate::sys::testns::{assert_read_or_dropped, in_netns, run};

    fn loopback(port: u16, gro: bool, gso: bool) -> UdpTunnelSocket {
        let mut cfg = UdpConfig::new(Ipv4Addr::LOCALHOST, port);
        cfg.gro = gro;
        cfg.gso = gso;
        UdpTunnelSocket::bind(&cfg).unwrap()
    }

    /// Receives until `want` payload bytes arrived (bounded by count), returning the metas.
    fn drain(
        sock: &UdpTunnelSocket,
        want: usize,
        bufs: &mut [Vec<u8>],
    ) -> Vec<(RecvMeta, Vec<u8>)> {
        let stop = Stop::new().unwrap();
        let mut out = Vec::new();
        let mut got = 0;
        let mut meta = [RecvMeta::default(); MAX_BATCH];
        for _ in 0..100 {
            if got >= want {
                break;
            }
            let n = sock.recv_batch(bufs, &mut meta, &stop).unwrap();
            for i in 0..n {
                got += meta[i].len;
                out.push((meta[i], bufs[i][..meta[i].len].to_vec()));
            }
        }
        out
    }

    #[test]
    fn batch_send_and_receive_plain() {
        in_netns("udp-plain", || {
            run("ip link set lo up");
            let a = loopback(0, false, false);
            let b = loopback(0, false, false);
            let dst = b.local_addr();
            let payloads: Vec<Vec<u8>> = (0..10u8).map(|i| vec![i; 100 + i as usize]).collect();
            let items: Vec<Transmit<'_>> = payloads
                .iter()
                .map(|p| Transmit {
                    dst,
                    data: p,
                    segment_size: None,
                })
                .collect();
            let sent = a.send_batch(0, &items);
            assert_eq!((sent.sent, sent.failed), (10, 0), "{:?}", sent.last_error);
            let mut bufs = vec![vec![0u8; 2048]; 16];
            let got = drain(&b, payloads.iter().map(Vec::len).sum(), &mut bufs);
            assert_eq!(got.len(), 10);
            for ((meta, data), want) in got.iter().zip(&payloads) {
                assert_eq!(meta.src, a.local_addr());
                assert_eq!(meta.segment_size, meta.len);
                assert!(!meta.truncated);
                assert_eq!(data, want);
            }
        });
    }

    #[test]
    fn running_out_of_ephemeral_ports_says_so() {
        in_netns("udp-noports", || {
            run("ip link set lo up");
            // Two ephemeral ports in this namespace, for sixteen lanes.
            run("sysctl -qw net.ipv4.ip_local_port_range='40000 40001'");
            let mut cfg = UdpConfig::new(Ipv4Addr::LOCALHOST, 4789);
            cfg.source_ports = 16;
            let err = UdpTunnelSocket::bind(&cfg).unwrap_err().to_string();
            assert!(
                err.contains("ephemeral port on 127.0.0.1")
                    && err.contains("16 ports")
                    && err.contains("ip_local_port_range"),
                "{err}"
            );
            assert!(!err.contains("port 0"), "{err}");
            // The receive port was free and stays so: the failed bind left nothing behind.
            cfg.source_ports = 1;
            assert_eq!(
                UdpTunnelSocket::bind(&cfg).unwrap().local_addr().port(),
                4789
            );
        });
    }

    #[test]
    fn each_lane_sends_from_its_own_source_port() {
        in_netns("udp-lanes", || {
            run("ip link set lo up");
            let mut cfg = UdpConfig::new(Ipv4Addr::LOCALHOST, 0);
            cfg.source_ports = 4;
            let a = UdpTunnelSocket::bind(&cfg).unwrap();
            let b = loopback(0, false, false);
            assert_eq!(a.lanes(), 4);
            let ports = a.source_ports().to_vec();
            let mut distinct = ports.clone();
            distinct.sort_unstable();
            distinct.dedup();
            assert_eq!(distinct.len(), 4, "{ports:?}");
            assert!(
                !ports.contains(&a.local_addr().port()),
                "lanes are not the bound port"
            );
            // Lane 5 wraps to lane 1; lanes stay put for a flow hash.
            assert_eq!(a.lane(5), 1);
            for lane in [0, 1, 2, 3, 5] {
                let payload = [lane as u8; 64];
                let item = Transmit {
                    dst: b.local_addr(),
                    data: &payload,
                    segment_size: None,
                };
                assert_eq!(a.send_batch(lane, &[item]).sent, 1);
                let mut bufs = vec![vec![0u8; 2048]; 4];
                let got = drain(&b, 64, &mut bufs);
                assert_eq!(got[0].0.src.port(), ports[lane % 4], "lane {lane}");
                assert_eq!(got[0].1, payload);
            }
            // One lane: the bound socket sends, from its own port.
            let c = loopback(0, false, false);
            assert_eq!(c.source_ports(), &[c.local_addr().port()]);
            assert_eq!(c.lane(12345), 0);
        });
    }

    #[test]
    fn datagrams_a_full_receive_buffer_refused_are_counted() {
        in_netns("udp-overflow", || {
            run("ip link set lo up");
            let mut cfg = UdpConfig::new(Ipv4Addr::LOCALHOST, 0);
            cfg.buffer_bytes = 4096;
            let sock = UdpTunnelSocket::bind(&cfg).unwrap();
            assert_eq!(sock.receive_drops(), 0);
            // Loopback delivers (or drops) each datagram before send returns.
            let peer = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            const SENT: usize = 64;
            for _ in 0..SENT {
                peer.send_to(&[7; 1000], sock.local_addr()).unwrap();
            }
            let mut bufs = vec![vec![0u8; 2048]; MAX_BATCH];
            let mut meta = [RecvMeta::default(); MAX_BATCH];
            assert_read_or_dropped(
                SENT,
                || sock.try_recv_batch(0, &mut bufs, &mut meta).unwrap(),
                || sock.receive_drops(),
            );
        });
    }

    #[test]
    fn receive_group_spreads_flows_and_never_joins_someone_elses_port() {
        in_netns("udp-group", || {
            run("ip link set lo up");
            // A port held by a plain socket (another VXLAN endpoint) stays refused.
            let other = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            let SocketAddr::V4(taken) = other.local_addr().unwrap() else {
                unreachable!("bound to an IPv4 address")
            };
            let mut cfg = UdpConfig::new(Ipv4Addr::LOCALHOST, taken.port());
            cfg.receivers = 4;
            let refused = UdpTunnelSocket::bind(&cfg);
            assert!(matches!(refused, Err(UdpError::Bind { .. })), "{refused:?}");
            drop(other);
            // Now ours; a second agent asking for the same group is refused too.
            let group = UdpTunnelSocket::bind(&cfg).unwrap();
            assert_eq!(group.receiver_count(), 4);
            let second = UdpTunnelSocket::bind(&cfg);
            assert!(matches!(second, Err(UdpError::Bind { .. })), "{second:?}");
            // 32 senders (flows): every datagram arrives once, spread over the sockets.
            let senders: Vec<_> = (0..32).map(|_| loopback(0, false, false)).collect();
            for (i, s) in senders.iter().enumerate() {
                let payload = [i as u8; 32];
                let item = Transmit {
                    dst: group.local_addr(),
                    data: &payload,
                    segment_size: None,
                };
                assert_eq!(s.send_batch(0, &[item]).sent, 1);
            }
            let mut per_socket = Vec::new();
            let mut seen = Vec::new();
            let mut bufs = vec![vec![0u8; 2048]; MAX_BATCH];
            let mut meta = [RecvMeta::default(); MAX_BATCH];
            for r in 0..group.receiver_count() {
                let n = group.try_recv_batch(r, &mut bufs, &mut meta).unwrap();
                per_socket.push(n);
                seen.extend(bufs[..n].iter().map(|b| b[0]));
            }
            seen.sort_unstable();
            assert_eq!(seen, (0..32u8).collect::<Vec<_>>(), "{per_socket:?}");
            assert!(
                per_socket.iter().filter(|&&n| n > 0).count() >= 2,
                "{per_socket:?}"
            );
        });
    }

    #[test]
    fn gso_send_arrives_gro_coalesced_with_segment_size() {
        in_netns("udp-gso", || {
            run("ip link set lo up");
            let a = loopback(0, true, true);
            let b = loopback(0, true, true);
            assert!(
                a.gso() && b.gro(),
                "this kernel should offer UDP GSO and GRO"
            );
            // 10 segments of 1000 bytes, each filled with its index, as one GSO train.
            let train: Vec<u8> = (0..10u8).flat_map(|i| vec![i; 1000]).collect();
            let sent = a.send_batch(
                0,
                &[Transmit {
                    dst: b.local_addr(),
                    data: &train,
                    segment_size: Some(1000),
                }],
            );
            assert_eq!((sent.sent, sent.failed), (1, 0), "{:?}", sent.last_error);
            let mut bufs = vec![vec![0u8; GRO_BUFFER_BYTES]; 4];
            let got = drain(&b, train.len(), &mut bufs);
            // Over loopback the GSO skb reaches the GRO-enabled socket whole.
            assert_eq!(got.len(), 1, "one coalesced message");
            assert_eq!(got[0].0.len, 10_000);
            assert_eq!(got[0].0.segment_size, 1000);
            assert_eq!(got[0].1, train);

            // A train longer than one GSO send allows is cut into several GSO messages.
            let long: Vec<u8> = (0..100u32).flat_map(|i| vec![i as u8; 1000]).collect();
            let sent = a.send_batch(
                0,
                &[Transmit {
                    dst: b.local_addr(),
                    data: &long,
                    segment_size: Some(1000),
                }],
            );
            assert_eq!((sent.sent, sent.failed), (1, 0), "{:?}", sent.last_error);
            let got = drain(&b, long.len(), &mut bufs);
            let lens: Vec<usize> = got.iter().map(|g| g.0.len).collect();
            assert_eq!(lens, [64_000, 36_000]);
            assert!(got.iter().all(|g| g.0.segment_size == 1000));
            assert_eq!(got.concat_data(), long);

            // A receiver without GRO sees the same train as 10 separate datagrams.
            let c = loopback(0, false, false);
            let sent = a.send_batch(
                0,
                &[Transmit {
                    dst: c.local_addr(),
                    data: &train,
                    segment_size: Some(1000),
                }],
            );
            assert_eq!(sent.sent, 1);
            let got = drain(&c, train.len(), &mut bufs);
            assert_eq!(got.len(), 10);
            for (i, (meta, data)) in got.iter().enumerate() {
                assert_eq!((meta.len, meta.segment_size), (1000, 1000));
                assert!(data.iter().all(|&b| b == i as u8));
            }
        });
    }

    #[test]
    fn segments_from_header_and_payload_slices_arrive_whole() {
        in_netns("udp-iov", || {
            run("ip link set lo up");
            let b = loopback(0, false, false);
            // 69 datagrams of 1000 bytes (a 10-byte header + 990 payload bytes each) and a
            // 510-byte tail: two GSO messages (64 segments at most in one).
            let headers: Vec<[u8; 10]> = (0..70u8).map(|i| [i; 10]).collect();
            let payload: Vec<u8> = (0..69 * 990 + 500).map(|i| (i % 251) as u8).collect();
            let segs: Vec<[&[u8]; 2]> = headers
                .iter()
                .zip(payload.chunks(990))
                .map(|(h, p)| [&h[..], p])
                .collect();
            for gso in [true, false] {
                let a = loopback(0, false, gso);
                assert_eq!(a.gso(), gso);
                let sent = a.send_segments(0, b.local_addr(), &segs, 1000);
                assert_eq!(sent.failed, 0, "{:?}", sent.last_error);
                assert_eq!(sent.sent, if gso { 2 } else { 70 });
                let mut bufs = vec![vec![0u8; 2048]; 64];
                let got = drain(&b, 69 * 1000 + 510, &mut bufs);
                assert_eq!(got.len(), 70, "gso={gso}");
                for (i, (meta, data)) in got.iter().enumerate() {
                    assert_eq!(meta.len, if i < 69 { 1000 } else { 510 });
                    assert_eq!(&data[..10], &headers[i]);
                    assert_eq!(&data[10..], segs[i][1]);
                }
            }
            let a = loopback(0, false, true);
            let too_many = vec![segs[0]; mmsg::MAX_SEGMENTS + 1];
            assert_eq!(
                a.send_segments(0, b.local_addr(), &too_many, 1000).failed,
                1
            );
        });
    }

    #[test]
    fn gso_off_splits_trains_into_datagrams() {
        in_netns("udp-split", || {
            run("ip link set lo up");
            let a = loopback(0, false, false);
            let b = loopback(0, true, false);
            assert!(!a.gso());
            let train: Vec<u8> = (0..5u8)
                .flat_map(|i| vec![i; 700])
                .chain([9u8; 100])
                .collect();
            let sent = a.send_batch(
                0,
                &[Transmit {
                    dst: b.local_addr(),
                    data: &train,
                    segment_size: Some(700),
                }],
            );
            assert_eq!((sent.sent, sent.failed), (1, 0));
            let mut bufs = vec![vec![0u8; GRO_BUFFER_BYTES]; 8];
            let got = drain(&b, train.len(), &mut bufs);
            let lens: Vec<usize> = got.iter().map(|g| g.0.len).collect();
            assert_eq!(lens, [700, 700, 700, 700, 700, 100]);
            assert_eq!(got.concat_data(), train);
        });
    }

    #[test]
    fn oversized_item_is_skipped_and_counted() {
        in_netns("udp-fail", || {
            run("ip link set lo up");
            let a = loopback(0, false, false);
            let b = loopback(0, false, false);
            let big = vec![0u8; 70_000];
            let small = [1u8; 10];
            let items = [
                Transmit {
                    dst: b.local_addr(),
                    data: &big,
                    segment_size: None,
                },
                Transmit {
                    dst: b.local_addr(),
                    data: &small,
                    segment_size: None,
                },
            ];
            let sent = a.send_batch(0, &items);
            assert_eq!((sent.sent, sent.failed), (1, 1));
            assert_eq!(
                sent.last_error.unwrap().raw_os_error(),
                Some(libc::EMSGSIZE)
            );
            let mut bufs = vec![vec![0u8; 2048]; 4];
            let got = drain(&b, 10, &mut bufs);
            assert_eq!(got.len(), 1);
            assert_eq!(got[0].1, small);
        });
    }

    #[test]
    fn recv_returns_zero_on_stop() {
        in_netns("udp-stop", || {
            run("ip link set lo up");
            let a = loopback(0, false, false);
            let stop = Stop::new().unwrap();
            let s2 = stop.clone();
            let t = std::thread::spawn(move || {
                std::thread::sleep(std::time::Duration::from_millis(50));
                s2.stop();
            });
            let mut bufs = vec![vec![0u8; 64]; 2];
            let mut meta = [RecvMeta::default(); 2];
            assert_eq!(a.recv_batch(&mut bufs, &mut meta, &stop).unwrap(), 0);
            t.join().unwrap();
        });
    }

    trait ConcatData {
        fn concat_data(&self) -> Vec<u8>;
    }
    impl ConcatData for Vec<(RecvMeta, Vec<u8>)> {
        fn concat_data(&self) -> Vec<u8> {
            self.iter().flat_map(|g| g.1.iter().copied()).collect()
        }
    }
}

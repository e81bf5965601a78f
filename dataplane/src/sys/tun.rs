//! The TUN device (`tunl0` by default) that carries inner pod packets between the kernel and
//! the agent, opened through `tun-rs`.
//!
//! With offload on, the device is opened with `IFF_VNET_HDR` and the kernel is told
//! (`TUNSETOFFLOAD`) that we take `TUN_F_CSUM | TUN_F_TSO4`: every read then starts with a
//! 10-byte `virtio_net_hdr` and may be a TCP super-packet of up to 64 KiB with a partial
//! checksum, and every write must start with such a header (a GSO header lets one write carry
//! many coalesced TCP segments). `tun-rs` opens the device, but it asks for TSO6 and USO as
//! well; we narrow the mask right after with our own `TUNSETOFFLOAD`, because the segmenter
//! handles IPv4 TCP only and IPv6 is dropped anyway. ECN-marked TSO (`TUN_F_TSO_ECN`) stays
//! off, so the kernel segments CWR-flagged bursts itself and `gso_type` never carries the ECN
//! bit. `tun-rs` hands out the raw bytes (its `recv`/`send` are plain `read`/`write` on the
//! fd), so no framing of ours is lost. If the kernel refuses any of this, the device is
//! reopened in plain mode (one IPv4 packet per read, no header) and [`Tun::offload_refusal`]
//! says why.
//!
//! The fd is non-blocking: the data path reads with [`Tun::try_read`] when its epoll set says
//! the queue is readable (a waiting `read` exists for the tests only). A deleted device leaves
//! the fd detached until [`Tun::reattach`].

use std::ffi::CString;
use std::io::{self, IoSlice};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};

use std::sync::atomic::{AtomicU32, Ordering::Relaxed};

use tun_rs::{DeviceBuilder, SyncDevice};

#[cfg(test)]
use super::wait::{wait_readable, Stop};

/// Whether `e`, from a read or write of a queue, means the device is gone (`ip link del`): the
/// queue is detached until [`Tun::reattach`].
pub fn is_detached(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::EBADFD)
}

/// Default TUN name.
pub const DEFAULT_NAME: &str = "tunl0";
/// Length of the `virtio_net_hdr` in front of every packet in offload mode.
pub const VNET_HDR_LEN: usize = 10;
/// A read buffer of this size always holds one whole read (64 KiB super-packet + header).
pub const MAX_READ: usize = 65535 + VNET_HDR_LEN;
/// Default transmit queue length: the kernel default for TUN is 500 packets; a bigger queue
/// absorbs bursts while the reader thread is busy with a batch.
pub const DEFAULT_TX_QUEUE_LEN: u32 = 1000;

/// How to open the TUN device.
#[derive(Clone, Debug)]
pub struct TunConfig {
    /// Device name (`--tun-name`).
    pub name: String,
    /// Ask for `IFF_VNET_HDR` + TSO4/CSUM offload.
    pub offload: bool,
    /// Open with `IFF_MULTI_QUEUE` so [`Tun::clone_queue`] can add queues.
    pub multi_queue: bool,
    /// Transmit queue length to set.
    pub tx_queue_len: u32,
}

impl TunConfig {
    /// `name` with offload on, one queue, the default queue length.
    pub fn new(name: &str) -> TunConfig {
        TunConfig {
            name: name.to_string(),
            offload: true,
            multi_queue: false,
            tx_queue_len: DEFAULT_TX_QUEUE_LEN,
        }
    }
}

/// Which offloads the open device has.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Offloads {
    /// Reads and writes carry a `virtio_net_hdr` ([`VNET_HDR_LEN`] bytes).
    pub vnet_hdr: bool,
    /// The kernel may hand us packets with a partial checksum (`VIRTIO_NET_HDR_F_NEEDS_CSUM`).
    pub csum: bool,
    /// The kernel may hand us IPv4 TCP super-packets (`VIRTIO_NET_HDR_GSO_TCPV4`).
    pub tso4: bool,
}

impl std::fmt::Display for Offloads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "vnet_hdr={} csum={} tso4={}",
            on(self.vnet_hdr),
            on(self.csum),
            on(self.tso4)
        )
    }
}

fn on(b: bool) -> &'static str {
    if b {
        "on"
    } else {
        "off"
    }
}

/// Why the TUN device could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum TunError {
    #[error("a network device named `{name}` already exists in this network namespace and is not a TUN device (it is {kind}); note that the kernel's `ipip` module, when loaded, creates an IP-in-IP device called `tunl0` in every network namespace. Pass another name with `--tun-name`, or remove that device")]
    NotTun { name: String, kind: String },
    #[error("TUN device name `{0}` is invalid (1 to 15 bytes, no `/`, NUL or whitespace)")]
    BadName(String),
    #[error("TUN device `{name}` is already in use by another process")]
    Busy { name: String },
    #[error("cannot open TUN device `{name}`: {source}{}", open_hint(.source))]
    Open {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot configure TUN device `{name}` ({what}): {source}")]
    Configure {
        name: String,
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

fn open_hint(e: &io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) => {
            " (needs CAP_NET_ADMIN: run as root or `setcap cap_net_admin,cap_net_raw+ep`)"
        }
        Some(libc::ENOENT) | Some(libc::ENODEV) => {
            " (is /dev/net/tun present and the `tun` module loaded?)"
        }
        _ => "",
    }
}

/// An open TUN queue. `read` and `write` take `&self`, so one reader thread and one writer
/// thread can share it (e.g. through `Arc`).
pub struct Tun {
    dev: SyncDevice,
    name: String,
    /// Changes when [`Tun::reattach`] builds the device anew.
    index: AtomicU32,
    multi_queue: bool,
    offloads: Offloads,
    refusal: Option<io::Error>,
}

impl std::fmt::Debug for Tun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tun")
            .field("name", &self.name)
            .field("index", &self.index())
            .field("offloads", &self.offloads)
            .field("fd", &self.dev.as_raw_fd())
            .finish()
    }
}

impl Tun {
    /// Creates (or attaches to) the TUN device `cfg.name` in the calling thread's network
    /// namespace. Refuses an existing device of that name that is not a TUN. The device is left
    /// down and unaddressed; [`super::netlink`] configures it.
    pub fn open(cfg: &TunConfig) -> Result<Tun, TunError> {
        let name = cfg.name.as_str();
        if name.is_empty()
            || name.len() > 15
            || name
                .bytes()
                .any(|b| b == b'/' || b == 0 || b.is_ascii_whitespace())
        {
            return Err(TunError::BadName(cfg.name.clone()));
        }
        if let Some(kind) = existing_non_tun(name) {
            return Err(TunError::NotTun {
                name: cfg.name.clone(),
                kind,
            });
        }
        let build = |offload: bool| {
            DeviceBuilder::new()
                .name(name)
                .offload(offload)
                .multi_queue(cfg.multi_queue)
                .tx_queue_len(cfg.tx_queue_len)
                // tun-rs brings devices up by default; netlink sets MTU and up together later.
                .enable(false)
                .build_sync()
        };
        let open_err = |source: io::Error| match source.raw_os_error() {
            Some(libc::EBUSY) => TunError::Busy {
                name: cfg.name.clone(),
            },
            _ => TunError::Open {
                name: cfg.name.clone(),
                source,
            },
        };
        let (dev, mut offloads, mut refusal) = if cfg.offload {
            match build(true) {
                Ok(dev) => (
                    dev,
                    Offloads {
                        vnet_hdr: true,
                        csum: true,
                        tso4: true,
                    },
                    None,
                ),
                Err(e) => (
                    build(false).map_err(open_err)?,
                    Offloads::default(),
                    Some(e),
                ),
            }
        } else {
            (build(false).map_err(open_err)?, Offloads::default(), None)
        };
        if offloads.vnet_hdr {
            // tun-rs enabled CSUM|TSO4|TSO6 (and USO where known); keep only what we segment.
            let wanted = [
                (libc::TUN_F_CSUM | libc::TUN_F_TSO4, true),
                (libc::TUN_F_CSUM, false),
                (0, false),
            ];
            for (mask, tso4) in wanted {
                match set_offload(dev.as_raw_fd(), mask) {
                    Ok(()) => {
                        offloads.csum = mask & libc::TUN_F_CSUM != 0;
                        offloads.tso4 = tso4;
                        break;
                    }
                    Err(e) => refusal = Some(e),
                }
            }
        }
        dev.set_nonblocking(true)
            .map_err(|source| TunError::Configure {
                name: cfg.name.clone(),
                what: "O_NONBLOCK",
                source,
            })?;
        let index = dev.if_index().map_err(|source| TunError::Configure {
            name: cfg.name.clone(),
            what: "interface index",
            source,
        })?;
        Ok(Tun {
            dev,
            name: cfg.name.clone(),
            index: AtomicU32::new(index),
            multi_queue: cfg.multi_queue,
            offloads,
            refusal,
        })
    }

    /// Device name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Interface index (for netlink).
    pub fn index(&self) -> u32 {
        self.index.load(Relaxed)
    }

    /// Attaches this queue again to a device named [`Tun::name`], creating the device when it
    /// is gone, and returns its interface index.
    ///
    /// `ip link del` on a TUN device detaches every queue (reads then fail with `EBADFD`) but
    /// leaves the file descriptors open, and `TUNSETIFF` on them builds the device anew: the
    /// first queue creates it, the others join it. The descriptors stay the same, so the data
    /// path keeps polling them and resumes without being restarted. The new device is down
    /// and unaddressed, like one from [`Tun::open`].
    pub fn reattach(&self) -> io::Result<u32> {
        let fd = self.dev.as_raw_fd();
        let mut flags = libc::IFF_TUN | libc::IFF_NO_PI;
        if self.offloads.vnet_hdr {
            flags |= libc::IFF_VNET_HDR;
        }
        if self.multi_queue {
            flags |= libc::IFF_MULTI_QUEUE;
        }
        let name = CString::new(self.name.as_str())
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: an all-zero ifreq is valid (a C struct of integers and arrays).
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in req.ifr_name.iter_mut().zip(name.as_bytes_with_nul()) {
            *dst = *src as libc::c_char;
        }
        req.ifr_ifru.ifru_flags = flags as libc::c_short;
        // SAFETY: fd is our open /dev/net/tun descriptor and req a live ifreq that TUNSETIFF
        // reads (name, flags) and writes (the name) during the call only.
        let rc = unsafe { libc::ioctl(fd, libc::TUNSETIFF, &mut req) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        if self.offloads.vnet_hdr {
            set_offload(fd, self.offload_mask())?;
        }
        // SAFETY: name is a NUL-terminated C string that outlives the call.
        let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if index == 0 {
            return Err(io::Error::last_os_error());
        }
        self.index.store(index, Relaxed);
        Ok(index)
    }

    /// The `TUNSETOFFLOAD` mask of the offloads in effect.
    fn offload_mask(&self) -> libc::c_uint {
        if self.offloads.tso4 {
            libc::TUN_F_CSUM | libc::TUN_F_TSO4
        } else if self.offloads.csum {
            libc::TUN_F_CSUM
        } else {
            0
        }
    }

    /// Offloads in effect; log this once at start.
    pub fn offloads(&self) -> Offloads {
        self.offloads
    }

    /// Why an asked-for offload was refused by the kernel, if one was.
    pub fn offload_refusal(&self) -> Option<&io::Error> {
        self.refusal.as_ref()
    }

    /// Bytes of `virtio_net_hdr` in front of each read and write: [`VNET_HDR_LEN`] or 0.
    pub fn vnet_hdr_len(&self) -> usize {
        if self.offloads.vnet_hdr {
            VNET_HDR_LEN
        } else {
            0
        }
    }

    /// Reads one packet (with its `virtio_net_hdr` in offload mode) into `buf`, blocking until
    /// one is there. Returns its length, or `Ok(0)` once `stop` is raised. A packet longer than
    /// `buf` is cut; use [`MAX_READ`]-sized buffers in offload mode.
    #[cfg(test)] // The data path reads without blocking; tests wait with this.
    pub fn read(&self, buf: &mut [u8], stop: &Stop) -> io::Result<usize> {
        loop {
            match self.dev.recv(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if !wait_readable(self.dev.as_raw_fd(), stop)? {
                        return Ok(0);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Reads one packet if one is queued, without blocking: `Ok(None)` when there is none.
    pub fn try_read(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        loop {
            match self.dev.recv(buf) {
                Ok(n) => return Ok(Some(n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Writes one packet (starting with a `virtio_net_hdr` in offload mode). The kernel
    /// rejects malformed headers with `EINVAL`; that affects only this packet.
    pub fn write(&self, buf: &[u8]) -> io::Result<usize> {
        self.write_retrying(|| self.dev.send(buf))
    }

    /// Writes one packet gathered from `parts` (`writev`), like [`write`](Self::write).
    pub fn write_vectored(&self, parts: &[IoSlice<'_>]) -> io::Result<usize> {
        self.write_retrying(|| self.dev.send_vectored(parts))
    }

    /// Runs `send` until it is not interrupted, waiting for room while the device's socket
    /// buffer is exhausted.
    fn write_retrying(&self, send: impl Fn() -> io::Result<usize>) -> io::Result<usize> {
        loop {
            match send() {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let mut pfd = libc::pollfd {
                        fd: self.dev.as_raw_fd(),
                        events: libc::POLLOUT,
                        revents: 0,
                    };
                    // SAFETY: one valid pollfd; bounded 100 ms wait.
                    unsafe { libc::poll(&mut pfd, 1, 100) };
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Opens another queue of a multi-queue device (for one more reader/writer thread pair).
    pub fn clone_queue(&self) -> Result<Tun, TunError> {
        let configure = |what, source| TunError::Configure {
            name: self.name.clone(),
            what,
            source,
        };
        let dev = self
            .dev
            .try_clone()
            .map_err(|e| configure("add queue", e))?;
        if self.offloads.vnet_hdr {
            set_offload(dev.as_raw_fd(), self.offload_mask())
                .map_err(|e| configure("TUNSETOFFLOAD", e))?;
        }
        dev.set_nonblocking(true)
            .map_err(|e| configure("O_NONBLOCK", e))?;
        Ok(Tun {
            dev,
            name: self.name.clone(),
            index: AtomicU32::new(self.index()),
            multi_queue: self.multi_queue,
            offloads: self.offloads,
            refusal: None,
        })
    }
}

impl AsRawFd for Tun {
    fn as_raw_fd(&self) -> RawFd {
        self.dev.as_raw_fd()
    }
}

impl AsFd for Tun {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.dev.as_fd()
    }
}

fn set_offload(fd: RawFd, mask: libc::c_uint) -> io::Result<()> {
    // SAFETY: TUNSETOFFLOAD takes its argument by value (an unsigned long mask), no pointers;
    // fd is a live TUN descriptor.
    let rc = unsafe { libc::ioctl(fd, libc::TUNSETOFFLOAD, mask as libc::c_ulong) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// If a device called `name` exists in this namespace and is not a TUN, what it is.
fn existing_non_tun(name: &str) -> Option<String> {
    let cname = CString::new(name).ok()?;
    // SAFETY: cname is a valid NUL-terminated string; if_nametoindex only reads it.
    if unsafe { libc::if_nametoindex(cname.as_ptr()) } == 0 {
        return None;
    }
    match driver_info(name) {
        Some((driver, bus)) if driver == "tun" && bus == "tun" => None,
        Some((driver, bus)) if driver == "tun" => Some(format!("a {} device", bus.to_uppercase())),
        Some((driver, _)) => Some(format!("a `{driver}` device")),
        None => Some("a device of another type".to_string()),
    }
}

/// `ethtool_drvinfo` from `linux/ethtool.h`.
#[repr(C)]
struct EthtoolDrvinfo {
    cmd: u32,
    driver: [u8; 32],
    version: [u8; 32],
    fw_version: [u8; 32],
    bus_info: [u8; 32],
    erom_version: [u8; 32],
    reserved2: [u8; 12],
    n_priv_flags: u32,
    n_stats: u32,
    testinfo_len: u32,
    eedump_len: u32,
    regdump_len: u32,
}

const ETHTOOL_GDRVINFO: u32 = 0x0000_0003;

/// (driver, bus_info) of a device via `SIOCETHTOOL`/`ETHTOOL_GDRVINFO`. The TUN driver answers
/// `("tun", "tun")` for TUN and `("tun", "tap")` for TAP devices.
fn driver_info(name: &str) -> Option<(String, String)> {
    // SAFETY: socket takes no pointers.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: fd was just created and is owned by nobody else.
    let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: both are plain C structs for which all-zero is valid.
    let mut info: EthtoolDrvinfo = unsafe { std::mem::zeroed() };
    info.cmd = ETHTOOL_GDRVINFO;
    // SAFETY: as above.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes().take(15)) {
        *dst = src as libc::c_char;
    }
    req.ifr_ifru.ifru_data = (&mut info as *mut EthtoolDrvinfo).cast();
    // SAFETY: req names the device and points at a live, correctly laid out ethtool_drvinfo
    // that the kernel fills in; both outlive the call.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCETHTOOL, &mut req) };
    if rc < 0 {
        return None;
    }
    Some((c_str(&info.driver), c_str(&info.bus_info)))
}

fn c_str(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::testns::{in_netns, run};
    use etherparse::{NetSlice, PacketBuilder, SlicedPacket, TransportSlice};
    use std::io::{Read, Write};
    use std::net::{Ipv4Addr, TcpStream, UdpSocket};
    use std::time::Duration;

    const TUN_IP: &str = "10.244.1.0";
    const REMOTE: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 5);

    fn open_up(name: &str, offload: bool) -> Tun {
        let mut cfg = TunConfig::new(name);
        cfg.offload = offload;
        let tun = Tun::open(&cfg).unwrap();
        run(&format!(
            "ip link set lo up && ip addr add {TUN_IP}/32 dev {name} && ip link set {name} up && ip route add 10.244.0.0/16 dev {name}"
        ));
        tun
    }

    /// Reads until an IPv4 packet matching `want` shows up (the kernel may also send IPv6
    /// router solicitations into a fresh device); returns (vnet header, IPv4 packet).
    fn read_ipv4(tun: &Tun, want: impl Fn(&[u8]) -> bool) -> (Vec<u8>, Vec<u8>) {
        let stop = Stop::new().unwrap();
        let timer = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_secs(5));
                stop.stop();
            })
        };
        let mut buf = vec![0u8; MAX_READ];
        let hl = tun.vnet_hdr_len();
        for _ in 0..100 {
            let n = tun.read(&mut buf, &stop).unwrap();
            assert!(n > 0, "no matching packet within 5 s");
            let pkt = &buf[hl..n];
            if pkt.first().map(|b| b >> 4) == Some(4) && want(pkt) {
                drop(timer);
                return (buf[..hl].to_vec(), pkt.to_vec());
            }
        }
        panic!("no matching packet in 100 reads");
    }

    fn udp_to_remote(pkt: &[u8], port: u16) -> bool {
        matches!(SlicedPacket::from_ip(pkt), Ok(p) if matches!(
            (&p.net, &p.transport),
            (Some(NetSlice::Ipv4(ip)), Some(TransportSlice::Udp(u)))
                if ip.header().destination_addr() == REMOTE && u.destination_port() == port))
    }

    #[test]
    fn plain_mode_reads_bare_ipv4_and_writes_are_delivered() {
        in_netns("tun-plain", || {
            let tun = open_up("pntun0", false);
            assert_eq!(tun.offloads(), Offloads::default());
            assert_eq!(tun.vnet_hdr_len(), 0);
            let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
            sock.send_to(b"hello tun", (REMOTE, 9999)).unwrap();
            let (hdr, pkt) = read_ipv4(&tun, |p| udp_to_remote(p, 9999));
            assert!(hdr.is_empty());
            let p = SlicedPacket::from_ip(&pkt).unwrap();
            assert_eq!(p.ip_payload().unwrap().payload.len(), 8 + 9);
            assert!(pkt.ends_with(b"hello tun"));

            // A packet written into the TUN reaches a local socket.
            let rx = UdpSocket::bind((TUN_IP, 7777)).unwrap();
            rx.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut out = Vec::new();
            PacketBuilder::ipv4(REMOTE.octets(), [10, 244, 1, 0], 64)
                .udp(5555, 7777)
                .write(&mut out, b"from the tunnel")
                .unwrap();
            assert_eq!(tun.write(&out).unwrap(), out.len());
            let mut buf = [0u8; 64];
            let (n, from) = rx.recv_from(&mut buf).unwrap();
            assert_eq!(&buf[..n], b"from the tunnel");
            assert_eq!(from, (REMOTE, 5555).into());
        });
    }

    #[test]
    fn offload_mode_yields_vnet_header_and_tso_super_packets() {
        in_netns("tun-offload", || {
            let tun = open_up("pntun1", true);
            assert_eq!(
                tun.offloads(),
                Offloads {
                    vnet_hdr: true,
                    csum: true,
                    tso4: true
                },
                "refused: {:?}",
                tun.offload_refusal()
            );
            assert_eq!(tun.vnet_hdr_len(), VNET_HDR_LEN);

            // A UDP datagram arrives with a partial checksum the kernel left to us.
            let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
            sock.send_to(b"offloaded", (REMOTE, 9999)).unwrap();
            let (hdr, _pkt) = read_ipv4(&tun, |p| udp_to_remote(p, 9999));
            assert_eq!(hdr[0] & 1, 1, "VIRTIO_NET_HDR_F_NEEDS_CSUM");
            assert_eq!(hdr[1], 0, "GSO_NONE");
            assert_eq!(
                u16::from_le_bytes([hdr[6], hdr[7]]),
                20,
                "csum_start after IPv4 header"
            );
            assert_eq!(
                u16::from_le_bytes([hdr[8], hdr[9]]),
                6,
                "UDP checksum offset"
            );

            // TCP: play the remote end of a handshake so the kernel sends a bulk burst.
            let client = std::thread::spawn(|| {
                let mut s =
                    TcpStream::connect_timeout(&(REMOTE, 80).into(), Duration::from_secs(5))
                        .unwrap();
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                s.write_all(&vec![0x5a; 60_000]).unwrap();
                let mut got = vec![0u8; 5000];
                s.read_exact(&mut got).unwrap();
                got
            });
            let is_tcp = |p: &[u8]| matches!(SlicedPacket::from_ip(p), Ok(s) if matches!(s.transport, Some(TransportSlice::Tcp(_))));
            let (_, syn) = read_ipv4(&tun, is_tcp);
            let s = SlicedPacket::from_ip(&syn).unwrap();
            let Some(TransportSlice::Tcp(t)) = s.transport else {
                unreachable!()
            };
            assert!(t.syn());
            let (sport, isn) = (t.source_port(), t.sequence_number());
            let mut synack = vec![0u8; VNET_HDR_LEN];
            PacketBuilder::ipv4(REMOTE.octets(), [10, 244, 1, 0], 64)
                .tcp(80, sport, 1000, 65535)
                .syn()
                .ack(isn.wrapping_add(1))
                .options(&[etherparse::TcpOptionElement::MaximumSegmentSize(1400)])
                .unwrap()
                .write(&mut synack, &[])
                .unwrap();
            tun.write(&synack).unwrap();
            let (hdr, big) = read_ipv4(&tun, |p| p.len() > 1500);
            assert_eq!(hdr[1], 1, "VIRTIO_NET_HDR_GSO_TCPV4");
            let gso_size = u16::from_le_bytes([hdr[4], hdr[5]]);
            assert!((1000..=1400).contains(&gso_size), "gso_size {gso_size}");
            assert!(big.len() > 1500 && big.len() <= 65535);

            // Write side: one GSO_TCPV4 super-packet (5000 bytes of data, gso_size 1400) from
            // the remote end, with a partial checksum as virtio-net expects, reaches the client.
            let data: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
            let mut gso = Vec::new();
            PacketBuilder::ipv4(REMOTE.octets(), [10, 244, 1, 0], 64)
                .tcp(80, sport, 1001, 65535)
                .ack(isn.wrapping_add(1))
                .psh()
                .write(&mut gso, &data)
                .unwrap();
            // Pseudo-header sum over the whole super-packet, not complemented (NEEDS_CSUM).
            let tcp_len = (gso.len() - 20) as u32;
            let mut sum: u32 =
                (10 << 8 | 244) + (2 << 8 | 5) + (10 << 8 | 244) + (1 << 8) + 6 + tcp_len;
            while sum > 0xffff {
                sum = (sum & 0xffff) + (sum >> 16);
            }
            gso[36..38].copy_from_slice(&(sum as u16).to_be_bytes());
            let mut hdr = [0u8; VNET_HDR_LEN];
            hdr[0] = 1; // VIRTIO_NET_HDR_F_NEEDS_CSUM
            hdr[1] = 1; // VIRTIO_NET_HDR_GSO_TCPV4
            hdr[2..4].copy_from_slice(&40u16.to_le_bytes()); // hdr_len
            hdr[4..6].copy_from_slice(&1400u16.to_le_bytes()); // gso_size
            hdr[6..8].copy_from_slice(&20u16.to_le_bytes()); // csum_start
            hdr[8..10].copy_from_slice(&16u16.to_le_bytes()); // csum_offset
            let frame = [&hdr[..], &gso].concat();
            assert_eq!(tun.write(&frame).unwrap(), frame.len());
            assert_eq!(client.join().unwrap(), data);
        });
    }

    #[test]
    fn non_tun_device_with_the_name_is_refused_clearly() {
        in_netns("tun-clash", || {
            run("ip link add tunl0 type bridge");
            let err = Tun::open(&TunConfig::new("tunl0")).unwrap_err();
            assert!(matches!(err, TunError::NotTun { .. }), "{err:?}");
            let msg = err.to_string();
            for needle in [
                "`tunl0`",
                "not a TUN device",
                "`bridge`",
                "ipip",
                "--tun-name",
            ] {
                assert!(msg.contains(needle), "{needle:?} missing from: {msg}");
            }
        });
    }

    #[test]
    fn read_is_released_by_stop_and_names_are_checked() {
        in_netns("tun-stop", || {
            let tun = Tun::open(&TunConfig::new("pntun2")).unwrap();
            let stop = Stop::new().unwrap();
            let s2 = stop.clone();
            let t = std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                s2.stop();
            });
            let mut buf = vec![0u8; MAX_READ];
            assert_eq!(tun.read(&mut buf, &stop).unwrap(), 0);
            t.join().unwrap();
            assert!(matches!(
                Tun::open(&TunConfig::new("a-name-far-too-long")),
                Err(TunError::BadName(_))
            ));
        });
    }

    #[test]
    fn multi_queue_clones_keep_the_offloads() {
        in_netns("tun-mq", || {
            let cfg = TunConfig {
                multi_queue: true,
                ..TunConfig::new("pntun3")
            };
            let q0 = Tun::open(&cfg).unwrap();
            let q1 = q0.clone_queue().unwrap();
            assert_eq!(q1.offloads(), q0.offloads());
            assert_eq!((q1.index(), q1.name()), (q0.index(), "pntun3"));
            assert_ne!(q1.as_raw_fd(), q0.as_raw_fd());
            // A single-queue device cannot grow queues.
            let single = Tun::open(&TunConfig::new("pntun4")).unwrap();
            assert!(matches!(
                single.clone_queue(),
                Err(TunError::Configure { .. })
            ));
        });
    }
}

//! The nfnetlink_log socket the agent reads the packets network policy denies from (the
//! messages themselves are [`crate::core::nflog`]'s).

use std::os::fd::{AsRawFd, OwnedFd};

use nix::sys::socket::{
    bind, recv, send, socket, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol,
    SockType,
};

use crate::core::nflog;

/// A socket bound to one NFLOG group of this network namespace.
pub struct NflogSocket {
    fd: OwnedFd,
}

impl NflogSocket {
    /// Binds `group`, asking for each packet's first `range` bytes. Fails when the kernel has no
    /// nfnetlink_log, or when another program holds the group (EBUSY).
    pub fn open(group: u16, range: u32) -> Result<NflogSocket, String> {
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkNetFilter,
        )
        .map_err(|e| format!("netfilter netlink socket: {e}"))?;
        bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0))
            .map_err(|e| format!("netfilter netlink bind: {e}"))?;
        let s = NflogSocket { fd };
        for (what, request) in [
            ("bind", nflog::bind_request(group)),
            ("copy mode", nflog::copy_request(group, range)),
        ] {
            send(s.fd.as_raw_fd(), &request, MsgFlags::empty())
                .map_err(|e| format!("NFLOG {what}: {e}"))?;
            let mut buf = [0u8; 512];
            let n = recv(s.fd.as_raw_fd(), &mut buf, MsgFlags::empty())
                .map_err(|e| format!("NFLOG {what}: {e}"))?;
            match nflog::ack_error(&buf[..n]) {
                Some(0) => {}
                Some(e) => {
                    let errno = nix::errno::Errno::from_raw(-e);
                    return Err(format!("NFLOG group {group} {what}: {errno}"));
                }
                None => return Err(format!("NFLOG group {group} {what}: no acknowledgement")),
            }
        }
        Ok(s)
    }

    /// Waits for the next datagram of logged packets; its length in `buf`.
    pub fn recv(&self, buf: &mut [u8]) -> Result<usize, String> {
        recv(self.fd.as_raw_fd(), buf, MsgFlags::empty()).map_err(|e| format!("NFLOG recv: {e}"))
    }
}

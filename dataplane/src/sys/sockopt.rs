//! Integer socket options, the buffer sizes the data path asks for, and the kernel's count of
//! a socket's drops.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};

/// Sets an integer socket option.
pub(crate) fn setsockopt_int(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: passes a pointer to a live c_int and its exact size.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Reads an integer socket option.
pub(crate) fn getsockopt_int(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
) -> io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: value and len are live and len holds value's size.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            level,
            name,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(value)
    }
}

/// Datagrams the kernel dropped at a socket since it was opened, nearly all because its receive
/// buffer was full: `SO_MEMINFO`'s `SK_MEMINFO_DROPS`, what `ss -m` shows as `d` (a 32-bit
/// counter in the kernel).
pub(crate) fn socket_drops(fd: BorrowedFd<'_>) -> io::Result<u64> {
    const DROPS: usize = libc::SK_MEMINFO_DROPS as usize;
    let mut info = [0u32; DROPS + 1];
    let mut len = std::mem::size_of_val(&info) as libc::socklen_t;
    // SAFETY: info and len are live and len holds info's size; the kernel writes at most len
    // bytes into info and stores the length it wrote in len.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_MEMINFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    if (len as usize) < std::mem::size_of_val(&info) {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "SO_MEMINFO has no drop counter on this kernel",
        ));
    }
    Ok(u64::from(info[DROPS]))
}

/// Grows a socket's receive and send buffers to `bytes`.
///
/// Tries `SO_*BUFFORCE` first (needs CAP_NET_ADMIN, ignores `net.core.[rw]mem_max`), then the
/// plain options, which the kernel silently caps at `[rw]mem_max`. Returns the sizes the kernel
/// reports afterwards (which Linux doubles for bookkeeping overhead).
pub(crate) fn grow_buffers(fd: RawFd, bytes: usize) -> (usize, usize) {
    let want = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    for (force, plain) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    ] {
        if setsockopt_int(fd, libc::SOL_SOCKET, force, want).is_err() {
            // Best effort: a smaller buffer only costs throughput under bursts.
            let _ = setsockopt_int(fd, libc::SOL_SOCKET, plain, want);
        }
    }
    let rcv = getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_RCVBUF).unwrap_or(0);
    let snd = getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_SNDBUF).unwrap_or(0);
    (rcv.max(0) as usize, snd.max(0) as usize)
}

//! Waiting on descriptors: the shared [`Stop`] signal, and [`Watch`], one epoll instance over
//! all of a data-path thread's descriptors with the stop signal in every wait.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use std::sync::Arc;

/// A sticky shutdown signal that releases every reader blocked in this module.
///
/// It is an `eventfd` that is written once and never drained, so every `poll` on it returns at
/// once from then on. Clone it into each data-path thread; calling [`Stop::stop`] from any thread
/// (a signal handler task, the main thread) makes blocked `read`/`recv_batch` calls return
/// `Ok(0)`.
#[derive(Clone, Debug)]
pub struct Stop {
    fd: Arc<OwnedFd>,
}

impl Stop {
    /// Creates a signal that is not yet raised.
    pub fn new() -> io::Result<Stop> {
        // SAFETY: eventfd takes no pointers; the flags are valid constants.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: eventfd just returned this descriptor to us and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Stop { fd: Arc::new(fd) })
    }

    /// Raises the signal. Idempotent.
    pub fn stop(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our own eventfd. The only possible failure
        // is EAGAIN when the counter is saturated, which still leaves the fd readable.
        unsafe {
            libc::write(
                self.fd.as_raw_fd(),
                (&one as *const u64).cast(),
                std::mem::size_of::<u64>(),
            )
        };
    }

    /// Whether [`Stop::stop`] has been called.
    pub fn is_stopped(&self) -> bool {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, zero timeout.
        let n = unsafe { libc::poll(&mut pfd, 1, 0) };
        n > 0 && pfd.revents & libc::POLLIN != 0
    }
}

/// The eventfd becomes readable (and stays so) once stopped: async code can wait on it with
/// `tokio::io::unix::AsyncFd` instead of polling [`Stop::is_stopped`].
impl AsFd for Stop {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Blocks until `fd` is readable (`Ok(true)`) or `stop` is raised (`Ok(false)`).
#[cfg(test)] // The data path reads without blocking; tests wait with this.
pub(crate) fn wait_readable(fd: std::os::fd::RawFd, stop: &Stop) -> io::Result<bool> {
    loop {
        let mut pfds = [
            libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: pfds is a live array of two pollfd; the length passed matches it.
        let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, -1) };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        if pfds[1].revents != 0 {
            return Ok(false);
        }
        if pfds[0].revents != 0 {
            return Ok(true);
        }
    }
}

/// The descriptors one loop serves, and its [`Stop`], watched through one epoll instance:
/// asking which are readable is one system call whose cost does not grow with their number.
/// (A `poll` of the agent's nine descriptors looked each one up and polled it on every call,
/// which a busy-polling loop makes thousands of times a second: about 8 % of a busy agent's
/// samples.) Level-triggered, so a descriptor stays reported until it is drained, as `poll`
/// did.
#[derive(Debug)]
pub struct Watch {
    epoll: Epoll,
    count: usize,
}

/// Most descriptors a [`Watch`] takes (bit `i` of its answers is descriptor `i`).
pub const WATCH_MAX: usize = 31;

/// The epoll token of the stop signal (descriptors use their index).
const STOP_TOKEN: u64 = u64::MAX;

impl Watch {
    /// Watches `fds` for input (bit `i` of the answers for `fds[i]`) and `stop`.
    ///
    /// # Panics
    /// With more than [`WATCH_MAX`] descriptors: a caller bug.
    pub fn new(fds: &[BorrowedFd<'_>], stop: &Stop) -> io::Result<Watch> {
        assert!(
            fds.len() <= WATCH_MAX,
            "a Watch takes at most {WATCH_MAX} descriptors"
        );
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        for (i, fd) in fds.iter().enumerate() {
            epoll.add(fd, EpollEvent::new(EpollFlags::EPOLLIN, i as u64))?;
        }
        epoll.add(stop, EpollEvent::new(EpollFlags::EPOLLIN, STOP_TOKEN))?;
        Ok(Watch {
            epoll,
            count: fds.len(),
        })
    }

    /// Which descriptors are readable right now (possibly none), or [`Readiness::Stopped`]. A
    /// busy-polling loop calls this between bursts instead of trying a read on each.
    pub fn ready(&self) -> io::Result<Readiness> {
        self.wait_for(EpollTimeout::ZERO)
    }

    /// Blocks until a descriptor is readable and returns which are, or 0 once stopped.
    pub fn wait(&self) -> io::Result<u32> {
        loop {
            match self.wait_for(EpollTimeout::NONE)? {
                Readiness::Stopped => return Ok(0),
                Readiness::Ready(0) => {}
                Readiness::Ready(bits) => return Ok(bits),
            }
        }
    }

    /// Blocks until a descriptor is readable, `stop` is raised or `timeout` passes (then
    /// `Ready(0)`).
    pub fn wait_timeout(&self, timeout: std::time::Duration) -> io::Result<Readiness> {
        let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
        self.wait_for(EpollTimeout::from(ms))
    }

    fn wait_for(&self, timeout: EpollTimeout) -> io::Result<Readiness> {
        let mut events = [EpollEvent::empty(); WATCH_MAX + 1];
        let n = loop {
            match self.epoll.wait(&mut events[..=self.count], timeout) {
                Ok(n) => break n,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
        };
        let mut ready = 0u32;
        for e in &events[..n] {
            match e.data() {
                STOP_TOKEN => return Ok(Readiness::Stopped),
                i => ready |= 1 << i,
            }
        }
        Ok(Readiness::Ready(ready))
    }
}

/// What [`Watch::ready`] saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    /// Bit `i` set when descriptor `i` is readable (0: none is).
    Ready(u32),
    /// The [`Stop`] signal is raised.
    Stopped,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_releases_a_blocked_waiter() {
        let stop = Stop::new().unwrap();
        assert!(!stop.is_stopped());
        // A pipe that never becomes readable stands in for an idle socket.
        let mut fds = [0; 2];
        // SAFETY: fds is a live array of two c_int.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: pipe returned two fresh descriptors we now own.
        let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let waiter = {
            let stop = stop.clone();
            let rfd = r.as_raw_fd();
            std::thread::spawn(move || wait_readable(rfd, &stop))
        };
        std::thread::sleep(std::time::Duration::from_millis(50));
        stop.stop();
        assert!(
            !waiter.join().unwrap().unwrap(),
            "woken by stop, not by data"
        );
        assert!(stop.is_stopped());
        stop.stop();
        assert!(stop.is_stopped(), "stop is sticky and idempotent");
        drop((r, w));
    }

    #[test]
    fn watch_reports_which_and_stop() {
        let stop = Stop::new().unwrap();
        let mut fds = [0; 4];
        // SAFETY: fds[..2] and fds[2..] are live arrays of two c_int each.
        unsafe {
            assert_eq!(libc::pipe(fds.as_mut_ptr()), 0);
            assert_eq!(libc::pipe(fds.as_mut_ptr().add(2)), 0);
        }
        // SAFETY: pipe returned four fresh descriptors we now own.
        let owned: Vec<OwnedFd> = fds
            .iter()
            .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
            .collect();
        let readers = [owned[0].as_fd(), owned[2].as_fd()];
        let watch = Watch::new(&readers, &stop).unwrap();
        let first = Watch::new(&readers[..1], &stop).unwrap();
        assert_eq!(watch.ready().unwrap(), Readiness::Ready(0));
        // SAFETY: writes one byte from a live array to our second pipe.
        assert_eq!(
            unsafe { libc::write(owned[3].as_raw_fd(), [7u8].as_ptr().cast(), 1) },
            1
        );
        assert_eq!(watch.wait().unwrap(), 0b10);
        // Level-triggered: still reported until read.
        assert_eq!(watch.ready().unwrap(), Readiness::Ready(0b10));
        assert_eq!(first.ready().unwrap(), Readiness::Ready(0));
        let mut byte = [0u8; 1];
        // SAFETY: reads one byte into a live array from our second pipe.
        assert_eq!(
            unsafe { libc::read(owned[2].as_raw_fd(), byte.as_mut_ptr().cast(), 1) },
            1
        );
        assert_eq!(watch.ready().unwrap(), Readiness::Ready(0));
        // A blocked wait returns once stopped.
        std::thread::scope(|s| {
            let waiter = s.spawn(|| watch.wait().unwrap());
            std::thread::sleep(std::time::Duration::from_millis(50));
            stop.stop();
            assert_eq!(waiter.join().unwrap(), 0, "stop wins");
        });
        assert_eq!(watch.ready().unwrap(), Readiness::Stopped);
        assert_eq!(first.ready().unwrap(), Readiness::Stopped);
    }

    #[test]
    #[should_panic(expected = "at most 31 descriptors")]
    fn watch_refuses_more_descriptors_than_bits() {
        let stop = Stop::new().unwrap();
        let fds = vec![stop.as_fd(); WATCH_MAX + 1];
        let _ = Watch::new(&fds, &stop);
    }

    #[test]
    fn wait_readable_reports_data() {
        let stop = Stop::new().unwrap();
        let mut fds = [0; 2];
        // SAFETY: fds is a live array of two c_int.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: pipe returned two fresh descriptors we now own.
        let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: writes one byte from a live array to our pipe.
        assert_eq!(
            unsafe { libc::write(w.as_raw_fd(), [7u8].as_ptr().cast(), 1) },
            1
        );
        assert!(wait_readable(r.as_raw_fd(), &stop).unwrap());
    }
}

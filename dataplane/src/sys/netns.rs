//! Running code in another network namespace, named by a path (`CNI_NETNS`:
//! `/run/netns/NAME` or `/proc/PID/ns/net`).
//!
//! `setns(CLONE_NEWNET)` moves only the calling thread, so the work runs on a thread of its
//! own that ends with it; the rest of the process stays where it was.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

/// An open network namespace.
#[derive(Debug)]
pub struct NetNs(File);

impl NetNs {
    /// Opens the namespace at `path`.
    pub fn open(path: &Path) -> io::Result<NetNs> {
        File::open(path).map(NetNs)
    }

    /// The descriptor, for moving a device into the namespace.
    pub fn fd(&self) -> std::os::fd::RawFd {
        self.0.as_raw_fd()
    }

    /// Runs `f` on a new thread inside this namespace and returns what it returned.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> io::Result<T> {
        std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: the descriptor is an open namespace file for the whole call; setns
                // changes only this thread's network namespace, and the thread ends with `f`.
                let rc = unsafe { libc::setns(self.0.as_raw_fd(), libc::CLONE_NEWNET) };
                if rc != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(f())
            })
            .join()
            .map_err(|_| io::Error::other("the thread in the namespace panicked"))?
        })
    }
}

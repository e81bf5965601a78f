//! One agent per network namespace: a lock the kernel releases when its holder dies, and a
//! look-up of who else holds a TUN device.
//!
//! The lock is a listening Unix socket with an abstract name (`@podnet-agent`). Abstract names
//! belong to the network namespace: every agent started in a namespace sees the same name
//! whatever its `--state-dir`, agents in other namespaces do not, and the kernel frees the name
//! the moment the holder exits, SIGKILL included, so no stale lock can block the next start. The
//! kernel records a listener's credentials at `listen()`, so a second agent learns the holder's
//! PID by connecting (`SO_PEERCRED`) without the holder having to answer.

use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};

/// The abstract socket name every agent takes.
pub const AGENT_LOCK: &str = "podnet-agent";

/// Why the lock could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "another podnet-agent runs in this network namespace (PID {pid}, state dir {}); nothing \
         was changed. Stop it first (kill {pid}) or start this one in another network namespace",
        state_dir.display()
    )]
    Held { pid: i32, state_dir: PathBuf },
    #[error("cannot take the agent lock (abstract Unix socket @{name}): {source}")]
    Io { name: String, source: io::Error },
}

/// The lock, held until dropped (or the process dies).
#[derive(Debug)]
pub struct AgentLock {
    name: String,
    _listener: UnixListener,
}

impl AgentLock {
    /// Takes lock `name` in this network namespace. When another process holds it, the error
    /// names that process and its `--state-dir` (read from its command line; `default_state_dir`
    /// when it passed none).
    pub fn acquire(name: &str, default_state_dir: &Path) -> Result<AgentLock, LockError> {
        let io_err = |source| LockError::Io {
            name: name.to_owned(),
            source,
        };
        let addr = SocketAddr::from_abstract_name(name).map_err(io_err)?;
        match UnixListener::bind_addr(&addr) {
            Ok(listener) => Ok(AgentLock {
                name: name.to_owned(),
                _listener: listener,
            }),
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
                let pid = holder_pid(&addr).map_err(io_err)?;
                let state_dir = cmdline(pid)
                    .and_then(|args| flag_value(&args, "--state-dir"))
                    .map_or_else(|| default_state_dir.to_path_buf(), PathBuf::from);
                Err(LockError::Held { pid, state_dir })
            }
            Err(e) => Err(io_err(e)),
        }
    }

    /// The lock's name as `ss -xl` shows it (`@podnet-agent`).
    pub fn name(&self) -> String {
        format!("@{}", self.name)
    }
}

/// The PID of the process listening on `addr`.
fn holder_pid(addr: &SocketAddr) -> io::Result<i32> {
    let stream = UnixStream::connect_addr(addr)?;
    let cred = getsockopt(&stream, PeerCredentials).map_err(io::Error::from)?;
    Ok(cred.pid())
}

/// Process `pid`'s arguments, if it is still there.
fn cmdline(pid: i32) -> Option<Vec<String>> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        raw.split(|&b| b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect(),
    )
}

/// The value of `--flag V` or `--flag=V` in `args`.
fn flag_value(args: &[String], flag: &str) -> Option<String> {
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == flag {
            return it.next().cloned();
        }
        if let Some(v) = a.strip_prefix(flag).and_then(|r| r.strip_prefix('=')) {
            return Some(v.to_owned());
        }
    }
    None
}

/// Processes other than this one, in this network namespace, that hold a file descriptor of
/// TUN device `name` (the tun driver writes `iff:\tNAME` into the fdinfo of an attached fd).
/// A second multi-queue open of their device would attach to it and take a share of its
/// packets, so the agent refuses such a device.
pub fn tun_holders(name: &str) -> Vec<i32> {
    // The calling thread's namespace (a thread can have entered another than its process's).
    let own_ns = std::fs::read_link("/proc/thread-self/ns/net").ok();
    let me = std::process::id() as i32;
    let want = format!("iff:\t{name}\n");
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut holders = Vec::new();
    for entry in procs.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        if pid == me || std::fs::read_link(entry.path().join("ns/net")).ok() != own_ns {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(entry.path().join("fdinfo")) else {
            continue;
        };
        let holds = fds
            .flatten()
            .any(|fd| std::fs::read_to_string(fd.path()).is_ok_and(|info| info.contains(&want)));
        if holds {
            holders.push(pid);
        }
    }
    holders
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::testns::in_netns;
    use crate::sys::tun::{Tun, TunConfig};

    #[test]
    fn a_second_lock_in_one_namespace_is_refused_and_names_the_holder() {
        in_netns("lock", || {
            let dir = Path::new("/run/podnet");
            let first = AgentLock::acquire("podnet-agent-test", dir).unwrap();
            assert_eq!(first.name(), "@podnet-agent-test");
            match AgentLock::acquire("podnet-agent-test", dir) {
                Err(LockError::Held { pid, .. }) => {
                    assert_eq!(pid, std::process::id() as i32);
                }
                other => panic!("second lock: {other:?}"),
            }
            // Released with the holder: the next one gets it at once.
            drop(first);
            let again = AgentLock::acquire("podnet-agent-test", dir).unwrap();
            drop(again);
        });
    }

    #[test]
    fn the_refusal_says_what_to_do() {
        let e = LockError::Held {
            pid: 42,
            state_dir: PathBuf::from("/var/lib/x"),
        };
        let msg = e.to_string();
        assert!(
            msg.contains("PID 42") && msg.contains("/var/lib/x") && msg.contains("kill 42"),
            "{msg}"
        );
    }

    #[test]
    fn flag_values_are_found_in_both_spellings() {
        let args: Vec<String> = ["podnet-agent", "run", "--state-dir", "/a", "--api=1"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(flag_value(&args, "--state-dir").as_deref(), Some("/a"));
        assert_eq!(flag_value(&args, "--api").as_deref(), Some("1"));
        assert_eq!(flag_value(&args, "--state-dir-x"), None);
        assert_eq!(flag_value(&args[..3], "--state-dir"), None);
    }

    #[test]
    fn a_tun_held_by_another_process_is_found() {
        in_netns("tunholders", || {
            assert!(tun_holders("pntunh0").is_empty());
            // Our own fds do not count.
            let _tun = Tun::open(&TunConfig::new("pntunh0")).unwrap();
            assert!(tun_holders("pntunh0").is_empty());
            // Another process in this namespace opens one (TUNSETIFF, IFF_TUN | IFF_NO_PI).
            let script = "import fcntl, os, struct, sys, time\n\
                fd = os.open('/dev/net/tun', os.O_RDWR)\n\
                fcntl.ioctl(fd, 0x400454ca, struct.pack('16sH', b'pntunh1', 0x1001))\n\
                print('open', flush=True)\n\
                time.sleep(30)\n";
            let mut child = std::process::Command::new("python3")
                .args(["-c", script])
                .stdout(std::process::Stdio::piped())
                .spawn()
                .expect("python3");
            let mut line = String::new();
            let mut out = io::BufReader::new(child.stdout.take().unwrap());
            io::BufRead::read_line(&mut out, &mut line).unwrap();
            assert_eq!(line, "open\n");
            let found = tun_holders("pntunh1");
            child.kill().unwrap();
            child.wait().unwrap();
            assert_eq!(found, [child.id() as i32]);
            assert!(tun_holders("pntunh0").is_empty());
        });
    }
}

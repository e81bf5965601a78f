//! The plugin's own address allocator: one file per allocated address under
//! `DATA_DIR/NETWORK/`, named by the address and holding the container ID and interface it is
//! for. A lock file (`flock`) serializes parallel ADDs and DELs, so no address is handed out
//! twice; the files survive restarts of the plugin, the agent and the runtime.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write as _};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use ipnet::Ipv4Net;
use nix::fcntl::{Flock, FlockArg};

/// A pod attachment: what an address is allocated to.
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize)]
pub struct Attachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

impl Attachment {
    fn record(&self) -> String {
        format!("{}\n{}\n", self.container_id, self.ifname)
    }

    fn parse(text: &str) -> Option<Attachment> {
        let mut lines = text.lines();
        Some(Attachment {
            container_id: lines.next()?.to_string(),
            ifname: lines.next()?.to_string(),
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    #[error(
        "no free address in {subnet}: all {usable} addresses for pods are allocated (see \
         {dir}); delete stale pods (CNI DEL or GC), or give the node a larger pod CIDR"
    )]
    Exhausted {
        subnet: Ipv4Net,
        usable: u32,
        dir: String,
    },
    #[error("IPAM store {dir}: {source}")]
    Io { dir: String, source: io::Error },
}

/// The allocations of one network on this node.
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
}

impl Store {
    /// `data_dir/network`, created if missing.
    pub fn open(data_dir: &Path, network: &str) -> Result<Store, IpamError> {
        let dir = data_dir.join(network);
        let store = Store { dir };
        fs::create_dir_all(&store.dir).map_err(|e| store.err(e))?;
        Ok(store)
    }

    fn err(&self, source: io::Error) -> IpamError {
        IpamError::Io {
            dir: self.dir.display().to_string(),
            source,
        }
    }

    fn lock(&self) -> Result<Flock<File>, IpamError> {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.dir.join(".lock"))
            .map_err(|e| self.err(e))?;
        Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, e)| self.err(e.into()))
    }

    /// Every allocation: address and attachment.
    fn entries(&self) -> Result<Vec<(Ipv4Addr, Attachment)>, IpamError> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(|e| self.err(e))? {
            let entry = entry.map_err(|e| self.err(e))?;
            let Some(ip) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<Ipv4Addr>().ok())
            else {
                continue;
            };
            let text = fs::read_to_string(entry.path()).map_err(|e| self.err(e))?;
            if let Some(a) = Attachment::parse(&text) {
                out.push((ip, a));
            }
        }
        Ok(out)
    }

    /// The address of `who`, allocating the lowest free one in `subnet` (after the gateway,
    /// the first host address) if it has none: an ADD retried for the same attachment gets
    /// the same address.
    pub fn allocate(&self, subnet: Ipv4Net, who: &Attachment) -> Result<Ipv4Addr, IpamError> {
        let _lock = self.lock()?;
        let entries = self.entries()?;
        if let Some((ip, _)) = entries.iter().find(|(_, a)| a == who) {
            return Ok(*ip);
        }
        let gateway = gateway(subnet);
        let taken: std::collections::BTreeSet<Ipv4Addr> =
            entries.iter().map(|(ip, _)| *ip).collect();
        let free = subnet
            .hosts()
            .filter(|ip| *ip != gateway)
            .find(|ip| !taken.contains(ip));
        let Some(ip) = free else {
            return Err(IpamError::Exhausted {
                subnet,
                usable: usable(subnet),
                dir: self.dir.display().to_string(),
            });
        };
        let path = self.dir.join(ip.to_string());
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| self.err(e))?;
        f.write_all(who.record().as_bytes())
            .and_then(|()| f.sync_all())
            .map_err(|e| self.err(e))?;
        Ok(ip)
    }

    /// The address of `who`, if it has one.
    pub fn find(&self, who: &Attachment) -> Result<Option<Ipv4Addr>, IpamError> {
        let _lock = self.lock()?;
        Ok(self
            .entries()?
            .into_iter()
            .find(|(_, a)| a == who)
            .map(|(ip, _)| ip))
    }

    /// Frees the address of `who`; `None` if it had none (a repeated DEL).
    pub fn release(&self, who: &Attachment) -> Result<Option<Ipv4Addr>, IpamError> {
        let _lock = self.lock()?;
        let found = self.entries()?.into_iter().find(|(_, a)| a == who);
        if let Some((ip, _)) = &found {
            fs::remove_file(self.dir.join(ip.to_string())).map_err(|e| self.err(e))?;
        }
        Ok(found.map(|(ip, _)| ip))
    }

    /// Frees every address whose attachment is not in `keep`; returns what it freed.
    pub fn gc(&self, keep: &[Attachment]) -> Result<Vec<(Ipv4Addr, Attachment)>, IpamError> {
        let _lock = self.lock()?;
        let mut freed = Vec::new();
        for (ip, a) in self.entries()? {
            if !keep.contains(&a) {
                fs::remove_file(self.dir.join(ip.to_string())).map_err(|e| self.err(e))?;
                freed.push((ip, a));
            }
        }
        Ok(freed)
    }
}

/// The pod gateway: the first host address (the node's bridge).
pub fn gateway(subnet: Ipv4Net) -> Ipv4Addr {
    subnet.hosts().next().unwrap_or(subnet.network())
}

/// Addresses pods can get: the host addresses but the gateway.
pub fn usable(subnet: Ipv4Net) -> u32 {
    (subnet.hosts().count() as u32).saturating_sub(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn who(id: &str) -> Attachment {
        Attachment {
            container_id: id.into(),
            ifname: "eth0".into(),
        }
    }

    #[test]
    fn allocations_are_distinct_stable_freed_and_collected() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), "podnet").unwrap();
        let subnet: Ipv4Net = "10.244.1.0/29".parse().unwrap();
        assert_eq!(usable(subnet), 5);
        let a = store.allocate(subnet, &who("a")).unwrap();
        assert_eq!(
            a,
            "10.244.1.2".parse::<Ipv4Addr>().unwrap(),
            "after the gateway"
        );
        assert_eq!(store.allocate(subnet, &who("a")).unwrap(), a, "retried ADD");
        let b = store.allocate(subnet, &who("b")).unwrap();
        assert_ne!(a, b);
        assert_eq!(store.release(&who("a")).unwrap(), Some(a));
        assert_eq!(store.release(&who("a")).unwrap(), None, "second DEL");
        // Survives a new process: a fresh Store over the same directory.
        let again = Store::open(dir.path(), "podnet").unwrap();
        assert_eq!(again.find(&who("b")).unwrap(), Some(b));
        for id in ["c", "d", "e", "f"] {
            again.allocate(subnet, &who(id)).unwrap();
        }
        let e = again.allocate(subnet, &who("g")).unwrap_err();
        assert!(e.to_string().contains("all 5 addresses"), "{e}");
        let freed = again.gc(&[who("b"), who("c")]).unwrap();
        assert_eq!(freed.len(), 3, "{freed:?}");
        assert!(again.allocate(subnet, &who("g")).is_ok());
    }

    #[test]
    fn parallel_allocations_never_share_an_address() {
        let dir = tempfile::tempdir().unwrap();
        let subnet: Ipv4Net = "10.244.2.0/24".parse().unwrap();
        let path = dir.path().to_path_buf();
        let ips: Vec<Ipv4Addr> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..50)
                .map(|i| {
                    let path = path.clone();
                    s.spawn(move || {
                        // A Store per thread, as parallel plugin processes would have.
                        let store = Store::open(&path, "podnet").unwrap();
                        store.allocate(subnet, &who(&format!("c{i}"))).unwrap()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let distinct: std::collections::BTreeSet<_> = ips.iter().collect();
        assert_eq!(distinct.len(), 50);
    }
}

//! Where the registry is kept across restarts.
//!
//! [`Store`] is what one process owning the state saves it to. The embedded default
//! [`FileStore`] keeps the whole state as one JSON file, replaced atomically: write a
//! temporary file in the same directory, fsync it, rename it over the old one, fsync the
//! directory. A crash at any moment leaves either the old or the new file, never a torn one.
//! An unreadable or corrupt file is an error: starting empty over it would hand out pod CIDRs
//! that running nodes already use. [`FileStore::lock`] makes one process the file's only
//! writer: a second service started on the same file stops at once with an error instead of
//! both handing out CIDRs from their own copy.
//!
//! Replicas that share the state use the etcd store instead (`etcd.rs`, `replica.rs`). It is
//! not a [`Store`]: it writes each change as a transaction, never a whole state.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use crate::state::StoredState;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot read state file {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error(
        "state file {path} is corrupt ({reason}); refusing to start empty over it because that \
         would hand out pod CIDRs nodes already use; restore it from a backup, or move it away \
         to start over"
    )]
    Corrupt { path: PathBuf, reason: String },
    #[error("cannot write state file {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error(
        "state file {path} is in use by another podnet-control{} (it holds the lock on {lock}); \
         stop that one, or give this one another --state",
        holder.as_ref().map(|pid| format!(" (pid {pid})")).unwrap_or_default()
    )]
    InUse {
        path: PathBuf,
        lock: PathBuf,
        holder: Option<String>,
    },
    #[error("cannot lock {path}: {source}")]
    Lock { path: PathBuf, source: io::Error },
    #[error("state store: {0}")]
    Other(String),
}

/// Durable home of the registry.
pub trait Store: Send + Sync + 'static {
    /// The saved state, `None` when nothing was ever saved.
    fn load(&self) -> Result<Option<StoredState>, StoreError>;
    /// Saves `state` durably before returning: callers acknowledge changes after this.
    fn save(&self, state: &StoredState) -> Result<(), StoreError>;
}

/// The whole state as one JSON file, replaced atomically.
#[derive(Clone, Debug)]
pub struct FileStore {
    path: PathBuf,
    /// The exclusive lock taken by [`FileStore::lock`], released when the last clone drops
    /// (and by the kernel when the process dies, so a crash leaves no stale lock).
    lock: Option<Arc<Flock<File>>>,
}

impl FileStore {
    /// A store on `path`, not yet locked (see [`FileStore::lock`]).
    pub fn new(path: impl Into<PathBuf>) -> FileStore {
        FileStore {
            path: path.into(),
            lock: None,
        }
    }

    /// Takes the state file for this process alone: an exclusive `flock` on `<path>.lock`
    /// (which also records our PID for the error a second process gets), held for the life of
    /// the store. Fails with [`StoreError::InUse`] when another process holds it.
    pub fn lock(mut self) -> Result<FileStore, StoreError> {
        let mut name = self.path.clone().into_os_string();
        name.push(".lock");
        let lock = PathBuf::from(name);
        let lock_err = |source: io::Error| StoreError::Lock {
            path: lock.clone(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock)
            .map_err(lock_err)?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(held) => {
                held.set_len(0).map_err(lock_err)?;
                writeln!(&*held, "{}", std::process::id()).map_err(lock_err)?;
                self.lock = Some(Arc::new(held));
                Ok(self)
            }
            Err((_, Errno::EWOULDBLOCK)) => {
                let holder = fs::read_to_string(&lock)
                    .ok()
                    .map(|s| s.trim().to_owned())
                    .filter(|s| !s.is_empty());
                Err(StoreError::InUse {
                    path: self.path.clone(),
                    lock,
                    holder,
                })
            }
            Err((_, errno)) => Err(lock_err(errno.into())),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn dir(&self) -> PathBuf {
        match self.path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        }
    }

    /// `<file name>.tmp.`, the prefix of temporary files.
    fn temp_prefix(&self) -> String {
        let name = self
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        format!("{name}.tmp.")
    }

    fn temp_path(&self) -> PathBuf {
        self.dir()
            .join(format!("{}{}", self.temp_prefix(), std::process::id()))
    }

    /// Removes temporary files a crash left between write and rename; they never hold the
    /// state of record.
    fn remove_stale_temps(&self) {
        let prefix = self.temp_prefix();
        let Ok(entries) = fs::read_dir(self.dir()) else {
            return;
        };
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with(&prefix) {
                let _ = fs::remove_file(entry.path());
            }
        }
    }

    fn write_err(&self, source: io::Error) -> StoreError {
        StoreError::Write {
            path: self.path.clone(),
            source,
        }
    }
}

impl Store for FileStore {
    fn load(&self) -> Result<Option<StoredState>, StoreError> {
        let bytes = match fs::read(&self.path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(StoreError::Read {
                    path: self.path.clone(),
                    source,
                })
            }
        };
        self.remove_stale_temps();
        if bytes.is_empty() {
            return Err(StoreError::Corrupt {
                path: self.path.clone(),
                reason: "the file is empty".into(),
            });
        }
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| StoreError::Corrupt {
                path: self.path.clone(),
                reason: e.to_string(),
            })
    }

    fn save(&self, state: &StoredState) -> Result<(), StoreError> {
        let mut bytes =
            serde_json::to_vec_pretty(state).map_err(|e| StoreError::Other(e.to_string()))?;
        bytes.push(b'\n');
        let temp = self.temp_path();
        let result = (|| {
            let mut file = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&temp)?;
            file.write_all(&bytes)?;
            file.sync_all()?;
            drop(file);
            fs::rename(&temp, &self.path)?;
            // The rename is durable only once the directory entry is.
            File::open(self.dir())?.sync_all()
        })();
        if result.is_err() {
            let _ = fs::remove_file(&temp);
        }
        result.map_err(|e| self.write_err(e))
    }
}

/// Keeps state in memory only; for tests and throwaway runs.
#[derive(Debug, Default)]
pub struct MemoryStore {
    state: std::sync::Mutex<Option<StoredState>>,
}

impl Store for MemoryStore {
    fn load(&self) -> Result<Option<StoredState>, StoreError> {
        Ok(self.state.lock().unwrap_or_else(|e| e.into_inner()).clone())
    }

    fn save(&self, state: &StoredState) -> Result<(), StoreError> {
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = Some(state.clone());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::STATE_FORMAT;
    use podnet_proto::api::{Encap, Node, NodeState};

    fn state(revision: u64, nodes: usize) -> StoredState {
        StoredState {
            policy: Default::default(),
            format: STATE_FORMAT,
            cluster_cidr: "10.244.0.0/16".parse().unwrap(),
            node_prefix: 24,
            revision,
            nodes: (1..=nodes)
                .map(|i| Node {
                    wireguard_public_key: None,
                    name: format!("h{i}"),
                    underlay_ip: format!("198.18.0.{i}").parse().unwrap(),
                    encap: Encap::Ipip,
                    vtep_mac: format!("02:00:c6:12:00:{i:02x}").parse().unwrap(),
                    pod_cidr: format!("10.244.{i}.0/24").parse().unwrap(),
                    state: NodeState::Up,
                    last_heartbeat: 1,
                    revision: i as u64,
                })
                .collect(),
        }
    }

    #[test]
    fn a_locked_state_file_refuses_a_second_owner_until_released() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let first = FileStore::new(&path).lock().unwrap();
        let pid = std::process::id().to_string();
        match FileStore::new(&path).lock() {
            Err(StoreError::InUse {
                path: p, holder, ..
            }) => {
                assert_eq!(p, path);
                assert_eq!(holder.as_deref(), Some(pid.as_str()));
            }
            other => panic!("second lock: {other:?}"),
        }
        let err = FileStore::new(&path).lock().unwrap_err().to_string();
        assert!(
            err.contains("in use") && err.contains(&pid) && err.contains("--state"),
            "{err}"
        );
        // Clones share the lock; it goes with the last of them.
        let clone = first.clone();
        drop(first);
        assert!(
            FileStore::new(&path).lock().is_err(),
            "still held by the clone"
        );
        drop(clone);
        let again = FileStore::new(&path).lock().unwrap();
        again.save(&state(1, 1)).unwrap();
        assert_eq!(again.load().unwrap(), Some(state(1, 1)));
    }

    #[test]
    fn missing_file_means_fresh_start() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::new(dir.path().join("state.json"));
        assert_eq!(store.load().unwrap(), None);
    }

    #[test]
    fn save_replaces_atomically_and_leaves_no_temp_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let store = FileStore::new(&path);
        store.save(&state(1, 1)).unwrap();
        store.save(&state(2, 3)).unwrap();
        assert_eq!(store.load().unwrap(), Some(state(2, 3)));
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, ["state.json"]);
    }

    #[test]
    fn a_leftover_temp_file_from_a_crash_is_ignored_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let store = FileStore::new(&path);
        store.save(&state(4, 2)).unwrap();
        // A crash between creating the temp file and the rename leaves a torn temp file.
        let torn = dir.path().join("state.json.tmp.1");
        fs::write(&torn, b"{\"format\":1,\"clus").unwrap();
        let unrelated = dir.path().join("other.json.tmp.1");
        fs::write(&unrelated, b"x").unwrap();
        assert_eq!(store.load().unwrap(), Some(state(4, 2)));
        assert!(!torn.exists());
        assert!(unrelated.exists(), "only our own temp files are removed");
        store.save(&state(5, 2)).unwrap();
        assert_eq!(store.load().unwrap(), Some(state(5, 2)));
    }

    #[test]
    fn corrupt_or_empty_file_is_an_error_not_a_fresh_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let store = FileStore::new(&path);
        fs::write(&path, b"{\"format\":1,\"clus").unwrap();
        let err = store.load().unwrap_err();
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains("state.json"), "{err}");
        fs::write(&path, b"").unwrap();
        assert!(store.load().unwrap_err().to_string().contains("empty"));
        fs::write(&path, b"{\"nodes\": 3}").unwrap();
        assert!(matches!(store.load(), Err(StoreError::Corrupt { .. })));
    }

    #[test]
    fn unreadable_path_is_a_read_error() {
        let dir = tempfile::tempdir().unwrap();
        // A directory where the file should be cannot be read as a file.
        let store = FileStore::new(dir.path());
        assert!(matches!(store.load(), Err(StoreError::Read { .. })));
    }

    #[test]
    fn save_into_a_missing_directory_fails_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::new(dir.path().join("no/such/dir/state.json"));
        let err = store.save(&state(1, 0)).unwrap_err();
        assert!(matches!(err, StoreError::Write { .. }), "{err}");
    }
}

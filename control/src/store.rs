//! Where the registry is kept across restarts.
//!
//! [`Store`] is what one process owning the state saves it to, one [`Change`] at a time. The
//! embedded default [`FileStore`] keeps a snapshot, `state.json` (the whole state as JSON, as
//! earlier versions wrote it), and a log beside it, `state.json.log`, to which every change is
//! appended as one JSON line and fsynced before the change is acknowledged. A change costs
//! what it changed, not the size of the cluster. When the log has grown past the snapshot (and
//! 256 KiB), the snapshot is written afresh, atomically (temporary file, fsync, rename, fsync
//! of the directory), and the log emptied; so replaying the log at start never takes longer
//! than reading the snapshot once more.
//!
//! A crash at any moment loses nothing acknowledged:
//! - an append cut short leaves a last line without its newline; it was never acknowledged, and
//!   is dropped at load (and cut off at the next append);
//! - a crash between a new snapshot and the emptied log leaves entries the snapshot already
//!   holds: the snapshot records the last entry in it (`log_seq`), and load skips those.
//!
//! An unreadable or corrupt snapshot, or a log with a bad line before its end, a gap in its
//! sequence, or no snapshot to apply to, is an error: starting empty over it would hand out pod
//! CIDRs that running nodes already use. [`FileStore::lock`] makes one process the file's only
//! writer: a second service started on the same file stops at once with an error instead of
//! both handing out CIDRs from their own copy.
//!
//! Replicas that share the state use the etcd store instead (`etcd.rs`, `replica.rs`). It is
//! not a [`Store`]: it writes each change as a transaction.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use podnet_proto::policy::PolicyState;
use serde::{Deserialize, Serialize};

use crate::state::{NodeDelta, StoredState};

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

/// One change to the saved state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Change {
    /// Everything: a fresh store's first save.
    Whole(StoredState),
    /// Nodes written and removed, with the revision after them.
    Nodes(NodeDelta),
    /// The policy records (pods, namespaces, policies), replaced.
    Policy(PolicyState),
}

impl Change {
    pub fn apply_to(&self, state: &mut StoredState) {
        match self {
            Change::Whole(whole) => *state = whole.clone(),
            Change::Nodes(delta) => state.apply(delta),
            Change::Policy(policy) => state.policy = policy.clone(),
        }
    }
}

/// Durable home of the registry.
pub trait Store: Send + Sync + 'static {
    /// The saved state, `None` when nothing was ever saved.
    fn load(&self) -> Result<Option<StoredState>, StoreError>;
    /// Saves `change` (to the state last loaded or saved) durably before returning: callers
    /// acknowledge changes after this. Anything but [`Change::Whole`] needs that state.
    fn save(&self, change: &Change) -> Result<(), StoreError>;
}

/// The snapshot file: the state, and the last log entry it includes.
#[derive(Serialize, Deserialize)]
struct Snapshot {
    #[serde(flatten)]
    state: StoredState,
    #[serde(default, skip_serializing_if = "is_zero")]
    log_seq: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// One line of the log.
#[derive(Serialize, Deserialize)]
struct Entry<C> {
    seq: u64,
    change: C,
}

/// The log is compacted into a new snapshot once it is larger than the snapshot and this.
const COMPACT_AT_LEAST: u64 = 256 * 1024;

/// A snapshot and an append-only log of changes (see the module documentation).
#[derive(Clone, Debug)]
pub struct FileStore {
    path: PathBuf,
    /// The exclusive lock taken by [`FileStore::lock`], released when the last clone drops
    /// (and by the kernel when the process dies, so a crash leaves no stale lock).
    lock: Option<Arc<Flock<File>>>,
    /// The state as loaded and changed since, and where the log stands.
    open: Arc<Mutex<Option<Open>>>,
    compact_at_least: u64,
}

#[derive(Debug)]
struct Open {
    state: StoredState,
    /// The last entry applied, in the snapshot or the log.
    seq: u64,
    /// The log, opened for appending at the first save.
    log: Option<File>,
    /// Length of the log's whole entries: anything after it is a torn append.
    log_len: u64,
    snapshot_len: u64,
}

impl FileStore {
    /// A store on `path`, not yet locked (see [`FileStore::lock`]).
    pub fn new(path: impl Into<PathBuf>) -> FileStore {
        FileStore {
            path: path.into(),
            lock: None,
            open: Arc::new(Mutex::new(None)),
            compact_at_least: COMPACT_AT_LEAST,
        }
    }

    /// Compacts once the log is larger than the snapshot and `bytes` (256 KiB by default).
    pub fn compact_at_least(mut self, bytes: u64) -> FileStore {
        self.compact_at_least = bytes;
        self
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

impl FileStore {
    /// `<path>.log`.
    pub fn log_path(&self) -> PathBuf {
        let mut name = self.path.clone().into_os_string();
        name.push(".log");
        PathBuf::from(name)
    }

    fn corrupt(path: &Path, reason: String) -> StoreError {
        StoreError::Corrupt {
            path: path.to_path_buf(),
            reason,
        }
    }

    fn read(path: &Path) -> Result<Option<Vec<u8>>, StoreError> {
        match fs::read(path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(StoreError::Read {
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    /// Writes `state` as the snapshot, atomically, recording `log_seq` as included.
    fn write_snapshot(&self, state: &StoredState, log_seq: u64) -> Result<u64, StoreError> {
        let snapshot = Snapshot {
            state: state.clone(),
            log_seq,
        };
        let mut bytes =
            serde_json::to_vec_pretty(&snapshot).map_err(|e| StoreError::Other(e.to_string()))?;
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
        result.map_err(|e| self.write_err(e))?;
        Ok(bytes.len() as u64)
    }

    /// The log, opened for appending, with a torn last append cut off.
    fn open_log(&self, whole_len: u64) -> io::Result<File> {
        let path = self.log_path();
        let existed = path.exists();
        let file = OpenOptions::new().append(true).create(true).open(&path)?;
        if file.metadata()?.len() > whole_len {
            file.set_len(whole_len)?;
        }
        if !existed {
            File::open(self.dir())?.sync_all()?;
        }
        Ok(file)
    }

    /// Appends `change` to the log and applies it; compacts when the log has grown enough.
    fn append(&self, open: &mut Open, change: &Change) -> Result<(), StoreError> {
        let log_err = |source| StoreError::Write {
            path: self.log_path(),
            source,
        };
        let seq = open.seq + 1;
        let mut line = serde_json::to_vec(&Entry { seq, change })
            .map_err(|e| StoreError::Other(e.to_string()))?;
        line.push(b'\n');
        let log = match &mut open.log {
            Some(log) => log,
            None => open
                .log
                .insert(self.open_log(open.log_len).map_err(log_err)?),
        };
        if let Err(e) = log.write_all(&line).and_then(|()| log.sync_data()) {
            // Part of the line may be in the file: reopening cuts it off.
            open.log = None;
            return Err(log_err(e));
        }
        open.log_len += line.len() as u64;
        open.seq = seq;
        change.apply_to(&mut open.state);
        if open.log_len > open.snapshot_len.max(self.compact_at_least) {
            // The change is durable in the log already: a compaction that fails is retried
            // at the next change.
            match self.compact(open) {
                Ok(()) => {}
                Err(e) => {
                    tracing::warn!("state log not compacted (retried at the next change): {e}")
                }
            }
        }
        Ok(())
    }

    /// A new snapshot of everything, then an empty log.
    fn compact(&self, open: &mut Open) -> Result<(), StoreError> {
        open.snapshot_len = self.write_snapshot(&open.state, open.seq)?;
        if let Some(log) = &open.log {
            log.set_len(0)
                .and_then(|()| log.sync_all())
                .map_err(|source| StoreError::Write {
                    path: self.log_path(),
                    source,
                })?;
        }
        open.log_len = 0;
        Ok(())
    }
}

impl Store for FileStore {
    fn load(&self) -> Result<Option<StoredState>, StoreError> {
        let snapshot = Self::read(&self.path)?;
        self.remove_stale_temps();
        let log_path = self.log_path();
        let log = Self::read(&log_path)?.unwrap_or_default();
        let Some(bytes) = snapshot else {
            if log.contains(&b'\n') {
                return Err(Self::corrupt(
                    &self.path,
                    format!(
                        "it is missing, but {} holds changes to it",
                        log_path.display()
                    ),
                ));
            }
            return Ok(None);
        };
        if bytes.is_empty() {
            return Err(Self::corrupt(&self.path, "the file is empty".into()));
        }
        let snapshot: Snapshot =
            serde_json::from_slice(&bytes).map_err(|e| Self::corrupt(&self.path, e.to_string()))?;
        let (mut state, mut seq) = (snapshot.state, snapshot.log_seq);
        let mut whole = 0;
        // Only lines with their newline: what follows the last one is a torn append that was
        // never acknowledged.
        for line in log.split_inclusive(|&b| b == b'\n') {
            if line.last() != Some(&b'\n') {
                break;
            }
            let at = whole;
            whole += line.len();
            let entry: Entry<Change> = serde_json::from_slice(line)
                .map_err(|e| Self::corrupt(&log_path, format!("the entry at byte {at}: {e}")))?;
            if entry.seq <= snapshot.log_seq {
                // Already in the snapshot: the log was not emptied after it was written.
                continue;
            }
            if entry.seq != seq + 1 {
                return Err(Self::corrupt(
                    &log_path,
                    format!("entry {} follows entry {seq}", entry.seq),
                ));
            }
            entry.change.apply_to(&mut state);
            seq = entry.seq;
        }
        *self.open.lock().unwrap_or_else(|e| e.into_inner()) = Some(Open {
            state: state.clone(),
            seq,
            log: None,
            log_len: whole as u64,
            snapshot_len: bytes.len() as u64,
        });
        Ok(Some(state))
    }

    fn save(&self, change: &Change) -> Result<(), StoreError> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Change::Whole(state) = change {
            // The log goes first: entries left beside a fresh snapshot would be replayed on it.
            match fs::remove_file(self.log_path()) {
                Ok(()) => File::open(self.dir())
                    .and_then(|d| d.sync_all())
                    .map_err(|e| self.write_err(e))?,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(self.write_err(e)),
            }
            let snapshot_len = self.write_snapshot(state, 0)?;
            *open = Some(Open {
                state: state.clone(),
                seq: 0,
                log: None,
                log_len: 0,
                snapshot_len,
            });
            return Ok(());
        }
        let open = open.as_mut().ok_or_else(|| {
            StoreError::Other("a change saved before the state was loaded".into())
        })?;
        self.append(open, change)
    }
}

/// Keeps state in memory only; for tests and throwaway runs.
#[derive(Debug, Default)]
pub struct MemoryStore {
    state: Mutex<Option<StoredState>>,
}

impl Store for MemoryStore {
    fn load(&self) -> Result<Option<StoredState>, StoreError> {
        Ok(self.state.lock().unwrap_or_else(|e| e.into_inner()).clone())
    }

    fn save(&self, change: &Change) -> Result<(), StoreError> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match (&mut *state, change) {
            (slot, Change::Whole(whole)) => *slot = Some(whole.clone()),
            (Some(state), change) => change.apply_to(state),
            (None, _) => {
                return Err(StoreError::Other(
                    "a change saved before the state was loaded".into(),
                ))
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::STATE_FORMAT;
    use podnet_proto::api::{Encap, Node, NodeState};
    use podnet_proto::policy::PolicyState;

    fn state(revision: u64, nodes: usize) -> StoredState {
        StoredState {
            policy: Default::default(),
            format: STATE_FORMAT,
            cluster_cidr: "10.244.0.0/16".parse().unwrap(),
            node_prefix: 24,
            cluster_cidr_v6: None,
            node_prefix_v6: None,
            revision,
            nodes: (1..=nodes)
                .map(|i| Node {
                    wireguard_public_key: None,
                    name: format!("h{i}"),
                    underlay_ip: format!("198.18.0.{i}").parse().unwrap(),
                    encap: Encap::Ipip,
                    vtep_mac: format!("02:00:c6:12:00:{i:02x}").parse().unwrap(),
                    pod_cidr: format!("10.244.{i}.0/24").parse().unwrap(),
                    pod_cidr_v6: None,
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
        again.save(&Change::Whole(state(1, 1))).unwrap();
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
        store.save(&Change::Whole(state(1, 1))).unwrap();
        store.save(&Change::Whole(state(2, 3))).unwrap();
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
        store.save(&Change::Whole(state(4, 2))).unwrap();
        // A crash between creating the temp file and the rename leaves a torn temp file.
        let torn = dir.path().join("state.json.tmp.1");
        fs::write(&torn, b"{\"format\":1,\"clus").unwrap();
        let unrelated = dir.path().join("other.json.tmp.1");
        fs::write(&unrelated, b"x").unwrap();
        assert_eq!(store.load().unwrap(), Some(state(4, 2)));
        assert!(!torn.exists());
        assert!(unrelated.exists(), "only our own temp files are removed");
        store.save(&Change::Whole(state(5, 2))).unwrap();
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
        let err = store.save(&Change::Whole(state(1, 0))).unwrap_err();
        assert!(matches!(err, StoreError::Write { .. }), "{err}");
    }

    fn node(i: usize, revision: u64) -> Node {
        state(revision, i).nodes.pop().unwrap()
    }

    fn delta(revision: u64, put: Vec<Node>, removed: &[&str]) -> Change {
        Change::Nodes(NodeDelta {
            revision,
            put,
            removed: removed.iter().map(|s| s.to_string()).collect(),
        })
    }

    fn len(path: &Path) -> u64 {
        fs::metadata(path).map_or(0, |m| m.len())
    }

    #[test]
    fn a_change_is_one_appended_line_and_load_replays_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let store = FileStore::new(&path);
        store.save(&Change::Whole(state(2, 2))).unwrap();
        let snapshot = fs::read(&path).unwrap();
        let mut expect = state(2, 2);
        let changes = [
            delta(3, vec![node(3, 3)], &[]),
            delta(
                4,
                vec![Node {
                    state: NodeState::Down,
                    ..node(1, 4)
                }],
                &[],
            ),
            delta(5, vec![], &["h2"]),
            Change::Policy(PolicyState {
                revision: 7,
                ..Default::default()
            }),
        ];
        for (i, change) in changes.iter().enumerate() {
            let before = len(&store.log_path());
            store.save(change).unwrap();
            change.apply_to(&mut expect);
            let line = fs::read(store.log_path()).unwrap()[before as usize..].to_vec();
            assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1, "one line");
            let entry: Entry<Change> = serde_json::from_slice(&line).unwrap();
            assert_eq!((entry.seq, &entry.change), (i as u64 + 1, change));
        }
        assert_eq!(
            fs::read(&path).unwrap(),
            snapshot,
            "the snapshot is not rewritten"
        );
        let names: Vec<_> = expect.nodes.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["h1", "h3"]);
        assert_eq!(FileStore::new(&path).load().unwrap(), Some(expect.clone()));
        // A reopened store goes on from where the log ends.
        let reopened = FileStore::new(&path);
        reopened.load().unwrap();
        let next = delta(6, vec![node(4, 6)], &[]);
        reopened.save(&next).unwrap();
        next.apply_to(&mut expect);
        assert_eq!(FileStore::new(&path).load().unwrap(), Some(expect));
    }

    #[test]
    fn the_log_is_compacted_into_the_snapshot_once_it_outgrows_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let store = FileStore::new(&path).compact_at_least(0);
        store.save(&Change::Whole(state(0, 0))).unwrap();
        let mut expect = state(0, 0);
        let mut compactions = 0;
        for i in 1..=200 {
            let change = delta(i as u64, vec![node(i, i as u64)], &[]);
            let before = len(&store.log_path());
            store.save(&change).unwrap();
            change.apply_to(&mut expect);
            if len(&store.log_path()) < before {
                compactions += 1;
                assert_eq!(len(&store.log_path()), 0, "emptied after a compaction");
            }
            // Never more log than snapshot, give or take the one line appended last.
            assert!(len(&store.log_path()) <= len(&path) + 400);
        }
        assert!(compactions >= 3, "{compactions} compactions");
        let snapshot: Snapshot = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
        assert!(snapshot.log_seq > 0 && snapshot.log_seq <= 200);
        assert_eq!(FileStore::new(&path).load().unwrap(), Some(expect));
    }

    #[test]
    fn entries_the_snapshot_holds_are_skipped_after_a_crash_before_the_log_was_emptied() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let store = FileStore::new(&path);
        store.save(&Change::Whole(state(0, 0))).unwrap();
        let mut expect = state(0, 0);
        for i in 1..=3 {
            let change = delta(i, vec![node(i as usize, i)], &[]);
            store.save(&change).unwrap();
            change.apply_to(&mut expect);
        }
        let log = fs::read(store.log_path()).unwrap();
        // Compacted (snapshot with log_seq 3), then the crash: the old log is still there.
        store.write_snapshot(&expect, 3).unwrap();
        fs::write(store.log_path(), &log).unwrap();
        let store = FileStore::new(&path);
        assert_eq!(store.load().unwrap(), Some(expect.clone()));
        let change = delta(4, vec![node(4, 4)], &[]);
        store.save(&change).unwrap();
        change.apply_to(&mut expect);
        assert_eq!(FileStore::new(&path).load().unwrap(), Some(expect));
    }

    #[test]
    fn a_torn_last_append_is_dropped_and_cut_off_at_the_next_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let store = FileStore::new(&path);
        store.save(&Change::Whole(state(0, 1))).unwrap();
        let mut expect = state(0, 1);
        let change = delta(2, vec![node(2, 2)], &[]);
        store.save(&change).unwrap();
        change.apply_to(&mut expect);
        // A crash half way through the next append (never acknowledged).
        let mut log = OpenOptions::new()
            .append(true)
            .open(store.log_path())
            .unwrap();
        log.write_all(br#"{"seq":2,"change":{"nodes":{"revis"#)
            .unwrap();
        let store = FileStore::new(&path);
        assert_eq!(store.load().unwrap(), Some(expect.clone()));
        let change = delta(3, vec![node(3, 3)], &[]);
        store.save(&change).unwrap();
        change.apply_to(&mut expect);
        assert_eq!(FileStore::new(&path).load().unwrap(), Some(expect));
    }

    #[test]
    fn a_bad_line_a_gap_or_a_log_without_its_snapshot_is_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let store = FileStore::new(&path);
        store.save(&Change::Whole(state(0, 1))).unwrap();
        store.save(&delta(2, vec![node(2, 2)], &[])).unwrap();
        let good = fs::read(store.log_path()).unwrap();
        let corrupt = |log: &[u8], says: &str| {
            fs::write(FileStore::new(&path).log_path(), log).unwrap();
            let err = FileStore::new(&path).load().unwrap_err();
            assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
            assert!(err.to_string().contains(says), "{err}");
        };
        corrupt(
            &[b"garbage\n".as_slice(), &good].concat(),
            "the entry at byte 0",
        );
        let gap = String::from_utf8(good.clone())
            .unwrap()
            .replace("\"seq\":1", "\"seq\":2");
        corrupt(gap.as_bytes(), "entry 2 follows entry 0");
        fs::write(FileStore::new(&path).log_path(), &good).unwrap();
        fs::remove_file(&path).unwrap();
        let err = FileStore::new(&path).load().unwrap_err();
        assert!(err.to_string().contains("holds changes to it"), "{err}");
    }

    #[test]
    fn a_change_before_a_load_is_refused_and_a_fresh_store_drops_an_old_log() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let store = FileStore::new(&path);
        let err = store.save(&delta(1, vec![node(1, 1)], &[])).unwrap_err();
        assert!(
            err.to_string().contains("before the state was loaded"),
            "{err}"
        );
        let memory = MemoryStore::default();
        assert!(memory.save(&delta(1, vec![], &[])).is_err());
        // Whole after whatever was there: only the new state counts.
        store.save(&Change::Whole(state(0, 1))).unwrap();
        store.save(&delta(2, vec![node(2, 2)], &[])).unwrap();
        store.save(&Change::Whole(state(9, 3))).unwrap();
        assert!(!store.log_path().exists());
        assert_eq!(FileStore::new(&path).load().unwrap(), Some(state(9, 3)));
    }
}

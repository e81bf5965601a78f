//! `podnet-control store`: a cluster's whole state read out of one store and written into
//! another, so a cluster grows from the file store to etcd with every node keeping its pod
//! CIDR, and either store can be dumped to a JSON snapshot and restored from one.
//!
//! Both ends must be still: the file store is locked as `serve` locks it (a running service
//! refuses the copy), and a copy into etcd refuses a prefix that holds a cluster. A copy into
//! etcd cut short and run again finishes without writing anything twice ([`Etcd::copy_in`]).

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use crate::etcd::{Etcd, EtcdError};
use crate::etcd_tls::EtcdTls;
use crate::state::{StoredState, Timing};
use crate::store::{Change, FileStore, Store, StoreError};

/// Where a state is read from or written to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Place {
    /// `file:PATH`: a file store's state file (and its log).
    File(PathBuf),
    /// `etcd:URL,URL...`: an etcd cluster, under `--etcd-prefix`.
    Etcd(Vec<String>),
}

impl FromStr for Place {
    type Err = String;

    fn from_str(s: &str) -> Result<Place, String> {
        match s.split_once(':') {
            Some(("file", path)) if !path.is_empty() => Ok(Place::File(path.into())),
            Some(("etcd", urls)) if !urls.is_empty() => {
                Ok(Place::Etcd(urls.split(',').map(str::to_string).collect()))
            }
            _ => Err(format!(
                "{s:?} is no store: give file:PATH (a --state file) or etcd:URL[,URL...]"
            )),
        }
    }
}

impl std::fmt::Display for Place {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Place::File(path) => write!(f, "file:{}", path.display()),
            Place::Etcd(urls) => write!(f, "etcd:{}", urls.join(",")),
        }
    }
}

/// How to reach etcd, for an `etcd:` place.
#[derive(Clone, Debug)]
pub struct EtcdAccess {
    pub prefix: String,
    pub tls: Option<EtcdTls>,
}

#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    #[error("{0}")]
    Refused(String),
}

/// Leases are not copied; the timing only checks that the state loads.
const TIMING: Timing = Timing {
    lease_ttl_ms: 20_000,
    reclaim_after_ms: 86_400_000,
};

async fn connect(urls: &[String], etcd: &EtcdAccess) -> Result<Etcd, CopyError> {
    Ok(Etcd::connect(
        urls,
        &etcd.prefix,
        Duration::from_millis(TIMING.lease_ttl_ms),
        etcd.tls.clone(),
    )
    .await?)
}

/// The file store at `path`, locked: a `serve` on it makes the copy stop here.
fn locked(path: &PathBuf) -> Result<FileStore, CopyError> {
    Ok(FileStore::new(path).lock()?)
}

/// The whole state in `from`.
pub async fn read(from: &Place, etcd: &EtcdAccess) -> Result<StoredState, CopyError> {
    match from {
        Place::File(path) => locked(path)?.load()?.ok_or_else(|| {
            CopyError::Refused(format!("{}: no state there to copy", path.display()))
        }),
        Place::Etcd(urls) => connect(urls, etcd)
            .await?
            .copy_out(TIMING)
            .await?
            .ok_or_else(|| {
                CopyError::Refused(format!(
                    "no podnet cluster under {} at {}",
                    etcd.prefix,
                    urls.join(",")
                ))
            }),
    }
}

/// Writes `state` into `to`, which must hold no cluster (or, in etcd, the same state copied
/// in part). Says what it did.
pub async fn write(
    to: &Place,
    state: &StoredState,
    etcd: &EtcdAccess,
    batch: usize,
) -> Result<String, CopyError> {
    let nodes = state.nodes.len();
    let records =
        state.policy.pods.len() + state.policy.namespaces.len() + state.policy.policies.len();
    match to {
        Place::File(path) => {
            let store = locked(path)?;
            if let Some(there) = store.load()? {
                return Err(CopyError::Refused(format!(
                    "{} already holds a cluster ({} nodes): give a new --state path",
                    path.display(),
                    there.nodes.len()
                )));
            }
            store.save(&Change::Whole(state.clone()))?;
            Ok(format!(
                "{nodes} nodes and {records} policy records written to {to}"
            ))
        }
        Place::Etcd(urls) => {
            let report = connect(urls, etcd)
                .await?
                .copy_in(state, TIMING, batch)
                .await?;
            Ok(if report.done_before {
                format!(
                    "{to} under {} holds this state already: nothing written",
                    etcd.prefix
                )
            } else {
                format!(
                    "{nodes} nodes and {records} policy records copied to {to} under {} ({} keys \
                     written, {} already there from an earlier run)",
                    etcd.prefix, report.written, report.present
                )
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_are_file_or_etcd() {
        assert_eq!(
            "file:/var/lib/podnet/state.json".parse(),
            Ok(Place::File("/var/lib/podnet/state.json".into()))
        );
        assert_eq!(
            "etcd:https://a:2379,https://b:2379".parse(),
            Ok(Place::Etcd(vec![
                "https://a:2379".into(),
                "https://b:2379".into()
            ]))
        );
        for bad in ["state.json", "file:", "etcd:", "s3:bucket"] {
            let e = bad.parse::<Place>().unwrap_err();
            assert!(e.contains("file:PATH"), "{bad}: {e}");
        }
    }
}

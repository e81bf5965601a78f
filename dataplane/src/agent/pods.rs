//! The pods this node runs, as the CNI plugin reports them (`PUT /pods/{container}/{ifname}`
//! on the admin API), kept in `<state-dir>/pods.json` across restarts and published to the
//! control service as pod records, which network policy selects by.
//!
//! The agent is the authority on its own pods: at start, and whenever a call failed, the
//! publisher makes the service's records of this node equal to the local ones.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use podnet_control_client::{Backoff, Client};
use podnet_proto::policy::PodRecord;
use tokio::sync::watch;

use crate::agent::files::{write_atomic, StateDirError};

/// The state file.
const FILE: &str = "pods.json";

/// A pod the CNI plugin could not register.
#[derive(Debug, thiserror::Error)]
pub enum PodError {
    #[error("{0}")]
    Invalid(String),
    #[error(
        "pod {pod} is attached already as container {container}; delete that one first \
         (CNI DEL), or give this pod another name"
    )]
    NameTaken { pod: String, container: String },
    #[error(transparent)]
    Save(#[from] StateDirError),
}

/// The node's pods by attachment (`CONTAINER/IFNAME`).
pub struct LocalPods {
    node: String,
    file: PathBuf,
    pods: Mutex<BTreeMap<String, PodRecord>>,
    /// Counts changes; the publisher waits on it.
    version: watch::Sender<u64>,
}

impl LocalPods {
    /// The pods saved in `state_dir`. A file that cannot be read is logged and set aside: the
    /// next CNI calls register the pods again.
    pub fn load(state_dir: &Path, node: &str) -> LocalPods {
        let file = state_dir.join(FILE);
        let pods = match std::fs::read(&file) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::warn!(file = %file.display(), "local pod records unreadable, starting without them: {e}");
                BTreeMap::new()
            }),
            Err(_) => BTreeMap::new(),
        };
        LocalPods {
            node: node.to_string(),
            file,
            pods: Mutex::new(pods),
            version: watch::channel(0).0,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, PodRecord>> {
        self.pods.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn save(&self, pods: &BTreeMap<String, PodRecord>) -> Result<(), StateDirError> {
        let bytes = serde_json::to_vec_pretty(pods).expect("pod records serialize");
        write_atomic(&self.file, &bytes)
    }

    /// Records the pod of attachment `key` (this node's name filled in); whether it changed.
    /// Another attachment holding the same namespace and name is refused.
    pub fn attach(&self, key: &str, mut pod: PodRecord) -> Result<bool, PodError> {
        pod.node = self.node.clone();
        pod.validate().map_err(PodError::Invalid)?;
        let mut pods = self.lock();
        if let Some((other, _)) = pods
            .iter()
            .find(|(k, p)| k.as_str() != key && p.key() == pod.key())
        {
            return Err(PodError::NameTaken {
                pod: pod.key(),
                container: other.clone(),
            });
        }
        if pods.get(key) == Some(&pod) {
            return Ok(false);
        }
        let mut next = pods.clone();
        next.insert(key.to_string(), pod);
        self.save(&next)?;
        *pods = next;
        self.version.send_modify(|v| *v += 1);
        Ok(true)
    }

    /// Forgets attachment `key`; the pod it held, if any.
    pub fn detach(&self, key: &str) -> Result<Option<PodRecord>, PodError> {
        let mut pods = self.lock();
        if !pods.contains_key(key) {
            return Ok(None);
        }
        let mut next = pods.clone();
        let gone = next.remove(key);
        self.save(&next)?;
        *pods = next;
        self.version.send_modify(|v| *v += 1);
        Ok(gone)
    }

    /// Every pod, by attachment.
    pub fn snapshot(&self) -> BTreeMap<String, PodRecord> {
        self.lock().clone()
    }
}

/// Keeps the control service's records of this node's pods equal to the local ones, for as
/// long as it runs: on every change, and again after a failed call (with backoff).
pub async fn publish(pods: std::sync::Arc<LocalPods>, client: Client) {
    let mut changed = pods.version.subscribe();
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    // What the service holds for this node, by NS/NAME; None until it has been read.
    let mut published: Option<BTreeMap<String, PodRecord>> = None;
    loop {
        changed.borrow_and_update();
        match sync(&pods, &client, &mut published).await {
            Ok(()) => {
                backoff.reset();
                if changed.changed().await.is_err() {
                    return;
                }
            }
            Err(e) => {
                let delay = backoff.next_delay();
                tracing::warn!("pod records not published yet, retrying in {delay:?}: {e}");
                tokio::time::sleep(delay).await;
            }
        }
    }
}

async fn sync(
    pods: &LocalPods,
    client: &Client,
    published: &mut Option<BTreeMap<String, PodRecord>>,
) -> Result<(), podnet_control_client::ClientError> {
    if published.is_none() {
        let state = client.policy(None).await?;
        let ours = state
            .pods
            .into_iter()
            .filter(|(_, p)| p.node == pods.node)
            .collect();
        *published = Some(ours);
    }
    let have = published.as_mut().expect("read above");
    let want: BTreeMap<String, PodRecord> = pods
        .snapshot()
        .into_values()
        .map(|p| (p.key(), p))
        .collect();
    let stale: Vec<String> = have
        .keys()
        .filter(|k| !want.contains_key(*k))
        .cloned()
        .collect();
    for key in stale {
        let (ns, name) = key.split_once('/').expect("keys are NS/NAME");
        client.delete_pod(ns, name).await?;
        have.remove(&key);
        tracing::info!(pod = %key, "pod record withdrawn");
    }
    for (key, pod) in want {
        if have.get(&key) != Some(&pod) {
            client.put_pod(&pod).await?;
            tracing::info!(pod = %key, ips = ?pod.ips, "pod record published");
            have.insert(key, pod);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(ns: &str, name: &str, ip: &str) -> PodRecord {
        serde_json::from_value(
            serde_json::json!({"namespace": ns, "name": name, "node": "",
            "ips": [ip], "container_id": "c"}),
        )
        .unwrap()
    }

    #[test]
    fn attach_detach_and_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let pods = LocalPods::load(dir.path(), "h1");
        assert!(pods.attach("c1/eth0", pod("x", "a", "10.244.1.2")).unwrap());
        assert!(
            !pods.attach("c1/eth0", pod("x", "a", "10.244.1.2")).unwrap(),
            "unchanged"
        );
        let e = pods
            .attach("c2/eth0", pod("x", "a", "10.244.1.3"))
            .unwrap_err();
        assert!(matches!(e, PodError::NameTaken { .. }), "{e}");
        assert!(e.to_string().contains("container c1/eth0"), "{e}");
        assert!(pods.attach("c2/eth0", pod("x", "b", "10.244.1.3")).unwrap());
        assert_eq!(
            pods.snapshot()["c1/eth0"].node,
            "h1",
            "the node is the agent's"
        );

        let again = LocalPods::load(dir.path(), "h1");
        assert_eq!(again.snapshot(), pods.snapshot());
        assert_eq!(again.detach("c1/eth0").unwrap().unwrap().name, "a");
        assert!(again.detach("c1/eth0").unwrap().is_none());
        assert_eq!(LocalPods::load(dir.path(), "h1").snapshot().len(), 1);
    }

    #[test]
    fn an_invalid_record_is_refused_and_an_unreadable_file_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        let pods = LocalPods::load(dir.path(), "h1");
        let e = pods
            .attach("c1/eth0", pod("X", "a", "10.244.1.2"))
            .unwrap_err();
        assert!(e.to_string().starts_with("namespace: "), "{e}");
        std::fs::write(dir.path().join(FILE), "{").unwrap();
        assert!(LocalPods::load(dir.path(), "h1").snapshot().is_empty());
    }
}

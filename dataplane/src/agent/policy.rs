//! Enforcing network policy on this node: the nftables table `ip podnet_policy`, compiled
//! ([`crate::core::policy`]) from the records podnet-control serves and the pods this node runs,
//! applied whenever either changes, checked every 2 s and put back when something else changed
//! it, and removed at a clean stop. The last records are kept in `<state-dir>/policy.json`, so
//! a restarted agent enforces them before its data path forwards a packet.
//!
//! The table is written as nft's own language through `nft -f -`, one transaction that deletes
//! the old table and adds the new one: the `ct original` matches the rules need are one
//! expression each there.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use podnet_control_client::{Backoff, Client};
use podnet_proto::policy::{Cluster, PodRecord, PodView, PolicyState};

use crate::agent::files::write_atomic;
use crate::agent::pods::LocalPods;
use crate::core::policy::{compile, render, NodeRules, TABLE};

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("network policy needs nftables, and `nft` was not found: apt-get install nftables")]
    NoNft,
    #[error("nft refused the policy table `ip {TABLE}`: {0}")]
    Nft(String),
}

/// What was applied last.
#[derive(Default)]
struct Applied {
    rules: Option<NodeRules>,
    generation: u32,
}

/// The node's policy: the records last read from the control service, and the table applied.
pub struct Enforcer {
    pods: Arc<LocalPods>,
    file: PathBuf,
    records: Mutex<PolicyState>,
    applied: Mutex<Applied>,
}

impl Enforcer {
    /// An enforcer with the records saved in `state_dir` (none if there are none).
    pub fn new(pods: Arc<LocalPods>, state_dir: &Path) -> Enforcer {
        let file = state_dir.join("policy.json");
        let records = match std::fs::read(&file) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::warn!(file = %file.display(), "saved policy records unreadable, starting without them: {e}");
                PolicyState::default()
            }),
            Err(_) => PolicyState::default(),
        };
        // Generations start from the clock so a restarted agent never reuses the mark an old
        // connection carries from rules that are gone.
        let generation = (podnet_control_client::clock::now_ms() / 1000) as u32;
        Enforcer {
            pods,
            file,
            records: Mutex::new(records),
            // Nothing isolates anything until records say so; the table is written the first
            // time a rule is needed, so a node without nft runs fine until then.
            applied: Mutex::new(Applied {
                rules: Some(NodeRules::default()),
                generation,
            }),
        }
    }

    /// The records in force (as read from the control service).
    pub fn records(&self) -> PolicyState {
        self.records
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The rules in force, if any table was applied.
    pub fn rules(&self) -> Option<NodeRules> {
        let applied = self.applied.lock().unwrap_or_else(|e| e.into_inner());
        applied.rules.clone()
    }

    /// Takes new records from the control service, keeps them in the state dir, and applies
    /// what they mean.
    pub fn set_records(&self, state: PolicyState) -> Result<bool, PolicyError> {
        let bytes = serde_json::to_vec(&state).expect("records serialize");
        if let Err(e) = write_atomic(&self.file, &bytes) {
            tracing::warn!("policy records not saved (a restart starts without them): {e}");
        }
        *self.records.lock().unwrap_or_else(|e| e.into_inner()) = state;
        self.apply()
    }

    /// Whether the table in the kernel is still the one applied: its generation and its number
    /// of rules. If not (deleted, or rules removed by hand), it is applied again; whether it was.
    pub fn check(&self) -> Result<bool, PolicyError> {
        let (want, generation) = {
            let applied = self.applied.lock().unwrap_or_else(|e| e.into_inner());
            match &applied.rules {
                Some(r) if *r != NodeRules::default() => {
                    (render(r, applied.generation), applied.generation)
                }
                // Nothing to enforce: no table is needed.
                _ => return Ok(false),
            }
        };
        let listed = nft_list().unwrap_or_default();
        let rules = |text: &str| text.matches(" comment \"").count();
        // nft lists marks in hex.
        let mark = format!("ct mark {generation:#010x} accept");
        if listed.contains(&mark) && rules(&listed) == rules(&want) {
            return Ok(false);
        }
        tracing::warn!("the policy table was changed by something else, putting it back");
        let mut applied = self.applied.lock().unwrap_or_else(|e| e.into_inner());
        applied.rules = None;
        drop(applied);
        self.apply()
    }

    /// What policy is evaluated over here: the records, with this node's pods as it knows them.
    pub fn cluster(&self) -> Cluster {
        self.view().0
    }

    /// The records' cluster with the local pods' own records in place of the service's, and
    /// the local pods.
    fn view(&self) -> (Cluster, Vec<PodRecord>) {
        let mut cluster = self.records().cluster();
        let local: Vec<PodRecord> = self.pods.snapshot().into_values().collect();
        cluster.pods.retain(|p| {
            !local
                .iter()
                .any(|l| l.namespace == p.namespace && l.name == p.name)
        });
        cluster.pods.extend(local.iter().map(PodRecord::view));
        (cluster, local)
    }

    /// Compiles the rules for this node's pods and applies them if they changed; whether
    /// they did. The local pods count as they are here, also before the control service has
    /// their records: a pod is never without its rules.
    pub fn apply(&self) -> Result<bool, PolicyError> {
        let (cluster, local) = self.view();
        let mine: Vec<&PodView> = cluster
            .pods
            .iter()
            .filter(|p| {
                local
                    .iter()
                    .any(|l| l.namespace == p.namespace && l.name == p.name)
            })
            .collect();
        let rules = compile(&cluster, mine);
        let mut applied = self.applied.lock().unwrap_or_else(|e| e.into_inner());
        if applied.rules.as_ref() == Some(&rules) {
            return Ok(false);
        }
        let generation = applied.generation.wrapping_add(1);
        nft(&format!(
            "add table ip {TABLE}\ndelete table ip {TABLE}\n{}",
            render(&rules, generation)
        ))?;
        tracing::info!(
            ingress_isolated = rules.ingress_isolated.len(),
            egress_isolated = rules.egress_isolated.len(),
            rules = rules.ingress.len() + rules.egress.len(),
            generation,
            "network policy applied"
        );
        *applied = Applied {
            rules: Some(rules),
            generation,
        };
        Ok(true)
    }

    /// Removes the table: at start (what an earlier agent left is not this one's), and at a
    /// clean stop (pods are then no longer isolated). Without nft there is nothing to remove.
    pub fn remove(&self) {
        match nft(&format!("add table ip {TABLE}\ndelete table ip {TABLE}\n")) {
            Ok(()) | Err(PolicyError::NoNft) => {}
            Err(e) => tracing::warn!("policy table not removed: {e}"),
        }
    }
}

/// `nft list table ip podnet_policy` (`None` if there is no such table or no nft).
fn nft_list() -> Option<String> {
    let out = Command::new("nft")
        .args(["list", "table", "ip", TABLE])
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `nft -f -` with `script` on stdin.
fn nft(script: &str) -> Result<(), PolicyError> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => PolicyError::NoNft,
            _ => PolicyError::Nft(e.to_string()),
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .map_err(|e| PolicyError::Nft(e.to_string()))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| PolicyError::Nft(e.to_string()))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(PolicyError::Nft(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ))
    }
}

/// How often the table is compared with what was applied.
pub const CHECK_PERIOD: Duration = Duration::from_secs(2);

/// Compares the table with what was applied every [`CHECK_PERIOD`], putting it back (and
/// counting repair `policy`) when something else changed it.
pub async fn watch(enforcer: Arc<Enforcer>, repairs: Arc<crate::agent::host::Repairs>) {
    loop {
        tokio::time::sleep(CHECK_PERIOD).await;
        let e = Arc::clone(&enforcer);
        match tokio::task::spawn_blocking(move || e.check()).await {
            Ok(Ok(true)) => repairs.add("policy"),
            Ok(Ok(false)) => {}
            Ok(Err(e)) => tracing::error!("{e}"),
            Err(e) => tracing::error!("policy check task failed: {e}"),
        }
    }
}

/// Follows the control service's records (a long poll on `GET /v1/policy?after=N`) and
/// applies each new revision, for as long as it runs.
pub async fn follow(enforcer: Arc<Enforcer>, client: Client) {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    let mut revision = None;
    loop {
        match client.policy(revision).await {
            Ok(state) => {
                backoff.reset();
                if Some(state.revision) == revision {
                    continue;
                }
                revision = Some(state.revision);
                let e = Arc::clone(&enforcer);
                let failed = match tokio::task::spawn_blocking(move || e.set_records(state)).await {
                    Ok(Ok(_)) => continue,
                    Ok(Err(e)) => e.to_string(),
                    Err(e) => format!("policy apply task failed: {e}"),
                };
                // Read and applied again after a pause, whether or not the records move.
                revision = None;
                let delay = backoff.next_delay();
                tracing::error!("{failed}; trying again in {delay:?}");
                tokio::time::sleep(delay).await;
            }
            Err(e) => {
                let delay = backoff.next_delay();
                tracing::warn!("policy records not read, retrying in {delay:?}: {e}");
                tokio::time::sleep(delay).await;
            }
        }
    }
}

//! Enforcing network policy on this node: the nftables table `ip podnet_policy`, compiled
//! ([`crate::core::policy`]) from the records podnet-control serves and the pods this node runs,
//! applied whenever either changes, checked every 2 s and put back when something else changed
//! it, and removed at a clean stop. The last records are kept in `<state-dir>/policy.json`, so
//! a restarted agent enforces them before its data path forwards a packet.
//!
//! Scripts are nft's own language (the `ct original` matches the rules need are one expression
//! each there), written to `<state-dir>/policy.nft` and run by `nft -f`, each one transaction.
//! The first creates the table; after that a change adds and deletes only what differs
//! ([`crate::core::policy_table`]), rules by the handles nft echoes (`--echo --handle`, as JSON).

use std::collections::{BTreeMap, VecDeque};
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use podnet_control_client::{Backoff, Client};
use podnet_proto::policy::{Cluster, Direction, PodRecord, PodView, PolicyState};

use crate::agent::files::write_atomic;
use crate::agent::pods::LocalPods;
use crate::core::nflog;
use crate::core::policy::{compile, NodeRules};
use crate::core::policy_table::{self, counter, create, update, Plan, Script, Slot, TABLE};

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
    /// The rules in force (`None` when the table must be written again whole).
    rules: Option<NodeRules>,
    plan: Plan,
    generation: u32,
    /// Whether this agent wrote the table (it writes none until a rule is needed).
    table: bool,
    /// The handles of the table's rules.
    handles: BTreeMap<Slot, u64>,
}

/// The packets the rules judged, by direction and verdict, kept monotonic across tables
/// written anew (the kernel's counters start again with each).
#[derive(Default)]
struct Judged {
    counted: BTreeMap<&'static str, u64>,
    last: BTreeMap<&'static str, u64>,
}

/// A packet network policy denied here, as NFLOG sampled it, with the names that say why.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Denial {
    pub seq: u64,
    pub time_ms: u64,
    /// `ingress` (denied into a pod of this node) or `egress` (out of one).
    pub direction: String,
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub protocol: u8,
    /// 0 for a protocol without ports.
    pub dst_port: u16,
    /// The pods at either end (`NS/NAME`), where they are pods.
    pub src_pod: Option<String>,
    pub dst_pod: Option<String>,
    /// The policies that isolate this node's end in that direction.
    pub isolated_by: Vec<String>,
}

/// Denials kept for `drops`; older ones are dropped.
pub const DENIALS_KEPT: usize = 256;

/// The node's policy: the records last read from the control service, and the table applied.
pub struct Enforcer {
    pods: Arc<LocalPods>,
    file: PathBuf,
    /// Where the scripts are written for nft.
    script: PathBuf,
    records: Mutex<PolicyState>,
    applied: Mutex<Applied>,
    /// The revision of the records whose rules are in force.
    enforced: AtomicU64,
    /// Checks made, for [`FULL_CHECK_EVERY`].
    checks: AtomicU64,
    judged: Mutex<Judged>,
    /// The last sequence number given, and the newest denials.
    denials: Mutex<(u64, VecDeque<Denial>)>,
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
            script: state_dir.join("policy.nft"),
            records: Mutex::new(records),
            // Nothing isolates anything until records say so; the table is written the first
            // time a rule is needed, so a node without nft runs fine until then.
            applied: Mutex::new(Applied {
                rules: Some(NodeRules::default()),
                generation,
                ..Applied::default()
            }),
            enforced: AtomicU64::new(0),
            checks: AtomicU64::new(0),
            judged: Mutex::default(),
            denials: Mutex::default(),
        }
    }

    /// The records in force (as read from the control service).
    pub fn records(&self) -> PolicyState {
        self.records
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The revision of the records whose rules are in force (0 before any).
    pub fn enforced(&self) -> u64 {
        self.enforced.load(Relaxed)
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

    /// Whether the table in the kernel is still the one applied; if not, it is written again
    /// whole, and whether it was. Every call looks for the table's chains (deleted table or
    /// chain), which costs nft nothing; every [`FULL_CHECK_EVERY`]th call also compares the
    /// number of rules and the generation, which costs it a read of every set.
    pub fn check(&self) -> Result<bool, PolicyError> {
        let (want, generation) = {
            let applied = self.applied.lock().unwrap_or_else(|e| e.into_inner());
            if !applied.table {
                return Ok(false);
            }
            // Every allowing rule and the two denying ones carry a comment.
            (applied.plan.rules.len() + 2, applied.generation)
        };
        let full = self
            .checks
            .fetch_add(1, Relaxed)
            .is_multiple_of(FULL_CHECK_EVERY);
        let chains = nft(&["-j", "list", "chains", "ip"], "")
            .ok()
            .and_then(|listed| policy_table::chains(&listed).ok())
            .unwrap_or_default();
        let mut intact = policy_table::CHAINS.iter().all(|c| chains.contains(*c));
        if intact && full {
            let listed = nft_list().unwrap_or_default();
            let marked = nft(&["list", "set", "ip", TABLE, "generation"], "")
                .unwrap_or_default()
                // nft lists marks in hex.
                .contains(&format!("{generation:#010x}"));
            intact = marked && listed.matches(" comment \"").count() == want;
        }
        if intact {
            return Ok(false);
        }
        tracing::warn!("the policy table was changed by something else, putting it back");
        let mut applied = self.applied.lock().unwrap_or_else(|e| e.into_inner());
        applied.rules = None;
        applied.table = false;
        drop(applied);
        self.apply()
    }

    /// The packets the rules judged since the agent started, by direction and verdict:
    /// `(direction, allowed, packets)`. Read from the table's counters (none without a table).
    pub fn judged(&self) -> Vec<(Direction, bool, u64)> {
        let now = nft_counters().unwrap_or_default();
        let mut judged = self.judged.lock().unwrap_or_else(|e| e.into_inner());
        let Judged { counted, last } = &mut *judged;
        let mut out = Vec::new();
        for direction in [Direction::Ingress, Direction::Egress] {
            for allowed in [true, false] {
                let name = counter(direction, allowed);
                let was = last.get(name).copied().unwrap_or(0);
                let is = now.get(name).copied().unwrap_or(0);
                // A count below the last one read belongs to a table written anew.
                let more = if is >= was { is - was } else { is };
                last.insert(name, is);
                let total = counted.entry(name).or_default();
                *total += more;
                out.push((direction, allowed, *total));
            }
        }
        out
    }

    /// Keeps a denied packet NFLOG reported under `prefix` (its direction), named from the
    /// records.
    fn record_denial(&self, prefix: &str, flow: nflog::Flow) {
        let Some(direction) = [Direction::Ingress, Direction::Egress]
            .into_iter()
            .find(|d| d.name() == prefix)
        else {
            return;
        };
        let cluster = self.cluster();
        let pod = |ip: Ipv4Addr| {
            cluster
                .pods
                .iter()
                .find(|p| p.ips.contains(&IpAddr::V4(ip)))
        };
        let local = pod(match direction {
            Direction::Ingress => flow.dst,
            Direction::Egress => flow.src,
        });
        let isolated_by = local
            .map(|p| cluster.isolating(p, direction).map(|n| n.key()).collect())
            .unwrap_or_default();
        let name = |ip| pod(ip).map(|p| format!("{}/{}", p.namespace, p.name));
        let mut denials = self.denials.lock().unwrap_or_else(|e| e.into_inner());
        denials.0 += 1;
        let denial = Denial {
            seq: denials.0,
            time_ms: podnet_control_client::clock::now_ms(),
            direction: prefix.to_string(),
            src: flow.src,
            dst: flow.dst,
            protocol: flow.protocol,
            dst_port: flow.dst_port,
            src_pod: name(flow.src),
            dst_pod: name(flow.dst),
            isolated_by,
        };
        if denials.1.len() == DENIALS_KEPT {
            denials.1.pop_front();
        }
        denials.1.push_back(denial);
    }

    /// The newest sequence number, and the denials kept after `since`.
    pub fn denials_since(&self, since: u64) -> (u64, Vec<Denial>) {
        let denials = self.denials.lock().unwrap_or_else(|e| e.into_inner());
        let after = denials
            .1
            .iter()
            .filter(|d| d.seq > since)
            .cloned()
            .collect();
        (denials.0, after)
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
        let revision = self
            .records
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .revision;
        let changed = self.apply_rules()?;
        // A CNI attach and a new revision apply at once: the later of the two may finish first.
        self.enforced.fetch_max(revision, Relaxed);
        Ok(changed)
    }

    fn apply_rules(&self) -> Result<bool, PolicyError> {
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
        let plan = Plan::of(&rules);
        let change = match applied.rules {
            Some(_) if applied.table => update(
                &applied.plan,
                &plan,
                applied.generation,
                generation,
                &applied.handles,
            )
            .ok(),
            _ => None,
        };
        let whole = change.is_none();
        let handles = match change.map(|script| run(&script, &self.script)) {
            Some(Ok(handles)) => handles,
            // A table someone else changed may refuse a change: write it whole.
            Some(Err(e)) => {
                tracing::warn!("policy change refused, writing the table anew: {e}");
                applied.table = false;
                run(&create(&plan, generation), &self.script)?
            }
            None => run(&create(&plan, generation), &self.script)?,
        };
        if whole || !applied.table {
            applied.handles.clear();
        }
        applied.handles.retain(
            |slot, _| !matches!(slot, Slot::Allow(d, r) if !plan.rules.contains(&(*d, r.clone()))),
        );
        applied.handles.extend(handles);
        tracing::info!(
            ingress_isolated = rules.ingress_isolated.len(),
            egress_isolated = rules.egress_isolated.len(),
            rules = plan.rules.len(),
            sets = plan.sets.len(),
            generation,
            whole,
            "network policy applied"
        );
        applied.rules = Some(rules);
        applied.plan = plan;
        applied.generation = generation;
        applied.table = true;
        Ok(true)
    }

    /// Removes the table: at start (what an earlier agent left is not this one's), and at a
    /// clean stop (pods are then no longer isolated). Without nft there is nothing to remove.
    pub fn remove(&self) {
        let script = format!("add table ip {TABLE}\ndelete table ip {TABLE}\n");
        match nft(&["-f", "-"], &script) {
            Ok(_) | Err(PolicyError::NoNft) => {}
            Err(e) => tracing::warn!("policy table not removed: {e}"),
        }
    }
}

/// `nft list table ip podnet_policy` (`None` if there is no such table or no nft).
fn nft_list() -> Option<String> {
    // Terse: without the sets' elements, which are most of a large table (8,800 lines on each
    // node with 300 pods and 100 policies) and which the check does not compare.
    nft(&["--terse", "list", "table", "ip", TABLE], "").ok()
}

/// Runs `script` and returns the handles nft gave the rules it added. The script goes through
/// `file` (kept, the last one run): nft 1.0 echoes nothing as JSON for a script on a pipe.
fn run(script: &Script, file: &Path) -> Result<Vec<(Slot, u64)>, PolicyError> {
    std::fs::write(file, &script.text)
        .map_err(|e| PolicyError::Nft(format!("cannot write {}: {e}", file.display())))?;
    let path = file.to_string_lossy();
    // An echo costs nft a read of every set: asked for only when there are handles to learn.
    if script.added.is_empty() {
        nft(&["-f", &path], "")?;
        return Ok(Vec::new());
    }
    let echo = nft(&["-j", "--echo", "--handle", "-f", &path], "")?;
    let handles = policy_table::echoed_handles(&echo).map_err(PolicyError::Nft)?;
    if handles.len() != script.added.len() {
        return Err(PolicyError::Nft(format!(
            "nft echoed {} rules for the {} added",
            handles.len(),
            script.added.len()
        )));
    }
    Ok(script.added.iter().cloned().zip(handles).collect())
}

/// The table's named counters, by name (`None` if there is no such table or no nft).
fn nft_counters() -> Option<BTreeMap<String, u64>> {
    let listed = nft(&["-j", "list", "counters", "table", "ip", TABLE], "").ok()?;
    policy_table::counters(&listed).ok()
}

/// Runs nft with `args` and `script` on stdin; what it printed.
fn nft(args: &[&str], script: &str) -> Result<String, PolicyError> {
    let mut child = Command::new("nft")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
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
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(PolicyError::Nft(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ))
    }
}

/// Reads the denied packets the table samples to NFLOG, for as long as the agent runs (a
/// thread of its own: the socket blocks). Without nfnetlink_log, or with the group taken, the
/// agent runs on and `drops` shows no denials.
pub fn sample_denials(enforcer: Arc<Enforcer>) {
    let socket = match crate::sys::nflog::NflogSocket::open(nflog::GROUP, nflog::COPY_RANGE) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(
                "denied packets are not sampled for `drops` (NFLOG group {}): {e}",
                nflog::GROUP
            );
            return;
        }
    };
    let spawned = std::thread::Builder::new()
        .name("policy-log".into())
        .spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            let mut failed = 0;
            loop {
                let n = match socket.recv(&mut buf) {
                    Ok(n) => n,
                    // ENOBUFS: the kernel dropped samples while this thread was behind; they
                    // are samples, so reading goes on, unless the socket fails for good.
                    Err(e) if failed < 100 => {
                        failed += 1;
                        tracing::debug!("{e}");
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!("denied packets are no longer sampled for `drops`: {e}");
                        return;
                    }
                };
                failed = 0;
                for logged in nflog::packets(&buf[..n]) {
                    if let Some(flow) = nflog::flow(logged.payload) {
                        enforcer.record_denial(logged.prefix, flow);
                    }
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!("denied packets are not sampled for `drops`: {e}");
    }
}

/// How often the table is compared with what was applied.
pub const CHECK_PERIOD: Duration = Duration::from_secs(2);

/// Every this many checks, the rules are compared too (every 30 s).
pub const FULL_CHECK_EVERY: u64 = 15;

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

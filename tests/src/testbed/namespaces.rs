//! The [`Testbed`] itself: its namespaces, hosts and processes, and the `Drop` that tears
//! them all down.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use super::topology::{Host, Peers, Pod};
use crate::cmd::{must, run};
use crate::process::Background;

/// A running testbed. Dropping it stops every process it started (by PID) and deletes every
/// namespace it created, also when the test panicked (then the logs are printed and kept).
pub struct Testbed {
    pub prefix: String,
    /// Logs, pcaps, agent state dirs.
    pub dir: PathBuf,
    pub hosts: Vec<Host>,
    pub(super) namespaces: Vec<String>,
    pub(super) procs: BTreeMap<String, Background>,
    pub(super) peers: Peers,
    pub(super) mtls: bool,
    /// podnet-control replicas over etcd (0: one file-store service in host 1).
    pub(super) replicas: u8,
    pub(super) cni: bool,
    pub(super) agent_args: Vec<String>,
    pub(super) control_args: Vec<String>,
    pub(super) pods_per_host: u8,
    /// The first host on the second underlay subnet (`u8::MAX`: one subnet).
    pub(super) second_subnet_from: u8,
}

impl Testbed {
    pub fn ul(&self) -> String {
        format!("{}-ul", self.prefix)
    }

    /// Host n (1-based).
    pub fn host(&self, n: u8) -> &Host {
        self.hosts
            .iter()
            .find(|h| h.index == n)
            .unwrap_or_else(|| panic!("no host {n}"))
    }

    pub(super) fn host_mut(&mut self, n: u8) -> &mut Host {
        self.hosts
            .iter_mut()
            .find(|h| h.index == n)
            .unwrap_or_else(|| panic!("no host {n}"))
    }

    /// Pod m (1-based) of host n.
    pub fn pod(&self, n: u8, m: u8) -> &Pod {
        &self.host(n).pods[usize::from(m) - 1]
    }

    pub fn pods(&self) -> Vec<Pod> {
        self.hosts.iter().flat_map(|h| h.pods.clone()).collect()
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    /// Creates `<prefix>-<suffix>` with `lo` up and records it for teardown.
    pub fn add_netns(&mut self, suffix: &str) -> String {
        let ns = format!("{}-{suffix}", self.prefix);
        must(None, &["ip", "netns", "add", &ns]);
        self.namespaces.push(ns.clone());
        must(Some(&ns), &["ip", "link", "set", "lo", "up"]);
        ns
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        let panicking = std::thread::panicking();
        // Tools first, then the agents (which leave podnet-control gracefully on SIGTERM, so it
        // must still be up), the control service last.
        let mut names: Vec<String> = self.procs.keys().cloned().collect();
        names.sort_by_key(|n| match n.as_str() {
            "control" => 2,
            n if n.starts_with("agent-") => 1,
            _ => 0,
        });
        for name in names {
            if let Some(mut p) = self.procs.remove(&name) {
                p.stop();
                if panicking {
                    let log = p.log();
                    let tail: Vec<&str> = log.lines().rev().take(40).collect();
                    eprintln!("--- {} ({name}) last lines:", self.prefix);
                    for l in tail.iter().rev() {
                        eprintln!("{l}");
                    }
                }
            }
        }
        for ns in self.namespaces.iter().rev() {
            let _ = run(None, &["ip", "netns", "del", ns], Duration::from_secs(10));
        }
        if panicking {
            eprintln!(
                "testbed {} torn down; logs kept in {}",
                self.prefix,
                self.dir.display()
            );
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

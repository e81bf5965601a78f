//! Traffic between pods (ping, the full mesh, iperf3) and what the agents count of it.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use super::namespaces::Testbed;
use super::topology::{admin_api, Pod};
use crate::cmd::{run, Output};
use crate::http;
use crate::parse;

impl Testbed {
    /// `ping -c COUNT` from `from` to `to` (-W 1 s per reply, 0.2 s apart), bounded.
    pub fn ping(&self, from: &Pod, to: Ipv4Addr, count: u32) -> Output {
        let c = count.to_string();
        let timeout = Duration::from_secs(u64::from(count) + 5);
        run(
            Some(&from.ns),
            &[
                "ping",
                "-n",
                "-c",
                &c,
                "-i",
                "0.2",
                "-W",
                "1",
                &to.to_string(),
            ],
            timeout,
        )
        .unwrap_or_else(|e| panic!("{e}"))
    }

    /// One ping from every pod to every other pod, 16 at a time; lists the pairs that got no
    /// reply, in pair order.
    ///
    /// # Panics
    /// With fewer than two pods: there would be nothing to check, and an empty list must mean
    /// that every pair answered.
    pub fn mesh_failures(&self) -> Vec<String> {
        let pods = self.pods();
        assert!(
            pods.len() >= 2,
            "a mesh check needs two pods or more; this testbed has {}",
            pods.len()
        );
        let pairs: Vec<(&Pod, &Pod)> = pods
            .iter()
            .flat_map(|a| pods.iter().map(move |b| (a, b)))
            .filter(|(a, b)| a.ns != b.ns)
            .collect();
        let next = std::sync::atomic::AtomicUsize::new(0);
        let mut failed: Vec<(usize, String)> = std::thread::scope(|scope| {
            let workers: Vec<_> = (0..16)
                .map(|_| {
                    scope.spawn(|| {
                        let mut failed = Vec::new();
                        loop {
                            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            let Some((a, b)) = pairs.get(i) else {
                                return failed;
                            };
                            if !self.ping(a, b.ip, 1).success() {
                                failed.push((i, format!("{} -> {}", a.ns, b.ip)));
                            }
                        }
                    })
                })
                .collect();
            workers
                .into_iter()
                .flat_map(|w| w.join().expect("a mesh probe thread panicked"))
                .collect()
        });
        failed.sort();
        failed.into_iter().map(|(_, pair)| pair).collect()
    }

    /// Waits until every pod pings every other pod.
    pub fn wait_mesh(&mut self, timeout: Duration) -> Result<(), String> {
        let start = Instant::now();
        loop {
            let failed = self.mesh_failures();
            if failed.is_empty() {
                return Ok(());
            }
            for (name, p) in self.procs.iter_mut() {
                if let Some(status) = p.try_exit() {
                    return Err(format!("{name} exited ({status}):\n{}", p.log()));
                }
            }
            if start.elapsed() > timeout {
                return Err(format!(
                    "after {timeout:?} still no ping {}",
                    failed.join(", ")
                ));
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    /// Starts a one-shot `iperf3 -s -1` named `name` in `ns` and waits until it listens.
    pub fn start_iperf_server(&mut self, name: &str, ns: &str) -> Result<(), String> {
        self.start_ready(
            name,
            ns,
            &["iperf3", "-s", "-1", "--forceflush"],
            "listening",
            Duration::from_secs(10),
        )
    }

    /// A bounded iperf3 TCP run (`-t SECS -J`) from `client` to an `iperf3 -s -1` in `server`.
    pub fn iperf(
        &mut self,
        client: &Pod,
        server: &Pod,
        secs: u32,
    ) -> Result<parse::IperfResult, String> {
        self.iperf_with(client, server, secs, &[])
    }

    /// [`Testbed::iperf`] with more client arguments (`-M 100`, `-R`, ...).
    pub fn iperf_with(
        &mut self,
        client: &Pod,
        server: &Pod,
        secs: u32,
        extra: &[&str],
    ) -> Result<parse::IperfResult, String> {
        let name = format!("iperf3-s-{}", server.ns);
        self.start_iperf_server(&name, &server.ns.clone())?;
        let (t, ip) = (secs.to_string(), server.ip.to_string());
        let mut argv = vec![
            "iperf3",
            "-c",
            &ip,
            "-t",
            &t,
            "-J",
            "--connect-timeout",
            "3000",
        ];
        argv.extend_from_slice(extra);
        let out = run(
            Some(&client.ns),
            &argv,
            Duration::from_secs(u64::from(secs) + 20),
        )?;
        self.stop(&name);
        parse::iperf3_json(&out.stdout).map_err(|e| format!("{e}; stderr: {}", out.stderr))
    }

    /// Waits until the agents of `hosts` all enforce network-policy revision `revision` (their
    /// `/status`), polling every 5 ms; panics, naming the host, after `timeout`.
    pub fn wait_policy_enforced(
        &self,
        hosts: std::ops::RangeInclusive<u8>,
        revision: u64,
        timeout: Duration,
    ) {
        let start = Instant::now();
        for n in hosts {
            loop {
                let status = self.admin_get(n, "/status").unwrap().json().unwrap();
                if status["policy"]["revision"].as_u64() >= Some(revision) {
                    break;
                }
                assert!(
                    start.elapsed() < timeout,
                    "h{n} does not enforce policy revision {revision}: {}",
                    status["policy"]
                );
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }

    /// GET on host n's agent admin API.
    pub fn admin_get(&self, n: u8, path: &str) -> Result<http::Response, String> {
        http::get(&self.host(n).ns, admin_api(), path)
    }

    /// Host n's agent `/metrics` text (panics unless 200).
    pub fn metrics(&self, n: u8) -> String {
        let r = self
            .admin_get(n, "/metrics")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.status, 200, "/metrics on h{n}: {}", r.body);
        r.body
    }

    /// Host n's metric `name` with `labels` ([`parse::metric_sum`]); panics, naming what is
    /// there, when the agent exposes no such sample.
    pub fn metric(&self, n: u8, name: &str, labels: &[(&str, &str)]) -> f64 {
        parse::metric_sum(&self.metrics(n), name, labels)
            .unwrap_or_else(|e| panic!("h{n} /metrics: {e}"))
    }

    /// Host n's `podnet_agent_drops_total{reason}`. Every reason's series exists from the
    /// agent's start, so a missing one is a misspelled reason and panics. Exactly that family:
    /// the per-peer family carries the same reasons and would count them twice.
    pub fn drops(&self, n: u8, reason: &str) -> f64 {
        self.metric(n, "podnet_agent_drops_total", &[("reason", reason)])
    }
}

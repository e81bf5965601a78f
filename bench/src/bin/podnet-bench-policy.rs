//! Network-policy scale benchmark (`scripts/bench-policy` runs it).
//!
//! A 3-node testbed (podnet VXLAN, podnet-control with the file store) with `--pods` pods made
//! through the CNI plugin, spread over 10 namespaces and the 3 nodes, and `--policies`
//! NetworkPolicies over them. Measured:
//! - apply: each policy applied on its own, the time from the request until every node enforces
//!   its revision (each agent's `/status`), p50 and p99; then all of them in one request;
//! - pod events with the policies in force: a pod added (CNI ADD, selected by policies and
//!   selected as a peer) and removed (DEL), the time from the call until every node enforces the
//!   control service's revision that holds the change, the lines of each node's nft script for
//!   it (`<state-dir>/policy.nft`, the last script run) against the whole table's, and the agents'
//!   CPU per event (their own and their children's, nft included);
//! - iperf3: one TCP stream between two isolated pods on two nodes, with the policies in force
//!   and with none, interleaved round by round; throughput and the machine's CPU per GB.
//!
//! Prints one JSON object on stdout; progress goes to stderr.

use std::time::{Duration, Instant};

use clap::Parser;
use podnet_tests::testbed::Pod;
use podnet_tests::{run, Encap, HostMode, Peers, Testbed, TestbedBuilder};
use serde_json::{json, Value};

#[derive(Parser)]
#[command(about = "podnet network-policy scale benchmark")]
struct Args {
    /// Pods, spread over 10 namespaces and 3 nodes (at most 600: 200 a node's /24 holds).
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u32).range(30..=600))]
    pods: u32,
    /// Policies, 10 per namespace at most.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=100))]
    policies: u32,
    /// Pod events measured (each an ADD and a DEL).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=100))]
    events: u32,
    /// iperf3 rounds (each: without policies, then with them).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=20))]
    rounds: u32,
    /// Seconds per iperf3 run.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=60))]
    time: u32,
}

const NAMESPACES: u32 = 10;

fn say(text: impl AsRef<str>) {
    eprintln!("bench-policy: {}", text.as_ref());
}

/// Pod j of a namespace: its node, and its labels (`app` one of ten, `role` client or server).
fn pod_labels(j: u32) -> (u8, String) {
    let role = if j.is_multiple_of(2) {
        "client"
    } else {
        "server"
    };
    ((j % 3 + 1) as u8, format!("app:a{},role:{role}", j % 10))
}

/// Policy k: in namespace `n{k/10}`, it isolates `app=a{k%10}` for ingress (and every fourth
/// for egress too), and allows clients of its own namespace and of the namespaces of one team,
/// on three ports and a range; the egress ones allow 5201 and DNS anywhere in the cluster, and
/// a block with a hole.
fn policy(k: u32) -> Value {
    let mut spec = json!({
        "podSelector": {"matchLabels": {"app": format!("a{}", k % 10)}},
        "ingress": [{
            "from": [
                {"podSelector": {"matchLabels": {"role": "client"}}},
                {"namespaceSelector": {"matchLabels": {"team": format!("t{}", k % 3)}},
                 "podSelector": {"matchLabels": {"role": "client"}}}
            ],
            "ports": [{"port": 80}, {"port": 443}, {"port": 5201}, {"port": 8000, "endPort": 8100}]
        }]
    });
    if k.is_multiple_of(4) {
        spec["policyTypes"] = json!(["Ingress", "Egress"]);
        spec["egress"] = json!([
            {"to": [{"namespaceSelector": {}}],
             "ports": [{"port": 5201}, {"port": 53, "protocol": "UDP"}]},
            {"to": [{"ipBlock": {"cidr": "10.244.0.0/16", "except": ["10.244.3.0/24"]}}],
             "ports": [{"port": 443}]}
        ]);
    }
    json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
           "metadata": {"name": format!("p{}", k % 10), "namespace": format!("n{}", k / 10)},
           "spec": spec})
}

struct Bench {
    tb: Testbed,
}

impl Bench {
    /// A control API call from host 1; panics unless it answers 200.
    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Value {
        let body = body.map(Value::to_string);
        self.tb.control_call(method, path, body.as_deref())
    }

    /// Waits until every node enforces `revision`; panics after 30 s.
    fn enforced(&self, revision: u64) {
        self.tb
            .wait_policy_enforced(1..=3, revision, Duration::from_secs(30));
    }

    /// A change, then the wait until every node enforces it; the time both took.
    fn change(&self, method: &str, path: &str, body: Option<&Value>) -> Duration {
        let start = Instant::now();
        let answer = self.call(method, path, body);
        let revision = answer["revision"].as_u64().expect("a revision");
        self.enforced(revision);
        start.elapsed()
    }

    /// The agents' CPU so far, in seconds: user and system, their own and their children's.
    fn agents_cpu(&mut self) -> f64 {
        (1..=3)
            .map(|n| {
                let pid = self.tb.proc(&format!("agent-h{n}")).pid();
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
                // Fields after the command's closing parenthesis: utime is the 12th.
                let rest = &stat[stat.rfind(')').unwrap() + 2..];
                let f: Vec<u64> = rest
                    .split_whitespace()
                    .map(|x| x.parse().unwrap_or(0))
                    .collect();
                (f[11] + f[12] + f[13] + f[14]) as f64 / 100.0
            })
            .sum()
    }

    /// Packets the policy rules of all nodes judged so far (allowed and denied).
    fn judged(&self) -> f64 {
        (1..=3)
            .map(|n| {
                let text = self.tb.metrics(n);
                podnet_tests::parse::metric_sum(&text, "podnet_agent_policy_packets_total", &[])
                    .unwrap_or_else(|e| panic!("h{n}: {e}"))
            })
            .sum()
    }

    /// Lines of the script each node last ran, if it ran one since `since`.
    fn scripts_since(&self, since: std::time::SystemTime) -> Vec<usize> {
        (1..=3)
            .filter_map(|n| {
                let file = self.tb.path(&format!("h{n}/policy.nft"));
                let meta = std::fs::metadata(&file).ok()?;
                (meta.modified().ok()? >= since)
                    .then(|| std::fs::read_to_string(&file).unwrap().lines().count())
            })
            .collect()
    }

    /// Lines of `nft list table ip podnet_policy` on each node.
    fn table_lines(&self) -> Vec<usize> {
        (1..=3)
            .map(|n| {
                let argv = ["nft", "list", "table", "ip", "podnet_policy"];
                let out = run(Some(&self.tb.host(n).ns), &argv, Duration::from_secs(10)).unwrap();
                out.stdout.lines().count()
            })
            .collect()
    }

    /// The control service's revision once it holds pod `key` (`present`) or not.
    fn revision_with_pod(&self, key: &str, present: bool) -> u64 {
        let start = Instant::now();
        loop {
            let records = self.call("GET", "/v1/policy", None);
            if records["pods"].get(key).is_some() == present {
                return records["revision"].as_u64().unwrap();
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "pod {key} never {}",
                if present { "published" } else { "withdrawn" }
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// Busy and total jiffies of the whole machine (`/proc/stat`).
fn machine_cpu() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap();
    let f: Vec<u64> = stat
        .lines()
        .next()
        .unwrap()
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    let idle = f[3] + f.get(4).copied().unwrap_or(0);
    (f.iter().sum::<u64>() - idle, f.iter().sum())
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

fn stats(mut v: Vec<f64>) -> Value {
    v.sort_by(f64::total_cmp);
    json!({"n": v.len(), "p50": quantile(&v, 0.5), "p99": quantile(&v, 0.99),
           "max": v[v.len() - 1]})
}

fn main() {
    let args = Args::parse();
    let tb = TestbedBuilder::new("bpol")
        .hosts(3)
        .pods_per_host(0)
        .mode(HostMode::Podnet(Encap::Vxlan))
        .peers(Peers::Control)
        .cni()
        .no_wait()
        .build();
    let mut b = Bench { tb };
    for n in 1..=3 {
        b.tb.wait_subnet(n, Duration::from_secs(30));
    }
    for i in 0..NAMESPACES {
        b.call(
            "PATCH",
            &format!("/v1/namespaces/n{i}"),
            Some(&json!({"set": {"team": format!("t{}", i % 3)}})),
        );
    }
    let per_ns = args.pods / NAMESPACES;
    say(format!(
        "making {} pods through the CNI plugin",
        per_ns * NAMESPACES
    ));
    let started = Instant::now();
    let mut pods: Vec<(String, Pod)> = Vec::new();
    for i in 0..NAMESPACES {
        for j in 0..per_ns {
            let (node, labels) = pod_labels(j);
            let netns = b.tb.add_netns(&format!("n{i}p{j}"));
            let cni_args =
                format!("K8S_POD_NAMESPACE=n{i};K8S_POD_NAME=p{j};PODNET_LABELS={labels}");
            let ip = b.tb.cni_add(node, &netns, &cni_args);
            pods.push((
                format!("n{i}/p{j}"),
                Pod {
                    ns: netns,
                    ip,
                    host: node,
                },
            ));
        }
    }
    say(format!("pods made in {:?}", started.elapsed()));

    // iperf3 between n0/p0 (node 1, app a0, a client: egress isolated by n0/p0) and n0/p1
    // (node 2, app a1, a server: ingress isolated by n0/p1, which allows clients on 5201).
    let client = pods[0].1.clone();
    let server = pods[1].1.clone();
    let iperf = |b: &mut Bench, label: &str, out: &mut Vec<Value>| {
        let judged_before = b.judged();
        let agents_before = b.agents_cpu();
        let cpu = machine_cpu();
        let r =
            b.tb.iperf(&client, &server, args.time)
                .unwrap_or_else(|e| panic!("iperf3 {label}: {e}"));
        let after = machine_cpu();
        // The rules judge a connection's first packets; the rest pass on the conntrack mark.
        let judged = b.judged() - judged_before;
        let agents = b.agents_cpu() - agents_before;
        let busy_s = (after.0 - cpu.0) as f64 / 100.0;
        let gbits = r.received_bps / 1e9;
        let cpu_per_gb = busy_s / (r.received_bytes as f64 / 1e9);
        say(format!(
            "iperf3 {label}: {gbits:.2} Gbit/s, {cpu_per_gb:.2} CPU s/GB, {} retransmits, \
             {judged} packets judged by policy rules, agents' CPU {agents:.2} s",
            r.retransmits
        ));
        out.push(
            json!({"policies": label, "gbits": gbits, "cpu_s_per_gb": cpu_per_gb,
                        "retransmits": r.retransmits, "judged_packets": judged,
                        "agents_cpu_s": agents}),
        );
    };

    let mut throughput = Vec::new();
    let mut apply_one = Vec::new();
    let mut apply_all = Vec::new();
    let mut delete_one = Vec::new();
    let mut table = Vec::new();
    let mut in_force = false;
    // Rounds alternate which state goes first, so neither always follows a change.
    for round in 0..args.rounds {
        let order = if round.is_multiple_of(2) {
            [false, true]
        } else {
            [true, false]
        };
        for policies in order {
            if policies && !in_force {
                if apply_one.is_empty() {
                    say(format!("applying {} policies one at a time", args.policies));
                    for k in 0..args.policies {
                        let t = b.change("POST", "/v1/policies", Some(&json!([policy(k)])));
                        apply_one.push(t.as_secs_f64());
                    }
                    table = b.table_lines();
                } else {
                    let all: Vec<Value> = (0..args.policies).map(policy).collect();
                    let t = b.change("POST", "/v1/policies", Some(&Value::Array(all)));
                    apply_all.push(t.as_secs_f64());
                }
            }
            if !policies && in_force {
                for k in 0..args.policies {
                    let p = policy(k);
                    let key = format!(
                        "{}/{}",
                        p["metadata"]["namespace"].as_str().unwrap(),
                        p["metadata"]["name"].as_str().unwrap()
                    );
                    let t = b.change("DELETE", &format!("/v1/policies/{key}"), None);
                    delete_one.push(t.as_secs_f64());
                }
            }
            in_force = policies;
            iperf(
                &mut b,
                if policies { "all" } else { "none" },
                &mut throughput,
            );
        }
    }
    if !in_force {
        let all: Vec<Value> = (0..args.policies).map(policy).collect();
        b.change("POST", "/v1/policies", Some(&Value::Array(all)));
    }
    say(format!(
        "apply, one policy: {}; whole table lines per node {table:?}",
        stats(apply_one.clone())
    ));

    // Pod events with every policy in force.
    say(format!("{} pod events (ADD and DEL)", args.events));
    let mut add = Vec::new();
    let mut del = Vec::new();
    let mut script_lines = Vec::new();
    let cpu_before = b.agents_cpu();
    for e in 0..args.events {
        let (i, j) = (e % NAMESPACES, per_ns + e);
        let (node, labels) = pod_labels(j);
        let netns = b.tb.add_netns(&format!("ev{e}"));
        let key = format!("n{i}/e{e}");
        let cni_args = format!("K8S_POD_NAMESPACE=n{i};K8S_POD_NAME=e{e};PODNET_LABELS={labels}");
        let since = std::time::SystemTime::now();
        let start = Instant::now();
        b.tb.cni_add(node, &netns, &cni_args);
        let revision = b.revision_with_pod(&key, true);
        b.enforced(revision);
        add.push(start.elapsed().as_secs_f64());
        script_lines.extend(b.scripts_since(since));

        let since = std::time::SystemTime::now();
        let start = Instant::now();
        let out = b.tb.cni_call_as(node, "DEL", &netns, &cni_args);
        assert!(out.success(), "DEL {key}: {}", out.combined());
        let revision = b.revision_with_pod(&key, false);
        b.enforced(revision);
        del.push(start.elapsed().as_secs_f64());
        script_lines.extend(b.scripts_since(since));
    }
    let cpu_per_event = (b.agents_cpu() - cpu_before) / f64::from(2 * args.events);
    let lines: Vec<f64> = script_lines.iter().map(|&l| l as f64).collect();

    let ratio = |key: &str| {
        let of = |label: &str| -> Vec<f64> {
            throughput
                .iter()
                .filter(|r| r["policies"] == label)
                .map(|r| r[key].as_f64().unwrap())
                .collect()
        };
        let (none, all) = (of("none"), of("all"));
        let per_round: Vec<f64> = none.iter().zip(&all).map(|(n, a)| a / n).collect();
        let mut sorted = per_round.clone();
        sorted.sort_by(f64::total_cmp);
        json!({"median": quantile(&sorted, 0.5), "rounds": per_round})
    };
    let report = json!({
        "pods": per_ns * NAMESPACES,
        "policies": args.policies,
        "apply_one_s": stats(apply_one),
        "apply_all_s": if apply_all.is_empty() { Value::Null } else { stats(apply_all) },
        "delete_one_s": if delete_one.is_empty() { Value::Null } else { stats(delete_one) },
        "table_lines": table,
        "pod_add_enforced_s": stats(add),
        "pod_del_enforced_s": stats(del),
        "script_lines_per_event": if lines.is_empty() { Value::Null } else { stats(lines) },
        "agents_cpu_s_per_event": cpu_per_event,
        "iperf": throughput,
        "throughput_all_over_none": ratio("gbits"),
        "cpu_per_gb_all_over_none": ratio("cpu_s_per_gb"),
    });
    println!("{}", serde_json::to_string_pretty(&report).unwrap());
}

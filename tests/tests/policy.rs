//! Network policy enforced on every node, probed as upstream's network-policy suite probes it:
//! namespaces x, y and z with pods a, b and c each (labelled `pod=<name>`, namespaces
//! `ns=<name>`), spread over 3 nodes (over VXLAN, and over WireGuard), every pod serving TCP
//! and UDP on ports 80 and 81. For each case the full 9x9 matrix is probed per port and
//! protocol from inside the pods and compared with what the policy semantics
//! (`podnet_proto::policy`, unit-tested against upstream's truth tables) say for the records
//! podnet-control holds.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use podnet_proto::policy::{PolicyState, Protocol};
use podnet_tests::{e2e_ready, run, wait_for, Encap, HostMode, Peers, Testbed, TestbedBuilder};
use serde_json::{json, Value};

/// Serves TCP (answers `ok` and closes) and UDP (echoes) on ports 80 and 81.
const SERVER: &str = r#"
import selectors, socket
sel = selectors.DefaultSelector()
for port in (80, 81):
    t = socket.socket(); t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    t.bind(("0.0.0.0", port)); t.listen(64); t.setblocking(False)
    sel.register(t, selectors.EVENT_READ, "tcp")
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("0.0.0.0", port))
    sel.register(u, selectors.EVENT_READ, "udp")
# 82: a long-lived echo, for connections a policy must cut.
e = socket.socket(); e.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
e.bind(("0.0.0.0", 82)); e.listen(8); e.setblocking(False)
sel.register(e, selectors.EVENT_READ, "echo")
print("serving", flush=True)
while True:
    for key, _ in sel.select():
        s = key.fileobj
        try:
            if key.data == "tcp":
                c, _ = s.accept(); c.sendall(b"ok"); c.close()
            elif key.data == "echo":
                c, _ = s.accept(); c.setblocking(False); sel.register(c, selectors.EVENT_READ, "conn")
            elif key.data == "conn":
                d = s.recv(64)
                if d:
                    s.sendall(d)
                else:
                    sel.unregister(s); s.close()
            else:
                d, peer = s.recvfrom(64); s.sendto(d, peer)
        except OSError:
            pass
"#;

/// Probes every `ip` given on TCP and UDP ports 80 and 81 at once (1 s each) and prints one
/// line per probe: `IP PORT PROTO ok|no`.
const PROBE: &str = r#"
import socket, sys, threading
out = []
def tcp(ip, port):
    try:
        s = socket.create_connection((ip, port), timeout=1); ok = s.recv(2) == b"ok"; s.close()
    except OSError:
        ok = False
    out.append(f"{ip} {port} TCP {'ok' if ok else 'no'}")
def udp(ip, port):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(1)
    ok = False
    for _ in range(2):
        try:
            s.sendto(b"ping", (ip, port)); ok = s.recvfrom(64)[0] == b"ping"; break
        except OSError:
            pass
    out.append(f"{ip} {port} UDP {'ok' if ok else 'no'}")
ts = [threading.Thread(target=f, args=(ip, p)) for ip in sys.argv[1:] for p in (80, 81) for f in (tcp, udp)]
for t in ts: t.start()
for t in ts: t.join()
print("\n".join(sorted(out)))
"#;

/// Keeps one TCP connection to `IP` port 82 busy (a line every 20 ms) and prints `alive T`
/// (Unix time) for every answer, until the connection stops answering for 3 s.
const STREAM: &str = r#"
import socket, sys, time
s = socket.create_connection((sys.argv[1], 82), timeout=3)
print("ready", flush=True)
while True:
    try:
        s.sendall(b"x"); s.recv(64)
    except OSError as e:
        print("stopped", e, flush=True); break
    print("alive", time.time(), flush=True)
    time.sleep(0.02)
"#;

/// Tries TCP port 80 of every address given, over and over (each try 0.05 s at most), for
/// `SECONDS`, printing `reached IP` whenever a connection opens.
const HAMMER: &str = r#"
import socket, sys, threading, time
end = time.time() + float(sys.argv[1])
print("hammering", flush=True)
def hammer(ip):
    while time.time() < end:
        try:
            socket.create_connection((ip, 80), timeout=0.05).close()
            print("reached", ip, flush=True)
        except OSError:
            pass
ts = [threading.Thread(target=hammer, args=(ip,)) for ip in sys.argv[2:]]
for t in ts: t.start()
for t in ts: t.join()
print("done", flush=True)
"#;

const NAMESPACES: [&str; 3] = ["x", "y", "z"];
const PODS: [&str; 3] = ["a", "b", "c"];

/// One probe pod: `ns/name`, its network namespace and address.
#[derive(Clone, Debug)]
struct ProbePod {
    key: String,
    netns: String,
    ip: Ipv4Addr,
}

struct Matrix {
    tb: Testbed,
    pods: Vec<ProbePod>,
    /// For each change made: the time from the request to every node enforcing its revision.
    enforced_after: std::sync::Mutex<Vec<Duration>>,
}

/// A probe result: (from, to, port, protocol) -> reached.
type Probed = BTreeMap<(String, String, u16, Protocol), bool>;

impl Matrix {
    /// 3 nodes over `encap`, the 9 pods made through the CNI plugin with their identity,
    /// namespaces labelled, servers running.
    fn new(name: &str, encap: Encap) -> Matrix {
        Matrix::with(name, encap, |b| b)
    }

    /// [`Matrix::new`] with the testbed's builder changed by `more`.
    fn with(
        name: &str,
        encap: Encap,
        more: impl FnOnce(TestbedBuilder) -> TestbedBuilder,
    ) -> Matrix {
        let builder = TestbedBuilder::new(name)
            .hosts(3)
            .pods_per_host(0)
            .mode(HostMode::Podnet(encap))
            .peers(Peers::Control)
            .cni()
            .no_wait();
        let mut tb = more(builder).build();
        for n in 1..=3 {
            tb.wait_subnet(n, Duration::from_secs(20));
        }
        let (server, probe) = (tb.path("serve.py"), tb.path("probe.py"));
        std::fs::write(&server, SERVER).unwrap();
        std::fs::write(&probe, PROBE).unwrap();
        let ports =
            "serve-80-tcp:80/TCP,serve-80-udp:80/UDP,serve-81-tcp:81/TCP,serve-81-udp:81/UDP";
        let mut pods = Vec::new();
        for (i, ns) in NAMESPACES.iter().enumerate() {
            for (j, pod) in PODS.iter().enumerate() {
                let node = ((i * 3 + j) % 3 + 1) as u8;
                let netns = tb.add_netns(&format!("{ns}{pod}"));
                let args = format!(
                    "K8S_POD_NAMESPACE={ns};K8S_POD_NAME={pod};PODNET_LABELS=pod:{pod};PODNET_PORTS={ports}"
                );
                let ip = tb.cni_add(node, &netns, &args);
                let name = format!("serve-{ns}{pod}");
                tb.start_ready(
                    &name,
                    &netns,
                    &["python3", server.to_str().unwrap()],
                    "serving",
                    Duration::from_secs(10),
                )
                .unwrap();
                pods.push(ProbePod {
                    key: format!("{ns}/{pod}"),
                    netns,
                    ip,
                });
            }
        }
        let m = Matrix {
            tb,
            pods,
            enforced_after: Default::default(),
        };
        for ns in NAMESPACES {
            m.call(
                "PATCH",
                &format!("/v1/namespaces/{ns}"),
                &json!({"set": {"ns": ns}}),
            );
        }
        m
    }

    /// A control API call from host 1; panics unless it answers 200.
    fn call(&self, method: &str, path: &str, body: &Value) -> Value {
        let body = body.to_string();
        let body = (method != "DELETE").then_some(body.as_str());
        self.tb.control_call(method, path, body)
    }

    fn records(&self) -> PolicyState {
        serde_json::from_value(self.call("GET", "/v1/policy", &Value::Null)).unwrap()
    }

    /// Every pod probes every other pod, all at once.
    fn probe(&self) -> Probed {
        let probe = self.tb.path("probe.py");
        let by_ip: BTreeMap<String, String> = self
            .pods
            .iter()
            .map(|p| (p.ip.to_string(), p.key.clone()))
            .collect();
        let results: Vec<(String, String)> = std::thread::scope(|s| {
            let handles: Vec<_> = self
                .pods
                .iter()
                .map(|from| {
                    let targets: Vec<String> = self
                        .pods
                        .iter()
                        .filter(|p| p.key != from.key)
                        .map(|p| p.ip.to_string())
                        .collect();
                    let probe = probe.clone();
                    s.spawn(move || {
                        let mut argv = vec!["python3".to_string(), probe.to_str().unwrap().into()];
                        argv.extend(targets);
                        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
                        let out = run(Some(&from.netns), &argv, Duration::from_secs(20))
                            .unwrap_or_else(|e| panic!("{e}"));
                        assert!(out.success(), "probe from {}: {}", from.key, out.combined());
                        (from.key.clone(), out.stdout)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let mut probed = Probed::new();
        for (from, text) in results {
            for line in text.lines() {
                let f: Vec<&str> = line.split_whitespace().collect();
                let to = by_ip[f[0]].clone();
                let protocol = Protocol::from_name(f[2]).unwrap();
                probed.insert(
                    (from.clone(), to, f[1].parse().unwrap(), protocol),
                    f[3] == "ok",
                );
            }
        }
        probed
    }

    /// What the semantics say for the records the service holds now.
    fn expected(&self) -> Probed {
        let cluster = self.records().cluster();
        let mut want = Probed::new();
        for from in &self.pods {
            for to in self.pods.iter().filter(|p| p.key != from.key) {
                for protocol in [Protocol::Tcp, Protocol::Udp] {
                    for port in [80, 81] {
                        let v =
                            cluster.decide(IpAddr::V4(from.ip), IpAddr::V4(to.ip), port, protocol);
                        want.insert(
                            (from.key.clone(), to.key.clone(), port, protocol),
                            v.allowed(),
                        );
                    }
                }
            }
        }
        want
    }

    /// Probes until the matrix is what the semantics say (within `timeout`); how long that took.
    fn converge(&self, case: &str, timeout: Duration) -> Duration {
        let start = Instant::now();
        let want = self.expected();
        let denied = want.values().filter(|ok| !**ok).count();
        let last = loop {
            let got = self.probe();
            if got == want {
                eprintln!(
                    "{case}: matrix as expected ({denied} of {} probes denied) after {:?}",
                    want.len(),
                    start.elapsed()
                );
                return start.elapsed();
            }
            if start.elapsed() > timeout {
                break got;
            }
        };
        let wrong: Vec<String> = want
            .iter()
            .filter(|(k, v)| last.get(*k) != Some(*v))
            .map(|((f, t, p, pr), v)| {
                format!(
                    "{f} -> {t} {p}/{pr}: want {}",
                    if *v { "ok" } else { "denied" }
                )
            })
            .collect();
        panic!(
            "{case}: {} probes wrong after {timeout:?}:\n{}",
            wrong.len(),
            wrong.join("\n")
        );
    }

    fn pod(&self, key: &str) -> &ProbePod {
        self.pods.iter().find(|p| p.key == key).unwrap()
    }

    /// The node a pod runs on (as the test spreads them).
    fn node_of(&self, key: &str) -> u8 {
        let i = self.pods.iter().position(|p| p.key == key).unwrap();
        (i % 3 + 1) as u8
    }

    fn apply(&self, policies: Value) {
        self.change("POST", "/v1/policies", &policies);
    }

    fn delete_all(&self) {
        for key in self.records().policies.keys() {
            self.change("DELETE", &format!("/v1/policies/{key}"), &Value::Null);
        }
    }

    /// A change of the records (policies or labels), then a wait until every node enforces its
    /// revision (each agent's `/status`); the time from the request to that is kept.
    fn change(&self, method: &str, path: &str, body: &Value) {
        let start = Instant::now();
        let answer = self.call(method, path, body);
        let revision = answer["revision"]
            .as_u64()
            .unwrap_or_else(|| panic!("{method} {path} gave no revision: {answer}"));
        self.tb
            .wait_policy_enforced(1..=3, revision, Duration::from_secs(10));
        self.enforced_after.lock().unwrap().push(start.elapsed());
    }

    /// The changes so far were each enforced on every node within a second (the p99), as the
    /// agents report it.
    fn assert_changes_fast(&self) {
        let mut took = self.enforced_after.lock().unwrap().clone();
        took.sort();
        assert!(took.len() >= 20, "only {} changes measured", took.len());
        let at = |q: f64| took[((took.len() - 1) as f64 * q).round() as usize];
        let (p50, p99) = (at(0.5), at(0.99));
        eprintln!(
            "{} changes enforced on all 3 nodes: p50 {p50:?}, p99 {p99:?}, max {:?}",
            took.len(),
            took[took.len() - 1]
        );
        assert!(p99 < Duration::from_secs(1), "p99 {p99:?}: {took:?}");
    }
}

fn policy(name: &str, ns: &str, spec: Value) -> Value {
    json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
           "metadata": {"name": name, "namespace": ns}, "spec": spec})
}

fn upstream_cases(m: &Matrix) {
    let limit = Duration::from_secs(10);
    m.converge("no policy", limit);
    for (case, policies) in cases() {
        m.delete_all();
        m.apply(policies);
        m.converge(case, limit);
    }
    more_cases(m);
}

/// Upstream's cases, each a name and the policies that make it.
fn cases() -> Vec<(&'static str, Value)> {
    let a = json!({"matchLabels": {"pod": "a"}});
    vec![
        (
            "deny all ingress",
            json!([policy(
                "deny",
                "x",
                json!({"podSelector": {}, "policyTypes": ["Ingress"]})
            )]),
        ),
        (
            "deny all both ways",
            json!([policy(
                "deny",
                "x",
                json!({"podSelector": {}, "policyTypes": ["Ingress", "Egress"]})
            )]),
        ),
        (
            "from a pod selector",
            json!([policy(
                "p",
                "x",
                json!({"podSelector": a, "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}]})
            )]),
        ),
        (
            "from a namespace selector",
            json!([policy(
                "p",
                "x",
                json!({"podSelector": a, "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}]}]})
            )]),
        ),
        (
            "both selectors ANDed",
            json!([policy(
                "p",
                "x",
                json!({"podSelector": a, "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}, "podSelector": {"matchLabels": {"pod": "c"}}}]}]})
            )]),
        ),
        (
            "two peers ORed",
            json!([policy(
                "p",
                "x",
                json!({"podSelector": a, "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}, {"podSelector": {"matchLabels": {"pod": "c"}}}]}]})
            )]),
        ),
        (
            "NotIn",
            json!([policy(
                "p",
                "x",
                json!({"podSelector": a, "ingress": [{"from": [{"namespaceSelector": {"matchExpressions": [{"key": "ns", "operator": "NotIn", "values": ["y"]}]}}]}]})
            )]),
        ),
        (
            "port 81 only",
            json!([policy(
                "p",
                "x",
                json!({"podSelector": a, "ingress": [{"ports": [{"port": 81}]}]})
            )]),
        ),
        (
            "a named port",
            json!([policy(
                "p",
                "x",
                json!({"podSelector": a, "ingress": [{"ports": [{"port": "serve-80-tcp"}]}]})
            )]),
        ),
        (
            "egress to a named port",
            json!([policy(
                "p",
                "x",
                json!({"podSelector": a, "policyTypes": ["Egress"], "egress": [{"ports": [{"port": "serve-81-udp", "protocol": "UDP"}]}]})
            )]),
        ),
        (
            "egress deny wins over ingress allow",
            json!([
                policy(
                    "out",
                    "x",
                    json!({"podSelector": a, "policyTypes": ["Egress"]})
                ),
                policy(
                    "in",
                    "y",
                    json!({"podSelector": {"matchLabels": {"pod": "b"}}, "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "x"}}, "podSelector": a}]}]})
                )
            ]),
        ),
        (
            "protocol only: UDP does not pass a TCP allow",
            json!([policy(
                "p",
                "x",
                json!({"podSelector": {}, "ingress": [{"ports": [{"protocol": "UDP"}]}]})
            )]),
        ),
        (
            "endPort",
            json!([policy(
                "p",
                "x",
                json!({"podSelector": {}, "ingress": [{"ports": [{"port": 81, "endPort": 90}]}]})
            )]),
        ),
    ]
}

/// `ipBlock` re-allowed, and changes over time.
fn more_cases(m: &Matrix) {
    let a = json!({"matchLabels": {"pod": "a"}});
    let limit = Duration::from_secs(10);
    // ipBlock with except, allowed again by a second policy: y/b's address is the exception.
    m.delete_all();
    let yb = m.pods.iter().find(|p| p.key == "y/b").unwrap().ip;
    m.apply(json!([policy("block", "x", json!({"podSelector": a, "ingress": [{"from": [{"ipBlock": {"cidr": "10.244.0.0/16", "except": [format!("{yb}/32")]}}]}]}))]));
    m.converge("ipBlock with except", limit);
    m.apply(json!([policy("again", "x", json!({"podSelector": a, "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}, "podSelector": {"matchLabels": {"pod": "b"}}}]}]}))]));
    m.converge("the exception allowed again", limit);
    // Changes over time: a pod label and a namespace label move pods in and out of a rule.
    m.delete_all();
    m.apply(json!([policy("p", "x", json!({"podSelector": a, "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "blue"}}}, {"podSelector": {"matchLabels": {"role": "client"}}}]}]}))]));
    m.converge("changes: before", limit);
    m.change(
        "PATCH",
        "/v1/namespaces/z",
        &json!({"set": {"team": "blue"}}),
    );
    m.converge("changes: namespace label added", limit);
    // A pod taken into a rule changes that rule's set, and no rule: every rule keeps its
    // handle on the node of the isolated pod.
    let node = m.node_of("x/a");
    let table = || {
        let argv = ["nft", "-a", "list", "table", "ip", "podnet_policy"];
        let out = run(Some(&m.tb.host(node).ns), &argv, Duration::from_secs(10)).unwrap();
        assert!(out.success(), "{}", out.combined());
        out.stdout
    };
    let handles = |text: &str| -> Vec<String> {
        text.lines()
            .filter(|l| l.contains(" comment \""))
            .map(|l| l.trim().to_string())
            .collect()
    };
    let before = table();
    m.change("PATCH", "/v1/pods/x/b", &json!({"set": {"role": "client"}}));
    let after = table();
    assert_eq!(handles(&before), handles(&after), "{before}\n{after}");
    let xb = m.pod("x/b").ip.to_string();
    let has = |text: &str| {
        text.split(|c: char| !(c.is_ascii_digit() || c == '.'))
            .any(|w| w == xb)
    };
    assert!(
        !has(&before) && has(&after),
        "x/b {xb} is not added to a set:\n{before}\n{after}"
    );
    m.converge("changes: pod label added", limit);
    m.delete_all();
    m.converge("changes: policy deleted", limit);
    m.assert_changes_fast();
}

#[test]
fn the_probe_matrix_over_vxlan() {
    if !e2e_ready() {
        return;
    }
    let mut m = Matrix::new("polvx", Encap::Vxlan);
    upstream_cases(&m);
    lifecycle(&mut m);
}

/// Wall-clock Unix time in seconds.
fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// The node itself always reaches its pods; an established connection a new policy denies
/// stops within a second; the table removed by hand is put back; a restarted agent enforces
/// before it is up.
fn lifecycle(m: &mut Matrix) {
    let limit = Duration::from_secs(10);
    m.delete_all();
    m.apply(json!([policy(
        "deny",
        "x",
        json!({"podSelector": {}, "policyTypes": ["Ingress"]})
    )]));
    m.converge("deny all ingress in x", limit);
    // The probes x's pods denied are counted where they were denied; nothing isolates egress.
    let judged = |m: &Matrix, n: u8, direction: &str, verdict: &str| {
        m.tb.metric(
            n,
            "podnet_agent_policy_packets_total",
            &[("direction", direction), ("verdict", verdict)],
        )
    };
    let counted = |m: &Matrix| -> Vec<[f64; 2]> {
        (1..=3)
            .map(|n| {
                [
                    judged(m, n, "ingress", "denied"),
                    judged(m, n, "egress", "denied"),
                ]
            })
            .collect()
    };
    let before = counted(m);
    m.converge("deny all ingress in x, again", limit);
    let after = counted(m);
    for n in 0..3 {
        assert!(
            after[n][0] > before[n][0] && after[n][1] == before[n][1],
            "h{}: ingress and egress denied before {:?}, after {:?}",
            n + 1,
            before[n],
            after[n]
        );
    }
    // The node of x/a reaches it (health checks): its traffic leaves through `output`.
    let (xa, node) = (m.pod("x/a").clone(), m.node_of("x/a"));
    let ya = m.pod("y/a").clone();
    // `drops` shows what was denied there, sampled, with the pods' and the policy's names.
    let agent = podnet_tests::podnet_bin("podnet-agent");
    let drops = run(
        Some(&m.tb.host(node).ns),
        &[agent.to_str().unwrap(), "drops"],
        Duration::from_secs(10),
    )
    .unwrap();
    assert!(drops.success(), "{}", drops.combined());
    // (Earlier cases' denials are there too, under the policies of their time.)
    let denial = format!(
        "policy_denied    ingress {} (y/a) -> {} (x/a) TCP 80: isolated by x/deny, and no policy \
         allows it",
        ya.ip, xa.ip
    );
    assert!(
        drops.stdout.lines().any(|l| l.ends_with(&denial)),
        "no `{denial}` in:\n{}",
        drops.stdout
    );
    let status = m.tb.admin_get(node, "/status").unwrap().json().unwrap();
    assert_eq!(
        status["policy"]["policies"],
        json!(["x/deny"]),
        "{}",
        status["policy"]
    );
    assert_eq!(
        status["policy"]["ingress_isolated"],
        json!(["x/a"]),
        "{}",
        status["policy"]
    );
    assert_eq!(
        status["policy"]["egress_isolated"],
        json!([]),
        "{}",
        status["policy"]
    );
    // `why SRC DST PORT/PROTO` says which end decides, and by which policy.
    let why = |dst: &ProbePod, port: &str| {
        let argv = [
            agent.to_str().unwrap(),
            "why",
            &ya.ip.to_string(),
            &dst.ip.to_string(),
            port,
        ];
        let out = run(Some(&m.tb.host(node).ns), &argv, Duration::from_secs(10)).unwrap();
        assert!(out.success(), "{}", out.combined());
        out.stdout
    };
    let text = why(&xa, "80/tcp");
    assert!(
        text.contains(&format!(
            "policy:      {} -> {} 80/TCP: denied",
            ya.ip, xa.ip
        )) && text.contains("denied: isolated by x/deny, and none of them allows it")
            && text.contains("no policy isolates it: allowed"),
        "{text}"
    );
    let za = m.pod("z/a").clone();
    let text = why(&za, "81/udp");
    assert!(
        text.contains(&format!("{} -> {} 81/UDP: allowed", ya.ip, za.ip)),
        "{text}"
    );
    let probe = m.tb.path("probe.py");
    let out = run(
        Some(&m.tb.host(node).ns),
        &["python3", probe.to_str().unwrap(), &xa.ip.to_string()],
        Duration::from_secs(20),
    )
    .unwrap();
    assert!(
        out.stdout.contains(&format!("{} 80 TCP ok", xa.ip)),
        "node -> its isolated pod: {}",
        out.stdout
    );

    // A new pod in the isolated namespace x is never reachable, probed from its first moment:
    // its server listens before the pod has an address, and y/a hammers every free address of
    // the node. A new pod in y, not isolated, is reached by the same hammering.
    let cidr: ipnet::Ipv4Net = m.tb.wait_subnet(node, Duration::from_secs(5));
    let taken: Vec<Ipv4Addr> = m.pods.iter().map(|p| p.ip).collect();
    let free: Vec<String> = cidr
        .hosts()
        .skip(1)
        .take(24)
        .filter(|ip| !taken.contains(ip))
        .map(|ip| ip.to_string())
        .collect();
    let hammer = m.tb.path("hammer.py");
    std::fs::write(&hammer, HAMMER).unwrap();
    let mut argv = vec![
        "python3".to_string(),
        hammer.to_str().unwrap().into(),
        "6".into(),
    ];
    argv.extend(free.iter().cloned());
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let ya_ns = m.pod("y/a").netns.clone();
    m.tb.start_ready(
        "hammer",
        &ya_ns,
        &argv,
        "hammering",
        Duration::from_secs(10),
    )
    .unwrap();
    let server = m.tb.path("serve.py");
    let mut made = BTreeMap::new();
    for (ns, pod) in [("x", "d"), ("y", "d")] {
        let netns = m.tb.add_netns(&format!("{ns}{pod}"));
        let name = format!("serve-{ns}{pod}");
        m.tb.start_ready(
            &name,
            &netns,
            &["python3", server.to_str().unwrap()],
            "serving",
            Duration::from_secs(10),
        )
        .unwrap();
        let args = format!("K8S_POD_NAMESPACE={ns};K8S_POD_NAME={pod};PODNET_LABELS=pod:{pod}");
        let ip = m.tb.cni_add(node, &netns, &args).to_string();
        assert!(
            free.contains(&ip),
            "{ns}/{pod} got {ip}, outside the hammered {free:?}"
        );
        made.insert(ns, ip);
    }
    wait_for("the hammer done", Duration::from_secs(15), || {
        m.tb.finished_line("hammer", "done")
            .ok_or_else(|| m.tb.log("hammer"))
    })
    .unwrap();
    let log = m.tb.log("hammer");
    assert!(
        !log.contains(&format!("reached {}\n", made["x"])),
        "x/d was reachable: {log}"
    );
    assert!(
        log.contains(&format!("reached {}\n", made["y"])),
        "y/d was never reached, so the hammer saw nothing: {log}"
    );

    // A connection from y/a to x/b, allowed, then cut by a policy that denies it.
    m.delete_all();
    m.converge("nothing isolated", limit);
    let (xb, ya) = (m.pod("x/b").clone(), m.pod("y/a").clone());
    let stream = m.tb.path("stream.py");
    std::fs::write(&stream, STREAM).unwrap();
    m.tb.start_ready(
        "stream",
        &ya.netns,
        &["python3", stream.to_str().unwrap(), &xb.ip.to_string()],
        "ready",
        Duration::from_secs(10),
    )
    .unwrap();
    wait_for("the stream's first answers", Duration::from_secs(5), || {
        let log = m.tb.log("stream");
        (log.matches("alive ").count() >= 5)
            .then_some(())
            .ok_or(log)
    })
    .unwrap();
    let cut_at = unix_now();
    m.apply(json!([policy(
        "only-z",
        "x",
        json!({"podSelector": {"matchLabels": {"pod": "b"}},
        "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "z"}}}]}]})
    )]));
    // The stream says `stopped` once nothing answered for 3 s.
    let log = wait_for("the stream to stop", Duration::from_secs(10), || {
        let log = m.tb.log("stream");
        log.contains("stopped").then_some(log.clone()).ok_or(log)
    })
    .unwrap();
    let last = log
        .lines()
        .filter_map(|l| l.strip_prefix("alive "))
        .filter_map(|t| t.trim().parse::<f64>().ok())
        .fold(0.0, f64::max);
    assert!(
        last > cut_at - 0.5,
        "the connection was alive when the policy came: {log}"
    );
    assert!(
        last < cut_at + 1.0,
        "the connection still answered {:.3} s after the policy was applied",
        last - cut_at
    );
    eprintln!(
        "an established connection stopped {:.3} s after the policy",
        last - cut_at
    );
    m.tb.stop("stream");
    m.converge("the cut policy", limit);

    // Removed by hand: put back within the check period, and counted.
    let ns = m.tb.host(node).ns.clone();
    let repairs = |m: &Matrix| {
        m.tb.metric(node, "podnet_agent_repairs_total", &[("what", "policy")])
    };
    let before = repairs(m);
    m.apply(json!([policy(
        "deny",
        "x",
        json!({"podSelector": {}, "policyTypes": ["Ingress"]})
    )]));
    m.converge("deny all again", limit);
    let out = run(
        Some(&ns),
        &["nft", "delete", "table", "ip", "podnet_policy"],
        Duration::from_secs(5),
    )
    .unwrap();
    assert!(out.success(), "{}", out.combined());
    wait_for("the policy table put back", Duration::from_secs(5), || {
        let listed = run(
            Some(&ns),
            &["nft", "list", "table", "ip", "podnet_policy"],
            Duration::from_secs(5),
        )
        .unwrap();
        if listed.success() && repairs(m) > before {
            Ok(())
        } else {
            Err(listed.combined())
        }
    })
    .unwrap();
    m.converge("after the repair", limit);

    // Restarted: the table is there as soon as the agent is up, before it reads the records.
    m.tb.kill9(&format!("agent-h{node}"));
    m.tb.restart_agent(node, HostMode::Podnet(Encap::Vxlan));
    let listed = run(
        Some(&ns),
        &["nft", "list", "table", "ip", "podnet_policy"],
        Duration::from_secs(5),
    )
    .unwrap();
    assert!(
        listed.success() && listed.stdout.contains(&xa.ip.to_string()),
        "policy in force when the restarted agent is up: {}",
        listed.combined()
    );
    m.converge("after an agent restart", limit);
}

#[test]
fn the_probe_matrix_over_wireguard() {
    if !e2e_ready() {
        return;
    }
    let m = Matrix::new("polwg", Encap::Wireguard);
    upstream_cases(&m);
}

/// A few of upstream's cases on a path: isolation, a namespace selector, and an egress deny
/// over an ingress allow, each over the full matrix.
fn path_cases(m: &Matrix) {
    let limit = Duration::from_secs(10);
    m.converge("no policy", limit);
    let few = [
        "deny all ingress",
        "from a namespace selector",
        "egress deny wins over ingress allow",
    ];
    let picked: Vec<_> = cases()
        .into_iter()
        .filter(|(c, _)| few.contains(c))
        .collect();
    assert_eq!(picked.len(), few.len(), "a case was renamed");
    for (case, policies) in picked {
        m.delete_all();
        m.apply(policies);
        m.converge(case, limit);
    }
}

/// Policy is enforced on the forward hook, which every path passes: IP-in-IP, no tunnel at all,
/// and VXLAN with `--cross-subnet` (direct within a subnet, tunnelled across).
#[test]
fn the_matrix_over_ipip() {
    if !e2e_ready() {
        return;
    }
    path_cases(&Matrix::new("polip", Encap::Ipip));
}

#[test]
fn the_matrix_without_a_tunnel() {
    if !e2e_ready() {
        return;
    }
    path_cases(&Matrix::new("polno", Encap::None));
}

#[test]
fn the_matrix_over_vxlan_cross_subnet() {
    if !e2e_ready() {
        return;
    }
    // Hosts 1 and 2 share a subnet; host 3 is on the other.
    let m = Matrix::with("polxs", Encap::Vxlan, |b| {
        b.subnets(2).agent_args(&["--cross-subnet"])
    });
    assert_eq!(
        m.tb.host(3).underlay_ip,
        std::net::Ipv4Addr::new(198, 18, 1, 3)
    );
    path_cases(&m);
}

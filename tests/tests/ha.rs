//! podnet-control replicas over a real 3-member etcd
//! cluster (Debian `etcd-server`), each member and replica in its own namespace on the
//! underlay.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use podnet_tests::capture::{tcpdump_text, Capture};
use podnet_tests::http::{self, Response};
use podnet_tests::parse::{self, ping_summary};
use podnet_tests::testbed::etcd_endpoints;
use podnet_tests::wait::wait_ping_replies;
use podnet_tests::{
    e2e_ready, podnet_bin, run, wait_for, Background, Encap, HostMode, Peers, Testbed,
    TestbedBuilder,
};

/// An HA testbed: `hosts` podnet hosts (VXLAN, one pod each) whose agents know `replicas`
/// replicas.
fn ha(name: &str, hosts: u8, replicas: u8, control_args: &[&str]) -> Testbed {
    TestbedBuilder::new(name)
        .hosts(hosts)
        .pods_per_host(1)
        .mode(HostMode::Podnet(Encap::Vxlan))
        .peers(Peers::Control)
        .ha(replicas)
        .control_args(control_args)
        .build()
}

/// Only the etcd cluster and `replicas` replicas, and one bare host to send requests from.
fn replicas_only(name: &str, replicas: u8) -> Testbed {
    replicas_with(name, replicas, &[])
}

/// [`replicas_only`], every replica also given `serve_flags`.
fn replicas_with(name: &str, replicas: u8, serve_flags: &[&str]) -> Testbed {
    let mut tb = TestbedBuilder::new(name)
        .hosts(1)
        .mode(HostMode::Bare)
        .control_args(serve_flags)
        .no_wait()
        .build();
    tb.start_etcd_cluster();
    for r in 1..=replicas {
        tb.start_replica(r);
    }
    tb
}

fn register_body(i: usize) -> String {
    format!(
        r#"{{"underlay_ip": "198.18.{}.{}", "encap": "vxlan"}}"#,
        10 + i / 200,
        1 + i % 200
    )
}

/// PUT /v1/nodes/NAME, retried while the answer is a 503 or no answer (what agents do),
/// for at most `patience`. Returns the acknowledged pod CIDR.
fn register(
    ns: &str,
    addr: SocketAddr,
    name: &str,
    body: &str,
    patience: Duration,
) -> Result<String, String> {
    let deadline = Instant::now() + patience;
    loop {
        let r = http::request(
            ns,
            addr,
            "PUT",
            &format!("/v1/nodes/{name}"),
            &[],
            Some(body),
            Duration::from_secs(5),
        );
        match r {
            Ok(r) if r.status == 200 => {
                let v = r.json()?;
                return Ok(v["pod_cidr"].as_str().unwrap_or_default().to_string());
            }
            Ok(r) if r.status != 503 => return Err(format!("{name}: {} {}", r.status, r.body)),
            other if Instant::now() > deadline => return Err(format!("{name}: {other:?}")),
            _ => thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// The pod CIDR claims in etcd (`/podnet/cidrs/...` -> holder), read with etcdctl.
fn etcd_claims(tb: &Testbed) -> BTreeMap<String, String> {
    etcd_keys(tb, "/podnet/cidrs/")
}

/// Every key under `prefix` in etcd, with its value, read with etcdctl.
fn etcd_keys(tb: &Testbed, prefix: &str) -> BTreeMap<String, String> {
    let out = tb.etcdctl(&["get", "--prefix", prefix]).unwrap();
    assert!(out.success(), "{}", out.combined());
    let lines: Vec<&str> = out.stdout.lines().filter(|l| !l.is_empty()).collect();
    lines
        .chunks(2)
        .map(|kv| (kv[0].to_string(), kv.get(1).unwrap_or(&"").to_string()))
        .collect()
}

/// No pod CIDR is held by two names, neither in a replica's list nor in etcd's claims, and
/// every claim is held by the node that has the CIDR.
fn assert_cidrs_unique(tb: &Testbed, listed: &BTreeMap<String, (String, String)>) {
    let mut holders: BTreeMap<&str, &str> = BTreeMap::new();
    for (name, (cidr, _)) in listed {
        if let Some(other) = holders.insert(cidr, name) {
            panic!("{cidr} is held by {name} and {other}");
        }
    }
    let claims = etcd_claims(tb);
    assert_eq!(claims.len(), listed.len(), "claims {claims:?}");
    for (key, holder) in &claims {
        let (cidr, _) = listed
            .get(holder)
            .unwrap_or_else(|| panic!("{key} held by unknown {holder}"));
        assert_eq!(key, &format!("/podnet/cidrs/{}", cidr.replace('/', "-")));
    }
}

/// Opens a watch on a replica for `for_how_long` on a thread; returns what it delivered.
fn watch_for(ns: &str, addr: SocketAddr, for_how_long: Duration) -> thread::JoinHandle<Response> {
    let ns = ns.to_string();
    thread::spawn(move || {
        http::request(
            &ns,
            addr,
            "GET",
            "/v1/nodes?watch=true",
            &[],
            None,
            for_how_long,
        )
        .unwrap()
    })
}

fn added_names(watch: &Response) -> BTreeSet<String> {
    watch
        .body
        .lines()
        .filter(|l| !l.trim().is_empty())
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| e["type"] == "added")
        .map(|e| e["node"]["name"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// Every node's IPv6 pod CIDR in a replica's list.
fn v6_cidrs(ns: &str, addr: SocketAddr) -> BTreeMap<String, String> {
    let list = http::get(ns, addr, "/v1/nodes").unwrap().json().unwrap();
    let nodes = list["nodes"].as_array().cloned().unwrap_or_default();
    let field = |n: &serde_json::Value, k: &str| n[k].as_str().unwrap_or_default().to_string();
    nodes
        .iter()
        .map(|n| (field(n, "name"), field(n, "pod_cidr_v6")))
        .collect()
}

// 1. Two dual-stack replicas, 100 concurrent registrations split across them: 100 distinct
// IPv4 and IPv6 CIDRs (each IPv6 block the one with its IPv4 block's index), every
// acknowledged registration visible through both, and both replicas' watches deliver every
// event.
#[test]
fn concurrent_registrations_on_two_replicas_get_distinct_cidrs() {
    if !e2e_ready() {
        return;
    }
    let v6 = [
        "--cluster-cidr-v6",
        "fd00:10:244::/56",
        "--node-prefix-v6",
        "64",
    ];
    let tb = replicas_with("ha-conc", 2, &v6);
    let ns = tb.host(1).ns.clone();
    let watches = [1, 2].map(|r| watch_for(&ns, tb.replica_addr(r), Duration::from_secs(25)));
    // Registrations start once both streams are open, so each watch sees every one.
    for r in [1, 2] {
        wait_for("the watch open", Duration::from_secs(10), || {
            let m = http::get(&ns, tb.replica_addr(r), "/metrics")?.body;
            let open = parse::metric_sum(&m, "podnet_control_watchers", &[])?;
            (open == 1.0)
                .then_some(())
                .ok_or(format!("replica {r}: {open} watchers"))
        })
        .unwrap_or_else(|e| panic!("{e}"));
    }
    let acked = Arc::new(Mutex::new(BTreeMap::new()));
    let started = Instant::now();
    let threads: Vec<_> = (0..100)
        .map(|i| {
            let (ns, acked) = (ns.clone(), acked.clone());
            let addr = tb.replica_addr(1 + (i % 2) as u8);
            thread::spawn(move || {
                let name = format!("n{i}");
                let cidr =
                    register(&ns, addr, &name, &register_body(i), Duration::from_secs(20)).unwrap();
                acked.lock().unwrap().insert(name, cidr);
            })
        })
        .collect();
    for t in threads {
        t.join().expect("a registration failed");
    }
    let acked = acked.lock().unwrap().clone();
    eprintln!(
        "100 registrations over 2 replicas in {:?}",
        started.elapsed()
    );
    assert_eq!(acked.len(), 100);
    let distinct: BTreeSet<&String> = acked.values().collect();
    assert_eq!(distinct.len(), 100, "CIDRs handed out twice: {acked:?}");
    for r in [1, 2] {
        let listed = http::node_states(&ns, tb.replica_addr(r));
        for (name, cidr) in &acked {
            assert_eq!(
                listed.get(name),
                Some(&(cidr.clone(), "up".to_string())),
                "{name} through replica {r}"
            );
        }
        assert_cidrs_unique(&tb, &listed);
        let v6 = v6_cidrs(&ns, tb.replica_addr(r));
        for (name, cidr) in &acked {
            let index: u8 = cidr.split('.').nth(2).unwrap().parse().unwrap();
            assert_eq!(
                v6.get(name),
                Some(&format!("fd00:10:244:{index:x}::/64")),
                "{name} ({cidr}) through replica {r}"
            );
        }
        let distinct: BTreeSet<&String> = v6.values().collect();
        assert_eq!(distinct.len(), 100, "IPv6 CIDRs handed out twice: {v6:?}");
    }
    for (r, watch) in watches.into_iter().enumerate() {
        let seen = added_names(&watch.join().unwrap());
        let want: BTreeSet<String> = acked.keys().cloned().collect();
        assert_eq!(seen, want, "watch on replica {}", r + 1);
    }

    // A third replica with another layout refuses to start and says which value differs:
    // the IPv4 node prefix, the IPv6 one, or no IPv6 layout at all.
    let refusals: [(&[&str], &[&str]); 3] = [
        (
            &["--node-prefix", "26"],
            &["node prefix /24", "--node-prefix 26"],
        ),
        (
            &[
                "--cluster-cidr-v6",
                "fd00:10:244::/56",
                "--node-prefix-v6",
                "72",
            ],
            &["IPv6 node prefix /64", "--node-prefix-v6 72"],
        ),
        (
            &[],
            &["IPv6 cluster CIDR fd00:10:244::/56", "no --cluster-cidr-v6"],
        ),
    ];
    for (extra, said) in refusals {
        let mut flags: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        flags.extend(tb.etcd_client_args());
        let text = refused_replica(&tb, &flags);
        assert!(said.iter().all(|s| text.contains(s)), "{extra:?}: {text}");
    }
}

// 2. The etcd leader SIGKILLed during a registration burst: every acknowledged registration
// is still there afterwards, and no CIDR is held by two names.
#[test]
fn killing_the_etcd_leader_mid_burst_loses_no_acknowledged_registration() {
    if !e2e_ready() {
        return;
    }
    let mut tb = replicas_only("ha-leader", 2);
    let ns = tb.host(1).ns.clone();
    let acked = Arc::new(Mutex::new(BTreeMap::new()));
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let (ns, acked) = (ns.clone(), acked.clone());
            let addr = tb.replica_addr(1 + (t % 2) as u8);
            thread::spawn(move || {
                for k in 0..20 {
                    let i = t * 20 + k;
                    let name = format!("n{i}");
                    match register(&ns, addr, &name, &register_body(i), Duration::from_secs(30)) {
                        Ok(cidr) => {
                            acked.lock().unwrap().insert(name, cidr);
                        }
                        Err(e) => eprintln!("not acknowledged: {e}"),
                    }
                }
            })
        })
        .collect();
    wait_for("a quarter of the burst", Duration::from_secs(30), || {
        let n = acked.lock().unwrap().len();
        if n >= 20 {
            Ok(())
        } else {
            Err(n.to_string())
        }
    })
    .unwrap();
    let leader = tb.etcd_leader().unwrap();
    tb.kill9(&format!("etcd{leader}"));
    let at_kill = acked.lock().unwrap().len();
    eprintln!("killed etcd leader e{leader} after {at_kill} acknowledged registrations");
    for t in threads {
        t.join().unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() > at_kill,
        "nothing was acknowledged after the kill"
    );
    assert_eq!(
        acked.len(),
        80,
        "registrations retried through the election all land"
    );
    for r in [1, 2] {
        // The mirror catches up with the new leader within a moment.
        let listed = wait_for(
            &format!("replica {r} lists all"),
            Duration::from_secs(10),
            || {
                let listed = http::node_states(&ns, tb.replica_addr(r));
                if acked.keys().all(|n| listed.contains_key(n)) {
                    Ok(listed)
                } else {
                    Err(listed.len().to_string())
                }
            },
        )
        .unwrap();
        for (name, cidr) in &acked {
            assert_eq!(&listed[name].0, cidr, "{name} through replica {r}");
        }
        assert_cidrs_unique(&tb, &listed);
    }
}

/// A ping from host 1's pod to `to` at 20 per second for `secs`, in the background.
fn ping_flood(tb: &Testbed, to: std::net::Ipv4Addr, secs: u32, log: &str) -> Background {
    let count = (secs * 20).to_string();
    let to = to.to_string();
    Background::start(
        "ping",
        Some(&tb.pod(1, 1).ns),
        &["ping", "-n", "-i", "0.05", "-W", "1", "-c", &count, &to],
        &tb.path(log),
    )
}

fn agent_status(tb: &Testbed, n: u8) -> serde_json::Value {
    tb.admin_get(n, "/status").unwrap().json().unwrap()
}

// 3. A replica SIGKILLed: its agents fail over to another within 5 s, tables converge on every
// host, and pods keep pinging with no loss beyond 1 s.
#[test]
fn agents_fail_over_when_their_replica_is_killed() {
    if !e2e_ready() {
        return;
    }
    let mut tb = ha("ha-failover", 3, 2, &[]);
    for n in 1..=3 {
        let st = agent_status(&tb, n);
        assert_eq!(
            st["control_server"],
            format!("http://{}", tb.replica_addr(1))
        );
    }
    let to = tb.pod(2, 1).ip;
    let mut ping = ping_flood(&tb, to, 12, "ping-failover.log");
    wait_ping_replies(|| ping.log(), 20, Duration::from_secs(10)).unwrap_or_else(|e| panic!("{e}"));
    tb.kill9("control1");
    let killed = Instant::now();
    let replica2 = format!("http://{}", tb.replica_addr(2));
    for n in 1..=3 {
        wait_for(
            &format!("h{n} watching replica 2"),
            Duration::from_secs(5).saturating_sub(killed.elapsed()),
            || {
                let st = agent_status(&tb, n);
                if st["control_server"] == replica2 && st["control_connected"] == true {
                    Ok(())
                } else {
                    Err(st["control_server"].to_string())
                }
            },
        )
        .unwrap();
    }
    eprintln!("all agents on replica 2 after {:?}", killed.elapsed());
    // A node that joins now (its agent also starts on the dead replica's URL) reaches every
    // host's table.
    tb.add_host(4, HostMode::Podnet(Encap::Vxlan));
    tb.setup_dataplane(4);
    let cidr = tb.wait_subnet(4, Duration::from_secs(20));
    tb.add_pods(4, cidr);
    let joined = Instant::now();
    for n in 1..=3 {
        wait_for(&format!("h{n} has h4"), Duration::from_secs(5), || {
            let st = agent_status(&tb, n);
            let peers = st["peers"].as_array().cloned().unwrap_or_default();
            if peers.iter().any(|p| p["node"] == "h4") {
                Ok(())
            } else {
                Err(st["peers"].to_string())
            }
        })
        .unwrap();
    }
    eprintln!("h4 in every table {:?} after it joined", joined.elapsed());
    tb.wait_mesh(Duration::from_secs(10)).unwrap();
    ping.wait_exit(Duration::from_secs(30));
    let summary = ping_summary(&ping.log()).unwrap_or_else(|| panic!("{}", ping.log()));
    eprintln!("ping through the failover: {summary:?}");
    // 20 pings a second: no loss beyond 1 s is at most 20 lost.
    assert!(
        summary.transmitted - summary.received <= 20,
        "lost {} of {}",
        summary.transmitted - summary.received,
        summary.transmitted
    );
}

// 4. Two of three etcd members stopped: registrations get 503 with the message, agents keep
// forwarding. Members back: a new node joins and is reachable from every pod within 5 s.
#[test]
fn losing_etcd_quorum_refuses_writes_but_keeps_forwarding() {
    if !e2e_ready() {
        return;
    }
    let mut tb = ha("ha-quorum", 2, 2, &[]);
    let ns = tb.host(1).ns.clone();
    tb.stop("etcd2");
    tb.stop("etcd3");
    let addr = tb.replica_addr(1);
    let refused = wait_for("a 503 from etcd", Duration::from_secs(15), || {
        let r = http::request(
            &ns,
            addr,
            "PUT",
            "/v1/nodes/late",
            &[],
            Some(&register_body(7)),
            Duration::from_secs(10),
        )
        .map_err(|e| e.to_string())?;
        if r.status == 503 {
            Ok(r)
        } else {
            Err(format!("{} {}", r.status, r.body))
        }
    })
    .unwrap();
    assert!(
        refused.body.contains("etcd unavailable") && refused.body.contains(&etcd_endpoints()),
        "{}",
        refused.body
    );
    let health = http::get(&ns, addr, "/healthz").unwrap();
    assert_eq!(health.status, 200);
    assert!(health.body.starts_with("degraded"), "{}", health.body);
    let metrics = http::get(&ns, addr, "/metrics").unwrap().body;
    assert!(
        metrics.contains("\npodnet_control_store_available 0\n"),
        "{metrics}"
    );
    // Reads are still served, and pods still reach each other.
    assert_eq!(http::node_states(&ns, addr).len(), 2);
    let out = tb.ping(tb.pod(1, 1), tb.pod(2, 1).ip, 5);
    assert!(out.success(), "{}", out.combined());

    tb.start_etcd(2);
    tb.start_etcd(3);
    wait_for("replicas healthy again", Duration::from_secs(30), || {
        for r in [1, 2] {
            let h = http::get(&ns, tb.replica_addr(r), "/healthz")?;
            if h.body != "ok\n" {
                return Err(h.body);
            }
            let m = http::get(&ns, tb.replica_addr(r), "/metrics")?;
            if !m.body.contains("\npodnet_control_store_available 1\n") {
                return Err("store_available is not 1".into());
            }
        }
        Ok(())
    })
    .unwrap();
    tb.add_host(3, HostMode::Podnet(Encap::Vxlan));
    tb.setup_dataplane(3);
    let cidr = tb.wait_subnet(3, Duration::from_secs(20));
    tb.add_pods(3, cidr);
    let up = Instant::now();
    tb.wait_mesh(Duration::from_secs(5)).unwrap();
    eprintln!(
        "new node reachable from every pod {:?} after it got its CIDR",
        up.elapsed()
    );
}

// 5. A node whose agent is killed is withdrawn on every replica within the lease TTL + 2 s.
#[test]
fn a_killed_agent_is_withdrawn_on_every_replica_within_the_lease_ttl() {
    if !e2e_ready() {
        return;
    }
    let mut tb = ha("ha-lease", 2, 2, &["--lease-ttl", "3s"]);
    let ns = tb.host(1).ns.clone();
    tb.kill9("agent-h2");
    let killed = Instant::now();
    for r in [1, 2] {
        let addr = tb.replica_addr(r);
        wait_for(
            &format!("h2 down on replica {r}"),
            Duration::from_secs(5).saturating_sub(killed.elapsed()),
            || {
                let listed = http::node_states(&ns, addr);
                match listed.get("h2") {
                    Some((_, state)) if state == "down" => Ok(()),
                    other => Err(format!("{other:?}")),
                }
            },
        )
        .unwrap();
    }
    eprintln!(
        "h2 withdrawn on both replicas {:?} after the kill (TTL 3 s)",
        killed.elapsed()
    );
    assert_eq!(http::node_states(&ns, tb.replica_addr(1))["h1"].1, "up");
}

/// The policy records on replicas: a policy applied on one and a pod registered on the other
/// are one key each in etcd, both replicas serve both, an agent's long poll on one wakes at
/// once for a change made on the other, and a restarted replica reads them back.
#[test]
fn policy_records_are_shared_by_replicas() {
    if !e2e_ready() {
        return;
    }
    let mut tb = replicas_only("ha-pol", 2);
    let ns = tb.host(1).ns.clone();
    let addrs = [tb.replica_addr(1), tb.replica_addr(2)];
    let call = |r: u8, method: &str, path: &str, body: Option<&str>| {
        let resp = http::request(
            &ns,
            addrs[usize::from(r) - 1],
            method,
            path,
            &[],
            body,
            Duration::from_secs(25),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            resp.status, 200,
            "{method} {path} on replica {r}: {}",
            resp.body
        );
        resp.json().unwrap()
    };
    let policy = r#"{"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "deny", "namespace": "x"}, "spec": {"podSelector": {}}}"#;
    let applied = call(1, "POST", "/v1/policies", Some(policy));
    assert_eq!(applied["policies"][0]["result"], "created", "{applied}");
    let pod = r#"{"namespace": "x", "name": "a", "node": "h1", "ips": ["10.244.1.2"],
        "labels": {"pod": "a"}, "container_id": "c1"}"#;
    let put = call(2, "PUT", "/v1/pods/x/a", Some(pod));
    let revision = put["revision"].as_u64().unwrap();
    for r in [1, 2] {
        wait_for(
            &format!("replica {r} serves both records"),
            Duration::from_secs(5),
            || {
                let state = call(r, "GET", "/v1/policy", None);
                let both =
                    state["policies"]["x/deny"].is_object() && state["pods"]["x/a"].is_object();
                if both && state["revision"].as_u64() >= Some(revision) {
                    Ok(())
                } else {
                    Err(state.to_string())
                }
            },
        )
        .unwrap();
    }
    let keys = etcd_keys(&tb, "/podnet/p");
    assert_eq!(
        keys.keys().collect::<Vec<_>>(),
        ["/podnet/pods/x/a", "/podnet/policies/x/deny"],
        "{keys:?}"
    );

    // A long poll on replica 2 wakes when replica 1 labels the pod.
    let waiter = {
        let (ns, addr) = (ns.clone(), addrs[1]);
        let path = format!("/v1/policy?after={revision}");
        thread::spawn(move || {
            let r = http::request(&ns, addr, "GET", &path, &[], None, Duration::from_secs(25));
            (Instant::now(), r)
        })
    };
    thread::sleep(Duration::from_millis(300));
    assert!(!waiter.is_finished(), "nothing changed yet");
    let labelled = call(
        1,
        "PATCH",
        "/v1/pods/x/a",
        Some(r#"{"set": {"app": "web"}}"#),
    );
    let changed = Instant::now();
    let (woke, resp) = waiter.join().unwrap();
    let state = resp.unwrap().json().unwrap();
    assert_eq!(state["pods"]["x/a"]["labels"]["app"], "web", "{state}");
    assert!(
        woke.duration_since(changed) < Duration::from_secs(1),
        "replica 2's poll answered {:?} after replica 1's change ({labelled})",
        woke.duration_since(changed)
    );

    tb.stop("control2");
    tb.start_replica(2);
    let state = call(2, "GET", "/v1/policy", None);
    assert_eq!(
        state["pods"]["x/a"]["labels"]["app"], "web",
        "read back after a restart: {state}"
    );
    assert!(state["policies"]["x/deny"].is_object(), "{state}");
}

/// `podnet-control serve --store etcd` with `flags`, in replica 1's namespace; it must fail,
/// and its output is returned.
fn refused_replica(tb: &Testbed, flags: &[String]) -> String {
    let bin = podnet_bin("podnet-control");
    let mut argv: Vec<String> = [
        bin.to_str().unwrap(),
        "serve",
        "--insecure",
        "--listen",
        "127.0.0.1:7899",
        "--store",
        "etcd",
    ]
    .map(str::to_string)
    .to_vec();
    argv.extend_from_slice(flags);
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let out = run(Some(&tb.replica_ns(1)), &argv, Duration::from_secs(30)).unwrap();
    assert!(!out.success(), "it served with {flags:?}");
    out.combined()
}

// 7. etcd over TLS with client certificates, as every HA testbed runs it: a write crosses
// etcd's client port as TLS records only; replicas without a certificate, with another CA's
// or an expired one, or dialling it the wrong way, are refused with what to do; a certificate
// replaced on disk is used at the next reconnect.
#[test]
fn etcd_over_mtls_hides_the_keys_refuses_bad_certificates_and_rereads_replaced_ones() {
    if !e2e_ready() {
        return;
    }
    let tb = ha("ha-etcdtls", 2, 1, &[]);
    let ns = tb.host(1).ns.clone();
    let addr = tb.replica_addr(1);

    // A registration while tcpdump watches etcd's client port on the underlay.
    let pcap = tb.path("etcd-client-port.pcap");
    let cap = Capture::start(&tb.ul(), "br0", "tcp port 2379", 10_000, &pcap);
    register(
        &ns,
        addr,
        "tlsprobe",
        &register_body(3),
        Duration::from_secs(10),
    )
    .unwrap();
    let stored = etcd_keys(&tb, "/podnet/nodes/tlsprobe");
    assert_eq!(stored.len(), 1, "the write is not in etcd: {stored:?}");
    let pcap = cap.finish();
    let bytes = std::fs::read(&pcap).unwrap();
    let packets = tcpdump_text(&pcap, false).lines().count();
    assert!(packets >= 10, "{packets} packets on port 2379");
    let has = |needle: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
    assert!(
        !has(b"/podnet"),
        "a /podnet key crossed the underlay in clear"
    );
    assert!(
        !has(b"tlsprobe"),
        "the node's name crossed the underlay in clear"
    );
    // TLS application-data records (content type 23, version 3.3).
    assert!(
        has(&[0x17, 0x03, 0x03]),
        "no TLS records in {packets} packets"
    );

    // Refusals, each with its advice.
    let pki = tb.pki();
    let pki_dir = pki.to_str().unwrap();
    let other = tb.path("other-ca");
    let other_dir = other.to_str().unwrap();
    tb.ca(&["init", "--dir", other_dir]);
    tb.ca(&[
        "issue",
        "--dir",
        other_dir,
        "--etcd-client",
        "podnet-control",
    ]);
    tb.ca(&[
        "issue",
        "--dir",
        pki_dir,
        "--etcd-client",
        "old",
        "--days",
        "0",
    ]);
    let file = |dir: &std::path::Path, name: &str| dir.join(name).to_str().unwrap().to_string();
    let flags = |ca: &std::path::Path, client: Option<(&std::path::Path, &str)>| {
        let mut f = vec![
            "--etcd-endpoints".to_string(),
            etcd_endpoints(),
            "--etcd-ca".into(),
            file(ca, "ca.pem"),
        ];
        if let Some((dir, name)) = client {
            f.extend([
                "--etcd-cert".into(),
                file(dir, &format!("etcd-client-{name}.pem")),
                "--etcd-key".into(),
                file(dir, &format!("etcd-client-{name}-key.pem")),
            ]);
        }
        f
    };
    thread::sleep(Duration::from_millis(1100));
    let plain = etcd_endpoints().replace("https://", "http://");
    for (what, etcd_flags, says) in [
        (
            "no certificate",
            flags(&pki, None),
            "give --etcd-cert and --etcd-key",
        ),
        (
            "another CA's certificate",
            flags(&pki, Some((&other, "podnet-control"))),
            "--trusted-ca-file",
        ),
        (
            "an expired certificate",
            flags(&pki, Some((&pki, "old"))),
            "expired on",
        ),
        (
            "another CA for etcd's certificate",
            flags(&other, Some((&pki, "podnet-control"))),
            "--etcd-ca must be the CA that signed",
        ),
        (
            "plain http:// to etcd's TLS port",
            vec!["--etcd-endpoints".into(), plain.clone()],
            "if it serves TLS",
        ),
        (
            "TLS flags with http:// endpoints",
            [
                vec!["--etcd-endpoints".into(), plain.clone()],
                flags(&pki, None)[2..].to_vec(),
            ]
            .concat(),
            "plain http://",
        ),
    ] {
        let text = refused_replica(&tb, &etcd_flags);
        assert!(text.contains(says), "{what}: no {says:?} in:\n{text}");
        eprintln!("{what}: {}", text.lines().last().unwrap_or_default());
    }

    // The running replica's certificate replaced on disk by another CA's: etcd refuses it at
    // the next reconnect (forced by dropping its etcd traffic a while); the good one put back
    // is used at the one after.
    let (cert, key) = (
        pki.join("etcd-client-podnet-control.pem"),
        pki.join("etcd-client-podnet-control-key.pem"),
    );
    let good = (std::fs::read(&cert).unwrap(), std::fs::read(&key).unwrap());
    std::fs::copy(other.join("etcd-client-podnet-control.pem"), &cert).unwrap();
    std::fs::copy(other.join("etcd-client-podnet-control-key.pem"), &key).unwrap();
    let replica_ns = tb.replica_ns(1);
    let nft = |script: &str| {
        let out = run(Some(&replica_ns), &["nft", script], Duration::from_secs(10)).unwrap();
        assert!(out.success(), "nft {script}: {}", out.combined());
    };
    let health = || http::get(&ns, addr, "/healthz").map(|r| r.body);
    nft("add table inet etcdcut; add chain inet etcdcut out { type filter hook output priority 0; tcp dport 2379 drop; }");
    wait_for("the replica to lose etcd", Duration::from_secs(20), || {
        health().and_then(|b| b.starts_with("degraded").then_some(()).ok_or(b))
    })
    .unwrap();
    nft("delete table inet etcdcut");
    let refused = wait_for(
        "etcd to refuse the replaced certificate",
        Duration::from_secs(20),
        || {
            health().and_then(|b| {
                b.contains("--trusted-ca-file")
                    .then_some(b.clone())
                    .ok_or(b)
            })
        },
    )
    .unwrap();
    assert!(refused.starts_with("degraded"), "{refused}");
    std::fs::write(&cert, &good.0).unwrap();
    std::fs::write(&key, &good.1).unwrap();
    wait_for(
        "the good certificate to be used again",
        Duration::from_secs(20),
        || health().and_then(|b| (b == "ok\n").then_some(()).ok_or(b)),
    )
    .unwrap();
    let log = tb.log("control1");
    assert!(
        log.matches("etcd TLS files changed on disk").count() >= 2,
        "{log}"
    );
    register(
        &ns,
        addr,
        "afterrotation",
        &register_body(4),
        Duration::from_secs(10),
    )
    .unwrap();
}

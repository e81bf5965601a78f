//! Growing out of one control process: a running 3-host dual-stack cluster on the file store
//! moved to replicas over a 3-member etcd (TLS, client certificates) with `podnet-control
//! store migrate`, while its pods keep an iperf3 stream going; and `store dump` / `store
//! restore`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use podnet_tests::http;
use podnet_tests::{
    e2e_ready, podnet_bin, run, wait_for, Background, Encap, HostMode, Peers, Testbed,
    TestbedBuilder,
};

/// Simulated nodes registered besides the three hosts, so a copy takes long enough to be cut.
const EXTRA_NODES: u32 = 150;

/// The cluster runs dual-stack, so the move must keep the IPv6 blocks and layout too.
const V6_FLAGS: [&str; 4] = [
    "--cluster-cidr-v6",
    "fd00:10:244::/56",
    "--node-prefix-v6",
    "64",
];

/// Every node's pod CIDR, state and IPv6 pod CIDR, as the control service at `addr` lists
/// them.
fn cidrs(tb: &Testbed, addr: std::net::SocketAddr) -> BTreeMap<String, (String, String, String)> {
    http::get(&tb.host(1).ns, addr, "/v1/nodes")
        .unwrap()
        .json()
        .unwrap()["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            (
                n["name"].as_str().unwrap().to_string(),
                (
                    n["pod_cidr"].as_str().unwrap().to_string(),
                    n["state"].as_str().unwrap().to_string(),
                    n["pod_cidr_v6"].as_str().unwrap_or_default().to_string(),
                ),
            )
        })
        .collect()
}

/// `podnet-control ARGS` in host 1's namespace (which reaches the underlay).
fn control(tb: &Testbed, args: &[String]) -> podnet_tests::Output {
    let bin = podnet_bin("podnet-control");
    let mut argv = vec![bin.to_str().unwrap()];
    argv.extend(args.iter().map(String::as_str));
    run(Some(&tb.host(1).ns), &argv, Duration::from_secs(60)).unwrap()
}

/// `store ARGS` with the testbed's etcd TLS flags.
fn store_args(tb: &Testbed, args: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = ["store"]
        .iter()
        .chain(args)
        .map(|s| s.to_string())
        .collect();
    // etcd_client_args() starts with --etcd-endpoints URLS; `store` takes them in etcd:URLS.
    a.extend(tb.etcd_client_args().into_iter().skip(2));
    a
}

#[test]
fn a_file_store_cluster_moves_to_etcd_replicas_keeping_every_cidr_while_iperf3_runs() {
    if !e2e_ready() {
        return;
    }
    let mut tb = TestbedBuilder::new("migrate")
        .hosts(3)
        .pods_per_host(1)
        .mode(HostMode::Podnet(Encap::Vxlan))
        .peers(Peers::Control)
        .control_args(&V6_FLAGS)
        .build();
    let file_addr = tb.control_addr();
    // Policy records, and nodes beyond the hosts (they lapse to down, keeping their blocks).
    tb.control_call(
        "PATCH",
        "/v1/namespaces/shop",
        Some(r#"{"set": {"team": "a"}}"#),
    );
    tb.control_call(
        "POST",
        "/v1/policies",
        Some(
            r#"{"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                "metadata": {"namespace": "shop", "name": "web"},
                "spec": {"podSelector": {"matchLabels": {"app": "web"}}}}"#,
        ),
    );
    for i in 0..EXTRA_NODES {
        let body = format!(
            r#"{{"underlay_ip": "198.18.{}.{}", "encap": "vxlan"}}"#,
            100 + i / 200,
            1 + i % 200
        );
        tb.control_call("PUT", &format!("/v1/nodes/sim{i}"), Some(&body));
    }
    let before = cidrs(&tb, file_addr);
    assert_eq!(before.len(), 3 + EXTRA_NODES as usize);
    for (name, (cidr, _, v6)) in &before {
        let index: u8 = cidr.split('.').nth(2).unwrap().parse().unwrap();
        assert_eq!(v6, &format!("fd00:10:244:{index:x}::/64"), "{name}");
    }
    let policy_before = tb.control_call("GET", "/v1/policy", None);

    // A TCP stream from h1's pod to h3's, through the whole move.
    let (a, c) = (tb.pod(1, 1).clone(), tb.pod(3, 1).clone());
    tb.start_iperf_server("iperf3-s", &c.ns).unwrap();
    let report = tb.path("iperf3.json");
    let ip = c.ip.to_string();
    let mut iperf = Background::start(
        "iperf3-c",
        Some(&a.ns),
        &[
            "iperf3",
            "-c",
            &ip,
            "-t",
            "40",
            "-i",
            "1",
            "-J",
            "--logfile",
            report.to_str().unwrap(),
        ],
        &tb.path("iperf3-c.log"),
    );

    // 1. Stop the file-store service; the agents forward on their last table.
    std::thread::sleep(Duration::from_secs(2));
    tb.stop("control");
    tb.start_etcd_cluster();
    let state = tb.path("control-state.json");
    let from = format!("file:{}", state.display());
    let to = format!("etcd:{}", podnet_tests::testbed::etcd_endpoints());

    // 2. A copy into a prefix that holds another cluster is refused.
    let foreign = tb.etcdctl(&["put", "/foreign/nodes/x", "{}"]).unwrap();
    assert!(foreign.success(), "{}", foreign.combined());
    let refused = control(
        &tb,
        &store_args(
            &tb,
            &[
                "migrate",
                "--from",
                &from,
                "--to",
                &to,
                "--etcd-prefix",
                "/foreign",
            ],
        ),
    );
    assert!(!refused.success());
    assert!(
        refused
            .combined()
            .contains("already holds a podnet cluster"),
        "{}",
        refused.combined()
    );

    // 3. A migration killed half way (one key per transaction, SIGKILL after 400 ms), run
    // again: it finishes, writing only what is missing; a third run writes nothing.
    let bin = podnet_bin("podnet-control");
    let mut argv = vec![bin.to_str().unwrap().to_string()];
    argv.extend(store_args(
        &tb,
        &["migrate", "--from", &from, "--to", &to, "--batch", "1"],
    ));
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let mut cut = Background::start(
        "migrate-cut",
        Some(&tb.host(1).ns),
        &argv,
        &tb.path("migrate-cut.log"),
    );
    std::thread::sleep(Duration::from_millis(400));
    cut.signal(nix::sys::signal::Signal::SIGKILL);
    cut.wait_exit(Duration::from_secs(5));
    let marker = tb
        .etcdctl(&["get", "/podnet/copy", "--print-value-only"])
        .unwrap();
    assert!(
        marker.stdout.contains("\"done\":false"),
        "the first run was not cut half way: {} / {}",
        marker.stdout,
        cut.log()
    );
    let finished = control(
        &tb,
        &store_args(&tb, &["migrate", "--from", &from, "--to", &to]),
    );
    assert!(finished.success(), "{}", finished.combined());
    let said = finished.stdout.trim().to_string();
    eprintln!("after the cut: {said}");
    assert!(said.contains("already there from an earlier run"), "{said}");
    assert!(
        !said.contains(", 0 already there"),
        "the second run found nothing: {said}"
    );
    let again = control(
        &tb,
        &store_args(&tb, &["migrate", "--from", &from, "--to", &to]),
    );
    assert!(
        again.success() && again.stdout.contains("nothing written"),
        "{}",
        again.combined()
    );

    // 4. Two replicas: the first where the file-store service was (the agents' --control),
    // the second at its own address.
    let mut replica = vec![
        bin.to_str().unwrap().to_string(),
        "serve".into(),
        "--insecure".into(),
        "--listen".into(),
        file_addr.to_string(),
        "--store".into(),
        "etcd".into(),
    ];
    replica.extend(tb.etcd_client_args());
    replica.extend(V6_FLAGS.map(str::to_string));
    let replica: Vec<&str> = replica.iter().map(String::as_str).collect();
    let ns1 = tb.host(1).ns.clone();
    tb.start("control", &ns1, &replica);
    tb.start_replica(2);
    wait_for(
        "the replica at the old address",
        Duration::from_secs(20),
        || {
            http::get(&ns1, file_addr, "/healthz")
                .and_then(|r| (r.body == "ok\n").then_some(()).ok_or(r.body))
        },
    )
    .unwrap();

    // Every node keeps its CIDR; the hosts renew through the replicas (their alive keys).
    let migrated = Instant::now();
    let alive = wait_for(
        "the agents to renew through the replicas",
        Duration::from_secs(30),
        || {
            let out = tb.etcdctl(&["get", "/podnet/alive/", "--prefix", "--keys-only"])?;
            let keys = out.stdout;
            if (1..=3).all(|n| keys.contains(&format!("/podnet/alive/h{n}"))) {
                Ok(migrated.elapsed())
            } else {
                Err(keys)
            }
        },
    )
    .unwrap();
    for addr in [file_addr, tb.replica_addr(2)] {
        let after = cidrs(&tb, addr);
        for (name, (cidr, _, v6)) in &before {
            assert_eq!(
                after.get(name).map(|v| (&v.0, &v.2)),
                Some((cidr, v6)),
                "{name} at {addr}"
            );
        }
        for n in 1..=3 {
            assert_eq!(after[&format!("h{n}")].1, "up", "h{n} at {addr}");
        }
    }
    let policy_after = tb.control_call("GET", "/v1/policy", None);
    assert_eq!(policy_after["policies"], policy_before["policies"]);
    assert_eq!(policy_after["namespaces"], policy_before["namespaces"]);

    // 5. The stream went on throughout: every second of it moved data.
    assert!(
        iperf
            .wait_exit(Duration::from_secs(60))
            .is_some_and(|s| s.success()),
        "iperf3: {}",
        iperf.log()
    );
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let seconds: Vec<f64> = json["intervals"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["sum"]["bits_per_second"].as_f64().unwrap())
        .collect();
    assert!(seconds.len() >= 39, "{} intervals", seconds.len());
    let slowest = seconds.iter().cloned().fold(f64::MAX, f64::min);
    assert!(slowest > 1e6, "a second with {slowest} bit/s: {seconds:?}");
    eprintln!(
        "migrated {} nodes; agents renewed through the replicas {alive:?} after; slowest second \
         of iperf3 {:.0} Mbit/s",
        before.len(),
        slowest / 1e6
    );

    // 6. dump, then restore into a fresh file store, round-trips every record.
    let dump = control(&tb, &store_args(&tb, &["dump", "--from", &to]));
    assert!(dump.success(), "{}", dump.combined());
    let snapshot = tb.path("dump.json");
    std::fs::write(&snapshot, &dump.stdout).unwrap();
    let restored = tb.path("restored-state.json");
    let restore = control(
        &tb,
        &store_args(
            &tb,
            &[
                "restore",
                "--to",
                &format!("file:{}", restored.display()),
                "-f",
                snapshot.to_str().unwrap(),
            ],
        ),
    );
    assert!(restore.success(), "{}", restore.combined());
    let back = control(
        &tb,
        &store_args(
            &tb,
            &["dump", "--from", &format!("file:{}", restored.display())],
        ),
    );
    assert!(back.success(), "{}", back.combined());
    let (a, b): (serde_json::Value, serde_json::Value) = (
        serde_json::from_str(&dump.stdout).unwrap(),
        serde_json::from_str(&back.stdout).unwrap(),
    );
    assert_eq!(a, b, "dump and restore differ");
    assert_eq!(a["nodes"].as_array().unwrap().len(), before.len());
    assert_eq!(
        a["cluster_cidr_v6"], "fd00:10:244::/56",
        "the IPv6 layout moved too"
    );
    assert_eq!(a["policy"]["policies"], policy_before["policies"]);
}

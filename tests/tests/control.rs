//! Agents join through podnet-control (DESIGN.md "Control
//! plane"): IPAM, membership, watch, persistence, leases, and the API's error answers.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use podnet_tests::http::{self, Response};
use podnet_tests::parse::ping_summary;
use podnet_tests::{
    e2e_ready, must, podnet_bin, run, wait_for, Background, Encap, HostMode, Peers, Testbed,
    TestbedBuilder,
};

fn with_control(name: &str, hosts: u8, control_args: &[&str]) -> Testbed {
    TestbedBuilder::new(name)
        .hosts(hosts)
        .pods_per_host(1)
        .mode(HostMode::Podnet(Encap::Vxlan))
        .peers(Peers::Control)
        .control_args(control_args)
        .build()
}

/// `GET /v1/nodes` from host 1's namespace: node name -> (pod CIDR, state).
fn nodes(tb: &Testbed) -> BTreeMap<String, (String, String)> {
    http::node_states(&tb.host(1).ns, tb.control_addr())
}

fn ifindex(tb: &Testbed, n: u8, dev: &str) -> String {
    let out = must(Some(&tb.host(n).ns), &["ip", "-o", "link", "show", dev]).stdout;
    out.split(':').next().unwrap_or_default().trim().to_owned()
}

// 1. Three agents get distinct pod CIDRs, every pod pings every remote pod, and both
// `podnet-control nodes` and GET /v1/nodes list all three.
#[test]
fn three_agents_get_distinct_cidrs_and_reach_each_other() {
    if !e2e_ready() {
        return;
    }
    let tb = TestbedBuilder::new("ctl3")
        .hosts(3)
        .pods_per_host(2)
        .mode(HostMode::Podnet(Encap::Vxlan))
        .peers(Peers::Control)
        .build();
    let cidrs: HashSet<String> = tb
        .hosts
        .iter()
        .map(|h| h.pod_cidr.unwrap().to_string())
        .collect();
    assert_eq!(cidrs.len(), 3, "{cidrs:?}");
    assert!(tb.mesh_failures().is_empty());

    let listed = nodes(&tb);
    for h in &tb.hosts {
        let name = format!("h{}", h.index);
        let (cidr, state) = listed
            .get(&name)
            .unwrap_or_else(|| panic!("{name} not in {listed:?}"));
        assert_eq!(cidr, &h.pod_cidr.unwrap().to_string());
        assert_eq!(state, "up");
    }
    let bin = podnet_bin("podnet-control");
    let table = must(
        Some(&tb.host(1).ns),
        &[
            bin.to_str().unwrap(),
            "nodes",
            "--server",
            &tb.control_url(),
        ],
    )
    .stdout;
    for h in &tb.hosts {
        assert!(table.contains(&format!("h{}", h.index)), "{table}");
        assert!(table.contains(&h.pod_cidr.unwrap().to_string()), "{table}");
        assert!(table.contains(&h.underlay_ip.to_string()), "{table}");
    }
}

/// An agent in control mode takes the cluster CIDR from the service (no `--cluster-cidr`): its
/// route, `subnet.env` and status carry the service's; a `--cluster-cidr` that differs is
/// refused naming both, and one that matches is accepted.
#[test]
fn agents_take_the_cluster_cidr_from_the_control_service() {
    if !e2e_ready() {
        return;
    }
    let cluster = "10.96.0.0/12";
    let mut tb = with_control(
        "ctlcidr",
        2,
        &["--cluster-cidr", cluster, "--node-prefix", "24"],
    );
    assert!(tb.mesh_failures().is_empty());
    let net: ipnet::Ipv4Net = cluster.parse().unwrap();
    for n in 1..=2 {
        let h = tb.host(n).clone();
        assert!(net.contains(&h.pod_cidr.unwrap()), "{:?}", h.pod_cidr);
        let env = std::fs::read_to_string(tb.path(&format!("h{n}/subnet.env"))).unwrap();
        assert_eq!(
            podnet_tests::parse::env_file(&env)["POD_NETWORK"],
            cluster,
            "{env}"
        );
        let route = must(Some(&h.ns), &["ip", "route", "show", cluster]).stdout;
        assert!(route.contains("dev tunl0"), "h{n}: {route}");
        let status = tb.admin_get(n, "/status").unwrap().body;
        assert!(
            status.contains(&format!("\"cluster_cidr\":\"{cluster}\"")),
            "{status}"
        );
    }
    tb.stop("agent-h2");
    let bin = podnet_bin("podnet-agent");
    let mut argv = vec![bin.to_str().unwrap().to_owned()];
    argv.extend(tb.agent_args(2, Encap::Vxlan));
    argv.extend(["--cluster-cidr".into(), "10.244.0.0/16".into()]);
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let out = run(Some(&tb.host(2).ns), &argv, Duration::from_secs(30)).unwrap();
    assert!(!out.success(), "{}", out.combined());
    assert!(
        out.combined().contains(
            "--cluster-cidr 10.244.0.0/16 differs from the control service's cluster CIDR 10.96.0.0/12"
        ),
        "{}",
        out.combined()
    );
    let mut args = tb.agent_args(2, Encap::Vxlan);
    args.extend(["--cluster-cidr".into(), cluster.into()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    tb.start_agent(2, &args);
    tb.wait_agent_up(2, Duration::from_secs(20));
    assert!(tb.mesh_failures().is_empty());
}

// 2. A fourth host joining while traffic flows is reachable from every other host's pods
// within 2 s of its registration, and the running flow loses nothing.
#[test]
fn a_joining_host_is_reachable_within_two_seconds() {
    if !e2e_ready() {
        return;
    }
    let mut tb = with_control("ctljoin", 3, &[]);
    let (a, b) = (tb.pod(1, 1).clone(), tb.pod(2, 1).clone());
    let mut flow = Background::start(
        "flow",
        Some(&a.ns),
        &[
            "ping",
            "-n",
            "-i",
            "0.1",
            "-c",
            "60",
            "-W",
            "1",
            &b.ip.to_string(),
        ],
        &tb.path("flow.log"),
    );

    tb.add_host(4, HostMode::Podnet(Encap::Vxlan));
    tb.setup_dataplane(4);
    let cidr = tb.wait_subnet(4, Duration::from_secs(10));
    let registered = Instant::now();
    tb.add_pods(4, cidr);
    let new_pod = tb.pod(4, 1).clone();
    for n in 1..=3 {
        let from = tb.pod(n, 1).clone();
        let left = Duration::from_secs(2).saturating_sub(registered.elapsed());
        let r = wait_for(&format!("{} -> {}", from.ns, new_pod.ip), left, || {
            let out = run(
                Some(&from.ns),
                &["ping", "-n", "-c1", "-W1", &new_pod.ip.to_string()],
                Duration::from_secs(3),
            )?;
            if out.success() {
                Ok(())
            } else {
                Err(out.combined())
            }
        });
        if let Err(e) = r {
            panic!("not reachable within 2 s of registration: {e}");
        }
    }
    let status = flow.wait_exit(Duration::from_secs(15));
    let log = flow.log();
    assert!(status.is_some(), "flow did not finish: {log}");
    let s = ping_summary(&log).unwrap_or_else(|| panic!("{log}"));
    assert_eq!(
        s.received, s.transmitted,
        "the running flow lost packets: {log}"
    );
}

// 3. Control service stopped: pods keep pinging. Restarted: every node keeps its pod CIDR, and
// agents resume their watch without re-creating anything.
#[test]
fn forwarding_survives_a_control_restart() {
    if !e2e_ready() {
        return;
    }
    let mut tb = with_control("ctlrestart", 3, &[]);
    let before = nodes(&tb);
    let tun_before: Vec<String> = (1..=3).map(|n| ifindex(&tb, n, "tunl0")).collect();
    let pids: Vec<u32> = (1..=3)
        .map(|n| tb.proc(&format!("agent-h{n}")).pid())
        .collect();

    tb.stop("control");
    // Forwarding holds once every agent knows the service is gone.
    for n in 1..=3 {
        wait_for(
            &format!("h{n} disconnected"),
            Duration::from_secs(10),
            || {
                let connected = tb.metric(n, "podnet_agent_control_connected", &[]);
                (connected == 0.0)
                    .then_some(())
                    .ok_or(format!("control_connected {connected}"))
            },
        )
        .unwrap_or_else(|e| panic!("{e}"));
    }
    let failed = tb.mesh_failures();
    assert!(failed.is_empty(), "with control down: {failed:?}");

    tb.start_control(&[]);
    let after = nodes(&tb);
    for (name, (cidr, _)) in &before {
        assert_eq!(&after[name].0, cidr, "{name} changed its pod CIDR");
    }
    let tun_after: Vec<String> = (1..=3).map(|n| ifindex(&tb, n, "tunl0")).collect();
    assert_eq!(tun_before, tun_after, "tunl0 was re-created");
    for (i, n) in (1..=3u8).enumerate() {
        let name = format!("agent-h{n}");
        assert!(tb.proc(&name).is_running(), "{}", tb.log(&name));
        assert_eq!(tb.proc(&name).pid(), pids[i]);
    }
    // The watch is live again: a node registered now shows up in every agent's routes.
    let r = http::request(
        &tb.host(1).ns,
        tb.control_addr(),
        "PUT",
        "/v1/nodes/h9",
        &[],
        Some(r#"{"underlay_ip":"198.18.0.9","encap":"vxlan"}"#),
        Duration::from_secs(5),
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let cidr = r.json().unwrap()["pod_cidr"].as_str().unwrap().to_owned();
    for n in 1..=3 {
        let seen = wait_for(
            &format!("{cidr} in h{n}'s routes"),
            Duration::from_secs(5),
            || {
                let routes = tb.admin_get(n, "/routes")?;
                if routes.body.contains(&cidr) {
                    Ok(())
                } else {
                    Err(routes.body)
                }
            },
        );
        seen.unwrap();
    }
    assert!(tb.mesh_failures().is_empty());
}

// 4. An agent killed with SIGKILL is withdrawn after the lease TTL (pings to it get
// unreachable, not silence); restarted, it gets the same pod CIDR back.
#[test]
fn a_killed_agent_is_withdrawn_and_gets_its_cidr_back() {
    if !e2e_ready() {
        return;
    }
    let mut tb = with_control("ctlkill", 3, &["--lease-ttl", "3s"]);
    let victim = tb.pod(3, 1).clone();
    let old_cidr = tb.host(3).pod_cidr.unwrap();
    let watcher = tb.pod(1, 1).clone();

    tb.kill9("agent-h3");
    let r = wait_for(
        "pings to the dead node to get unreachable",
        Duration::from_secs(12),
        || {
            let out = tb.ping(&watcher, victim.ip, 1);
            match ping_summary(&out.stdout) {
                Some(s) if s.errors == 1 && out.stdout.contains("Unreachable") => Ok(()),
                _ => Err(out.combined()),
            }
        },
    );
    r.unwrap();
    assert_eq!(nodes(&tb)["h3"].1, "down");

    std::fs::remove_file(tb.path("h3/subnet.env")).unwrap();
    let args = tb.agent_args(3, Encap::Vxlan);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    tb.start_agent(3, &args);
    assert_eq!(tb.wait_subnet(3, Duration::from_secs(10)), old_cidr);
    assert_eq!(nodes(&tb)["h3"].0, old_cidr.to_string());
    tb.wait_mesh(Duration::from_secs(10)).unwrap();
}

fn put(tb: &Testbed, name: &str, body: &str, token: Option<&str>) -> Response {
    let auth = token.map(|t| format!("Authorization: Bearer {t}"));
    let headers: Vec<&str> = auth.iter().map(String::as_str).collect();
    http::request(
        &tb.host(1).ns,
        tb.control_addr(),
        "PUT",
        &format!("/v1/nodes/{name}"),
        &headers,
        Some(body),
        Duration::from_secs(5),
    )
    .unwrap()
}

fn bare(name: &str) -> Testbed {
    TestbedBuilder::new(name)
        .hosts(1)
        .pods_per_host(1)
        .mode(HostMode::Bare)
        .no_wait()
        .build()
}

// 5a. 400 (which field), 401 (missing / wrong token), 409 (name held at another underlay IP),
// 507 (exhausted, saying how many nodes fit).
#[test]
fn control_api_error_answers() {
    if !e2e_ready() {
        return;
    }
    let mut tb = bare("ctlapi");
    let token_file = tb.path("token");
    std::fs::write(&token_file, "s3cret\n").unwrap();
    let tf = token_file.to_str().unwrap().to_owned();
    tb.start_control(&[
        "--cluster-cidr",
        "10.244.0.0/22",
        "--node-prefix",
        "24",
        "--token-file",
        &tf,
    ]);
    let ok = Some("s3cret");
    let body = |ip: &str| format!(r#"{{"underlay_ip":"{ip}","encap":"vxlan"}}"#);

    assert_eq!(put(&tb, "n1", &body("198.18.0.11"), None).status, 401);
    assert_eq!(
        put(&tb, "n1", &body("198.18.0.11"), Some("wrong")).status,
        401
    );
    let list = http::get(&tb.host(1).ns, tb.control_addr(), "/v1/nodes").unwrap();
    assert_eq!(list.status, 401);
    let health = http::get(&tb.host(1).ns, tb.control_addr(), "/healthz").unwrap();
    assert_eq!(health.status, 200);

    let r = put(&tb, "n1", "{not json", ok);
    assert_eq!(r.status, 400, "{}", r.body);
    let r = put(
        &tb,
        "n1",
        r#"{"underlay_ip":"not-an-ip","encap":"vxlan"}"#,
        ok,
    );
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(
        r.body.contains("underlay_ip"),
        "400 must name the field: {}",
        r.body
    );
    let r = put(
        &tb,
        "n1",
        r#"{"underlay_ip":"198.18.0.11","encap":"gre"}"#,
        ok,
    );
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("encap"), "{}", r.body);

    let a = put(&tb, "n1", &body("198.18.0.11"), ok);
    assert_eq!(a.status, 200, "{}", a.body);
    let b = put(&tb, "n2", &body("198.18.0.12"), ok);
    assert_eq!(b.status, 200, "{}", b.body);
    let (ca, cb) = (
        a.json().unwrap()["pod_cidr"].clone(),
        b.json().unwrap()["pod_cidr"].clone(),
    );
    assert_ne!(ca, cb);
    // Renewal from the same IP keeps the CIDR; the same name from elsewhere is a conflict.
    let again = put(&tb, "n1", &body("198.18.0.11"), ok);
    assert_eq!(again.status, 200);
    assert_eq!(again.json().unwrap()["pod_cidr"], ca);
    let r = put(&tb, "n1", &body("198.18.0.13"), ok);
    assert_eq!(r.status, 409, "{}", r.body);
    // Fill the (small) cluster CIDR: the first refusal is 507 and says how many nodes fit.
    let mut fits = 2;
    let refusal = loop {
        assert!(fits < 64, "a /22 cluster CIDR with /24 nodes never ran out");
        let r = put(
            &tb,
            &format!("n{}", fits + 1),
            &body(&format!("198.18.1.{}", fits + 1)),
            ok,
        );
        if r.status != 200 {
            break r;
        }
        fits += 1;
    };
    assert_eq!(refusal.status, 507, "{}", refusal.body);
    assert!(
        refusal.body.contains(&format!("{fits} nodes")),
        "507 must say how many nodes fit ({fits}): {}",
        refusal.body
    );
}

// 5b. The state file survives SIGKILL of the control service at any moment: it always parses,
// and every registration acknowledged before the kill is there after a restart.
#[test]
fn control_state_survives_sigkill() {
    if !e2e_ready() {
        return;
    }
    let mut tb = bare("ctlkill9");
    let state = tb.path("control-state.json");
    let mut acked: BTreeMap<String, String> = BTreeMap::new();
    for round in 0..6u32 {
        tb.start_control(&[]);
        for (name, cidr) in &acked {
            let listed = nodes(&tb);
            assert_eq!(
                listed.get(name).map(|n| &n.0),
                Some(cidr),
                "round {round}: lost {name}"
            );
        }
        // Register in a burst and kill mid-way, at a different moment each round.
        let ns = tb.host(1).ns.clone();
        let addr = tb.control_addr();
        let burst = std::thread::spawn(move || {
            let mut ok = Vec::new();
            for i in 0..20u32 {
                let name = format!("r{round}n{i}");
                let body = format!(
                    r#"{{"underlay_ip":"198.18.{}.{}","encap":"ipip"}}"#,
                    round + 1,
                    i + 1
                );
                let path = format!("/v1/nodes/{name}");
                match http::request(
                    &ns,
                    addr,
                    "PUT",
                    &path,
                    &[],
                    Some(&body),
                    Duration::from_secs(2),
                ) {
                    Ok(r) if r.status == 200 => {
                        let cidr = r
                            .json()
                            .ok()
                            .and_then(|v| v["pod_cidr"].as_str().map(str::to_owned));
                        ok.push((name, cidr.unwrap_or_default()));
                    }
                    _ => break,
                }
            }
            ok
        });
        std::thread::sleep(Duration::from_millis(5 + u64::from(round) * 7));
        tb.kill9("control");
        acked.extend(burst.join().unwrap());
        let text = std::fs::read_to_string(&state).unwrap_or_default();
        if !acked.is_empty() {
            assert!(!text.is_empty(), "round {round}: empty state file");
        }
        if !text.is_empty() {
            serde_json::from_str::<serde_json::Value>(&text)
                .unwrap_or_else(|e| panic!("round {round}: torn state file ({e}): {text}"));
        }
    }
    tb.start_control(&[]);
    let listed = nodes(&tb);
    for (name, cidr) in &acked {
        assert_eq!(listed.get(name).map(|n| &n.0), Some(cidr), "lost {name}");
    }
    assert!(!acked.is_empty(), "no registration was acknowledged at all");
}

// 5c. A corrupt state file stops the service with a message naming the file; it never starts
// empty over it.
#[test]
fn control_refuses_a_corrupt_state_file() {
    if !e2e_ready() {
        return;
    }
    let tb = bare("ctlcorrupt");
    let state = tb.path("control-state.json");
    std::fs::write(&state, "{\"nodes\": [tor").unwrap();
    let bin = podnet_bin("podnet-control");
    let out = run(
        Some(&tb.host(1).ns),
        &[
            bin.to_str().unwrap(),
            "serve",
            "--insecure",
            "--listen",
            &tb.control_addr().to_string(),
            "--state",
            state.to_str().unwrap(),
        ],
        Duration::from_secs(10),
    )
    .unwrap_or_else(|e| panic!("podnet-control must exit on a corrupt state file: {e}"));
    assert!(!out.success());
    assert!(
        out.combined().contains(state.to_str().unwrap()),
        "{}",
        out.combined()
    );
    assert_eq!(std::fs::read_to_string(&state).unwrap(), "{\"nodes\": [tor");
}

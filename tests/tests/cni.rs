//! The CNI plugin: pods made by `podnet-cni`, called as a runtime calls it (CNI_* variables,
//! the config on stdin), on testbeds whose agents get their pod CIDRs from podnet-control.
//!
//! CNI-made pods reach every pod over VXLAN and IP-in-IP and the outside through the node's
//! masquerade; the plugin's IPAM gives 50 parallel ADDs 50 addresses, keeps them across agent
//! restarts, frees them on DEL (twice is fine) and GC, and says how many a full subnet holds;
//! bad input gets the spec's codes and leaves nothing behind.

use std::net::Ipv4Addr;
use std::time::Duration;

use podnet_tests::{e2e_ready, run, wait_for, Encap, HostMode, Peers, Testbed, TestbedBuilder};
use serde_json::{json, Value};

fn cni_testbed(name: &str, encap: Encap, hosts: u8) -> Testbed {
    TestbedBuilder::new(name)
        .hosts(hosts)
        .pods_per_host(2)
        .mode(HostMode::Podnet(encap))
        .peers(Peers::Control)
        .cni()
        .build()
}

fn code(out: &podnet_tests::Output) -> u64 {
    let v: Value = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("error JSON on stdout ({e}): {}", out.combined()));
    v["code"].as_u64().unwrap_or(0)
}

/// Links in host n's namespace (names).
fn links(tb: &Testbed, n: u8) -> Vec<String> {
    let out = run(
        Some(&tb.host(n).ns),
        &["ip", "-o", "link", "show"],
        Duration::from_secs(10),
    )
    .expect("ip link");
    out.stdout
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_string())
        .collect()
}

/// Files of the plugin's IPAM store on host n (one per allocated address).
fn allocations(tb: &Testbed, n: u8) -> Vec<Ipv4Addr> {
    let dir = tb.path(&format!("h{n}-cni/podnet"));
    std::fs::read_dir(&dir)
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn cni_made_pods_reach_every_pod_and_the_outside_over_vxlan() {
    if !e2e_ready() {
        return;
    }
    // The builder waits for the full mesh: every CNI-made pod pings every other.
    let mut tb = cni_testbed("cnivxlan", Encap::Vxlan, 3);
    let outside: Ipv4Addr = "198.18.0.200".parse().unwrap();
    tb.add_underlay_node("out", outside);
    let p = tb.pod(1, 1).clone();
    assert!(tb.ping(&p, outside, 2).success(), "pod -> outside");
    assert!(
        tb.ping(&p, podnet_tests::testbed::underlay_ip(3), 2)
            .success(),
        "pod -> another node's underlay"
    );
    // The result a runtime gets: the pod's interface in its sandbox, the address, the route.
    let pns = tb.add_netns("h1-px");
    let out = tb.cni_call(1, "ADD", &pns, "eth0", None);
    assert!(out.success(), "{}", out.combined());
    let r: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(r["cniVersion"], json!("1.1.0"));
    assert_eq!(r["interfaces"][2]["name"], json!("eth0"));
    assert_eq!(
        r["interfaces"][2]["sandbox"],
        json!(format!("/run/netns/{pns}"))
    );
    assert_eq!(r["ips"][0]["interface"], json!(2));
    assert_eq!(r["routes"][0]["dst"], json!("0.0.0.0/0"));
    let check = tb.cni_call(1, "CHECK", &pns, "eth0", None);
    assert!(check.success(), "CHECK: {}", check.combined());
    // 0.4.0 still gets the version field in its ips.
    let mut old = tb.cni_config(1);
    old["cniVersion"] = json!("0.4.0");
    let pns4 = tb.add_netns("h1-p4");
    let out = tb.cni_call(1, "ADD", &pns4, "eth0", Some(&old));
    assert!(out.success(), "{}", out.combined());
    let r: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(r["ips"][0]["version"], json!("4"));
}

#[test]
fn cni_made_pods_reach_every_pod_over_ipip() {
    if !e2e_ready() {
        return;
    }
    let tb = cni_testbed("cniipip", Encap::Ipip, 3);
    assert!(tb.mesh_failures().is_empty());
}

#[test]
fn ipam_parallel_adds_del_gc_restart_and_exhaustion() {
    if !e2e_ready() {
        return;
    }
    let mut tb = cni_testbed("cniipam", Encap::Vxlan, 2);
    let before = allocations(&tb, 1).len();
    assert_eq!(before, 2, "the two testbed pods");
    // 50 ADDs at once, each its own plugin process, as parallel pod starts run them.
    let names: Vec<String> = (0..50).map(|i| tb.add_netns(&format!("h1-c{i}"))).collect();
    let results: Vec<podnet_tests::Output> = std::thread::scope(|s| {
        let tb = &tb;
        let handles: Vec<_> = names
            .iter()
            .map(|ns| s.spawn(move || tb.cni_call(1, "ADD", ns, "eth0", None)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut ips = std::collections::BTreeSet::new();
    for (out, ns) in results.iter().zip(&names) {
        assert!(out.success(), "ADD {ns}: {}", out.combined());
        let r: Value = serde_json::from_str(&out.stdout).unwrap();
        ips.insert(r["ips"][0]["address"].as_str().unwrap().to_string());
    }
    assert_eq!(ips.len(), 50, "{ips:?}");
    assert_eq!(allocations(&tb, 1).len(), 52);

    // DEL, then DEL again (and DEL of a container never added): all succeed.
    for _ in 0..2 {
        let out = tb.cni_call(1, "DEL", &names[0], "eth0", None);
        assert!(out.success(), "DEL: {}", out.combined());
    }
    let out = tb.cni_call(1, "DEL", "never-added", "eth0", None);
    assert!(out.success(), "DEL unknown: {}", out.combined());
    assert_eq!(allocations(&tb, 1).len(), 51);

    // The agent restarts: allocations stay and CHECK passes for a pod made before.
    tb.stop("agent-h1");
    tb.restart_agent(1, HostMode::Podnet(Encap::Vxlan));
    assert_eq!(allocations(&tb, 1).len(), 51);
    let check = tb.cni_call(1, "CHECK", &names[1], "eth0", None);
    assert!(check.success(), "CHECK after restart: {}", check.combined());

    // GC: only the testbed's pods and c1 stay valid.
    let mut conf = tb.cni_config(1);
    let mut keep: Vec<Value> = tb
        .host(1)
        .pods
        .iter()
        .map(|p| json!({"containerID": p.ns, "ifname": "eth0"}))
        .collect();
    keep.push(json!({"containerID": names[1], "ifname": "eth0"}));
    conf["cni.dev/valid-attachments"] = Value::Array(keep);
    let out = tb.cni_call(1, "GC", "unused", "eth0", Some(&conf));
    assert!(out.success(), "GC: {}", out.combined());
    assert_eq!(allocations(&tb, 1).len(), 3);
    // The restarted agent's route reaches the peers through the watch: wait for it. A kept pod
    // that GC had broken would never answer.
    tb.wait_mesh(Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("after the agent restart and GC: {e}"));

    // A full subnet says how many addresses it holds.
    let small = tb.path("small-subnet.env");
    std::fs::write(&small, "POD_SUBNET=10.244.200.0/29\nPOD_MTU=1450\n").unwrap();
    let mut conf = tb.cni_config(1);
    conf["subnetFile"] = json!(small);
    conf["dataDir"] = json!(tb.path("small-cni"));
    conf["bridge"] = json!("cni9");
    for i in 0..5 {
        let ns = tb.add_netns(&format!("h1-s{i}"));
        let out = tb.cni_call(1, "ADD", &ns, "eth0", Some(&conf));
        assert!(out.success(), "ADD {i}: {}", out.combined());
    }
    let ns = tb.add_netns("h1-s5");
    let out = tb.cni_call(1, "ADD", &ns, "eth0", Some(&conf));
    assert!(!out.success());
    assert_eq!(code(&out), 100, "{}", out.stdout);
    assert!(out.stdout.contains("all 5 addresses"), "{}", out.stdout);
    // ... and left no half-made pair behind.
    let inside = run(Some(&ns), &["ip", "-o", "link"], Duration::from_secs(10)).unwrap();
    assert!(!inside.stdout.contains("eth0"), "{}", inside.stdout);
}

#[test]
fn bad_input_gets_the_spec_codes_and_leaves_nothing() {
    if !e2e_ready() {
        return;
    }
    let mut tb = cni_testbed("cnibad", Encap::Vxlan, 1);
    let pns = tb.add_netns("h1-bad");
    let links_before = links(&tb, 1);
    let allocated_before = allocations(&tb, 1);
    let bin = podnet_tests::podnet_bin("podnet-cni");
    let call = |env: &[&str], stdin: &str| {
        let mut argv = vec!["env"];
        argv.extend_from_slice(env);
        argv.push(bin.to_str().unwrap());
        podnet_tests::cmd::run_with_stdin(
            Some(&tb.host(1).ns),
            &argv,
            stdin.as_bytes(),
            Duration::from_secs(20),
        )
        .unwrap()
    };
    let netns = format!("CNI_NETNS=/run/netns/{pns}");
    let good = tb.cni_config(1).to_string();
    let add = ["CNI_COMMAND=ADD", "CNI_CONTAINERID=bad", "CNI_IFNAME=eth0"];

    let out = call(&[add[0], add[1], add[2], &netns], "{\"cniVersion\": ");
    assert_eq!(code(&out), 6, "malformed JSON: {}", out.stdout);
    let out = call(&add, &good);
    assert_eq!(code(&out), 4, "no CNI_NETNS: {}", out.stdout);
    assert!(out.stdout.contains("CNI_NETNS"), "{}", out.stdout);
    let mut old = tb.cni_config(1);
    old["cniVersion"] = json!("0.3.1");
    let out = call(&[add[0], add[1], add[2], &netns], &old.to_string());
    assert_eq!(code(&out), 1, "unsupported version: {}", out.stdout);
    let mut missing = tb.cni_config(1);
    missing["subnetFile"] = json!("/nonexistent/subnet.env");
    let out = call(&[add[0], add[1], add[2], &netns], &missing.to_string());
    assert_eq!(code(&out), 11, "missing subnet file: {}", out.stdout);
    assert!(out.stdout.contains("podnet-agent"), "{}", out.stdout);
    let out = call(&["CNI_COMMAND=STATUS"], &missing.to_string());
    assert_eq!(code(&out), 50, "STATUS: {}", out.stdout);
    let out = call(&["CNI_COMMAND=STATUS"], &good);
    assert!(
        out.success(),
        "STATUS with the agent up: {}",
        out.combined()
    );
    let out = call(&["CNI_COMMAND=VERSION"], "");
    assert!(out.stdout.contains("\"1.1.0\""), "{}", out.stdout);

    assert_eq!(links(&tb, 1), links_before, "a failed ADD left a device");
    assert_eq!(
        allocations(&tb, 1),
        allocated_before,
        "a failed ADD kept an address"
    );
    let inside = run(Some(&pns), &["ip", "-o", "link"], Duration::from_secs(10)).unwrap();
    assert!(!inside.stdout.contains("eth0"), "{}", inside.stdout);
}

#[test]
fn portmap_chained_after_podnet_publishes_a_host_port() {
    if !e2e_ready() {
        return;
    }
    podnet_tests::require_tools(&["iptables", "iperf3"]);
    let portmap = std::path::Path::new("/usr/lib/cni/portmap");
    assert!(
        portmap.exists(),
        "apt-get install containernetworking-plugins (portmap)"
    );
    let mut tb = cni_testbed("cniportmap", Encap::Vxlan, 2);
    let pns = tb.add_netns("h1-web");
    // The conflist [podnet, portmap], run as a runtime runs it: each plugin gets the one
    // before it's result as prevResult.
    let mut conf = tb.cni_config(1);
    conf["cniVersion"] = json!("1.0.0");
    let out = tb.cni_call(1, "ADD", &pns, "eth0", Some(&conf));
    assert!(out.success(), "podnet ADD: {}", out.combined());
    let prev: Value = serde_json::from_str(&out.stdout).unwrap();
    let pm = json!({
        "cniVersion": "1.0.0",
        "name": "podnet",
        "type": "portmap",
        "capabilities": {"portMappings": true},
        "runtimeConfig": {"portMappings": [
            {"hostPort": 8080, "containerPort": 5201, "protocol": "tcp"}
        ]},
        "prevResult": prev,
    });
    let out = tb.cni_exec(1, portmap, "ADD", &pns, "eth0", &pm, "");
    assert!(out.success(), "portmap ADD: {}", out.combined());
    let chained: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(
        chained["ips"], prev["ips"],
        "portmap passed our result through"
    );

    tb.start_iperf_server("web", &pns).unwrap();
    let host1 = podnet_tests::testbed::underlay_ip(1).to_string();
    let out = run(
        Some(&tb.host(2).ns),
        &["iperf3", "-c", &host1, "-p", "8080", "-t", "1"],
        Duration::from_secs(20),
    )
    .unwrap();
    assert!(
        out.success() && out.stdout.contains("receiver"),
        "h2 -> h1:8080 -> the pod's 5201: {}",
        out.combined()
    );

    // DEL in reverse order, as runtimes do.
    let out = tb.cni_exec(1, portmap, "DEL", &pns, "eth0", &pm, "");
    assert!(out.success(), "portmap DEL: {}", out.combined());
    let out = tb.cni_call(1, "DEL", &pns, "eth0", Some(&conf));
    assert!(out.success(), "podnet DEL: {}", out.combined());
}

#[test]
fn delegated_ipam_and_del_after_the_netns_is_gone() {
    if !e2e_ready() {
        return;
    }
    let host_local = std::path::Path::new("/usr/lib/cni/host-local");
    assert!(
        host_local.exists(),
        "apt-get install containernetworking-plugins (host-local)"
    );
    let mut tb = cni_testbed("cniipamdel", Encap::Vxlan, 2);
    let cidr = tb.host(1).pod_cidr.expect("h1's pod CIDR");
    let base = u32::from(cidr.network());
    let start = Ipv4Addr::from(base + 100);
    let mut conf = tb.cni_config(1);
    // Debian's host-local speaks up to 1.0.0.
    conf["cniVersion"] = json!("1.0.0");
    conf["ipam"] = json!({
        "type": "host-local",
        "ranges": [[{"subnet": cidr.to_string(), "rangeStart": start.to_string(),
                     "gateway": Ipv4Addr::from(base + 1).to_string()}]],
        "dataDir": tb.path("host-local"),
    });
    let pns = tb.add_netns("h1-hl");
    let out = tb.cni_call(1, "ADD", &pns, "eth0", Some(&conf));
    assert!(out.success(), "ADD with host-local: {}", out.combined());
    let r: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(
        r["ips"][0]["address"],
        json!(format!("{start}/{}", cidr.prefix_len())),
        "host-local's address"
    );
    let pod = podnet_tests::Pod {
        ns: pns.clone(),
        ip: start,
        host: 1,
    };
    let peer = tb.pod(2, 1).ip;
    assert!(
        tb.ping(&pod, peer, 2).success(),
        "the host-local pod reaches h2's"
    );
    assert_eq!(
        allocations(&tb, 1).len(),
        2,
        "podnet's own IPAM was not used"
    );
    let out = tb.cni_call(1, "DEL", &pns, "eth0", Some(&conf));
    assert!(out.success(), "DEL with host-local: {}", out.combined());
    let held = tb.path("host-local/podnet").join(start.to_string());
    assert!(!held.exists(), "host-local still holds {start}");

    // DEL after the pod's namespace is gone succeeds and frees the address.
    let gone = tb.add_netns("h1-gone");
    let out = tb.cni_call(1, "ADD", &gone, "eth0", None);
    assert!(out.success(), "{}", out.combined());
    assert_eq!(allocations(&tb, 1).len(), 3);
    podnet_tests::must(None, &["ip", "netns", "del", &gone]);
    let out = tb.cni_call(1, "DEL", &gone, "eth0", None);
    assert!(out.success(), "DEL with the netns gone: {}", out.combined());
    assert_eq!(allocations(&tb, 1).len(), 2);
}

/// The pod records on the control service, `NS/NAME` -> record, read from host 1.
fn pod_records(tb: &Testbed) -> serde_json::Map<String, Value> {
    let r = podnet_tests::http::get(&tb.host(1).ns, tb.control_addr(), "/v1/policy").unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    r.json().unwrap()["pods"]
        .as_object()
        .cloned()
        .unwrap_or_default()
}

/// ADD tells the agent who the pod is (CNI_ARGS namespace, name, labels, named ports), the
/// agent publishes the record to podnet-control, DEL withdraws it; a name held by another
/// container and a malformed CNI_ARGS are refused with their codes, leaving nothing behind.
#[test]
fn pods_get_their_identity_from_the_cni_call() {
    if !e2e_ready() {
        return;
    }
    let mut tb = cni_testbed("cniid", Encap::Vxlan, 2);
    // The builder's pods, made without CNI_ARGS: namespace default, the container ID as name.
    let builder_pods = wait_for(
        "the builder's pods published",
        Duration::from_secs(10),
        || {
            let pods = pod_records(&tb);
            if pods.len() == 4 {
                Ok(pods)
            } else {
                Err(format!("{pods:?}"))
            }
        },
    )
    .unwrap();
    assert!(
        builder_pods.keys().all(|k| k.starts_with("default/")),
        "{builder_pods:?}"
    );

    let pns = tb.add_netns("h2-web");
    let args = "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-1;\
                PODNET_LABELS=app:web,tier:front;PODNET_PORTS=http:8080/TCP,dns:53/UDP";
    let ip = tb.cni_add(2, &pns, args).to_string();
    let record = wait_for("shop/web-1 published", Duration::from_secs(10), || {
        pod_records(&tb)
            .remove("shop/web-1")
            .ok_or_else(|| "not yet".to_string())
    })
    .unwrap();
    assert_eq!(
        record,
        json!({"namespace": "shop", "name": "web-1", "node": "h2", "ips": [ip],
               "labels": {"app": "web", "tier": "front"},
               "ports": [{"name": "http", "port": 8080, "protocol": "TCP"},
                         {"name": "dns", "port": 53, "protocol": "UDP"}],
               "container_id": pns})
    );
    let local = tb.admin_get(2, "/pods").unwrap().json().unwrap();
    assert_eq!(local[format!("{pns}/eth0")]["name"], "web-1", "{local}");

    // The same pod name from another container: refused, and its address given back.
    let before = allocations(&tb, 2).len();
    let twin = tb.add_netns("h2-twin");
    let out = tb.cni_call_as(2, "ADD", &twin, "K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-1");
    assert!(!out.success());
    assert_eq!(code(&out), 7, "{}", out.combined());
    assert!(out.stdout.contains("attached already"), "{}", out.stdout);
    assert_eq!(
        allocations(&tb, 2).len(),
        before,
        "the twin's address was released"
    );
    let out = tb.cni_call_as(2, "ADD", &twin, "PODNET_LABELS=app");
    assert_eq!(code(&out), 4, "{}", out.combined());
    assert!(out.stdout.contains("PODNET_LABELS"), "{}", out.stdout);
    assert_eq!(
        allocations(&tb, 2).len(),
        before,
        "nothing allocated for bad CNI_ARGS"
    );

    let out = tb.cni_call_as(2, "DEL", &pns, args);
    assert!(out.success(), "{}", out.combined());
    wait_for(
        "shop/web-1 withdrawn",
        Duration::from_secs(10),
        || match pod_records(&tb).contains_key("shop/web-1") {
            false => Ok(()),
            true => Err("still there".to_string()),
        },
    )
    .unwrap();
}

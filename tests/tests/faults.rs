//! Faults under load.
//!
//! - agent SIGKILL and restart under a ping stream: traffic is back within 2 s of the restart
//!   and the node keeps its pod CIDR;
//! - control service SIGKILL in the middle of a burst of registrations: after a restart every
//!   acknowledged registration is there with the CIDR it was given, and no CIDR is held by two
//!   nodes;
//! - underlay link down and up on one host under a ping stream: traffic resumes;
//! - loss and reordering on the underlay with tc netem: only where the kernel has `sch_netem`
//!   (the test says so and stops otherwise).

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use podnet_tests::http;
use podnet_tests::parse::{env_file, ping_summary};
use podnet_tests::wait::{wait_for, wait_ping_replies};
use podnet_tests::{
    e2e_ready, must, require_tools, run, Encap, HostMode, Peers, Pod, Testbed, TestbedBuilder,
};

fn testbed(name: &str, hosts: u8, peers: Peers) -> Testbed {
    TestbedBuilder::new(name)
        .hosts(hosts)
        .pods_per_host(1)
        .mode(HostMode::Podnet(Encap::Vxlan))
        .peers(peers)
        .build()
}

/// Pings once (1 s wait) until a reply comes; returns how long that took.
fn until_ping(tb: &Testbed, from: &Pod, to: Ipv4Addr, limit: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let out = run(
            Some(&from.ns),
            &["ping", "-n", "-c", "1", "-W", "1", &to.to_string()],
            Duration::from_secs(3),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        if out.success() {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < limit,
            "no ping reply {} -> {to} within {limit:?}\nagent h1:\n{}",
            from.ns,
            tb.log("agent-h1")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn subnet(tb: &Testbed, n: u8) -> String {
    let text = std::fs::read_to_string(tb.path(&format!("h{n}/subnet.env"))).expect("subnet.env");
    env_file(&text)["POD_SUBNET"].clone()
}

/// A ping stream (10 per second, bounded) from `from` to `to`, as process `name`.
fn ping_stream(tb: &mut Testbed, name: &str, from: &Pod, to: Ipv4Addr, count: u32) {
    let c = count.to_string();
    let ns = from.ns.clone();
    tb.start(
        name,
        &ns,
        &[
            "ping",
            "-n",
            // Reports each request without a reply ("no answer yet"): the outage reaching the
            // pods is a line in the log to wait for.
            "-O",
            "-i",
            "0.1",
            "-W",
            "1",
            "-c",
            &c,
            &to.to_string(),
        ],
    );
}

/// Waits until the ping stream `name` has at least `n` replies.
fn wait_replies(tb: &Testbed, name: &str, n: usize) {
    wait_ping_replies(|| tb.log(name), n, Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{e}"));
}

/// Waits until the ping stream `name` reports a request without a reply beyond those it had
/// when called: the outage reached the pods.
fn wait_unanswered(tb: &Testbed, name: &str) {
    let unanswered = |tb: &Testbed| tb.log(name).matches("no answer yet").count();
    let before = unanswered(tb);
    wait_for("a request without a reply", Duration::from_secs(10), || {
        (unanswered(tb) > before).then_some(()).ok_or(tb.log(name))
    })
    .unwrap_or_else(|e| panic!("{e}"));
}

fn stream_summary(tb: &mut Testbed, name: &str, secs: u64) -> (u32, u32) {
    tb.proc(name).wait_exit(Duration::from_secs(secs));
    let log = tb.log(name);
    let s = ping_summary(&log).unwrap_or_else(|| panic!("no ping summary in {log}"));
    (s.transmitted, s.received)
}

#[test]
fn agent_sigkill_and_restart_keeps_its_cidr_and_traffic_returns_within_2s() {
    if !e2e_ready() {
        return;
    }
    let mut tb = testbed("faultagent", 2, Peers::Control);
    let (pod1, pod2) = (tb.pod(1, 1).clone(), tb.pod(2, 1).clone());
    let cidr = subnet(&tb, 1);
    ping_stream(&mut tb, "ping", &pod2, pod1.ip, 150);
    wait_replies(&tb, "ping", 20);

    tb.kill9("agent-h1");
    wait_unanswered(&tb, "ping");
    let args = tb.agent_args(1, Encap::Vxlan);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    tb.start_agent(1, &args);
    let back = until_ping(&tb, &pod2, pod1.ip, Duration::from_secs(10));
    eprintln!(
        "agent restarted: traffic back {} ms after the restart",
        back.as_millis()
    );
    assert!(
        back <= Duration::from_secs(2),
        "traffic back only after {back:?}"
    );
    assert_eq!(
        subnet(&tb, 1),
        cidr,
        "the restarted agent got another pod CIDR"
    );

    let (sent, received) = stream_summary(&mut tb, "ping", 30);
    eprintln!("ping stream across the kill: {received}/{sent} replies");
    assert!(received > 0 && received < sent, "{received}/{sent}");
    // The stream ran after the restart: more replies than before the kill (~20).
    assert!(received >= 40, "{received}/{sent}");
}

#[test]
fn control_sigkill_during_a_registration_burst_loses_no_acknowledged_node() {
    if !e2e_ready() {
        return;
    }
    // One host: its agent registers, the control service runs in its namespace.
    let mut tb = testbed("faultctl", 1, Peers::Control);
    let ns = tb.host(1).ns.clone();
    let addr = tb.control_addr();
    const THREADS: u8 = 4;
    const PER_THREAD: u8 = 60;
    let acked: Arc<Mutex<BTreeMap<String, String>>> = Arc::default();
    let attempts = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for t in 0..THREADS {
        let (ns, acked, attempts) = (ns.clone(), acked.clone(), attempts.clone());
        workers.push(std::thread::spawn(move || {
            for i in 0..PER_THREAD {
                let name = format!("burst-{t}-{i}");
                let body = format!(
                    r#"{{"underlay_ip":"198.18.{}.{}","encap":"vxlan"}}"#,
                    10 + t,
                    i + 1
                );
                attempts.fetch_add(1, Ordering::Relaxed);
                let r = http::request(
                    &ns,
                    addr,
                    "PUT",
                    &format!("/v1/nodes/{name}"),
                    &[],
                    Some(&body),
                    Duration::from_secs(2),
                );
                if let Ok(resp) = r {
                    if resp.status == 200 {
                        let v = resp.json().expect("registration answer is JSON");
                        let cidr = v["pod_cidr"].as_str().expect("pod_cidr").to_string();
                        acked.lock().unwrap().insert(name, cidr);
                    }
                }
            }
        }));
    }
    // Kill it with some registrations acknowledged and more in flight.
    let started = Instant::now();
    while acked.lock().unwrap().len() < 40 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "burst too slow"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    tb.kill9("control");
    let at_kill = acked.lock().unwrap().len();
    for w in workers {
        w.join().expect("worker");
    }
    let acked = acked.lock().unwrap().clone();
    eprintln!(
        "burst: {} attempts, {at_kill} acknowledged when SIGKILLed, {} in all",
        attempts.load(Ordering::Relaxed),
        acked.len()
    );
    assert!(
        acked.len() < usize::from(THREADS) * usize::from(PER_THREAD),
        "kill came too late"
    );

    tb.start_control(&[]);
    let list = http::get(&ns, addr, "/v1/nodes").expect("list after restart");
    let v = list.json().expect("node list JSON");
    let nodes: BTreeMap<String, String> = v["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .map(|n| {
            (
                n["name"].as_str().unwrap().to_string(),
                n["pod_cidr"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    for (name, cidr) in &acked {
        assert_eq!(
            nodes.get(name),
            Some(cidr),
            "{name} was acknowledged with {cidr} but after the restart has {:?}",
            nodes.get(name)
        );
    }
    let distinct: BTreeSet<&String> = nodes.values().collect();
    assert_eq!(
        distinct.len(),
        nodes.len(),
        "a pod CIDR is held twice: {nodes:?}"
    );

    // New registrations after the restart get fresh CIDRs.
    let r = http::request(
        &ns,
        addr,
        "PUT",
        "/v1/nodes/after-restart",
        &[],
        Some(r#"{"underlay_ip":"198.18.20.1","encap":"vxlan"}"#),
        Duration::from_secs(5),
    )
    .expect("register after restart");
    assert_eq!(r.status, 200, "{}", r.body);
    let fresh = r.json().unwrap()["pod_cidr"].as_str().unwrap().to_string();
    assert!(!distinct.contains(&fresh), "{fresh} handed out again");
}

#[test]
fn underlay_link_down_and_up_traffic_resumes() {
    if !e2e_ready() {
        return;
    }
    let mut tb = testbed("faultlink", 2, Peers::Static);
    let (pod1, pod2) = (tb.pod(1, 1).clone(), tb.pod(2, 1).clone());
    let h1 = tb.host(1).ns.clone();
    ping_stream(&mut tb, "ping", &pod2, pod1.ip, 120);
    wait_replies(&tb, "ping", 20);
    must(Some(&h1), &["ip", "link", "set", "eth0", "down"]);
    wait_unanswered(&tb, "ping");
    let during = run(
        Some(&pod2.ns),
        &["ping", "-n", "-c", "1", "-W", "1", &pod1.ip.to_string()],
        Duration::from_secs(3),
    )
    .unwrap();
    assert!(
        !during.success(),
        "ping went through with the underlay down"
    );
    must(Some(&h1), &["ip", "link", "set", "eth0", "up"]);
    let back = until_ping(&tb, &pod2, pod1.ip, Duration::from_secs(15));
    eprintln!("underlay up: traffic back after {} ms", back.as_millis());
    assert!(tb.proc("agent-h1").is_running(), "{}", tb.log("agent-h1"));
    let (sent, received) = stream_summary(&mut tb, "ping", 30);
    eprintln!("ping stream across link down/up: {received}/{sent}");
    assert!(received > 0 && received < sent, "{received}/{sent}");
}

#[test]
fn loss_and_reordering_on_the_underlay_tcp_completes() {
    if !e2e_ready() {
        return;
    }
    require_tools(&["iperf3", "tc"]);
    let mut tb = testbed("faultnetem", 2, Peers::Static);
    let h2 = tb.host(2).ns.clone();
    let netem = run(
        Some(&h2),
        &[
            "tc", "qdisc", "add", "dev", "eth0", "root", "netem", "loss", "2%", "delay", "5ms",
            "2ms", "reorder", "10%",
        ],
        Duration::from_secs(5),
    )
    .unwrap();
    if !netem.success() {
        // Seen on this CI kernel: "Error: Specified qdisc kind is unknown." (no sch_netem).
        eprintln!(
            "SKIPPED: tc netem is not available in this kernel ({}); loss/reordering not tested",
            netem.combined().trim()
        );
        return;
    }
    let (pod1, pod2) = (tb.pod(1, 1).clone(), tb.pod(2, 1).clone());
    let result = tb
        .iperf(&pod2, &pod1, 5)
        .unwrap_or_else(|e| panic!("iperf3 over a lossy underlay: {e}"));
    eprintln!("iperf3 with 2% loss and 10% reordering: {result:?}");
    assert!(result.received_bytes > 0);
}

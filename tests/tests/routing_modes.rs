//! Routing modes. `--encap none` routes pod traffic to peers on the same underlay
//! subnet with plain kernel routes (no tunnel, no userspace data path); `--cross-subnet` does
//! that for same-subnet peers and tunnels across subnets. The routes are host state the agent
//! owns: they follow peers joining and leaving, and a restarted agent reconciles what a killed
//! one left.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use podnet_tests::capture::{self, Capture};
use podnet_tests::parse::ping_summary;
use podnet_tests::{
    e2e_ready, must, podnet_bin, require_tools, run, wait_for, Encap, HostMode, Peers, Testbed,
    TestbedBuilder,
};

fn agent(tb: &Testbed, n: u8, args: &[&str]) -> podnet_tests::Output {
    let bin = podnet_bin("podnet-agent");
    let mut argv = vec![bin.to_str().expect("utf-8 path")];
    argv.extend_from_slice(args);
    run(Some(&tb.host(n).ns), &argv, Duration::from_secs(20)).unwrap_or_else(|e| panic!("{e}"))
}

fn routes(tb: &Testbed, n: u8) -> String {
    must(Some(&tb.host(n).ns), &["ip", "route"]).stdout
}

/// The direct route host `n` should have to host `k`'s pods.
fn direct_route(tb: &Testbed, k: u8) -> String {
    let h = tb.host(k);
    format!(
        "{} via {} dev eth0 proto 222",
        h.pod_cidr.expect("pod CIDR"),
        h.underlay_ip
    )
}

/// Waits up to `limit` until host n's routing table does (or does not) show `route`; returns
/// how long it took.
fn until_route(tb: &Testbed, n: u8, route: &str, present: bool, limit: Duration) -> Duration {
    let start = Instant::now();
    wait_for(&format!("h{n}: {route} present={present}"), limit, || {
        let table = routes(tb, n);
        if table.contains(route) == present {
            Ok(start.elapsed())
        } else {
            Err(table)
        }
    })
    .unwrap_or_else(|table| panic!("{table}"))
}

/// tcpdump lines (a capture in the underlay namespace on every interface) that are the packet
/// itself, not the inner packet tcpdump decodes from a tunnel (those lines have no timestamp).
fn packet_lines(text: &str) -> Vec<&str> {
    text.lines()
        .filter(|l| l.starts_with(|c: char| c.is_ascii_digit()))
        .collect()
}

#[test]
fn none_routes_directly_and_follows_peers() {
    if !e2e_ready() {
        return;
    }
    require_tools(&["tcpdump", "iperf3"]);
    let mut tb = TestbedBuilder::new("routednone")
        .hosts(3)
        .pods_per_host(1)
        .mode(HostMode::PodnetDirect)
        .peers(Peers::Control)
        .build();
    let (p1, p2) = (tb.pod(1, 1).clone(), tb.pod(2, 1).clone());
    for k in [2, 3] {
        assert!(
            routes(&tb, 1).contains(&direct_route(&tb, k)),
            "{}",
            routes(&tb, 1)
        );
    }
    // On the wire: the pod addresses themselves, no tunnel.
    let pcap = tb.path("none.pcap");
    let cap = Capture::start(
        &tb.ul(),
        "br0",
        "icmp or udp port 4789 or ip proto 4",
        4,
        &pcap,
    );
    assert!(tb.ping(&p1, p2.ip, 2).success());
    let text = capture::tcpdump_text(&cap.finish(), false);
    let request = format!("IP {} > {}: ICMP echo request", p1.ip, p2.ip);
    assert!(
        packet_lines(&text).iter().any(|l| l.contains(&request)),
        "{text}"
    );
    assert!(
        !text.contains("VXLAN") && !text.contains("198.18.0."),
        "{text}"
    );
    let r = tb.iperf(&p1, &p2, 2).unwrap_or_else(|e| panic!("{e}"));
    eprintln!("none: {:.2} Gbit/s", r.received_bps / 1e9);
    assert!(r.received_bps > 0.5e9, "{r:?}");
    // No packet went through the agents' data path.
    let status: serde_json::Value =
        serde_json::from_str(&tb.admin_get(1, "/status").unwrap().body).unwrap();
    assert_eq!(status["counters"]["tx"]["packets"], 0, "{status}");
    assert_eq!(status["routing"], "direct", "{status}");
    let why = agent(&tb, 1, &["why", &p2.ip.to_string()]).stdout;
    assert!(
        why.contains("the kernel routes it directly via 198.18.0.2"),
        "{why}"
    );
    let text = agent(&tb, 1, &["status"]).stdout;
    assert!(text.contains("(direct route)"), "{text}");
    assert!(
        text.contains("routing:     direct routes to the peers on 198.18.0.0/24"),
        "{text}"
    );

    // A peer that leaves loses its route, and gets it back when it joins, within 2 s.
    let route3 = direct_route(&tb, 3);
    tb.stop("agent-h3");
    let gone = until_route(&tb, 1, &route3, false, Duration::from_secs(5));
    assert!(
        gone <= Duration::from_secs(2),
        "route to h3 gone after {gone:?}"
    );
    let up = tb.restart_agent(3, HostMode::PodnetDirect);
    until_route(&tb, 1, &route3, true, Duration::from_secs(5));
    let back = up.elapsed();
    eprintln!("route to h3: gone {gone:?} after it left, back {back:?} after it was up");
    assert!(
        back <= Duration::from_secs(2),
        "route to h3 back after {back:?}"
    );
    assert!(tb.ping(&p1, tb.pod(3, 1).ip, 2).success());
}

fn cross_subnet(encap: Encap) {
    if !e2e_ready() {
        return;
    }
    require_tools(&["tcpdump"]);
    // Hosts 1, 2 on 198.18.0.0/24; 3, 4 on 198.18.1.0/24.
    let tb = TestbedBuilder::new(&format!("xsub{}", encap.name()))
        .hosts(4)
        .pods_per_host(1)
        .subnets(2)
        .mode(HostMode::Podnet(encap))
        .peers(Peers::Control)
        .agent_args(&["--cross-subnet"])
        .build();
    let pods: Vec<_> = (1..=4).map(|n| tb.pod(n, 1).clone()).collect();
    assert_eq!(tb.host(3).underlay_ip, Ipv4Addr::new(198, 18, 1, 3));
    let table = routes(&tb, 1);
    assert!(table.contains(&direct_route(&tb, 2)), "{table}");
    for k in [3, 4] {
        let cidr = tb.host(k).pod_cidr.unwrap().to_string();
        assert!(!table.contains(&format!("{cidr} via")), "{table}");
    }
    let pcap = tb.path("xsub.pcap");
    let cap = Capture::start(
        &tb.ul(),
        "any",
        "icmp or udp port 4789 or ip proto 4",
        60,
        &pcap,
    );
    for (a, b) in [(0, 1), (1, 0), (0, 2), (3, 1)] {
        let out = tb.ping(&pods[a], pods[b].ip, 2);
        let s = ping_summary(&out.stdout).unwrap_or_else(|| panic!("{}", out.combined()));
        assert_eq!(s.received, 2, "{} -> {}", pods[a].ns, pods[b].ip);
    }
    let text = capture::tcpdump_text(&cap.finish(), false);
    let lines = packet_lines(&text);
    let plain = |a: usize, b: usize| {
        let req = format!("IP {} > {}: ICMP echo request", pods[a].ip, pods[b].ip);
        // An IP-in-IP packet prints both headers on one line: plain has no underlay address.
        lines
            .iter()
            .any(|l| l.contains(&req) && !l.contains("198.18."))
    };
    // Same subnet: plain on the wire. Across: only inside the tunnel.
    assert!(plain(0, 1) && plain(1, 0), "{text}");
    assert!(!plain(0, 2) && !plain(3, 1), "{text}");
    let tunnelled = match encap {
        Encap::Vxlan => "> 198.18.1.3.4789: VXLAN".to_string(),
        Encap::Ipip => "IP 198.18.0.1 > 198.18.1.3: IP ".to_string(),
        Encap::Wireguard | Encap::None => unreachable!("--cross-subnet is for ipip and vxlan"),
    };
    assert!(text.contains(&tunnelled), "{text}");
    // why, for a pod on each side.
    let near = agent(&tb, 1, &["why", &pods[1].ip.to_string()]).stdout;
    assert!(
        near.contains("the kernel routes it directly via 198.18.0.2"),
        "{near}"
    );
    let far = agent(&tb, 1, &["why", &pods[2].ip.to_string()]).stdout;
    assert!(
        far.contains(&format!("encapsulated with {}", encap.name())),
        "{far}"
    );
    let routes_text = agent(&tb, 4, &["routes"]).stdout;
    assert!(routes_text.contains("direct route"), "{routes_text}");
}

#[test]
fn vxlan_cross_subnet_is_plain_within_a_subnet_and_tunnelled_across() {
    cross_subnet(Encap::Vxlan);
}

#[test]
fn ipip_cross_subnet_is_plain_within_a_subnet_and_tunnelled_across() {
    cross_subnet(Encap::Ipip);
}

#[test]
fn none_refuses_peers_on_other_subnets_and_reconciles_after_sigkill() {
    if !e2e_ready() {
        return;
    }
    // Static mode: a clear error before anything is set up.
    let bare = TestbedBuilder::new("nonestatic")
        .hosts(2)
        .pods_per_host(1)
        .subnets(2)
        .mode(HostMode::Bare)
        .peers(Peers::Static)
        .no_wait()
        .build();
    let args = bare.agent_args_of(1, HostMode::PodnetDirect);
    let at = args.iter().position(|a| a == "--static-peer").unwrap();
    assert_eq!(args[at + 1], "10.244.2.0/24=198.18.1.2", "{args:?}");
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = agent(&bare, 1, &argv);
    assert!(!out.success());
    assert!(
        out.stderr
            .contains("cannot be reached: 198.18.1.2 is not on the underlay subnet 198.18.0.0/24"),
        "{}",
        out.combined()
    );
    assert!(!must(Some(&bare.host(1).ns), &["ip", "link"])
        .stdout
        .contains("tunl0"));

    // Control mode: hosts 1, 2 on one subnet, 3 on the other. The far peer is refused:
    // logged, counted, host unreachable, and why names the reason.
    let mut tb = TestbedBuilder::new("nonectl")
        .hosts(3)
        .pods_per_host(1)
        .subnets(2)
        .mode(HostMode::PodnetDirect)
        .peers(Peers::Control)
        .no_wait()
        .build();
    let (p1, p2, p3) = (
        tb.pod(1, 1).clone(),
        tb.pod(2, 1).clone(),
        tb.pod(3, 1).clone(),
    );
    wait_for("h1 -> h2", Duration::from_secs(20), || {
        if tb.ping(&p1, p2.ip, 1).success() {
            Ok(())
        } else {
            Err(routes(&tb, 1))
        }
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let out = wait_for("unreachable", Duration::from_secs(10), || {
        let out = tb.ping(&p1, p3.ip, 1);
        if out.combined().contains("Destination Host Unreachable") {
            Ok(out)
        } else {
            Err(out.combined())
        }
    })
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(!out.success());
    assert!(tb.drops(1, "peer_encap") >= 1.0);
    let why = agent(&tb, 1, &["why", &p3.ip.to_string()]).stdout;
    assert!(
        why.contains("drop (peer_encap)")
            && why.contains("198.18.1.3 is not on the underlay subnet"),
        "{why}"
    );
    let log = tb.log("agent-h1");
    assert_eq!(log.matches("peer h3 receives none").count(), 1, "{log}");

    // SIGKILL leaves the direct routes behind; h2 leaves while h1 is dead; the restarted h1
    // removes the stale route at once and keeps the others right.
    let route2 = direct_route(&tb, 2);
    tb.kill9("agent-h1");
    assert!(routes(&tb, 1).contains(&route2), "{}", routes(&tb, 1));
    tb.stop("agent-h2");
    tb.restart_agent(1, HostMode::PodnetDirect);
    let stale = until_route(&tb, 1, &route2, false, Duration::from_secs(5));
    eprintln!("stale route to h2 gone {stale:?} after the restarted agent was up");
    assert!(!routes(&tb, 1).contains("proto 222"), "{}", routes(&tb, 1));
    tb.restart_agent(2, HostMode::PodnetDirect);
    until_route(&tb, 1, &route2, true, Duration::from_secs(10));
    assert!(tb.ping(&p1, p2.ip, 2).success());
}

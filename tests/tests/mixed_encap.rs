//! Each peer is sent the encapsulation it receives. A cluster of IP-in-IP and VXLAN
//! hosts (through the control service) carries ping and TCP between every pair, each pair on
//! the receiver's encapsulation; a node restarted on another encapsulation is re-learned
//! without touching the others; a peer whose encapsulation cannot be sent gets ICMP host
//! unreachable, a named drop reason, and `why` says so.

use std::time::Duration;

use podnet_tests::capture::{self, Capture};
use podnet_tests::http;
use podnet_tests::parse::ping_summary;
use podnet_tests::{
    e2e_ready, podnet_bin, require_tools, run, Encap, HostMode, Peers, Testbed, TestbedBuilder,
};

/// Hosts 1 (IP-in-IP), 2 and 3 (VXLAN), one pod each, podnet-control in host 1; `build`
/// waits until every pod pings every other pod.
fn mixed(name: &str) -> Testbed {
    TestbedBuilder::new(name)
        .hosts(3)
        .pods_per_host(1)
        .mode(HostMode::Podnet(Encap::Vxlan))
        .host_mode(1, HostMode::Podnet(Encap::Ipip))
        .peers(Peers::Control)
        .build()
}

fn agent(tb: &Testbed, n: u8, args: &[&str]) -> podnet_tests::Output {
    let bin = podnet_bin("podnet-agent");
    let mut argv = vec![bin.to_str().expect("utf-8 path")];
    argv.extend_from_slice(args);
    run(Some(&tb.host(n).ns), &argv, Duration::from_secs(20)).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn ipip_and_vxlan_hosts_reach_each_other_on_the_receivers_encapsulation() {
    if !e2e_ready() {
        return;
    }
    require_tools(&["tcpdump", "iperf3"]);
    let mut tb = mixed("mixedencap");
    let pods: Vec<_> = (1..=3).map(|n| tb.pod(n, 1).clone()).collect();
    // Every pair, both ways, on the underlay: to host 1 in IP-in-IP, to 2 and 3 in VXLAN.
    let pcap = tb.path("mixed.pcap");
    let cap = Capture::start(&tb.ul(), "br0", "ip proto 4 or udp port 4789", 200, &pcap);
    for a in &pods {
        for b in &pods {
            if a.host != b.host {
                let out = tb.ping(a, b.ip, 2);
                let s = ping_summary(&out.stdout).unwrap_or_else(|| panic!("{}", out.combined()));
                assert_eq!(s.received, 2, "{} -> {}: {}", a.ns, b.ip, out.combined());
            }
        }
    }
    let text = capture::tcpdump_text(&cap.finish(), false);
    let seen = |from: u8, to: u8, vxlan: bool| {
        text.lines().any(|l| {
            if vxlan {
                l.contains(&format!("IP 198.18.0.{from}."))
                    && l.contains(&format!("> 198.18.0.{to}.4789: VXLAN"))
            } else {
                l.contains(&format!("IP 198.18.0.{from} > 198.18.0.{to}: IP "))
            }
        })
    };
    for (from, to) in [(2, 1), (3, 1)] {
        assert!(seen(from, to, false), "no IP-in-IP {from} -> {to}:\n{text}");
        assert!(!seen(from, to, true), "VXLAN {from} -> {to}:\n{text}");
    }
    for (from, to) in [(1, 2), (1, 3), (2, 3), (3, 2)] {
        assert!(seen(from, to, true), "no VXLAN {from} -> {to}:\n{text}");
        assert!(!seen(from, to, false), "IP-in-IP {from} -> {to}:\n{text}");
    }
    // TCP both ways across the encapsulations, and between the two VXLAN hosts.
    for (a, b) in [(0, 1), (1, 0), (2, 0), (1, 2)] {
        let (from, to) = (pods[a].clone(), pods[b].clone());
        let r = tb
            .iperf(&from, &to, 2)
            .unwrap_or_else(|e| panic!("iperf3 {} -> {}: {e}", from.ns, to.ip));
        eprintln!(
            "{} -> {}: {:.2} Gbit/s, {} retransmits",
            from.ns,
            to.ns,
            r.received_bps / 1e9,
            r.retransmits
        );
        assert!(r.received_bps > 0.1e9, "{} -> {}: {r:?}", from.ns, to.ns);
    }
    // status and routes name each peer's encapsulation.
    let status = agent(&tb, 1, &["status"]).stdout;
    let h2 = status.lines().find(|l| l.starts_with("h2 ")).unwrap_or("");
    assert!(h2.ends_with("vxlan"), "{status}");
    let routes = agent(&tb, 2, &["routes"]).stdout;
    let h1 = routes.lines().find(|l| l.contains(" h1 ")).unwrap_or("");
    assert!(h1.ends_with("ipip"), "{routes}");
    // Host 1's larger tunl0 MTU (1480) meets host 2's VXLAN (1450): frag-needed carries 1450.
    let big = run(
        Some(&pods[0].ns),
        &[
            "ping",
            "-n",
            "-c",
            "1",
            "-W",
            "1",
            "-M",
            "do",
            "-s",
            "1440",
            &pods[1].ip.to_string(),
        ],
        Duration::from_secs(5),
    )
    .unwrap();
    assert!(
        big.combined().contains("mtu = 1450") || big.combined().contains("mtu=1450"),
        "{}",
        big.combined()
    );
}

#[test]
fn a_node_restarted_on_another_encapsulation_is_relearned_at_once() {
    if !e2e_ready() {
        return;
    }
    let mut tb = mixed("migrate");
    let others: Vec<u32> = [2, 3]
        .iter()
        .map(|n| tb.proc(&format!("agent-h{n}")).pid())
        .collect();
    let (h1p, h2p) = (tb.pod(1, 1).clone(), tb.pod(2, 1).clone());
    // Host 1 moves from IP-in-IP to VXLAN.
    tb.stop("agent-h1");
    let registered = tb.restart_agent(1, HostMode::Podnet(Encap::Vxlan));
    let back = podnet_tests::wait_for("ping h2 -> h1", Duration::from_secs(10), || {
        let out = run(
            Some(&h2p.ns),
            &["ping", "-n", "-c", "1", "-W", "0.2", &h1p.ip.to_string()],
            Duration::from_secs(3),
        )
        .unwrap();
        if out.success() {
            Ok(registered.elapsed())
        } else {
            Err(out.combined())
        }
    })
    .unwrap_or_else(|e| panic!("no ping to the migrated node: {e}"));
    eprintln!("pings to h1 back {back:?} after it was up on VXLAN");
    assert!(back <= Duration::from_secs(2), "{back:?}");
    // Both ways, and nobody else restarted.
    let out = tb.ping(&h1p, h2p.ip, 2);
    assert!(out.success(), "{}", out.combined());
    for (n, pid) in [2u8, 3].iter().zip(&others) {
        let name = format!("agent-h{n}");
        assert_eq!(tb.proc(&name).pid(), *pid);
        assert!(tb.proc(&name).is_running(), "{name} stopped");
    }
    let routes = agent(&tb, 2, &["routes"]).stdout;
    let h1 = routes.lines().find(|l| l.contains(" h1 ")).unwrap_or("");
    assert!(h1.ends_with("vxlan"), "{routes}");
}

#[test]
fn a_peer_whose_encapsulation_cannot_be_sent_gets_unreachable_and_a_reason() {
    if !e2e_ready() {
        return;
    }
    let tb = mixed("peerencap");
    // A WireGuard node registers with the control service: these VXLAN agents have no key and
    // send nothing encrypted, so they cannot reach it.
    let body = r#"{"underlay_ip":"198.18.0.9","encap":"wireguard","wireguard_public_key":"AQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyA="}"#;
    let r = http::request(
        &tb.host(1).ns,
        tb.control_addr(),
        "PUT",
        "/v1/nodes/h9",
        &[],
        Some(body),
        Duration::from_secs(5),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status, 200, "{}", r.body);
    let cidr: ipnet::Ipv4Net = r.json().unwrap()["pod_cidr"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let target = std::net::Ipv4Addr::from(u32::from(cidr.network()) + 2);
    let from = tb.pod(2, 1).clone();
    // Host 2 learns it through the watch; then pings get host unreachable, not silence.
    let out = podnet_tests::wait_for("unreachable", Duration::from_secs(10), || {
        let out = tb.ping(&from, target, 2);
        if out.combined().contains("Destination Host Unreachable") {
            Ok(out)
        } else {
            Err(out.combined())
        }
    })
    .unwrap_or_else(|e| panic!("no host unreachable for {target}: {e}"));
    let s = ping_summary(&out.stdout).unwrap();
    assert_eq!(s.received, 0, "{}", out.combined());
    assert!(tb.drops(2, "peer_encap") >= 1.0, "{}", tb.metrics(2));
    let why = agent(&tb, 2, &["why", &target.to_string()]).stdout;
    assert!(
        why.contains("drop (peer_encap)") && why.contains("which receives wireguard"),
        "{why}"
    );
    // A VNI is VXLAN's alone: not printed for the WireGuard peer by this VXLAN node.
    assert!(
        why.contains("encap:       wireguard, overlay MTU") && !why.contains("vni"),
        "{why}"
    );
    let routes = agent(&tb, 2, &["routes"]).stdout;
    let h9 = routes.lines().find(|l| l.contains(" h9 ")).unwrap_or("");
    assert!(
        h9.ends_with("wireguard") && !routes.contains("vni"),
        "{routes}"
    );
    let status = agent(&tb, 2, &["status"]).stdout;
    let h9 = status.lines().find(|l| l.starts_with("h9 ")).unwrap_or("");
    assert!(h9.contains("wireguard (unreachable:"), "{status}");
    // Logged once for the peer, not per packet.
    let log = tb.log("agent-h2");
    assert_eq!(
        log.matches("peer h9 receives wireguard").count(),
        1,
        "{log}"
    );
    assert!(tb.drops(2, "peer_encap") >= 1.0);
}

//! Pod egress: pods reach what is outside the cluster CIDR through the agent's nftables
//! masquerade, on a 3-host VXLAN testbed through podnet-control whose pods the podnet CNI
//! plugin made, with an "outside" host on the underlay that has no route to any pod CIDR.
//!
//! The outside host sees the node's underlay address, a pod reaches another node's underlay
//! address, pod-to-pod packets keep their pod addresses; the table is there while the agent
//! runs, replaced after a SIGKILL and restart, gone after a clean stop; with --no-masquerade
//! there is no table and the outside host sees pod addresses. (A host without `nft`:
//! `errors.rs`.)

use std::net::Ipv4Addr;
use std::time::Duration;

use podnet_tests::capture::{tcpdump_text, Capture};
use podnet_tests::testbed::underlay_ip;
use podnet_tests::{
    e2e_ready, podnet_bin, require_tools, run, Encap, HostMode, Peers, Pod, Testbed, TestbedBuilder,
};

const MODE: HostMode = HostMode::Podnet(Encap::Vxlan);
const OUTSIDE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 200);

fn testbed(name: &str, agent_args: &[&str]) -> (Testbed, Pod) {
    let mut tb = TestbedBuilder::new(name)
        .hosts(3)
        .pods_per_host(1)
        .mode(MODE)
        .peers(Peers::Control)
        .cni()
        .agent_args(agent_args)
        .build();
    let ns = tb.add_underlay_node("out", OUTSIDE);
    let outside = Pod {
        ns,
        ip: OUTSIDE,
        host: 0,
    };
    (tb, outside)
}

/// `nft list table ip podnet` in host n: `None` when there is no such table.
fn egress_table(tb: &Testbed, n: u8) -> Option<String> {
    let out = run(
        Some(&tb.host(n).ns),
        &["nft", "list", "table", "ip", "podnet"],
        Duration::from_secs(10),
    )
    .expect("nft");
    out.success().then_some(out.stdout)
}

/// Sources of the ICMP echo requests a capture saw.
fn echo_sources(pcap: &std::path::Path) -> Vec<String> {
    tcpdump_text(pcap, false)
        .lines()
        .filter(|l| l.contains("ICMP echo request"))
        .filter_map(|l| l.split(" IP ").nth(1))
        .filter_map(|l| l.split(" > ").next())
        .map(str::to_string)
        .collect()
}

fn agent_status(tb: &Testbed, n: u8) -> String {
    let bin = podnet_bin("podnet-agent");
    let out = run(
        Some(&tb.host(n).ns),
        &[bin.to_str().unwrap(), "status"],
        Duration::from_secs(10),
    )
    .expect("status");
    assert!(out.success(), "{}", out.combined());
    out.stdout
}

#[test]
fn pods_reach_the_outside_as_their_node_and_each_other_as_themselves() {
    if !e2e_ready() {
        return;
    }
    require_tools(&["nft", "tcpdump", "iperf3"]);
    let (mut tb, outside) = testbed("egress", &[]);
    let p1 = tb.pod(1, 1).clone();

    // The outside host sees the node's underlay address.
    let pcap = tb.path("outside.pcap");
    let cap = Capture::start(&outside.ns, "eth0", "icmp", 20, &pcap);
    let ping = tb.ping(&p1, OUTSIDE, 3);
    assert!(ping.success(), "pod -> outside: {}", ping.combined());
    let sources = echo_sources(&cap.finish());
    assert!(!sources.is_empty(), "no echo request seen outside");
    assert!(
        sources.iter().all(|s| *s == underlay_ip(1).to_string()),
        "outside saw {sources:?}, not only h1's underlay address"
    );
    let result = tb
        .iperf(&p1, &outside, 2)
        .unwrap_or_else(|e| panic!("iperf3 pod -> outside: {e}"));
    assert!(result.received_bytes > 0, "{result:?}");

    // Another node's underlay address answers too.
    let ping = tb.ping(&p1, underlay_ip(2), 3);
    assert!(ping.success(), "pod -> h2's underlay: {}", ping.combined());

    // Pod to pod keeps the pod address: tunl0 of h2 sees h1's pod as the source.
    let p2 = tb.pod(2, 1).clone();
    let pcap = tb.path("tunl0.pcap");
    let cap = Capture::start(&tb.host(2).ns, "tunl0", "icmp", 20, &pcap);
    let ping = tb.ping(&p1, p2.ip, 3);
    assert!(ping.success(), "pod -> pod: {}", ping.combined());
    let sources = echo_sources(&cap.finish());
    assert!(
        !sources.is_empty() && sources.iter().all(|s| *s == p1.ip.to_string()),
        "tunl0 saw {sources:?}"
    );

    // The table, in status, while the agent runs.
    let table = egress_table(&tb, 1).expect("no table ip podnet while the agent runs");
    let pod_cidr = p1.ip.to_string();
    let pod_net = format!("{}.0/24", &pod_cidr[..pod_cidr.rfind('.').unwrap()]);
    assert!(
        table.contains(&format!(
            "ip saddr {pod_net} ip daddr != 10.244.0.0/16 masquerade"
        )),
        "{table}"
    );
    let status = agent_status(&tb, 1);
    assert!(
        status.contains(&format!("egress:      masquerade {pod_net}")),
        "{status}"
    );

    // SIGKILL leaves it; the restarted agent replaces it (one rule, not two); a clean stop
    // removes it.
    tb.kill9("agent-h1");
    assert!(egress_table(&tb, 1).is_some(), "gone after SIGKILL?");
    run(
        Some(&tb.host(1).ns),
        &[
            "nft",
            "add",
            "rule",
            "ip",
            "podnet",
            "postrouting",
            "counter",
        ],
        Duration::from_secs(10),
    )
    .expect("nft add rule");
    tb.restart_agent(1, MODE);
    let table = egress_table(&tb, 1).expect("table after the restart");
    assert_eq!(table.matches("masquerade").count(), 1, "{table}");
    assert!(!table.contains("counter"), "leftover rule kept: {table}");
    assert!(tb.ping(&p1, OUTSIDE, 2).success());
    tb.stop("agent-h1");
    assert_eq!(egress_table(&tb, 1), None, "table left after a clean stop");
}

#[test]
fn the_egress_table_is_put_back_when_removed() {
    if !e2e_ready() {
        return;
    }
    require_tools(&["nft"]);
    let (tb, outside) = testbed("egressrepair", &[]);
    let p1 = tb.pod(1, 1).clone();
    run(
        Some(&tb.host(1).ns),
        &["nft", "delete", "table", "ip", "podnet"],
        Duration::from_secs(10),
    )
    .expect("nft delete");
    let back = podnet_tests::wait_for("the table back", Duration::from_secs(10), || {
        egress_table(&tb, 1).ok_or_else(|| "absent".to_string())
    });
    assert!(back.is_ok(), "not repaired:\n{}", tb.log("agent-h1"));
    assert!(
        tb.log("agent-h1")
            .contains("the nftables table ip podnet was removed or changed; replaced"),
        "{}",
        tb.log("agent-h1")
    );
    let m = tb.metric(1, "podnet_agent_repairs_total", &[("what", "masquerade")]);
    assert_eq!(m, 1.0);
    assert!(tb.ping(&p1, outside.ip, 2).success());
}

#[test]
fn without_masquerade_there_is_no_table_and_the_outside_sees_pod_addresses() {
    if !e2e_ready() {
        return;
    }
    require_tools(&["nft", "tcpdump"]);
    let (tb, outside) = testbed("noegress", &["--no-masquerade"]);
    let p1 = tb.pod(1, 1).clone();
    assert_eq!(egress_table(&tb, 1), None);
    assert!(agent_status(&tb, 1).contains("egress:      off (--no-masquerade)"));
    let pcap = tb.path("outside.pcap");
    let cap = Capture::start(&outside.ns, "eth0", "icmp", 20, &pcap);
    // No reply: the outside host has no route back to the pod.
    let ping = tb.ping(&p1, OUTSIDE, 2);
    assert!(
        !ping.success(),
        "a reply without a route back? {}",
        ping.stdout
    );
    let sources = echo_sources(&cap.finish());
    assert!(
        !sources.is_empty() && sources.iter().all(|s| *s == p1.ip.to_string()),
        "outside saw {sources:?}"
    );
}

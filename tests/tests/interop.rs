//! Wire compatibility with Linux. Host 1 runs the kernel's own vxlan device (static neighbour +
//! FDB entries per DESIGN.md's VTEP MAC rule) with its default offloads, hosts 2 and 3 run
//! podnet VXLAN with static peers. Pods ping, and carry TCP and UDP, in both directions.
//!
//! The kernel's vxlan device leaves inner TCP/UDP checksums to checksum offload (the field
//! holds only the pseudo-header sum), so these tests fail unless podnet completes them on
//! receive.

use podnet_tests::capture::{self, Capture};
use podnet_tests::parse::{iperf3_udp_json, ping_summary};
use podnet_tests::{
    e2e_ready, require_tools, run, Encap, HostMode, Peers, Pod, Testbed, TestbedBuilder,
};
use std::time::Duration;

/// Which data path the podnet agents use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    Offload,
    NoOffload,
}

fn mixed(name: &str, path: Path) -> Testbed {
    let mut b = TestbedBuilder::new(name)
        .hosts(3)
        .pods_per_host(2)
        .mode(HostMode::Podnet(Encap::Vxlan))
        .host_mode(1, HostMode::KernelVxlan)
        .peers(Peers::Static);
    if path == Path::NoOffload {
        b = b.agent_args(&["--no-offload", "--tun-queues", "1"]);
    }
    let tb = b.build();
    // The kernel host keeps its default offloads: the inner checksums it sends are partial.
    let out = run(
        Some(&tb.host(1).ns),
        &["ethtool", "-k", "vxlan0"],
        Duration::from_secs(10),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        out.stdout.contains("tx-checksum-ip-generic: on"),
        "vxlan0 offloads: {}",
        out.stdout
    );
    tb
}

#[test]
fn kernel_vxlan_host_and_podnet_vxlan_hosts_ping_both_ways() {
    if !e2e_ready() {
        return;
    }
    require_tools(&["tcpdump", "ethtool"]);
    let tb = mixed("interop", Path::Offload);
    let kernel = tb.pod(1, 1).clone();
    for podnet in [tb.pod(2, 1).clone(), tb.pod(3, 2).clone()] {
        for (from, to) in [(&kernel, &podnet), (&podnet, &kernel)] {
            let out = tb.ping(from, to.ip, 3);
            let s = ping_summary(&out.stdout).unwrap_or_else(|| panic!("{}", out.combined()));
            assert_eq!(
                s.received,
                3,
                "{} -> {}: {}",
                from.ns,
                to.ip,
                out.combined()
            );
        }
    }
    // The kernel really carries it as VXLAN (not some other path): capture on the underlay.
    let pcap = tb.path("interop.pcap");
    let cap = Capture::start(&tb.ul(), "br0", "udp port 4789", 4, &pcap);
    let dst = tb.pod(2, 2).ip;
    assert!(tb.ping(&kernel, dst, 2).success());
    let text = capture::tcpdump_text(&cap.finish(), false);
    assert!(
        text.contains("198.18.0.1.") && text.contains("> 198.18.0.2.4789: VXLAN"),
        "{text}"
    );
    assert!(
        text.contains("> 198.18.0.1.4789: VXLAN, flags [I] (0x08), vni 1"),
        "{text}"
    );
}

/// The receiving pod's kernel counters of segments and datagrams it dropped for a bad checksum.
fn csum_errors(pod: &Pod) -> (u64, u64) {
    let out = run(
        Some(&pod.ns),
        &["nstat", "-asz", "TcpInCsumErrors", "UdpInCsumErrors"],
        Duration::from_secs(10),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let value = |name: &str| {
        out.stdout
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in nstat output: {}", out.stdout))
    };
    (value("TcpInCsumErrors"), value("UdpInCsumErrors"))
}

/// TCP (iperf3, both directions, at least 1 Gbit/s with offload) and UDP between a kernel-VXLAN pod and
/// podnet pods. tshark on the receiving podnet pod's side checks the inner checksums: without
/// offload podnet computes them, so every one verifies; with offload it hands them to the
/// kernel as partial (`VIRTIO_NET_HDR_F_NEEDS_CSUM`), as the kernel does across veth, so the
/// field holds the pseudo-header sum and nothing else may be wrong.
fn tcp_and_udp(name: &str, path: Path) {
    if !e2e_ready() {
        return;
    }
    require_tools(&["iperf3", "tcpdump", "tshark", "ethtool", "nstat"]);
    let mut tb = mixed(name, path);
    let kernel = tb.pod(1, 1).clone();
    let (p2, p3) = (tb.pod(2, 1).clone(), tb.pod(3, 2).clone());
    let before = csum_errors(&p2);
    let pcap = tb.path("receiving-pod.pcap");
    // What arrives from the kernel pod (p2's own segments leave partial: its veth offloads).
    let filter = format!("tcp and src host {}", kernel.ip);
    let cap = Capture::start(&p2.ns, "eth0", &filter, 2000, &pcap);
    let mut rates = Vec::new();
    for (from, to) in [(&kernel, &p2), (&p3, &kernel), (&kernel, &p3)] {
        let r = tb
            .iperf(from, to, 3)
            .unwrap_or_else(|e| panic!("iperf3 {} -> {}: {e}", from.ns, to.ip));
        eprintln!(
            "{path:?} {} -> {}: {:.2} Gbit/s, {} retransmits",
            from.ns,
            to.ns,
            r.received_bps / 1e9,
            r.retransmits
        );
        rates.push((format!("{} -> {}", from.ns, to.ns), r.received_bps));
    }
    let pcap = cap.finish();
    // The offload path is held to 1 Gbit/s (4-11 measured here with debug agents); the
    // per-packet path only to a rate no stalled connection reaches: with one worker on this
    // shared 2-core machine it measured 0.18-0.31 Gbit/s in a CI run (0.65-1.05 on a quiet
    // one). Its speed is the benchmarks' to show, not a timed test's.
    let floor = match path {
        Path::Offload => 1e9,
        Path::NoOffload => 0.05e9,
    };
    for (pair, bps) in &rates {
        assert!(
            *bps >= floor,
            "{pair}: {:.2} Gbit/s < {:.1}",
            bps / 1e9,
            floor / 1e9
        );
    }
    let tally = capture::tcp_checksums(&pcap);
    assert!(
        tally.good + tally.partial >= 100,
        "too few TCP segments captured in the receiving pod: {tally:?}"
    );
    assert_eq!(
        tally.bad,
        0,
        "invalid inner TCP checksums in the receiving pod: {tally:?}\n{}",
        capture::bad_tcp_checksums(&pcap)
    );
    if path == Path::NoOffload {
        assert_eq!(
            tally.partial, 0,
            "without offload podnet must compute every checksum: {tally:?}"
        );
    }

    // UDP from the kernel pod: with the checksum left partial the pod's kernel would drop
    // every datagram (UdpInCsumErrors).
    let name = format!("iperf3-udp-{}", p2.ns);
    tb.start_iperf_server(&name, &p2.ns.clone())
        .unwrap_or_else(|e| panic!("{e}"));
    let ip = p2.ip.to_string();
    let argv = [
        "iperf3", "-c", &ip, "-u", "-b", "50M", "-l", "1200", "-t", "2", "-J",
    ];
    let out =
        run(Some(&kernel.ns), &argv, Duration::from_secs(20)).unwrap_or_else(|e| panic!("{e}"));
    tb.stop(&name);
    let udp = iperf3_udp_json(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", out.stderr));
    eprintln!("{path:?} UDP kernel -> podnet: {udp:?}");
    assert!(udp.packets >= 1000, "{udp:?}");
    assert!(
        udp.lost_packets * 10 < udp.packets,
        "UDP lost {} of {} datagrams",
        udp.lost_packets,
        udp.packets
    );
    let after = csum_errors(&p2);
    assert_eq!(
        after, before,
        "the receiving pod dropped segments for bad checksums (TcpInCsumErrors, UdpInCsumErrors)"
    );
}

#[test]
fn kernel_vxlan_and_podnet_carry_tcp_and_udp_both_ways() {
    tcp_and_udp("interoptcp", Path::Offload);
}

#[test]
fn kernel_vxlan_and_podnet_carry_tcp_and_udp_both_ways_no_offload() {
    tcp_and_udp("interoptcpnooff", Path::NoOffload);
}

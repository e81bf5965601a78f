//! Self-tests of the harness and of `scripts/testbed` on the baselines that need no podnet
//! (kernel VXLAN, plain routing): if these pass, a failing podnet test is podnet's fault.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::time::Duration;

use podnet_tests::capture::{self, Capture};
use podnet_tests::parse::{frag_needed_mtu, ping_summary};
use podnet_tests::{e2e_ready, must, require_tools, run, HostMode, TestbedBuilder};

fn netns_exists(name: &str) -> bool {
    Path::new("/run/netns").join(name).exists()
}

#[test]
fn kernel_vxlan_testbed_pings_captures_and_checks_checksums() {
    if !e2e_ready() {
        return;
    }
    require_tools(&["tcpdump", "tshark", "iperf3", "ethtool"]);
    let mut tb = TestbedBuilder::new("kvx")
        .hosts(2)
        .pods_per_host(2)
        .mode(HostMode::KernelVxlan)
        .build();
    let (a, b) = (tb.pod(1, 1).clone(), tb.pod(2, 1).clone());

    // The underlay carries VXLAN that tcpdump decodes, with the inner ICMP between pod addresses.
    let pcap = tb.path("ul-icmp.pcap");
    let cap = Capture::start(&tb.ul(), "br0", "udp port 4789", 4, &pcap);
    let out = tb.ping(&a, b.ip, 2);
    assert!(out.success(), "{}", out.combined());
    let text = capture::tcpdump_text(&cap.finish(), false);
    assert!(text.contains("VXLAN, flags [I] (0x08), vni 1"), "{text}");
    assert!(
        text.contains(&format!("{} > {}: ICMP echo request", a.ip, b.ip)),
        "{text}"
    );

    // DF ping at the overlay MTU passes; one byte more gets frag-needed carrying the MTU.
    let at_mtu = run(
        Some(&a.ns),
        &[
            "ping",
            "-n",
            "-c1",
            "-W1",
            "-M",
            "do",
            "-s",
            "1422",
            &b.ip.to_string(),
        ],
        Duration::from_secs(5),
    )
    .unwrap();
    assert!(at_mtu.success(), "{}", at_mtu.combined());
    let over = run(
        Some(&a.ns),
        &[
            "ping",
            "-n",
            "-c1",
            "-W1",
            "-M",
            "do",
            "-s",
            "1423",
            &b.ip.to_string(),
        ],
        Duration::from_secs(5),
    )
    .unwrap();
    assert!(!over.success());
    assert_eq!(
        frag_needed_mtu(&over.combined()),
        Some(1450),
        "{}",
        over.combined()
    );

    // With its default offloads the kernel's vxlan device sends inner TCP checksums partial
    // (only the pseudo-header sum): the tally must tell them apart from wrong ones, or the
    // interop tests could not see what podnet has to complete.
    let pcap = tb.path("ul-tcp-partial.pcap");
    let cap = Capture::start(&tb.ul(), "br0", "udp port 4789", 3000, &pcap);
    let r = tb.iperf(&a, &b, 1).unwrap();
    assert!(r.received_bytes > 0, "{r:?}");
    let tally = capture::tcp_checksums(&cap.finish());
    assert!(tally.partial >= 100, "{tally:?}");
    assert_eq!(tally.bad, 0, "{tally:?}");

    // With checksum offload off in the pods the kernel fills every TCP checksum, so tshark must
    // find them all valid inside the VXLAN packets (this validates the checksum pipeline the
    // podnet tests rely on).
    for p in [&a, &b] {
        must(Some(&p.ns), &["ethtool", "-K", "eth0", "tx", "off"]);
    }
    let pcap = tb.path("ul-tcp.pcap");
    let cap = Capture::start(&tb.ul(), "br0", "udp port 4789", 3000, &pcap);
    let r = tb.iperf(&a, &b, 2).unwrap();
    assert!(r.received_bps > 0.0 && r.received_bytes > 0, "{r:?}");
    let tally = capture::tcp_checksums(&cap.finish());
    assert!(tally.good >= 100, "{tally:?}");
    assert_eq!((tally.bad, tally.partial), (0, 0), "{tally:?}");
    assert_eq!(
        tally.ip_bad, 0,
        "invalid inner IPv4 header checksums: {tally:?}"
    );
    assert!(tally.ip_good >= 100, "{tally:?}");
}

#[test]
fn plain_routing_testbed_forwards_and_reports_unreachable() {
    if !e2e_ready() {
        return;
    }
    require_tools(&["iperf3"]);
    let mut tb = TestbedBuilder::new("plain")
        .hosts(3)
        .pods_per_host(1)
        .mode(HostMode::Plain)
        .build();
    assert!(tb.mesh_failures().is_empty());
    let (a, c) = (tb.pod(1, 1).clone(), tb.pod(3, 1).clone());
    let r = tb.iperf(&a, &c, 1).unwrap();
    assert!(r.received_bps > 0.0, "{r:?}");
    // A pod CIDR no host routes: host 1 answers with an ICMP error (no default route there).
    let out = tb.ping(&a, "10.244.200.1".parse().unwrap(), 1);
    let s = ping_summary(&out.stdout).unwrap();
    assert_eq!((s.received, s.errors), (0, 1), "{}", out.combined());
    assert!(out.elapsed < Duration::from_secs(1), "{:?}", out.elapsed);
}

#[test]
fn teardown_happens_even_when_the_test_panics() {
    if !e2e_ready() {
        return;
    }
    let mut seen = (String::new(), 0u32);
    let result = catch_unwind(AssertUnwindSafe(|| {
        let mut tb = TestbedBuilder::new("panic")
            .hosts(2)
            .pods_per_host(1)
            .mode(HostMode::Bare)
            .no_wait()
            .build();
        let ns = tb.host(1).ns.clone();
        tb.start("sleeper", &ns, &["sleep", "60"]);
        seen = (tb.prefix.clone(), tb.proc("sleeper").pid());
        assert!(netns_exists(&format!("{}-h2-p1", tb.prefix)));
        panic!("deliberate");
    }));
    assert!(result.is_err());
    let (prefix, pid) = seen;
    for suffix in ["ul", "h1", "h2", "h1-p1", "h2-p1"] {
        assert!(
            !netns_exists(&format!("{prefix}-{suffix}")),
            "{prefix}-{suffix} left behind"
        );
    }
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "process {pid} still running"
    );
}

#[test]
fn commands_are_bounded_by_their_timeout() {
    let start = std::time::Instant::now();
    let r = run(None, &["sleep", "5"], Duration::from_millis(200));
    assert!(r.unwrap_err().contains("still running"));
    assert!(start.elapsed() < Duration::from_secs(2));
}

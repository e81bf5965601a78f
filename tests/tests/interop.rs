//! Issue 2, test 5: wire compatibility with Linux. Host 1 runs the kernel's own vxlan device
//! (static neighbour + FDB entries per DESIGN.md's VTEP MAC rule), hosts 2 and 3 run podnet
//! VXLAN with static peers; pods ping in both directions.

use podnet_tests::capture::{self, Capture};
use podnet_tests::parse::ping_summary;
use podnet_tests::{e2e_ready, require_tools, Encap, HostMode, Peers, TestbedBuilder};

#[test]
fn kernel_vxlan_host_and_podnet_vxlan_hosts_ping_both_ways() {
    if !e2e_ready() {
        return;
    }
    require_tools(&["tcpdump"]);
    let tb = TestbedBuilder::new("interop")
        .hosts(3)
        .pods_per_host(2)
        .mode(HostMode::Podnet(Encap::Vxlan))
        .host_mode(1, HostMode::KernelVxlan)
        .peers(Peers::Static)
        .build();
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

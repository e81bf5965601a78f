//! Per-packet VXLAN and IP-in-IP encapsulation and decapsulation of an MTU-sized pod packet.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use podnet_bench::{tcp_packet, NODE_A, NODE_B, VXLAN_MSS};
use podnet_proto::ethernet::MacAddr;
use podnet_proto::vxlan::{self, Vni};
use podnet_proto::{ipip, Ipv4Packet};

/// Headroom reserved in front of a packet read from the TUN.
const HEADROOM: usize = 64;

fn bench(c: &mut Criterion) {
    let inner = tcp_packet(usize::from(VXLAN_MSS), 1, 1);
    let mut buf = vec![0u8; HEADROOM + inner.len()];
    buf[HEADROOM..].copy_from_slice(&inner);
    let (src_mac, dst_mac) = (MacAddr::vtep_for(NODE_A), MacAddr::vtep_for(NODE_B));

    let mut g = c.benchmark_group("encap");
    g.throughput(Throughput::Elements(1));
    g.bench_function("vxlan_encap", |b| {
        b.iter(|| {
            vxlan::encapsulate(
                black_box(&mut buf),
                HEADROOM,
                Vni::default(),
                src_mac,
                dst_mac,
            )
        })
    });
    let start = vxlan::encapsulate(&mut buf, HEADROOM, Vni::default(), src_mac, dst_mac);
    let datagram = buf[start..].to_vec();
    g.bench_function("vxlan_decap", |b| {
        b.iter(|| {
            let d = vxlan::decapsulate(black_box(&datagram)).expect("fixture decapsulates");
            // The inbound path validates the inner packet next.
            Ipv4Packet::new_checked(d.inner)
                .expect("fixture is IPv4")
                .dst()
        })
    });

    g.bench_function("ipip_encap", |b| {
        b.iter(|| {
            ipip::encapsulate(
                black_box(&mut buf),
                HEADROOM,
                inner.len(),
                NODE_A,
                NODE_B,
                7,
            )
            .expect("fixture encapsulates")
        })
    });
    let start = ipip::encapsulate(&mut buf, HEADROOM, inner.len(), NODE_A, NODE_B, 7)
        .expect("fixture encapsulates");
    let outer = buf[start..].to_vec();
    g.bench_function("ipip_decap", |b| {
        b.iter(|| {
            let (src, inner) = ipip::decapsulate(black_box(&outer)).expect("fixture decapsulates");
            (
                src,
                Ipv4Packet::new_checked(inner)
                    .expect("fixture is IPv4")
                    .dst(),
            )
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

//! Segmentation of a 64 KiB TSO super-packet into VXLAN datagrams (what one TUN read turns
//! into before one UDP_SEGMENT send), coalescing of received segments into one TUN write, and
//! the whole receive path of one UDP GRO message (decapsulation and checks, then coalescing).

use std::hint::black_box;
use std::net::Ipv4Addr;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use podnet_bench::{flow_segments, super_packet, MAX_TSO_PAYLOAD, NODE_A, NODE_B, VXLAN_MSS};
use podnet_dataplane::core::drops::Counters;
use podnet_dataplane::core::forward::{Forwarder, Inbound, NodeConfig, RxTally, SendPaths};
use podnet_dataplane::core::table::{Peer, PeerEncap, RouteTable};
use podnet_proto::api::Encap;
use podnet_proto::ethernet::MacAddr;
use podnet_proto::gro::{Coalescer, Span};
use podnet_proto::gso;
use podnet_proto::vxlan::{self, Vni, ENCAP_LEN};

fn segmentation(c: &mut Criterion) {
    let (hdr, packet) = super_packet(MAX_TSO_PAYLOAD, VXLAN_MSS);
    let mut template = [0u8; ENCAP_LEN];
    vxlan::write_header(
        &mut template,
        Vni::default(),
        MacAddr::vtep_for(NODE_A),
        MacAddr::vtep_for(NODE_B),
    );
    let plan = gso::plan(&hdr, &packet, ENCAP_LEN).expect("fixture segments");
    let mut out = vec![0u8; plan.total_len()];

    let mut g = c.benchmark_group("gso");
    g.throughput(Throughput::Bytes(packet.len() as u64));
    g.bench_function(format!("64KiB_to_{}_vxlan_segments", plan.count), |b| {
        b.iter(|| {
            gso::segment(
                &hdr,
                black_box(&packet),
                ENCAP_LEN,
                &mut out,
                |prefix, _| prefix.copy_from_slice(&template),
            )
            .expect("fixture segments")
        })
    });
    // The data path's form: headers only, the payload read for the checksums but not copied.
    let mut headers = vec![0u8; plan.count * 256];
    g.bench_function(
        format!("64KiB_to_{}_vxlan_segment_headers", plan.count),
        |b| {
            b.iter(|| {
                gso::segment_headers(&hdr, black_box(&packet), &template, &mut headers)
                    .expect("fixture segments")
            })
        },
    );
    g.finish();
}

fn coalescing(c: &mut Criterion) {
    const SEGMENTS: usize = 44;
    let segs = flow_segments(SEGMENTS, VXLAN_MSS);
    let bytes: usize = segs.iter().map(Vec::len).sum();
    let mut co = Coalescer::new();

    let mut g = c.benchmark_group("gro");
    g.throughput(Throughput::Bytes(bytes as u64));
    g.bench_function(format!("{SEGMENTS}_segments_to_one_write"), |b| {
        b.iter(|| {
            let mut writes = 0usize;
            for (i, s) in segs.iter().enumerate() {
                co.push(black_box(&segs), Span::whole(i, s.len()), |w| {
                    writes += black_box(w).len()
                });
            }
            co.flush(&segs, |w| writes += black_box(w).len());
            writes
        })
    });
    g.finish();
}

/// The whole receive path of one UDP GRO message, short of the TUN write: 44 VXLAN datagrams
/// (one 64 KiB train) decapsulated and checked by the forwarder, then coalesced.
fn receive_path(c: &mut Criterion) {
    const SEGMENTS: usize = 44;
    let (vni, pod_b) = (Vni::default(), "10.244.2.0/24".parse().expect("CIDR"));
    let peers = vec![
        Peer {
            node: "a".into(),
            underlay_ip: NODE_A,
            vtep_mac: MacAddr::vtep_for(NODE_A),
            pod_cidr: "10.244.1.0/24".parse().expect("CIDR"),
            encap: PeerEncap::Vxlan,
        },
        Peer {
            node: "b".into(),
            underlay_ip: NODE_B,
            vtep_mac: MacAddr::vtep_for(NODE_B),
            pod_cidr: pod_b,
            encap: PeerEncap::Vxlan,
        },
    ];
    let table = RouteTable::build(1, peers).expect("table");
    let fwd = Forwarder::new(
        NodeConfig {
            node: "b".into(),
            underlay_ip: NODE_B,
            vtep_mac: MacAddr::vtep_for(NODE_B),
            pod_cidr: pod_b,
            cluster_cidr: "10.244.0.0/16".parse().expect("CIDR"),
            encap: Encap::Vxlan,
            vni,
            mtu: 1450,
            send: SendPaths::all(1450, 1500),
            icmp_source: Ipv4Addr::new(10, 244, 0, 254),
        },
        Arc::new(Counters::new()),
    );
    // The datagrams back to back, as one recvmmsg with UDP_GRO hands them over.
    let (src_mac, dst_mac) = (MacAddr::vtep_for(NODE_A), MacAddr::vtep_for(NODE_B));
    let mut train = Vec::new();
    for seg in flow_segments(SEGMENTS, VXLAN_MSS) {
        let mut d = vec![0u8; vxlan::ENCAP_LEN];
        d.extend_from_slice(&seg);
        vxlan::encapsulate(&mut d, vxlan::ENCAP_LEN, vni, src_mac, dst_mac);
        train.extend_from_slice(&d);
    }
    let step = vxlan::ENCAP_LEN + usize::from(VXLAN_MSS) + 20 + podnet_bench::TCP_LEN;
    let bufs = [train];
    let mut co = Coalescer::new();

    let mut g = c.benchmark_group("rx");
    g.throughput(Throughput::Bytes(bufs[0].len() as u64));
    g.bench_function(
        format!("{SEGMENTS}_vxlan_datagrams_decap_and_coalesce"),
        |b| {
            b.iter(|| {
                let mut writes = 0usize;
                let mut tally = RxTally::default();
                for (i, d) in bufs[0].chunks(step).enumerate() {
                    let verdict =
                        fwd.inbound_vxlan_tallied(&table, NODE_A, black_box(d), &mut tally);
                    if let Inbound::Deliver(inner) = verdict {
                        let start = i * step + (d.len() - inner.len());
                        let at = Span {
                            buf: 0,
                            start,
                            end: start + inner.len(),
                        };
                        co.push(&bufs, at, |_| writes += 1);
                    }
                }
                tally.commit(&fwd, &table);
                co.flush(&bufs, |_| writes += 1);
                assert_eq!(writes, 1, "one write per train");
                writes
            })
        },
    );
    g.finish();
}

criterion_group!(benches, segmentation, coalescing, receive_path);
criterion_main!(benches);

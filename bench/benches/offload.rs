//! Segmentation of a 64 KiB TSO super-packet into VXLAN datagrams (what one TUN read turns
//! into before one UDP_SEGMENT send) and coalescing of received segments into one TUN write.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use podnet_bench::{flow_segments, super_packet, MAX_TSO_PAYLOAD, NODE_A, NODE_B, VXLAN_MSS};
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

criterion_group!(benches, segmentation, coalescing);
criterion_main!(benches);

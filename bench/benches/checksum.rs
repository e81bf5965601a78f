//! Internet checksum throughput over an MTU-sized packet and a 64 KiB TSO super-packet.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use podnet_proto::checksum;

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("checksum");
    for len in [1500usize, 65535] {
        let data: Vec<u8> = (0..len).map(|i| (i * 31 + 7) as u8).collect();
        g.throughput(Throughput::Bytes(len as u64));
        g.bench_function(format!("{len}B"), |b| {
            b.iter(|| checksum::checksum(black_box(&data)))
        });
        // The same bytes starting at an odd address (unaligned loads).
        g.bench_function(format!("{len}B_unaligned"), |b| {
            let mut v = vec![0u8; len + 1];
            v[1..].copy_from_slice(&data);
            b.iter(|| checksum::checksum(black_box(&v[1..])))
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

//! Longest-prefix-match lookups in tables of 1k and 100k routes.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use podnet_bench::{lookup_addrs, routes};
use podnet_dataplane::core::lpm::Lpm;

/// Lookups per iteration: a batch the size of a receive batch times a few.
const LOOKUPS: usize = 1024;

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("lpm");
    g.throughput(Throughput::Elements(LOOKUPS as u64));
    for n in [1_000usize, 100_000] {
        let table = routes(n);
        let mut lpm = Lpm::new();
        for (net, v) in &table {
            lpm.insert(*net, *v);
        }
        let addrs = lookup_addrs(&table, LOOKUPS);
        g.bench_function(format!("lookup_{n}_routes"), |b| {
            b.iter(|| {
                let mut hits = 0u32;
                for a in &addrs {
                    if let Some(v) = lpm.lookup(black_box(*a)) {
                        hits = hits.wrapping_add(*v);
                    }
                }
                hits
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

//! Control-plane load generator (`scripts/bench-control` runs it).
//!
//! Simulates `--nodes` agents against one or more podnet-control replicas (`--control
//! URL,URL,...`, spread round-robin): each registers, then renews its lease at a third of the
//! TTL (the agents' default interval), and holds a watch stream. Measured:
//! - cold start: from the first registration until all are acknowledged;
//! - heartbeats: every renewal in the measuring window, its latency and how many per second;
//! - fan-out: `--probes` nodes are added and removed during the window, one at a time, and
//!   for each change the time from its request until each watcher saw it;
//! - the RSS of each `--pid` (the replicas) at the end.
//!
//! Prints one JSON object on stdout.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use podnet_control::api::{Encap, EventType, RegisterRequest};
use podnet_control::Client;
use tokio::sync::{mpsc, Semaphore};

#[derive(Parser)]
#[command(about = "podnet-control load generator")]
struct Args {
    /// Replica URLs, comma-separated; simulated nodes are spread over them.
    #[arg(long)]
    control: String,
    #[arg(long, default_value_t = 5000)]
    nodes: usize,
    /// Registrations in flight at once during the cold start.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Changes (an add, then its remove) made during the measuring window.
    #[arg(long, default_value_t = 5)]
    probes: usize,
    /// How long heartbeats are measured, after the cold start and the watches are up.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    window: Duration,
    /// Processes whose RSS is reported (the replicas).
    #[arg(long, value_delimiter = ',')]
    pid: Vec<u32>,
}

/// Simulated node i's underlay address, from 198.19.0.0/16 (inside 198.18.0.0/15).
fn underlay(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 19, (i / 250) as u8, (i % 250 + 1) as u8)
}

fn request(i: usize) -> RegisterRequest {
    RegisterRequest {
        wireguard_public_key: None,
        underlay_ip: underlay(i),
        encap: Encap::Vxlan,
        vtep_mac: None,
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// What one watcher saw: (probe name, event kind, when).
type Seen = (String, EventType, Instant);

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), String> {
    let args = Args::parse();
    let clients: Vec<Client> = args
        .control
        .split(',')
        .map(|url| Client::new(url, None).map_err(|e| e.to_string()))
        .collect::<Result<_, _>>()?;
    let client_of = |i: usize| clients[i % clients.len()].clone();

    // Cold start: every node registers, then keeps renewing from then on.
    let measuring = Arc::new(AtomicBool::new(false));
    let renewals: Arc<Mutex<Vec<f64>>> = Arc::default();
    let renew_errors = Arc::new(AtomicU64::new(0));
    let gate = Arc::new(Semaphore::new(args.concurrency));
    let (acked_tx, mut acked_rx) = mpsc::unbounded_channel::<Result<u64, String>>();
    let started = Instant::now();
    for i in 0..args.nodes {
        let (client, gate, acked) = (client_of(i), gate.clone(), acked_tx.clone());
        let (measuring, renewals, errors) =
            (measuring.clone(), renewals.clone(), renew_errors.clone());
        tokio::spawn(async move {
            let name = format!("sim-{i}");
            let req = request(i);
            let lease = {
                let _permit = gate.acquire().await;
                match client.register_with_retry(&name, &req).await {
                    Ok(lease) => lease,
                    Err(e) => {
                        let _ = acked.send(Err(format!("{name}: {e}")));
                        return;
                    }
                }
            };
            let _ = acked.send(Ok(lease.revision));
            drop(acked);
            let period = Duration::from_millis(lease.lease_ttl_ms / 3);
            // Spread the renewals over the period, as independently started agents would be.
            tokio::time::sleep(period.mul_f64(fastrand::f64())).await;
            let mut tick = tokio::time::interval(period);
            loop {
                tick.tick().await;
                let t = Instant::now();
                let ok = client.register(&name, &req).await.is_ok();
                if measuring.load(Ordering::Relaxed) {
                    if ok {
                        let ms = t.elapsed().as_secs_f64() * 1e3;
                        renewals.lock().unwrap().push(ms);
                    } else {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        });
    }
    drop(acked_tx);
    let mut acked = 0;
    while let Some(r) = acked_rx.recv().await {
        r?;
        acked += 1;
    }
    let cold_start = started.elapsed();
    eprintln!("{acked} nodes registered in {cold_start:?}");

    // One watch per simulated node, each from the revision its replica listed (one list per
    // replica: an agent lists once when it starts, and the start is not what is measured).
    let mut revisions = Vec::new();
    for client in &clients {
        let list = client.list().await.map_err(|e| e.to_string())?;
        revisions.push(list.revision);
    }
    let (seen_tx, mut seen_rx) = mpsc::unbounded_channel::<Seen>();
    let ready = Arc::new(AtomicU64::new(0));
    let watch_start = Instant::now();
    for i in 0..args.nodes {
        let (client, seen, ready) = (client_of(i), seen_tx.clone(), ready.clone());
        let since = revisions[i % clients.len()];
        tokio::spawn(async move {
            let Ok(mut stream) = client.watch_stream(Some(since)).await else {
                return;
            };
            ready.fetch_add(1, Ordering::Relaxed);
            while let Ok(Some(ev)) = stream.next_event().await {
                if ev.node.name.starts_with("probe-") {
                    let _ = seen.send((ev.node.name, ev.kind, Instant::now()));
                }
            }
        });
    }
    drop(seen_tx);
    let deadline = Instant::now() + Duration::from_secs(120);
    while (ready.load(Ordering::Relaxed) as usize) < args.nodes && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let watchers = ready.load(Ordering::Relaxed) as usize;
    eprintln!("{watchers} watches open in {:?}", watch_start.elapsed());

    // The window: heartbeats measured while probes come and go.
    measuring.store(true, Ordering::Relaxed);
    let window_start = Instant::now();
    let mut changes: Vec<(String, EventType, Instant)> = Vec::new();
    let gap = args.window / (2 * args.probes.max(1) as u32 + 1);
    let writer = clients[0].clone();
    for k in 0..args.probes {
        let name = format!("probe-{k}");
        tokio::time::sleep(gap).await;
        let t = Instant::now();
        writer
            .register(&name, &request(args.nodes + k))
            .await
            .map_err(|e| format!("{name}: {e}"))?;
        changes.push((name.clone(), EventType::Added, t));
        tokio::time::sleep(gap).await;
        let t = Instant::now();
        writer
            .delete(&name, true)
            .await
            .map_err(|e| format!("{name}: {e}"))?;
        changes.push((name, EventType::Deleted, t));
    }
    let rest = args.window.saturating_sub(window_start.elapsed());
    tokio::time::sleep(rest).await;
    measuring.store(false, Ordering::Relaxed);
    let window = window_start.elapsed();
    // Late deliveries still count, up to 5 s after the window.
    tokio::time::sleep(Duration::from_secs(5)).await;

    let mut seen: HashMap<(String, EventType), Vec<Instant>> = HashMap::new();
    while let Ok((name, kind, at)) = seen_rx.try_recv() {
        seen.entry((name, kind)).or_default().push(at);
    }
    let mut fanout: Vec<f64> = Vec::new();
    let mut saw_min = usize::MAX;
    for (name, kind, t) in &changes {
        let arrivals = seen.remove(&(name.clone(), *kind)).unwrap_or_default();
        saw_min = saw_min.min(arrivals.len());
        fanout.extend(
            arrivals
                .iter()
                .map(|a| a.saturating_duration_since(*t).as_secs_f64() * 1e3),
        );
    }
    fanout.sort_by(f64::total_cmp);
    let mut beats = renewals.lock().unwrap().clone();
    beats.sort_by(f64::total_cmp);
    let rss: Vec<Option<u64>> = args.pid.iter().map(|&p| rss_kib(p)).collect();
    let out = serde_json::json!({
        "nodes": args.nodes,
        "replicas": clients.len(),
        "cold_start_s": cold_start.as_secs_f64(),
        "watchers": watchers,
        "fanout_ms": {
            "changes": changes.len(),
            "p50": percentile(&fanout, 50.0),
            "p99": percentile(&fanout, 99.0),
            "max": fanout.last().copied().unwrap_or(f64::NAN),
            "min_watchers_reached": if changes.is_empty() { 0 } else { saw_min },
        },
        "heartbeats": {
            "window_s": window.as_secs_f64(),
            "count": beats.len(),
            "per_s": beats.len() as f64 / window.as_secs_f64(),
            "p50_ms": percentile(&beats, 50.0),
            "p99_ms": percentile(&beats, 99.0),
            "errors": renew_errors.load(Ordering::Relaxed),
        },
        "rss_kib": rss,
    });
    println!("{out}");
    Ok(())
}

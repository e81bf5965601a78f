//! `podnet-agent`: run the node agent, or query a running one.

use std::process::ExitCode;

use clap::Parser;
use podnet_dataplane::agent::admin::DropsBody;
use podnet_dataplane::agent::admin_client;
use podnet_dataplane::cli::{ApiArgs, Cli, Command, DropsArgs};
use podnet_dataplane::core::why;

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let result = match cli.command {
        Command::Run(args) => args
            .validate()
            .map_err(|e| e.to_string())
            .and_then(|cfg| podnet_dataplane::agent::run(cfg).map_err(|e| e.to_string())),
        Command::Status(a) => query(&a, "/status", admin_client::format_status),
        Command::Routes(a) => query(&a, "/routes", admin_client::format_routes),
        Command::Why(w) => {
            let path = match w.query() {
                Ok(path) => path,
                Err(e) => {
                    eprintln!("podnet-agent: error: {e}");
                    return ExitCode::FAILURE;
                }
            };
            query(&w.api, &path, |v| {
                match serde_json::from_value::<why::Answer>(v.clone()) {
                    Ok(a) => why::format(&a),
                    Err(e) => format!("unexpected answer from the agent: {e}\n{v}\n"),
                }
            })
        }
        Command::Drops(d) => drops(&d),
        Command::WireguardKey(k) => podnet_dataplane::wireguard::Keys::load_or_create(&k.state_dir)
            .map(|keys| println!("{}", keys.public()))
            .map_err(|e| e.to_string()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("podnet-agent: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn query(a: &ApiArgs, path: &str, format: fn(&serde_json::Value) -> String) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let v = rt
        .block_on(admin_client::fetch(a.api, path))
        .map_err(|e| e.to_string())?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    } else {
        print!("{}", format(&v));
    }
    Ok(())
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())
}

async fn fetch_drops(a: &ApiArgs, since: u64, policy_since: u64) -> Result<DropsBody, String> {
    let v = admin_client::fetch(
        a.api,
        &format!("/drops?since={since}&policy_since={policy_since}"),
    )
    .await
    .map_err(|e| e.to_string())?;
    serde_json::from_value(v).map_err(|e| format!("unexpected answer from the agent: {e}"))
}

/// `podnet-agent drops [--watch]`: the samples still in the ring, or every new one as it comes.
fn drops(d: &DropsArgs) -> Result<(), String> {
    use std::io::Write as _;
    let rt = runtime()?;
    rt.block_on(async {
        let first = fetch_drops(&d.api, 0, 0).await?;
        if !d.watch {
            if d.api.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&first).unwrap_or_default()
                );
            } else {
                for row in &first.samples {
                    println!("{}", admin_client::format_drop(row));
                }
                for denial in &first.policy {
                    println!("{}", admin_client::format_denial(denial));
                }
                println!(
                    "{} drops counted, {} sampled; {} packets dropped by the kernel at full \
                     receive sockets",
                    first.drops_total, first.sampled_total, first.receive_overflow
                );
            }
            return Ok(());
        }
        let deadline = d.duration.map(|t| tokio::time::Instant::now() + t);
        let mut policy_since = first.policy_last_seq;
        let (mut since, mut total, mut sampled, mut overflow) = (
            first.last_seq,
            first.drops_total,
            first.sampled_total,
            first.receive_overflow,
        );
        if !d.api.json {
            println!(
                "watching drops on {} (sampled, at most {} per reason per second; packets \
                 network policy denies, at most {} per direction per second)",
                d.api.api,
                podnet_dataplane::core::dropwatch::RATE_PER_S,
                podnet_dataplane::core::policy_table::SAMPLES_PER_S
            );
        }
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(200));
        loop {
            tick.tick().await;
            if deadline.is_some_and(|t| tokio::time::Instant::now() >= t) {
                return Ok(());
            }
            let body = fetch_drops(&d.api, since, policy_since).await?;
            for denial in &body.policy {
                if d.api.json {
                    println!("{}", serde_json::to_string(denial).unwrap_or_default());
                } else {
                    println!("{}", admin_client::format_denial(denial));
                }
            }
            policy_since = body.policy_last_seq;
            for row in &body.samples {
                if d.api.json {
                    println!("{}", serde_json::to_string(row).unwrap_or_default());
                } else {
                    println!("{}", admin_client::format_drop(row));
                }
            }
            // Drops that the rate limit (or a full ring) kept out of the samples.
            let shown = body.samples.len() as u64;
            let skipped = body
                .drops_total
                .saturating_sub(total)
                .saturating_sub(body.sampled_total.saturating_sub(sampled))
                + body
                    .sampled_total
                    .saturating_sub(sampled)
                    .saturating_sub(shown);
            if skipped > 0 && !d.api.json {
                println!("... {skipped} more drops not sampled");
            }
            // Packets the agent never read: no reason, no sample, only the kernel's count.
            let overflowed = body.receive_overflow.saturating_sub(overflow);
            if overflowed > 0 && !d.api.json {
                println!(
                    "... {overflowed} packets dropped by the kernel before the agent read them \
                     (receive sockets full)"
                );
            }
            since = body.last_seq;
            total = body.drops_total;
            sampled = body.sampled_total;
            overflow = body.receive_overflow;
            let _ = std::io::stdout().flush();
        }
    })
}

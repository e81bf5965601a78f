//! `podnet-agent`: run the node agent, or query a running one.

use std::process::ExitCode;

use clap::Parser;
use podnet_dataplane::admin;
use podnet_dataplane::cli::{ApiArgs, Cli, Command};

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
        Command::Status(a) => query(&a, "/status", admin::format_status),
        Command::Routes(a) => query(&a, "/routes", admin::format_routes),
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
        .block_on(admin::fetch(a.api, path))
        .map_err(|e| e.to_string())?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    } else {
        print!("{}", format(&v));
    }
    Ok(())
}

//! `podnet-cni`: the CNI plugin binary (install it as `/opt/cni/bin/podnet`). The protocol and
//! the work are in `podnet_dataplane::cni`; this reads stdin and the environment and prints
//! the answer.

use std::io::Read as _;
use std::process::ExitCode;

use podnet_dataplane::cni::{self, Env};

fn main() -> ExitCode {
    let env = Env::from_process();
    let mut stdin = Vec::new();
    if env.command.as_deref() != Some("VERSION") {
        let _ = std::io::stdin().read_to_end(&mut stdin);
    }
    match cni::run(&env, &stdin) {
        Ok(Some(result)) => {
            println!("{result}");
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err((version, e)) => {
            println!("{}", e.to_json(&version));
            eprintln!("podnet-cni: {} ({})", e.msg, e.details);
            ExitCode::FAILURE
        }
    }
}

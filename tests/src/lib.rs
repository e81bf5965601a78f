//! Test harness: namespaces with a Drop guard, processes stopped by PID, bounded waits.
//!
//! Every end-to-end test builds its own [`Testbed`] (DESIGN.md "Testbed" layout) under a unique
//! namespace prefix, so tests run in parallel and never touch the root namespace. Everything the
//! harness starts or creates is torn down by `Drop`, also when the test panics. Commands run
//! with a timeout, waits have deadlines, traffic is bounded in count and time.

pub mod capture;
pub mod cmd;
pub mod http;
pub mod packages;
pub mod parse;
pub mod process;
pub mod source;
pub mod testbed;
pub mod wait;
pub mod wg;

use std::path::{Path, PathBuf};

pub use cmd::{must, run, Output};
pub use process::Background;
pub use testbed::{
    expected_workers, workers_override, Encap, HostMode, Peers, Pod, Testbed, TestbedBuilder,
};
pub use wait::wait_for;

/// Checks that this process can build testbeds: root, `/dev/net/tun`, the `ip` command.
///
/// Returns `true` when the test should run. When something is missing the test fails with a
/// message saying what, unless `PODNET_E2E=skip` is set (and `CI` is not `true`): then it prints
/// why and returns `false`.
pub fn e2e_ready() -> bool {
    let mut missing = Vec::new();
    if !nix::unistd::Uid::effective().is_root() {
        missing.push("root (CAP_NET_ADMIN to create network namespaces)");
    }
    if !Path::new("/dev/net/tun").exists() {
        missing.push("/dev/net/tun");
    }
    if !tool_exists("ip") {
        missing.push("the `ip` command (iproute2)");
    }
    if !tool_exists("ping") {
        missing.push("the `ping` command (iputils-ping)");
    }
    if missing.is_empty() {
        return true;
    }
    let msg = format!(
        "end-to-end tests need {}; run them as root on Linux (`.ci/run` installs the tools), \
         or set PODNET_E2E=skip to skip them",
        missing.join(", ")
    );
    if std::env::var("PODNET_E2E").as_deref() == Ok("skip") {
        // CI must run them: a skipped end-to-end suite would pass while testing nothing.
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "PODNET_E2E=skip is refused when CI=true: {msg}"
        );
        eprintln!("skipped: {msg}");
        return false;
    }
    panic!("{msg}");
}

/// Panics unless every named tool is listed for the tests in `scripts/packages` (so a test
/// that starts using a new tool fails until the list, which `scripts/test` installs from, has
/// it) and is on PATH (naming the packages `scripts/test` would install).
pub fn require_tools(tools: &[&str]) {
    let items = packages::load();
    let listed = packages::needed_by(&items, "test");
    let unlisted: Vec<&str> = tools
        .iter()
        .copied()
        .filter(|t| !listed.iter().any(|i| i.name == *t))
        .collect();
    assert!(
        unlisted.is_empty(),
        "this test uses {} but scripts/packages does not list it for the feature `test`: add \
         a line (Debian package, features, command) so scripts/test and .ci/run install it",
        unlisted.join(", ")
    );
    let missing: Vec<String> = tools
        .iter()
        .filter(|t| !tool_exists(t))
        .map(|t| {
            let package = listed.iter().find(|i| i.name == *t).map(|i| &i.package);
            format!("{t} ({})", package.expect("checked above"))
        })
        .collect();
    assert!(
        missing.is_empty(),
        "this test needs {} on PATH: scripts/test installs them (apt-get)",
        missing.join(", ")
    );
}

/// Whether `name` is an executable file in a PATH directory.
pub fn tool_exists(name: &str) -> bool {
    which(name).is_some()
}

/// Where `name` is in a PATH directory, as the shell would find it.
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Path of a podnet binary (`podnet-agent`, `podnet-control`).
///
/// `PODNET_BIN_DIR` wins; otherwise the newest of `target/debug` and `target/release` next to
/// this crate (integration tests cannot see another package's `CARGO_BIN_EXE_*`). `scripts/test`
/// builds the binaries before running the tests.
pub fn podnet_bin(name: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os("PODNET_BIN_DIR") {
        let p = PathBuf::from(dir).join(name);
        assert!(p.is_file(), "PODNET_BIN_DIR has no {name}: {}", p.display());
        return p;
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let newest = ["debug", "release"]
        .iter()
        .map(|profile| target.join(profile).join(name))
        .filter_map(|p| {
            let modified = p.metadata().and_then(|m| m.modified()).ok()?;
            Some((modified, p))
        })
        .max();
    match newest {
        Some((_, p)) => p,
        None => panic!(
            "{name} is not built under {}: run `cargo build --bins` (scripts/test does) or set \
             PODNET_BIN_DIR",
            target.display()
        ),
    }
}

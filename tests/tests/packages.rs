//! `scripts/packages` is the one list of what podnet needs: every tool the tests and scripts
//! check for is on it, and the installer in `scripts/lib/packages.sh` reports, refuses and
//! explains as the README says. (The restricted-PATH run of `scripts/testbed up`, which fails
//! when the script uses an unlisted command, is in script.rs.)

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use podnet_tests::packages::{self, needed_by};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Every `.rs` file under `dir`.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The string literals inside each `open` ... `]` or `)` that follows `marker` in `text`.
fn literals_after(text: &str, marker: &str) -> Vec<String> {
    let mut found = Vec::new();
    for (at, _) in text.match_indices(marker) {
        let rest = &text[at + marker.len()..];
        let end = rest.find([']', ')']).unwrap_or(rest.len());
        found.extend(rest[..end].split('"').skip(1).step_by(2).map(str::to_owned));
    }
    found
}

#[test]
fn every_tool_a_test_requires_is_listed_for_the_tests() {
    let items = packages::load();
    let listed: BTreeSet<&str> = needed_by(&items, "test")
        .iter()
        .map(|i| i.name.as_str())
        .collect();
    let mut files = Vec::new();
    rust_files(&repo().join("tests"), &mut files);
    rust_files(&repo().join("bench"), &mut files);
    let mut unlisted = BTreeSet::new();
    let mut seen = 0;
    for file in &files {
        // This scanner's own markers are not tool uses.
        if file.ends_with("tests/packages.rs") {
            continue;
        }
        let text = std::fs::read_to_string(file).unwrap();
        let mut tools = literals_after(&text, "require_tools(&[");
        tools.extend(literals_after(&text, "tool_exists("));
        // A command a test runs directly (`&["iperf3", "-c", ...]`) that this machine has.
        tools.extend(
            argv_heads(&text)
                .into_iter()
                .filter(|t| podnet_tests::which(t).is_some()),
        );
        for tool in tools {
            seen += 1;
            if !listed.contains(tool.as_str()) {
                unlisted.insert(format!("{tool} ({})", file.display()));
            }
        }
    }
    assert!(
        seen > 50,
        "the scan found only {seen} tool uses: is it broken?"
    );
    assert!(
        unlisted.is_empty(),
        "used by tests but not in scripts/packages for `test`: {unlisted:?}"
    );
}

/// The first string of every `&["...", ...]` argv literal that is not a call's first argument
/// (`run(ns, &["ip", ...])`, `tb.start(name, &ns, &["sleep", ...])`; not the subcommands of
/// `s.call(&["up", ...])`).
fn argv_heads(text: &str) -> Vec<String> {
    text.match_indices("&[\"")
        .filter(|(at, _)| text[..*at].trim_end().ends_with(','))
        .filter_map(|(at, _)| {
            let rest = &text[at + 3..];
            rest.find('"').map(|end| rest[..end].to_owned())
        })
        .filter(|t| !t.is_empty() && !t.starts_with('-') && !t.contains(['/', ' ']))
        .collect()
}

#[test]
fn every_command_a_script_checks_for_is_listed() {
    let items = packages::load();
    let listed: BTreeSet<&str> = items.iter().map(|i| i.name.as_str()).collect();
    let mut unlisted = BTreeSet::new();
    let mut seen = 0;
    for script in [
        "scripts/testbed",
        "scripts/test",
        "scripts/bench-iperf",
        "scripts/bench-control",
        "scripts/bench-policy",
        "scripts/ping-hops",
        ".ci/run",
    ] {
        let text = std::fs::read_to_string(repo().join(script)).unwrap();
        for marker in ["command -v ", "type -P "] {
            for (at, _) in text.match_indices(marker) {
                let word: String = text[at + marker.len()..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
                    .collect();
                // `command -v "$c"` loops over a list: its words are checked where they stand.
                // cargo comes with Rust, apt-get is what installs the list, gnuplot is an
                // optional chart tool, and protoc is checked for only to hide it.
                let outside = ["cargo", "cargo-fuzz", "apt-get", "gnuplot", "protoc"];
                if word.is_empty() || outside.contains(&word.as_str()) {
                    continue;
                }
                seen += 1;
                if !listed.contains(word.as_str()) {
                    unlisted.insert(format!("{word} ({script})"));
                }
            }
        }
    }
    assert!(seen > 5, "the scan found only {seen} checks: is it broken?");
    assert!(
        unlisted.is_empty(),
        "checked for but not in scripts/packages: {unlisted:?}"
    );
}

/// Runs bash with `scripts/lib/packages.sh` sourced and `script` after it.
fn with_lib(script: &str, env: &[(&str, &str)]) -> (bool, String) {
    let lib = repo().join("scripts/lib/packages.sh");
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!("source {}; {script}", lib.display()))
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let text = podnet_tests::cmd::printed(&out);
    (out.status.success(), text)
}

/// A list with one package this machine has (bash) and one it cannot have.
fn fake_list(dir: &Path) -> String {
    let list = dir.join("packages");
    std::fs::write(
        &list,
        "# test list\nbash  f1  bash\npodnet-no-such-pkg  f1,f2  podnet-no-such-tool /no/such/file\n",
    )
    .unwrap();
    list.display().to_string()
}

#[test]
fn the_report_names_what_is_here_and_what_would_be_installed() {
    let dir = tempfile::tempdir().unwrap();
    let list = fake_list(dir.path());
    let (ok, text) = with_lib("report_packages who f1", &[("PODNET_PACKAGES", &list)]);
    assert!(ok, "{text}");
    assert!(
        text.contains("bash") && !text.contains("bash(missing)"),
        "{text}"
    );
    assert!(text.contains("podnet-no-such-tool(missing)"), "{text}");
    assert!(text.contains("/no/such/file(missing)"), "{text}");
    assert!(
        text.contains("would install: podnet-no-such-pkg\n"),
        "{text}"
    );
    let (ok, text) = with_lib("report_packages who nothing", &[("PODNET_PACKAGES", &list)]);
    assert!(ok && text.contains("would install: nothing"), "{text}");
}

#[test]
fn no_install_fails_naming_the_packages_and_a_machine_without_apt_names_the_commands() {
    let dir = tempfile::tempdir().unwrap();
    let list = fake_list(dir.path());
    let (ok, text) = with_lib(
        "ensure_packages who f2",
        &[("PODNET_PACKAGES", &list), ("PODNET_NO_INSTALL", "1")],
    );
    assert!(!ok, "{text}");
    assert!(
        text.contains("who: missing podnet-no-such-tool /no/such/file (for f2)")
            && text.contains("apt-get install podnet-no-such-pkg"),
        "{text}"
    );
    // Nothing missing: no install, no error, even with the opt-out.
    let (ok, text) = with_lib(
        "ensure_packages who f3",
        &[("PODNET_PACKAGES", &list), ("PODNET_NO_INSTALL", "1")],
    );
    assert!(ok && text.is_empty(), "{text}");
    // A PATH without apt-get: links to bash and the few commands the library runs.
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    for tool in ["bash", "dirname", "awk", "id"] {
        let target = podnet_tests::which(tool).unwrap();
        std::os::unix::fs::symlink(target, bin.join(tool)).unwrap();
    }
    let (ok, text) = with_lib(
        "ensure_packages who f1",
        &[("PATH", bin.to_str().unwrap()), ("PODNET_PACKAGES", &list)],
    );
    assert!(!ok, "{text}");
    assert!(
        text.contains("this machine has no apt-get")
            && text.contains("podnet-no-such-tool /no/such/file")
            && text.contains("Debian's packages: podnet-no-such-pkg"),
        "{text}"
    );
}

#[test]
fn testbed_deps_reports_per_mode_and_refuses_a_bad_flag_before_anything() {
    let testbed = repo().join("scripts/testbed");
    let run = |args: &[&str]| {
        let out = Command::new(&testbed).args(args).output().unwrap();
        let text = podnet_tests::cmd::printed(&out);
        (out.status.success(), text)
    };
    let (ok, plain) = run(&["deps"]);
    assert!(ok && plain.contains("would install:"), "{plain}");
    assert!(
        plain.contains("iproute2") && !plain.contains("etcd-server"),
        "{plain}"
    );
    let (ok, ha) = run(&["deps", "--ha", "--runtime", "containerd"]);
    assert!(ok, "{ha}");
    for pkg in [
        "etcd-server",
        "etcd-client",
        "containerd",
        "runc",
        "busybox-static",
    ] {
        assert!(ha.contains(pkg), "{pkg} not in: {ha}");
    }
    let (ok, text) = run(&["deps", "--runtime", "docker"]);
    assert!(
        !ok && text.contains("--runtime must be containerd"),
        "{text}"
    );
}

//! The data plane's forwarding core stays pure (STYLE.md, "Sans-IO core, thin shells"): no clock,
//! no lock, no system call, no file or socket. Time is passed in (`Forwarder::tick`,
//! `DropWatch::tick`), and only `sys/` and the agent shell talk to the OS. This test reads the
//! core's sources, however deep (their code, not their unit tests), and fails on the first call
//! that would break that.

use podnet_tests::source::{code, rust_files, workspace};

/// What the core must not do, and why not.
const FORBIDDEN: [(&str, &str); 10] = [
    (
        "Instant::now",
        "reads the clock: take the time as an argument",
    ),
    (
        "SystemTime::now",
        "reads the clock: take the time as an argument",
    ),
    ("Mutex", "locks on the packet path"),
    ("RwLock", "locks on the packet path"),
    ("libc::", "calls the OS: that belongs in sys/"),
    ("std::fs", "touches files: that belongs in the agent shell"),
    ("std::net::UdpSocket", "opens sockets: that belongs in sys/"),
    (
        "std::thread",
        "starts or parks threads: that belongs in the agent shell",
    ),
    ("std::process", "runs processes"),
    ("unsafe", "unsafe code is fenced into sys/"),
];

fn violations(name: &str, text: &str) -> Vec<String> {
    let code = code(text);
    FORBIDDEN
        .iter()
        .filter(|(needle, _)| code.contains(needle))
        .map(|(needle, why)| format!("{name} uses `{needle}`: it {why}"))
        .collect()
}

#[test]
fn the_core_reads_no_clock_takes_no_lock_and_makes_no_system_call() {
    let src = workspace().join("dataplane/src/core");
    let files = rust_files(&src);
    let mut found = Vec::new();
    for path in &files {
        let name = path.strip_prefix(&src).unwrap().display().to_string();
        let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{name}: {e}"));
        found.extend(violations(&name, &text));
    }
    assert!(
        files.len() >= 11,
        "read only {} files of src/core",
        files.len()
    );
    assert!(found.is_empty(), "{}", found.join("\n"));
}

#[test]
fn the_check_sees_what_it_forbids_and_not_tests_or_comments() {
    let bad = "fn f() { let t = std::time::Instant::now(); }\n";
    assert_eq!(violations("x.rs", bad).len(), 1, "a clock read is caught");
    let fine = "// Instant::now is not called here\nfn f() {}\n#[cfg(test)]\nmod tests {\n    fn g() { std::thread::spawn(|| ()); }\n}\n";
    assert!(violations("x.rs", fine).is_empty());
}

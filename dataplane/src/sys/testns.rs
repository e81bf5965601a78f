//! Test support: run a closure on a thread that has entered a fresh network namespace.
//! Also a check shared by the socket tests.
//!
//! `setns(CLONE_NEWNET)` only moves the calling thread, so each test gets its own thread; the
//! namespace is created with `ip netns add` under a unique `pn-h5-...` name and deleted by a
//! Drop guard even when the test panics. Without root the tests fail with a message, unless
//! `PODNET_E2E=skip` is set outside CI.

use std::cell::RefCell;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

static SEQ: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static CURRENT: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Deletes the namespace when dropped.
pub struct NetnsGuard {
    pub name: String,
}

impl Drop for NetnsGuard {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Creates a uniquely named namespace (deleted when the guard drops).
pub fn create(tag: &str) -> NetnsGuard {
    let name = format!(
        "pn-h5-{tag}-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    );
    let st = Command::new("ip")
        .args(["netns", "add", &name])
        .status()
        .unwrap();
    assert!(st.success(), "ip netns add {name} failed");
    NetnsGuard { name }
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Moves the calling thread into namespace `name`.
pub fn enter(name: &str) {
    let f = File::open(format!("/var/run/netns/{name}")).unwrap();
    // SAFETY: f is an open netns file; setns only changes this thread's network namespace.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
    CURRENT.with(|c| *c.borrow_mut() = Some(name.to_string()));
}

/// Runs `f` on a new thread inside a fresh namespace. Without root it fails, saying so, unless
/// `PODNET_E2E=skip` (outside CI) asks to skip the tests that need root.
pub fn in_netns<F: FnOnce() + Send + 'static>(tag: &str, f: F) {
    if !is_root() {
        let skip = std::env::var("PODNET_E2E").as_deref() == Ok("skip")
            && std::env::var("CI").as_deref() != Ok("true");
        assert!(
            skip,
            "{tag} needs root to create network namespaces: run the tests as root, or set \
             PODNET_E2E=skip (outside CI) to skip them"
        );
        eprintln!("skipping {tag}: needs root to create network namespaces (PODNET_E2E=skip)");
        return;
    }
    let guard = create(tag);
    let name = guard.name.clone();
    let res = std::thread::spawn(move || {
        enter(&name);
        f();
    })
    .join();
    drop(guard);
    if let Err(panic) = res {
        std::panic::resume_unwind(panic);
    }
}

/// Runs a shell command inside the current thread's test namespace and returns its stdout;
/// panics with its stderr if it fails.
pub fn run(cmd: &str) -> String {
    let out = try_run(cmd);
    match out {
        Ok(s) => s,
        Err(e) => panic!("`{cmd}` failed: {e}"),
    }
}

/// Like [`run`] but returns stderr as the error.
pub fn try_run(cmd: &str) -> Result<String, String> {
    let ns = CURRENT
        .with(|c| c.borrow().clone())
        .expect("not inside a test netns");
    let out = Command::new("ip")
        .args(["netns", "exec", &ns, "sh", "-c", cmd])
        .output()
        .unwrap();
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// Reads a socket to the end with `read_batch` (one non-blocking batch per call, 0 when nothing
/// is queued) and checks that each of the `sent` packets was either read or counted by
/// `receive_drops`, and that there were some of each.
pub fn assert_read_or_dropped(
    sent: usize,
    mut read_batch: impl FnMut() -> usize,
    receive_drops: impl Fn() -> u64,
) {
    let mut read = 0;
    loop {
        let n = read_batch();
        if n == 0 {
            break;
        }
        read += n;
    }
    let drops = receive_drops() as usize;
    assert!(read > 0 && drops > 0, "read {read}, dropped {drops}");
    assert_eq!(read + drops, sent, "read {read}, dropped {drops}");
}

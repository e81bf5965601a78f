//! Running a command to completion, optionally inside a network namespace, with a timeout.

use std::io::Read;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// What a finished command printed.
#[derive(Debug)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Output {
    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// Stdout followed by stderr, for messages and for matching text printed on either.
    pub fn combined(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

/// What a finished `std::process::Command` printed: stdout followed by stderr, as text.
pub fn printed(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A `Command` for `argv`, wrapped in `ip netns exec NS` when `ns` is given.
pub fn command(ns: Option<&str>, argv: &[&str]) -> Command {
    let (program, args) = argv.split_first().expect("empty argv");
    match ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, program]).args(args);
            c
        }
        None => {
            let mut c = Command::new(program);
            c.args(args);
            c
        }
    }
}

/// Runs `argv` (in netns `ns`) and waits at most `timeout`; a command still running then is
/// killed (by its PID) and reported as an error with what it printed so far.
pub fn run(ns: Option<&str>, argv: &[&str], timeout: Duration) -> Result<Output, String> {
    run_with_stdin(ns, argv, &[], timeout)
}

/// [`run`] with `input` written to the command's stdin (then closed).
pub fn run_with_stdin(
    ns: Option<&str>,
    argv: &[&str],
    input: &[u8],
    timeout: Duration,
) -> Result<Output, String> {
    let what = describe(ns, argv);
    let mut child = command(ns, argv)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{what}: cannot start: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        use std::io::Write as _;
        // A command that does not read its input closes the pipe early: not an error.
        let _ = stdin.write_all(input);
    }
    let out = reader(&mut child, true);
    let err = reader(&mut child, false);
    let start = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if start.elapsed() < timeout => thread::sleep(Duration::from_millis(5)),
            Ok(None) => break None,
            Err(e) => return Err(format!("{what}: wait failed: {e}")),
        }
    };
    let elapsed = start.elapsed();
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let stdout = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    match status {
        Some(status) => Ok(Output {
            status,
            stdout,
            stderr,
            elapsed,
        }),
        None => Err(format!(
            "{what}: still running after {timeout:?}, killed; stdout: {stdout}; stderr: {stderr}"
        )),
    }
}

/// Runs `argv` in `ns` (20 s timeout) and panics unless it exits successfully.
pub fn must(ns: Option<&str>, argv: &[&str]) -> Output {
    let out = run(ns, argv, Duration::from_secs(20)).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        out.success(),
        "{} failed ({}): {}",
        describe(ns, argv),
        out.status,
        out.combined()
    );
    out
}

pub(crate) fn describe(ns: Option<&str>, argv: &[&str]) -> String {
    match ns {
        Some(ns) => format!("[{ns}] {}", argv.join(" ")),
        None => argv.join(" "),
    }
}

fn reader(child: &mut Child, stdout: bool) -> thread::JoinHandle<String> {
    let mut pipe: Box<dyn Read + Send> = if stdout {
        Box::new(child.stdout.take().expect("stdout piped"))
    } else {
        Box::new(child.stderr.take().expect("stderr piped"))
    };
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = pipe.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    })
}

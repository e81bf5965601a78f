//! Background processes (agents, control service, iperf3 servers, tcpdump), stopped by PID.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::cmd::{command, describe};

/// A process started in the background; its stdout and stderr go to a log file.
/// Dropping it stops it (SIGTERM, then SIGKILL after a grace period).
#[derive(Debug)]
pub struct Background {
    pub name: String,
    child: Child,
    log: PathBuf,
    exit: Option<ExitStatus>,
}

impl Background {
    /// Starts `argv` in netns `ns` (`ip netns exec` execs, so the PID is the program's own).
    pub fn start(name: &str, ns: Option<&str>, argv: &[&str], log: &Path) -> Background {
        let file = File::create(log).unwrap_or_else(|e| panic!("create {}: {e}", log.display()));
        let file2 = file.try_clone().expect("clone log file");
        let child = command(ns, argv)
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(file2)
            .spawn()
            .unwrap_or_else(|e| panic!("{}: cannot start: {e}", describe(ns, argv)));
        Background {
            name: name.to_owned(),
            child,
            log: log.to_owned(),
            exit: None,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Everything the process printed so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The exit status if the process has ended (reaping it), `None` while it runs.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            self.exit = self.child.try_wait().ok().flatten();
        }
        self.exit
    }

    pub fn is_running(&mut self) -> bool {
        self.try_exit().is_none()
    }

    /// Waits up to `timeout` for the process to end on its own.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let start = Instant::now();
        loop {
            if let Some(s) = self.try_exit() {
                return Some(s);
            }
            if start.elapsed() >= timeout {
                return None;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `signal` to this process (by PID) if it is still running.
    pub fn signal(&mut self, signal: Signal) {
        if self.is_running() {
            let _ = kill(Pid::from_raw(self.child.id() as i32), signal);
        }
    }

    /// SIGTERM, up to 5 s to exit, then SIGKILL. Returns the exit status.
    pub fn stop(&mut self) -> Option<ExitStatus> {
        self.signal(Signal::SIGTERM);
        if let Some(s) = self.wait_exit(Duration::from_secs(5)) {
            return Some(s);
        }
        self.kill9()
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) -> Option<ExitStatus> {
        self.signal(Signal::SIGKILL);
        self.wait_exit(Duration::from_secs(5))
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        self.stop();
    }
}

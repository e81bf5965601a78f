//! The processes a testbed starts, each with its log, stopped by PID.

use std::time::Duration;

use nix::sys::signal::Signal;

use super::namespaces::Testbed;
use crate::process::Background;
use crate::wait::wait_for;

impl Testbed {
    /// Starts `argv` in `ns` in the background under `name` (logs in the testbed dir).
    pub fn start(&mut self, name: &str, ns: &str, argv: &[&str]) {
        if let Some(mut old) = self.procs.remove(name) {
            old.stop();
        }
        let log = self.path(&format!("{name}.log"));
        let p = Background::start(name, Some(ns), argv, &log);
        self.procs.insert(name.to_owned(), p);
    }

    pub fn proc(&mut self, name: &str) -> &mut Background {
        self.procs
            .get_mut(name)
            .unwrap_or_else(|| panic!("no process {name}"))
    }

    /// Stops (SIGTERM, then SIGKILL) and forgets process `name`.
    pub fn stop(&mut self, name: &str) -> Option<std::process::ExitStatus> {
        self.procs.remove(name).and_then(|mut p| p.stop())
    }

    /// SIGKILLs process `name` but keeps it (for its log).
    pub fn kill9(&mut self, name: &str) {
        self.proc(name).signal(Signal::SIGKILL);
        self.proc(name).wait_exit(Duration::from_secs(5));
    }

    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.path(&format!("{name}.log"))).unwrap_or_default()
    }

    /// The first finished line of process `name`'s log that starts with `prefix`. A line the
    /// process is still writing has no newline yet, and reading it would cut it short.
    pub fn finished_line(&self, name: &str, prefix: &str) -> Option<String> {
        self.log(name)
            .split_inclusive('\n')
            .find_map(|l| l.strip_suffix('\n').filter(|l| l.starts_with(prefix)))
            .map(str::to_owned)
    }

    /// [`Testbed::start`], then waits up to `timeout` for `ready` to appear in the process's
    /// log (a server saying it listens); the error carries the log.
    pub fn start_ready(
        &mut self,
        name: &str,
        ns: &str,
        argv: &[&str],
        ready: &str,
        timeout: Duration,
    ) -> Result<(), String> {
        self.start(name, ns, argv);
        wait_for(&format!("{name} to print {ready:?}"), timeout, || {
            let log = self.log(name);
            if log.contains(ready) {
                Ok(())
            } else {
                Err(log)
            }
        })
    }
}
